// Compile-time dispatch of runtime flags (flash-attn's static_switch.h pattern).
//
// Turns a runtime value into a constexpr visible inside the lambda, so one call site
// instantiates each variant of a kernel template:
//
//   BOOL_SWITCH(params.is_causal, kIsCausal, [&] { run_fwd<T, kIsCausal>(params, stream); });
//
// No torch (only the CUDA fp16/bf16 headers): usable from kernels/ launchers and csrc/ alike.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define BOOL_SWITCH(COND, CONST_NAME, ...)            \
  [&] {                                               \
    if (COND) {                                       \
      constexpr static bool CONST_NAME = true;        \
      return __VA_ARGS__();                           \
    } else {                                          \
      constexpr static bool CONST_NAME = false;       \
      return __VA_ARGS__();                           \
    }                                                 \
  }()

// Element dtype of the main tensors, as carried in params structs (see DType below).
// Exposes `using TYPE_NAME = __half / __nv_bfloat16 / float` inside the lambda; any value
// other than fp16/bf16 means fp32 (csrc/ maps only supported torch dtypes onto DType).
#define DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)                 \
  [&] {                                                     \
    switch (DTYPE) {                                        \
      case ::fastattn::DType::kFloat16: {                   \
        using TYPE_NAME = __half;                           \
        return __VA_ARGS__();                               \
      }                                                     \
      case ::fastattn::DType::kBFloat16: {                  \
        using TYPE_NAME = __nv_bfloat16;                    \
        return __VA_ARGS__();                               \
      }                                                     \
      default: {                                            \
        using TYPE_NAME = float;                            \
        return __VA_ARGS__();                               \
      }                                                     \
    }                                                       \
  }()

// Half-precision only (tensor-core kernels): fp16 or bf16.
#define HALF_SWITCH(IS_BF16, TYPE_NAME, ...)  \
  [&] {                                       \
    if (IS_BF16) {                            \
      using TYPE_NAME = __nv_bfloat16;        \
      return __VA_ARGS__();                   \
    } else {                                  \
      using TYPE_NAME = __half;               \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// Head-dimension buckets for attention-style kernels: exposes constexpr int CONST_NAME, the
// smallest supported bucket >= HEADDIM (32, 64, 96, 128, 192, 256).
#define HEADDIM_SWITCH(HEADDIM, CONST_NAME, ...)  \
  [&] {                                           \
    if (HEADDIM <= 32) {                          \
      constexpr static int CONST_NAME = 32;       \
      return __VA_ARGS__();                       \
    } else if (HEADDIM <= 64) {                   \
      constexpr static int CONST_NAME = 64;       \
      return __VA_ARGS__();                       \
    } else if (HEADDIM <= 96) {                   \
      constexpr static int CONST_NAME = 96;       \
      return __VA_ARGS__();                       \
    } else if (HEADDIM <= 128) {                  \
      constexpr static int CONST_NAME = 128;      \
      return __VA_ARGS__();                       \
    } else if (HEADDIM <= 192) {                  \
      constexpr static int CONST_NAME = 192;      \
      return __VA_ARGS__();                       \
    } else {                                      \
      constexpr static int CONST_NAME = 256;      \
      return __VA_ARGS__();                       \
    }                                             \
  }()

namespace fastattn {

// Element dtypes crossing the host/kernel boundary. Kept free of torch so kernels/ compiles
// alone; csrc/checks.h maps at::ScalarType onto it.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

}  // namespace fastattn
