// Backward kernels of residual + LayerNorm/RMSNorm.
//
// With xhat = (h - mean) * rstd (RMSNorm: h * rstd) and g = dy * weight:
//   dh_total  = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh      (RMSNorm: no mean(g))
//   dresidual = dh_total;  dx = dh_total * keep / (1 - p)
//   dweight   = sum_rows dy * xhat;  dbias = sum_rows dy
// The weight/bias gradients are deterministic: each row slot of a persistent grid sums its
// rows in a fixed order into its own fp32 row of a workspace, and _norm_bwd_reduce_kernel adds
// those rows in a fixed order. No atomics.
#pragma once

#include <cstdint>

#include "../common/philox.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "norm_params.h"

namespace fastattn {

// xhat and g for kVec elements; also returns dy (for the weight/bias gradients).
template <typename T, int kVec>
__device__ __forceinline__ void norm_bwd_load(const NormBwdParams& p, int64_t row, int64_t col, float mean,
                                              float rstd, float (&xhat)[kVec], float (&g)[kVec],
                                              float (&dy)[kVec]) {
  load_vec<T, kVec>(static_cast<const T*>(p.dy) + row * p.dy_row_stride + col, dy);
  load_vec_dyn<kVec>(p.h, row * p.h_row_stride + col, p.h_dtype, xhat);
#pragma unroll
  for (int i = 0; i < kVec; ++i) xhat[i] = (xhat[i] - mean) * rstd;
  if (p.weight != nullptr) {
    float w[kVec];
    load_vec_dyn<kVec>(p.weight, col, p.weight_dtype, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = dy[i] * w[i];
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) g[i] = dy[i];
  }
}

// dh_total from the row sums, plus the prenorm gradient; writes dresidual and dx.
template <typename T, int kVec>
__device__ __forceinline__ void norm_bwd_store(const NormBwdParams& p, int64_t row, int64_t col, float rstd,
                                               float mean_g, float mean_gx, const float (&xhat)[kVec],
                                               const float (&g)[kVec]) {
  float d[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) d[i] = rstd * (g[i] - mean_g - xhat[i] * mean_gx);
  if (p.dh != nullptr) {
    float dh[kVec];
    load_vec_dyn<kVec>(p.dh, row * p.dh_row_stride + col, p.dh_dtype, dh);
#pragma unroll
    for (int i = 0; i < kVec; ++i) d[i] += dh[i];
  }
  const int64_t out = row * p.cols + col;
  if (p.dresidual != nullptr) store_vec_dyn<kVec>(p.dresidual, out, p.dresidual_dtype, d);
  if (p.dropout) {
    const uint64_t e0 = static_cast<uint64_t>(out);
    if constexpr (kVec % 4 == 0) {
      bool keep[kVec];
      dropout_keep_n<kVec>(p.seed, p.offset, e0, p.dropout_threshold, keep);
#pragma unroll
      for (int i = 0; i < kVec; ++i) d[i] = keep[i] ? d[i] * p.dropout_scale : 0.f;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        d[i] = dropout_keep(p.seed, p.offset, e0 + i, p.dropout_threshold) ? d[i] * p.dropout_scale : 0.f;
      }
    }
  }
  store_vec<T, kVec>(static_cast<T*>(p.dx) + out, d);
}

template <typename T, int kWarpsPerRow, int kRowsPerCta, int kIters>
__global__ void __launch_bounds__(kWarpsPerRow * kRowsPerCta * 32)
    _norm_bwd_reg_kernel(const NormBwdParams p) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreadsPerRow = kWarpsPerRow * 32;
  static_assert(kWarpsPerRow == 1 || kRowsPerCta == 1, "multi-warp rows need one row per block");
  __shared__ float2 smem[kWarpsPerRow];

  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kThreadsPerRow;
  const int64_t slot_stride = static_cast<int64_t>(gridDim.x) * kRowsPerCta;
  const int64_t n = p.cols;
  const int64_t chunks = n / kVec;
  const float inv_n = 1.f / static_cast<float>(n);

  float dw[kIters][kVec];
  float db[kIters][kVec];
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) dw[it][i] = db[it][i] = 0.f;
  }

  // With kWarpsPerRow > 1 every thread of the block walks the same rows (uniform barriers).
  for (int64_t row = slot; row < p.rows; row += slot_stride) {
    const float mean = p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = p.rstd[row];
    float xhat[kIters][kVec];
    float g[kIters][kVec];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + lane;
      if (c < chunks) {
        float dy[kVec];
        norm_bwd_load<T, kVec>(p, row, c * kVec, mean, rstd, xhat[it], g[it], dy);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          sum_g += g[it][i];
          sum_gx += g[it][i] * xhat[it][i];
          dw[it][i] += dy[i] * xhat[it][i];
          db[it][i] += dy[i];
        }
      }
    }
    const float2 sums = row_allreduce_sum2<kWarpsPerRow>(sum_g, sum_gx, smem);
    const float mean_g = p.is_rms ? 0.f : sums.x * inv_n;
    const float mean_gx = sums.y * inv_n;
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + lane;
      if (c < chunks) norm_bwd_store<T, kVec>(p, row, c * kVec, rstd, mean_g, mean_gx, xhat[it], g[it]);
    }
  }

  // This slot's partial sums (zeros when it had no row).
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + lane;
    if (c < chunks) {
      if (p.partial_dweight != nullptr) store_vec<float, kVec>(p.partial_dweight + slot * n + c * kVec, dw[it]);
      if (p.partial_dbias != nullptr) store_vec<float, kVec>(p.partial_dbias + slot * n + c * kVec, db[it]);
    }
  }
}

