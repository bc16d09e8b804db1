// One launch of an attention kernel with dynamic shared memory; shared by the forward and
// backward launch templates (nvcc only: it uses <<<>>>).
#pragma once

#include "../common/cuda_check.h"

namespace fastattn {
namespace flash {

// Opts in to more than the 48 KiB default of dynamic shared memory when the kernel needs it.
template <typename Params>
cudaError_t launch_with_dynamic_smem(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes,
                                     cudaStream_t stream, const Params& params) {
  if (smem_bytes >= 48 * 1024) {
    FASTATTN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  FASTATTN_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace flash
}  // namespace fastattn
