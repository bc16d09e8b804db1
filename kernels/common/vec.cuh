// Vectorised global memory access with fp32 conversion, shared by the fastattn kernels.
//
// load_vec<X, kN>(ptr, out) reads kN consecutive elements of type X with the widest accesses
// their alignment allows (up to 16 bytes per instruction; ptr must be aligned to
// min(16, kN * sizeof(X)) bytes) and converts them to fp32; store_vec is the inverse, rounding
// to nearest. The *_dyn variants take the element dtype at run time (a warp-uniform branch),
// so one kernel instantiation serves every dtype mix of auxiliary tensors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "static_switch.h"

namespace fastattn {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename X>
__device__ __forceinline__ X from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The unsigned integer type of one memory access of kBytes bytes.
template <int kBytes> struct AccessType;
template <> struct AccessType<16> { using type = uint4; };
template <> struct AccessType<8> { using type = uint2; };
template <> struct AccessType<4> { using type = uint32_t; };
template <> struct AccessType<2> { using type = uint16_t; };

// kN elements of X as raw bits, split into accesses of at most 16 bytes.
template <typename X, int kN>
struct Packed {
  static constexpr int kBytes = kN * static_cast<int>(sizeof(X));
  static constexpr int kAccessBytes = kBytes >= 16 ? 16 : kBytes;
  static constexpr int kAccesses = kBytes / kAccessBytes;
  static_assert(kBytes % kAccessBytes == 0, "vector size must be a whole number of accesses");
  using Access = typename AccessType<kAccessBytes>::type;
  union {
    Access access[kAccesses];
    X elt[kN];
  };
};

template <typename X, int kN>
__device__ __forceinline__ void load_vec(const X* ptr, float (&out)[kN]) {
  Packed<X, kN> p;
  const auto* src = reinterpret_cast<const typename Packed<X, kN>::Access*>(ptr);
#pragma unroll
  for (int i = 0; i < Packed<X, kN>::kAccesses; ++i) p.access[i] = src[i];
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = to_float(p.elt[i]);
}

template <typename X, int kN>
__device__ __forceinline__ void store_vec(X* ptr, const float (&in)[kN]) {
  Packed<X, kN> p;
#pragma unroll
  for (int i = 0; i < kN; ++i) p.elt[i] = from_float<X>(in[i]);
  auto* dst = reinterpret_cast<typename Packed<X, kN>::Access*>(ptr);
#pragma unroll
  for (int i = 0; i < Packed<X, kN>::kAccesses; ++i) dst[i] = p.access[i];
}

// ptr + index elements of run-time dtype `dtype`, converted to fp32.
template <int kN>
__device__ __forceinline__ void load_vec_dyn(const void* ptr, int64_t index, DType dtype, float (&out)[kN]) {
  switch (dtype) {
    case DType::kFloat16:
      load_vec<__half, kN>(static_cast<const __half*>(ptr) + index, out);
      break;
    case DType::kBFloat16:
      load_vec<__nv_bfloat16, kN>(static_cast<const __nv_bfloat16*>(ptr) + index, out);
      break;
    default:
      load_vec<float, kN>(static_cast<const float*>(ptr) + index, out);
      break;
  }
}

template <int kN>
__device__ __forceinline__ void store_vec_dyn(void* ptr, int64_t index, DType dtype, const float (&in)[kN]) {
  switch (dtype) {
    case DType::kFloat16:
      store_vec<__half, kN>(static_cast<__half*>(ptr) + index, in);
      break;
    case DType::kBFloat16:
      store_vec<__nv_bfloat16, kN>(static_cast<__nv_bfloat16*>(ptr) + index, in);
      break;
    default:
      store_vec<float, kN>(static_cast<float*>(ptr) + index, in);
      break;
  }
}

// Rounds fp32 values to `dtype` and back: the value a later load of a stored copy returns.
template <int kN>
__device__ __forceinline__ void round_vec_dyn(DType dtype, float (&v)[kN]) {
  if (dtype == DType::kFloat16) {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] = __half2float(__float2half_rn(v[i]));
  } else if (dtype == DType::kBFloat16) {
#pragma unroll
    for (int i = 0; i < kN; ++i) v[i] = __bfloat162float(__float2bfloat16_rn(v[i]));
  }
}

// Host side: bytes per element of a DType, and whether kN elements at ptr can be accessed
// as one vector (the alignment load_vec/store_vec need).
inline int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

inline bool is_vector_aligned(const void* ptr, DType dtype, int n) {
  const int bytes = n * dtype_size(dtype);
  const int align = bytes >= 16 ? 16 : bytes;
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(align) == 0;
}

}  // namespace fastattn