// Minimum blocks per SM: a 32-warp occupancy target caps registers at 64; without a target
// ptxas 13.0 spilled a few bytes on sm_90 for this kernel.
template <typename T, int kVec, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1024 / (kWarps * 32)) _norm_bwd_loop_kernel(const NormBwdParams p) {
  constexpr int kThreads = kWarps * 32;
  __shared__ float2 smem[kWarps];
  const int64_t slot = blockIdx.x;
  const int64_t n = p.cols;
  const int64_t chunks = n / kVec;
  const float inv_n = 1.f / static_cast<float>(n);
  float* partial_dw = p.partial_dweight != nullptr ? p.partial_dweight + slot * n : nullptr;
  float* partial_db = p.partial_dbias != nullptr ? p.partial_dbias + slot * n : nullptr;

  bool first = true;
  for (int64_t row = slot; row < p.rows; row += gridDim.x) {
    const float mean = p.mean != nullptr ? p.mean[row] : 0.f;
    const float rstd = p.rstd[row];
    // Pass 1: the two row sums.
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
      float xhat[kVec], g[kVec], dy[kVec];
      norm_bwd_load<T, kVec>(p, row, c * kVec, mean, rstd, xhat, g, dy);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        sum_g += g[i];
        sum_gx += g[i] * xhat[i];
      }
    }
    const float2 sums = row_allreduce_sum2<kWarps>(sum_g, sum_gx, smem);
    const float mean_g = p.is_rms ? 0.f : sums.x * inv_n;
    const float mean_gx = sums.y * inv_n;
    // Pass 2: gradients; the slot's partial rows are owned by this block and each column by one
    // thread, so the read-modify-write needs no atomics.
    for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
      const int64_t col = c * kVec;
      float xhat[kVec], g[kVec], dy[kVec];
      norm_bwd_load<T, kVec>(p, row, col, mean, rstd, xhat, g, dy);
      norm_bwd_store<T, kVec>(p, row, col, rstd, mean_g, mean_gx, xhat, g);
      if (partial_dw != nullptr) {
        float acc[kVec];
        if (first) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
        } else {
          load_vec<float, kVec>(partial_dw + col, acc);
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += dy[i] * xhat[i];
        store_vec<float, kVec>(partial_dw + col, acc);
      }
      if (partial_db != nullptr) {
        float acc[kVec];
        if (first) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[i] = 0.f;
        } else {
          load_vec<float, kVec>(partial_db + col, acc);
        }
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[i] += dy[i];
        store_vec<float, kVec>(partial_db + col, acc);
      }
    }
    first = false;
  }
  if (first) {  // a slot without rows still owns its partial rows: zeros
    float zero[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) zero[i] = 0.f;
    for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
      if (partial_dw != nullptr) store_vec<float, kVec>(partial_dw + c * kVec, zero);
      if (partial_db != nullptr) store_vec<float, kVec>(partial_db + c * kVec, zero);
    }
  }
}

// dweight / dbias = column sums of the partial rows, in a fixed order.
// Block (32, kReduceRows): 32 consecutive columns, kReduceRows strided row subsets;
// blockIdx.y = 0: dweight, 1: dbias.
template <int kReduceRows>
__global__ void __launch_bounds__(32 * kReduceRows) _norm_bwd_reduce_kernel(const NormBwdParams p) {
  __shared__ float smem[kReduceRows][33];
  const bool is_bias = blockIdx.y == 1;
  const float* partial = is_bias ? p.partial_dbias : p.partial_dweight;
  void* out = is_bias ? p.dbias : p.dweight;
  if (partial == nullptr) return;  // uniform over the block
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float sum = 0.f;
  if (col < p.cols) {
    for (int r = threadIdx.y; r < p.partial_rows; r += kReduceRows) sum += partial[r * p.cols + col];
  }
  smem[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && col < p.cols) {
    float total = 0.f;
#pragma unroll
    for (int r = 0; r < kReduceRows; ++r) total += smem[r][threadIdx.x];
    const float v[1] = {total};
    store_vec_dyn<1>(out, col, is_bias ? p.dbias_dtype : p.dweight_dtype, v);
  }
}

}  // namespace fastattn
