// Launches of the backward kernels for one (dtype, head-dim bucket, dropout) configuration.
// Included only by the generated instantiation files (instantiations/flash_bwd_*.cu).
#pragma once

#include "../common/cuda_check.h"
#include "flash_launch.h"
#include "flash_bwd_kernel.cuh"
#include "flash_params.h"

namespace fastattn {
namespace flash {

// Grid y = (kv head, split of its group's query heads); bwd_num_splits sized it with the same block.
template <typename Tr>
cudaError_t launch_flash_bwd_dkdv(const FlashBwdParams& params, cudaStream_t stream) {
  static_assert(Tr::kBlockN == bwd_dkdv_block_n(Tr::kHeadDim), "bwd_num_splits assumes this key block");
  const dim3 grid((params.seqlen_k + Tr::kBlockN - 1) / Tr::kBlockN, params.nheads_kv * params.num_splits,
                  params.batch);
  return launch_with_dynamic_smem(&flash_bwd_dkdv_kernel<Tr>, grid, Tr::kNThreads, Tr::kSmemBytes, stream, params);
}

template <typename Tr>
cudaError_t launch_flash_bwd_dq(const FlashBwdParams& params, cudaStream_t stream) {
  const dim3 grid((params.seqlen_q + Tr::kBlockM - 1) / Tr::kBlockM, params.nheads, params.batch);
  return launch_with_dynamic_smem(&flash_bwd_dq_kernel<Tr>, grid, Tr::kNThreads, Tr::kSmemBytes, stream, params);
}

// dK/dV (and, non-deterministic, dQ through atomics) then, deterministic, the dQ kernel.
// Expects delta from run_flash_bwd_preprocess_ and, non-deterministic, a zeroed dq_accum; with
// num_splits > 1 leaves dK / dV partials for run_flash_bwd_reduce_dkdv_.
template <typename T, int kHeadDim, bool kIsDropout>
cudaError_t run_flash_bwd_(const FlashBwdParams& params, cudaStream_t stream) {
  if (params.deterministic) {
    FASTATTN_CUDA_TRY((launch_flash_bwd_dkdv<BwdDkdvTraitsFor<T, kHeadDim, kIsDropout, false>>(params, stream)));
    return launch_flash_bwd_dq<BwdDqTraitsFor<T, kHeadDim, kIsDropout>>(params, stream);
  }
  return launch_flash_bwd_dkdv<BwdDkdvTraitsFor<T, kHeadDim, kIsDropout, true>>(params, stream);
}

template <typename T>
cudaError_t run_flash_bwd_preprocess_(const FlashBwdParams& params, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.nheads;
  const dim3 grid(static_cast<unsigned>((rows + kPreprocessWarps - 1) / kPreprocessWarps));
  flash_bwd_preprocess_kernel<T><<<grid, kPreprocessWarps * 32, 0, stream>>>(params);
  FASTATTN_LAUNCH_CHECK();
  return cudaSuccess;
}

template <typename T>
cudaError_t run_flash_bwd_reduce_dkdv_(const FlashBwdParams& params, cudaStream_t stream) {
  flash_bwd_reduce_dkdv_kernel<T><<<reduce_dkdv_blocks(params), kReduceThreads, 0, stream>>>(params);
  FASTATTN_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace flash
}  // namespace fastattn
