// Launch of the sm_90a wgmma forward kernel for one (dtype, head-dim bucket). Included only by
// the generated instantiation files (instantiations/flash_fwd_*_sm90.cu).
#pragma once

#include "../common/cuda_check.h"
#include "../common/sm90a_image.h"
#include "flash_fwd_sm90_kernel.cuh"
#include "flash_launch.h"
#include "flash_params.h"

namespace fastattn {
namespace flash {

// The kernel has a body only where it was compiled for sm_90a. When the device runs any other
// image (a 9.0 target without the "a", PTX of an older arch JIT-compiled) this returns
// cudaErrorNoKernelImageForDevice without launching, and the dispatcher falls back to the
// mma.sync kernel.
template <typename Tr>
cudaError_t launch_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream) {
  if (!device_runs_sm90a()) return cudaErrorNoKernelImageForDevice;
  const dim3 grid((params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, params.nheads, params.batch);
  return launch_with_dynamic_smem(&flash_fwd_sm90_kernel<Tr>, grid, Tr::kNThreads, Tr::kSmemBytes, stream, params);
}

template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_sm90_(const FlashFwdParams& params, cudaStream_t stream) {
  return launch_flash_fwd_sm90<FwdSm90TraitsFor<T, kHeadDim>>(params, stream);
}

}  // namespace flash
}  // namespace fastattn
