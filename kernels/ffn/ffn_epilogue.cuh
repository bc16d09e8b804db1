// Epilogues of the FFN GEMM: what happens to each fp32 accumulator pair before it leaves the
// registers (bias, activation, dropout, activation derivative). Activations are evaluated in
// fp32 with erff and expf. The extension is built with --use_fast_math, which turns expf into
// ex2.approx (a few ulp) but tanhf into tanh.approx (max relative error 2^-11 per the PTX
// ISA, as large as fp16 rounding), so tanh is computed from expf instead.
//
// Every epilogue is called once per accumulator pair (row, col), (row, col + 1) with col even
// (the m16n8 accumulator layout), and masks rows >= M and columns >= N itself. Casting points:
// loads of z / bias widen to fp32, stores round to T (round-to-nearest-even).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/philox.cuh"
#include "ffn_params.h"

namespace fastattn {
namespace ffn {

template <typename T>
struct Convert;

template <>
struct Convert<__half> {
  using Pair = __half2;
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half2 from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};

template <>
struct Convert<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat162 from_float2(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

__device__ __forceinline__ bool aligned4(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 3u) == 0;
}

// Two consecutive elements (the second only when `two`); one 4-byte access when aligned (an
// odd row stride or the up-half offset F can misalign it).
template <typename T>
__device__ __forceinline__ float2 load2(const T* ptr, bool two) {
  if (two && aligned4(ptr)) {
    return Convert<T>::to_float2(*reinterpret_cast<const typename Convert<T>::Pair*>(ptr));
  }
  return make_float2(Convert<T>::to_float(ptr[0]), two ? Convert<T>::to_float(ptr[1]) : 0.f);
}

template <typename T>
__device__ __forceinline__ void store2(T* ptr, float v0, float v1, bool two) {
  if (two && aligned4(ptr)) {
    *reinterpret_cast<typename Convert<T>::Pair*>(ptr) = Convert<T>::from_float2(v0, v1);
  } else {
    ptr[0] = Convert<T>::from_float(v0);
    if (two) ptr[1] = Convert<T>::from_float(v1);
  }
}

// ---------------------------------------------------------------------------------------------
// Activations: f(z) and f'(z) in fp32, the formulas of fastattn/activations.py.
// ---------------------------------------------------------------------------------------------
template <Activation kAct>
struct Act;

template <>
struct Act<Activation::kRelu> {
  static __device__ __forceinline__ float f(float z) { return z > 0.f ? z : 0.f; }
  static __device__ __forceinline__ float df(float z) { return z > 0.f ? 1.f : 0.f; }
};

template <>
struct Act<Activation::kGelu> {
  static constexpr float kInvSqrt2 = 0.70710678118654752f;
  static constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  static __device__ __forceinline__ float f(float z) { return 0.5f * z * (1.f + erff(z * kInvSqrt2)); }
  static __device__ __forceinline__ float df(float z) {
    return 0.5f * (1.f + erff(z * kInvSqrt2)) + z * expf(-0.5f * z * z) * kInvSqrt2Pi;
  }
};

// tanh(u) = sign(u) * (1 - 2 / (exp(2|u|) + 1)); exp overflowing to inf gives exactly +-1.
// Measured in numpy float32 over u in [-12, 12]: max absolute error 1.5e-7 with a correctly
// rounded exp, 3.9e-7 with exp perturbed by 4 ulp (the fast-math expf).
__device__ __forceinline__ float tanh_from_exp(float u) {
  return copysignf(1.f - 2.f / (expf(2.f * fabsf(u)) + 1.f), u);
}

template <>
struct Act<Activation::kGeluTanh> {
  static constexpr float kSqrt2OverPi = 0.79788456080286536f;
  static constexpr float kCoeff = 0.044715f;
  static __device__ __forceinline__ float f(float z) {
    return 0.5f * z * (1.f + tanh_from_exp(kSqrt2OverPi * (z + kCoeff * z * z * z)));
  }
  static __device__ __forceinline__ float df(float z) {
    const float t = tanh_from_exp(kSqrt2OverPi * (z + kCoeff * z * z * z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kCoeff * z * z);
  }
};

template <>
struct Act<Activation::kSilu> {
  // expf(-z) overflows to inf for z < -88: sigmoid -> 0, f -> -0, df -> -0; never NaN.
  static __device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }
  static __device__ __forceinline__ float f(float z) { return z * sigmoid(z); }
  static __device__ __forceinline__ float df(float z) {
    const float s = sigmoid(z);
    return s * (1.f + z * (1.f - s));
  }
};

// ---------------------------------------------------------------------------------------------
// Dropout keep decisions of a (M, F) elements (row, col) and (row, col + 1): element index
// row * F + col, so the mask depends on (seed, offset, row, col) and F only.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ void dropout_keep_pair(const FfnGemmParams& p, int row, int col, bool& keep0,
                                                  bool& keep1) {
  const uint64_t e = static_cast<uint64_t>(row) * static_cast<uint64_t>(p.N) + static_cast<uint64_t>(col);
  const uint4 bits = dropout_bits4(p.seed, p.offset, e >> 2);
  const int lane = static_cast<int>(e & 3);
  keep0 = uint4_lane(bits, lane) >= p.dropout_threshold;
  // An odd F can put the pair across two Philox groups.
  keep1 = lane < 3 ? uint4_lane(bits, lane + 1) >= p.dropout_threshold
                   : dropout_keep(p.seed, p.offset, e + 1, p.dropout_threshold);
}

// ---------------------------------------------------------------------------------------------
// Epilogues
// ---------------------------------------------------------------------------------------------

// C = acc (+ bias): the second FFN GEMM, z recompute, dx, dw1, dw2.
template <typename T>
struct EpiBias {
  static constexpr bool kDual = false;
  static __device__ __forceinline__ void apply(const FfnGemmParams& p, int row, int col, float v0, float v1) {
    if (row >= p.M || col >= p.N) return;
    const bool two = col + 1 < p.N;
    if (p.bias != nullptr) {
      const float2 b = load2(static_cast<const T*>(p.bias) + col, two);
      v0 += b.x;
      v1 += b.y;
    }
    store2(static_cast<T*>(p.C) + row * p.ldc + col, v0, v1, two);
  }
};

// z = acc + b1 (stored when p.Z), a = dropout(act(z)) from the fp32 z.
template <typename T, Activation kAct>
struct EpiFwdAct {
  static constexpr bool kDual = false;
  static __device__ __forceinline__ void apply(const FfnGemmParams& p, int row, int col, float z0, float z1) {
    if (row >= p.M || col >= p.N) return;
    const bool two = col + 1 < p.N;
    if (p.bias != nullptr) {
      const float2 b = load2(static_cast<const T*>(p.bias) + col, two);
      z0 += b.x;
      z1 += b.y;
    }
    if (p.Z != nullptr) store2(static_cast<T*>(p.Z) + row * p.ldz + col, z0, z1, two);
    float a0 = Act<kAct>::f(z0), a1 = Act<kAct>::f(z1);
    if (p.has_dropout) {
      bool keep0, keep1;
      dropout_keep_pair(p, row, col, keep0, keep1);
      a0 = keep0 ? a0 * p.dropout_scale : 0.f;
      a1 = keep1 ? a1 * p.dropout_scale : 0.f;
    }
    store2(static_cast<T*>(p.act_out) + row * p.ld_act + col, a0, a1, two);
  }
};

// swiglu: gate = acc_gate + b1[col], up = acc_up + b1[F + col], a = dropout(silu(gate) * up).
template <typename T>
struct EpiFwdSwiglu {
  static constexpr bool kDual = true;
  static __device__ __forceinline__ void apply(const FfnGemmParams& p, int row, int col, float g0, float g1,
                                               float u0, float u1) {
    if (row >= p.M || col >= p.N) return;
    const int F = p.N;
    const bool two = col + 1 < F;
    if (p.bias != nullptr) {
      const float2 bg = load2(static_cast<const T*>(p.bias) + col, two);
      const float2 bu = load2(static_cast<const T*>(p.bias) + F + col, two);
      g0 += bg.x;
      g1 += bg.y;
      u0 += bu.x;
      u1 += bu.y;
    }
    if (p.Z != nullptr) {
      T* z_row = static_cast<T*>(p.Z) + row * p.ldz;
      store2(z_row + col, g0, g1, two);
      store2(z_row + F + col, u0, u1, two);
    }
    float a0 = Act<Activation::kSilu>::f(g0) * u0, a1 = Act<Activation::kSilu>::f(g1) * u1;
    if (p.has_dropout) {
      bool keep0, keep1;
      dropout_keep_pair(p, row, col, keep0, keep1);
      a0 = keep0 ? a0 * p.dropout_scale : 0.f;
      a1 = keep1 ? a1 * p.dropout_scale : 0.f;
    }
    store2(static_cast<T*>(p.act_out) + row * p.ld_act + col, a0, a1, two);
  }
};

// acc = dA = dy @ w2 (M, F). dz = dA * keep / (1 - p) * act'(z) into C; the dropped
// activation a_d = keep / (1 - p) * act(z), needed by dw2 = dy^T @ a_d, into act_out.
template <typename T, Activation kAct>
struct EpiBwdAct {
  static constexpr bool kDual = false;
  static __device__ __forceinline__ void apply(const FfnGemmParams& p, int row, int col, float g0, float g1) {
    if (row >= p.M || col >= p.N) return;
    const bool two = col + 1 < p.N;
    float s0 = 1.f, s1 = 1.f;  // keep / (1 - p)
    if (p.has_dropout) {
      bool keep0, keep1;
      dropout_keep_pair(p, row, col, keep0, keep1);
      s0 = keep0 ? p.dropout_scale : 0.f;
      s1 = keep1 ? p.dropout_scale : 0.f;
    }
    g0 *= s0;
    g1 *= s1;
    const T* z_row = static_cast<const T*>(p.Z) + row * p.ldz;
    T* dz_row = static_cast<T*>(p.C) + row * p.ldc;
    T* ad_row = static_cast<T*>(p.act_out) + row * p.ld_act;
    if constexpr (kAct == Activation::kSwiglu) {
      const int F = p.N;
      const float2 gate = load2(z_row + col, two);
      const float2 up = load2(z_row + F + col, two);
      const float sg0 = Act<Activation::kSilu>::sigmoid(gate.x), sg1 = Act<Activation::kSilu>::sigmoid(gate.y);
      const float silu0 = gate.x * sg0, silu1 = gate.y * sg1;
      const float dsilu0 = sg0 * (1.f + gate.x * (1.f - sg0)), dsilu1 = sg1 * (1.f + gate.y * (1.f - sg1));
      store2(dz_row + col, g0 * up.x * dsilu0, g1 * up.y * dsilu1, two);
      store2(dz_row + F + col, g0 * silu0, g1 * silu1, two);
      store2(ad_row + col, s0 * silu0 * up.x, s1 * silu1 * up.y, two);
    } else {
      const float2 z = load2(z_row + col, two);
      store2(dz_row + col, g0 * Act<kAct>::df(z.x), g1 * Act<kAct>::df(z.y), two);
      store2(ad_row + col, s0 * Act<kAct>::f(z.x), s1 * Act<kAct>::f(z.y), two);
    }
  }
};

}  // namespace ffn
}  // namespace fastattn
