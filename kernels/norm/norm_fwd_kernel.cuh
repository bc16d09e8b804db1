// Forward kernels of residual + LayerNorm/RMSNorm (see norm_params.h for the maths).
//
// Two shapes of kernel:
//  - register-resident rows (N up to 16384): kWarpsPerRow warps own one row, each thread keeps
//    kIters vectors of kVec elements (16-byte loads) of h in registers; exact two-pass
//    mean/variance over the registers, one read of x/residual, one write of h and y.
//    Statistics and y describe h as stored (rounded to h's dtype), like plain PyTorch.
//  - looped rows (any N, and the scalar kVec = 1 variant for rows that cannot be accessed in
//    16-byte vectors): one block per row, three passes; h is written in the first pass and
//    re-read (mostly from L2) by the variance and output passes.
// Statistics are fp32; mean/rstd are saved in fp32.
#pragma once

#include <cstdint>

#include "../common/philox.cuh"
#include "../common/reduce.cuh"
#include "../common/vec.cuh"
#include "norm_params.h"

namespace fastattn {

// h = dropout(x) + residual for kVec elements of one row, in fp32.
template <typename T, int kVec>
__device__ __forceinline__ void norm_load_h_in(const NormFwdParams& p, int64_t row, int64_t col,
                                               float (&h)[kVec]) {
  load_vec<T, kVec>(static_cast<const T*>(p.x) + row * p.x_row_stride + col, h);
  if (p.dropout) {
    const uint64_t e0 = static_cast<uint64_t>(row * p.cols + col);
    if constexpr (kVec % 4 == 0) {
      bool keep[kVec];
      dropout_keep_n<kVec>(p.seed, p.offset, e0, p.dropout_threshold, keep);
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] = keep[i] ? h[i] * p.dropout_scale : 0.f;
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const bool keep = dropout_keep(p.seed, p.offset, e0 + i, p.dropout_threshold);
        h[i] = keep ? h[i] * p.dropout_scale : 0.f;
      }
    }
  }
  if (p.residual != nullptr) {
    float r[kVec];
    load_vec_dyn<kVec>(p.residual, row * p.residual_row_stride + col, p.residual_dtype, r);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] += r[i];
  }
}

// Casting point of the residual stream: h is rounded to its dtype and stored, and the
// statistics and y use the rounded value, so that the backward (which reads the stored h)
// sees exactly the h the statistics describe.
template <int kVec>
__device__ __forceinline__ void norm_store_h(const NormFwdParams& p, int64_t index, float (&h)[kVec]) {
  round_vec_dyn<kVec>(p.h_dtype, h);
  store_vec_dyn<kVec>(p.h, index, p.h_dtype, h);
}

// y = (h - mean) * rstd * weight + bias for kVec elements, stored in T.
template <typename T, int kVec>
__device__ __forceinline__ void norm_store_y(const NormFwdParams& p, int64_t row, int64_t col,
                                             const float (&h)[kVec], float mean, float rstd) {
  float y[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) y[i] = (h[i] - mean) * rstd;
  if (p.weight != nullptr) {
    float w[kVec];
    load_vec_dyn<kVec>(p.weight, col, p.weight_dtype, w);
#pragma unroll
    for (int i = 0; i < kVec; ++i) y[i] *= w[i];
  }
  if (p.bias != nullptr) {
    float b[kVec];
    load_vec_dyn<kVec>(p.bias, col, p.bias_dtype, b);
#pragma unroll
    for (int i = 0; i < kVec; ++i) y[i] += b[i];
  }
  store_vec<T, kVec>(static_cast<T*>(p.y) + row * p.cols + col, y);
}

template <typename T, int kWarpsPerRow, int kRowsPerCta, int kIters>
__global__ void __launch_bounds__(kWarpsPerRow * kRowsPerCta * 32)
    _norm_fwd_reg_kernel(const NormFwdParams p) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kThreadsPerRow = kWarpsPerRow * 32;
  static_assert(kWarpsPerRow == 1 || kRowsPerCta == 1, "multi-warp rows need one row per block");
  __shared__ float smem[kWarpsPerRow];

  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + threadIdx.x / kThreadsPerRow;
  // Leaves per row slot: with kWarpsPerRow > 1 that is the whole block, so no barrier is skipped.
  if (row >= p.rows) return;
  const int64_t n = p.cols;
  const int64_t chunks = n / kVec;

  float h[kIters][kVec];
  float sum = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + lane;
    if (c < chunks) {
      norm_load_h_in<T, kVec>(p, row, c * kVec, h[it]);
      if (p.h != nullptr) norm_store_h<kVec>(p, row * n + c * kVec, h[it]);
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += h[it][i];
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[it][i] = 0.f;
    }
  }
  const float inv_n = 1.f / static_cast<float>(n);
  const float mean = p.is_rms ? 0.f : row_allreduce_sum<kWarpsPerRow>(sum, smem) * inv_n;

  float sq = 0.f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + lane;
    if (c < chunks) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = h[it][i] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(row_allreduce_sum<kWarpsPerRow>(sq, smem) * inv_n + p.eps);
  if (lane == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int64_t c = static_cast<int64_t>(it) * kThreadsPerRow + lane;
    if (c < chunks) norm_store_y<T, kVec>(p, row, c * kVec, h[it], mean, rstd);
  }
}

// h of kVec elements re-read by the later passes of the looped kernel: from the stored h, or
// from x when h is x itself.
template <typename T, int kVec>
__device__ __forceinline__ void norm_reload_h(const NormFwdParams& p, int64_t row, int64_t col,
                                              float (&h)[kVec]) {
  if (p.h != nullptr) {
    load_vec_dyn<kVec>(p.h, row * p.cols + col, p.h_dtype, h);
  } else {
    load_vec<T, kVec>(static_cast<const T*>(p.x) + row * p.x_row_stride + col, h);
  }
}

// Minimum blocks per SM: a 32-warp occupancy target caps registers at 64; without a target
// ptxas 13.0 spilled a few bytes on sm_90 for this kernel.
template <typename T, int kVec, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1024 / (kWarps * 32)) _norm_fwd_loop_kernel(const NormFwdParams p) {
  constexpr int kThreads = kWarps * 32;
  __shared__ float smem[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t n = p.cols;
  const int64_t chunks = n / kVec;
  const float inv_n = 1.f / static_cast<float>(n);

  // Pass 1: h (stored), sum. Each thread re-reads in later passes only what it wrote itself,
  // so no fence is needed between the passes.
  float sum = 0.f;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float h[kVec];
    norm_load_h_in<T, kVec>(p, row, c * kVec, h);
    if (p.h != nullptr) norm_store_h<kVec>(p, row * n + c * kVec, h);
#pragma unroll
    for (int i = 0; i < kVec; ++i) sum += h[i];
  }
  const float mean = p.is_rms ? 0.f : row_allreduce_sum<kWarps>(sum, smem) * inv_n;

  // Pass 2: variance around the mean (two-pass, no cancellation).
  float sq = 0.f;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float h[kVec];
    norm_reload_h<T, kVec>(p, row, c * kVec, h);
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const float d = h[i] - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(row_allreduce_sum<kWarps>(sq, smem) * inv_n + p.eps);
  if (threadIdx.x == 0) {
    if (p.mean != nullptr) p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  // Pass 3: y.
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    float h[kVec];
    norm_reload_h<T, kVec>(p, row, c * kVec, h);
    norm_store_y<T, kVec>(p, row, c * kVec, h, mean, rstd);
  }
}

}  // namespace fastattn
