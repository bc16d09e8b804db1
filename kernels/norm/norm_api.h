// Entry points of the norm kernels for the host glue (csrc/norm.cpp). Plain C++, no torch.
//
// Backward protocol: fill NormBwdParams, call norm_bwd_partial_rows() to size the fp32
// workspace (2 x rows x N when there is a weight and a bias), set partial_* and partial_rows,
// then run_norm_bwd() (row kernel + deterministic column reduction).
#pragma once

#include <cuda_runtime_api.h>

#include "norm_params.h"

namespace fastattn {

cudaError_t run_norm_fwd(const NormFwdParams& params, cudaStream_t stream);

// Rows of partial sums the backward writes for these params on the current device (0 when
// there is neither weight nor bias).
cudaError_t norm_bwd_partial_rows(const NormBwdParams& params, int* rows);

cudaError_t run_norm_bwd(const NormBwdParams& params, cudaStream_t stream);

// Per-dtype implementations, defined in the generated norm_{fwd,bwd}_<dtype>.cu files.
template <typename T>
cudaError_t run_norm_fwd_impl(const NormFwdParams& params, cudaStream_t stream);
template <typename T>
cudaError_t norm_bwd_partial_rows_impl(const NormBwdParams& params, int* rows);
template <typename T>
cudaError_t run_norm_bwd_impl(const NormBwdParams& params, cudaStream_t stream);

}  // namespace fastattn
