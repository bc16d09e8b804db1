// Kernel shapes of the norm kernels and their selection from the hidden size and alignment.
// Free of launches and CUDA runtime calls, so the host emulation (emulation/norm_emu.cpp)
// runs the same selection as norm_launch_template.cuh.
#pragma once

#include <cstdint>

#include "../common/vec.cuh"
#include "norm_bwd_kernel.cuh"
#include "norm_fwd_kernel.cuh"
#include "norm_params.h"

namespace fastattn {

// A register-resident shape: kWarpsPerRow warps per row, kRowsPerCta rows per block,
// kIters vectors per thread.
template <int kWarpsPerRow_, int kRowsPerCta_, int kIters_>
struct RegShape {
  static constexpr int kWarpsPerRow = kWarpsPerRow_, kRowsPerCta = kRowsPerCta_, kIters = kIters_;
  static constexpr int kThreads = kWarpsPerRow * kRowsPerCta * 32;
};

// A looped shape: one row per block of kWarps warps, kVec elements per access.
template <int kVec_, int kWarps_>
struct LoopShape {
  static constexpr int kVec = kVec_, kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
};

// Whether whole rows can be accessed in kVec-element vectors: N and every row stride
// multiples of kVec, every pointer aligned to the vector size.
inline bool rows_vectorizable(int64_t cols, int vec) { return cols % vec == 0; }

inline bool stride_ok(int64_t stride, int vec) { return stride % vec == 0; }

template <typename T>
bool fwd_vectorizable(const NormFwdParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = rows_vectorizable(p.cols, kVec) && is_vector_aligned(p.x, p.dtype, kVec) &&
            stride_ok(p.x_row_stride, kVec) && is_vector_aligned(p.y, p.dtype, kVec);
  if (p.residual != nullptr) {
    ok = ok && is_vector_aligned(p.residual, p.residual_dtype, kVec) && stride_ok(p.residual_row_stride, kVec);
  }
  if (p.weight != nullptr) ok = ok && is_vector_aligned(p.weight, p.weight_dtype, kVec);
  if (p.bias != nullptr) ok = ok && is_vector_aligned(p.bias, p.bias_dtype, kVec);
  if (p.h != nullptr) ok = ok && is_vector_aligned(p.h, p.h_dtype, kVec);
  return ok;
}

template <typename T>
bool bwd_vectorizable(const NormBwdParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  bool ok = rows_vectorizable(p.cols, kVec) && is_vector_aligned(p.dy, p.dtype, kVec) &&
            stride_ok(p.dy_row_stride, kVec) && is_vector_aligned(p.h, p.h_dtype, kVec) &&
            stride_ok(p.h_row_stride, kVec) && is_vector_aligned(p.dx, p.dtype, kVec);
  if (p.dh != nullptr) ok = ok && is_vector_aligned(p.dh, p.dh_dtype, kVec) && stride_ok(p.dh_row_stride, kVec);
  if (p.weight != nullptr) ok = ok && is_vector_aligned(p.weight, p.weight_dtype, kVec);
  if (p.dresidual != nullptr) ok = ok && is_vector_aligned(p.dresidual, p.dresidual_dtype, kVec);
  // The fp32 partial rows start at slot * cols floats: aligned whenever cols % kVec == 0.
  return ok;
}

// Forward shapes hold 32 elements of h per thread (8 for the narrowest rows): N <= 256, 1024
// with one warp per row, then 4 / 8 / 16 warps per row up to 16384; beyond, the looped kernel.
template <typename T, typename F>
auto with_fwd_shape(const NormFwdParams& p, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kIters = 32 / kVec;
  if (!fwd_vectorizable<T>(p)) return f(LoopShape<1, 4>{});
  const int64_t n = p.cols;
  if (n <= 8 * 32) return f(RegShape<1, 4, 8 / kVec>{});
  if (n <= 32 * 32) return f(RegShape<1, 4, kIters>{});
  if (n <= 4 * 32 * 32) return f(RegShape<4, 1, kIters>{});
  if (n <= 8 * 32 * 32) return f(RegShape<8, 1, kIters>{});
  if (n <= 16 * 32 * 32) return f(RegShape<16, 1, kIters>{});
  return f(LoopShape<kVec, 8>{});
}

// Backward shapes hold 16 elements per thread (xhat, g and the two gradient accumulators per
// element): N <= 256, 512 with one warp per row, then 4 / 8 / 16 warps up to 8192.
template <typename T, typename F>
auto with_bwd_shape(const NormBwdParams& p, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  constexpr int kIters = 16 / kVec;
  if (!bwd_vectorizable<T>(p)) return f(LoopShape<1, 4>{});
  const int64_t n = p.cols;
  if (n <= 8 * 32) return f(RegShape<1, 4, 8 / kVec>{});
  if (n <= 16 * 32) return f(RegShape<1, 4, kIters>{});
  if (n <= 4 * 16 * 32) return f(RegShape<4, 1, kIters>{});
  if (n <= 8 * 16 * 32) return f(RegShape<8, 1, kIters>{});
  if (n <= 16 * 16 * 32) return f(RegShape<16, 1, kIters>{});
  return f(LoopShape<kVec, 8>{});
}

template <typename T, typename Shape>
struct NormKernels;

template <typename T, int W, int R, int I>
struct NormKernels<T, RegShape<W, R, I>> {
  static constexpr int kRowsPerCta = R;
  static auto fwd() { return &_norm_fwd_reg_kernel<T, W, R, I>; }
  static auto bwd() { return &_norm_bwd_reg_kernel<T, W, R, I>; }
};

template <typename T, int V, int W>
struct NormKernels<T, LoopShape<V, W>> {
  static constexpr int kRowsPerCta = 1;
  static auto fwd() { return &_norm_fwd_loop_kernel<T, V, W>; }
  static auto bwd() { return &_norm_bwd_loop_kernel<T, V, W>; }
};

}  // namespace fastattn
