// Launch templates: pick a kernel shape from the hidden size and alignment, size the grid,
// launch. Included only by the per-dtype instantiation files (norm_fwd_*.cu, norm_bwd_*.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "../common/cuda_check.h"
#include "norm_api.h"
#include "norm_shapes.h"

namespace fastattn {

// Blocks of the persistent backward grid: enough to fill every SM once at full occupancy,
// never more than there are row groups.
template <typename T, typename Shape>
cudaError_t bwd_grid_blocks(const NormBwdParams& p, int* blocks) {
  using K = NormKernels<T, Shape>;
  int device = 0, sms = 0, per_sm = 0;
  FASTATTN_CUDA_TRY(cudaGetDevice(&device));
  FASTATTN_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  FASTATTN_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, K::bwd(), Shape::kThreads, 0));
  const int64_t row_groups = (p.rows + K::kRowsPerCta - 1) / K::kRowsPerCta;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *blocks = static_cast<int>(row_groups < resident ? row_groups : resident);
  return cudaSuccess;
}

template <typename T>
cudaError_t run_norm_fwd_impl(const NormFwdParams& p, cudaStream_t stream) {
  return with_fwd_shape<T>(p, [&](auto shape) -> cudaError_t {
    using Shape = decltype(shape);
    using K = NormKernels<T, Shape>;
    const int64_t blocks = (p.rows + K::kRowsPerCta - 1) / K::kRowsPerCta;
    K::fwd()<<<static_cast<unsigned>(blocks), Shape::kThreads, 0, stream>>>(p);
    FASTATTN_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

template <typename T>
cudaError_t norm_bwd_partial_rows_impl(const NormBwdParams& p, int* rows) {
  return with_bwd_shape<T>(p, [&](auto shape) -> cudaError_t {
    using Shape = decltype(shape);
    int blocks = 0;
    FASTATTN_CUDA_TRY((bwd_grid_blocks<T, Shape>(p, &blocks)));
    *rows = blocks * NormKernels<T, Shape>::kRowsPerCta;
    return cudaSuccess;
  });
}

template <typename T>
cudaError_t run_norm_bwd_impl(const NormBwdParams& p, cudaStream_t stream) {
  return with_bwd_shape<T>(p, [&](auto shape) -> cudaError_t {
    using Shape = decltype(shape);
    using K = NormKernels<T, Shape>;
    int blocks = 0;
    FASTATTN_CUDA_TRY((bwd_grid_blocks<T, Shape>(p, &blocks)));
    const bool partials = p.partial_dweight != nullptr || p.partial_dbias != nullptr;
    if (partials && p.partial_rows != blocks * K::kRowsPerCta) return cudaErrorInvalidValue;
    K::bwd()<<<blocks, Shape::kThreads, 0, stream>>>(p);
    FASTATTN_LAUNCH_CHECK();
    return cudaSuccess;
  });
}

}  // namespace fastattn
