// Dtype dispatch of the norm entry points and the weight/bias gradient reduction. The row
// kernels are instantiated in the generated norm_{fwd,bwd}_<dtype>.cu files.
#include "../common/cuda_check.h"
#include "../common/static_switch.h"
#include "norm_api.h"
#include "norm_bwd_kernel.cuh"

namespace fastattn {

cudaError_t run_norm_fwd(const NormFwdParams& params, cudaStream_t stream) {
  if (params.rows == 0) return cudaSuccess;
  return DTYPE_SWITCH(params.dtype, T, [&] { return run_norm_fwd_impl<T>(params, stream); });
}

cudaError_t norm_bwd_partial_rows(const NormBwdParams& params, int* rows) {
  *rows = 0;
  if (params.rows == 0 || (params.dweight == nullptr && params.dbias == nullptr)) return cudaSuccess;
  return DTYPE_SWITCH(params.dtype, T, [&] { return norm_bwd_partial_rows_impl<T>(params, rows); });
}

cudaError_t run_norm_bwd(const NormBwdParams& params, cudaStream_t stream) {
  if (params.rows == 0) return cudaSuccess;
  FASTATTN_CUDA_TRY(DTYPE_SWITCH(params.dtype, T, [&] { return run_norm_bwd_impl<T>(params, stream); }));
  if (params.partial_dweight == nullptr && params.partial_dbias == nullptr) return cudaSuccess;
  constexpr int kReduceRows = 8;
  const dim3 grid(static_cast<unsigned>((params.cols + 31) / 32), 2);
  const dim3 block(32, kReduceRows);
  _norm_bwd_reduce_kernel<kReduceRows><<<grid, block, 0, stream>>>(params);
  FASTATTN_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace fastattn
