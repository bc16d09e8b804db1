// Launch of the forward kernel for one (dtype, head-dim bucket, dropout) configuration.
// Included only by the generated instantiation files (instantiations/flash_fwd_*.cu).
#pragma once

#include "../common/cuda_check.h"
#include "flash_launch.h"
#include "flash_fwd_kernel.cuh"
#include "flash_params.h"

namespace fastattn {
namespace flash {

template <typename Tr>
cudaError_t launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  const dim3 grid((params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, params.nheads, params.batch);
  return launch_with_dynamic_smem(&flash_fwd_kernel<Tr>, grid, Tr::kNThreads, Tr::kSmemBytes, stream, params);
}

template <typename T, int kHeadDim, bool kIsDropout>
cudaError_t run_flash_fwd_(const FlashFwdParams& params, cudaStream_t stream) {
  return launch_flash_fwd<FwdTraitsFor<T, kHeadDim, kIsDropout>>(params, stream);
}

}  // namespace flash
}  // namespace fastattn
