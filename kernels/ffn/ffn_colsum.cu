// Deterministic column sums for the bias gradients: db1 = sum_m dz[m, :], db2 = sum_m dy[m, :].
//
// Pass 1: block (x, chunk) sums 64 columns over one fixed chunk of rows (8 row lanes, then a
// fixed-order reduction of the lanes) into partial[chunk, :] (fp32). Pass 2: one thread per
// column adds the chunks in order and rounds to the output dtype. No atomics, and the chunking
// depends on M only (ffn_colsum_rows_per_chunk), so results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/cuda_check.h"
#include "ffn_epilogue.cuh"
#include "ffn_params.h"

namespace fastattn {
namespace ffn {

constexpr int kColSumCols = 64;      // columns per partial-sum block (2 per thread)
constexpr int kColSumRowLanes = 8;   // rows read in parallel per block
constexpr int kColSumFinalThreads = 256;

template <typename T>
__global__ void __launch_bounds__(32 * kColSumRowLanes) _ffn_colsum_partial_kernel(const FfnColSumParams p,
                                                                                     int rows_per_chunk) {
  __shared__ float lane_sums[kColSumRowLanes][kColSumCols];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int col = static_cast<int>(blockIdx.x) * kColSumCols + 2 * tx;
  const int row_begin = static_cast<int>(blockIdx.y) * rows_per_chunk;
  const int row_end = min(row_begin + rows_per_chunk, p.M);
  const T* X = static_cast<const T*>(p.X);  // (M, N), row stride ldx
  float s0 = 0.f, s1 = 0.f;
  for (int row = row_begin + ty; row < row_end; row += kColSumRowLanes) {
    const T* x_row = X + row * p.ldx;
    if (col < p.N) s0 += Convert<T>::to_float(x_row[col]);
    if (col + 1 < p.N) s1 += Convert<T>::to_float(x_row[col + 1]);
  }
  lane_sums[ty][2 * tx] = s0;
  lane_sums[ty][2 * tx + 1] = s1;
  __syncthreads();
  if (ty == 0) {
    float t0 = 0.f, t1 = 0.f;
#pragma unroll
    for (int lane = 0; lane < kColSumRowLanes; ++lane) {
      t0 += lane_sums[lane][2 * tx];
      t1 += lane_sums[lane][2 * tx + 1];
    }
    float* partial = p.partial + static_cast<int64_t>(blockIdx.y) * p.N;  // (chunks, N) fp32
    if (col < p.N) partial[col] = t0;
    if (col + 1 < p.N) partial[col + 1] = t1;
  }
}

template <typename T>
__global__ void __launch_bounds__(kColSumFinalThreads) _ffn_colsum_final_kernel(const FfnColSumParams p,
                                                                                 int chunks) {
  const int col = static_cast<int>(blockIdx.x) * kColSumFinalThreads + static_cast<int>(threadIdx.x);
  if (col >= p.N) return;
  float sum = 0.f;
  for (int c = 0; c < chunks; ++c) sum += p.partial[static_cast<int64_t>(c) * p.N + col];
  static_cast<T*>(p.out)[col] = Convert<T>::from_float(sum);  // fp32 -> output dtype
}

namespace {

template <typename T>
cudaError_t launch_colsum(const FfnColSumParams& p, cudaStream_t stream) {
  const int rows_per_chunk = ffn_colsum_rows_per_chunk(p.M);
  const int chunks = ffn_colsum_chunks(p.M);
  if (chunks > 0) {  // M == 0: no partials, the final pass writes zeros
    const dim3 partial_grid((p.N + kColSumCols - 1) / kColSumCols, chunks);
    _ffn_colsum_partial_kernel<T><<<partial_grid, dim3(32, kColSumRowLanes), 0, stream>>>(p, rows_per_chunk);
    FASTATTN_LAUNCH_CHECK();
  }
  _ffn_colsum_final_kernel<T>
      <<<(p.N + kColSumFinalThreads - 1) / kColSumFinalThreads, kColSumFinalThreads, 0, stream>>>(p, chunks);
  FASTATTN_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace

cudaError_t run_ffn_colsum(const FfnColSumParams& params, cudaStream_t stream) {
  if (params.N == 0) return cudaSuccess;
  switch (params.dtype) {
    case DType::kFloat16:
      return launch_colsum<__half>(params, stream);
    case DType::kBFloat16:
      return launch_colsum<__nv_bfloat16>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ffn
}  // namespace fastattn
