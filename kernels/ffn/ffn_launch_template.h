// Launch templates: (dtype, GemmKind, Activation) -> tile configuration, operand layouts and
// epilogue of _ffn_gemm_kernel. Instantiated once per combination by the generated files in
// instantiations/ (generate_kernels.py), so each nvcc process compiles one kernel.
#pragma once

#include <type_traits>

#include "../common/cuda_check.h"
#include "ffn_gemm_kernel.cuh"
#include "ffn_params.h"

namespace fastattn {
namespace ffn {

// Shipped tile configurations: 8 warps (2 x 4), warp tile 64 x 32, 4-stage ring of
// 16 KiB per stage (64 KiB of shared memory, 2 CTAs per SM on A100 and H100/H200).
// The swiglu forward computes two 128 x 64 tiles (gate and up) with the same operand volume.
using ConfigDefault = GemmConfig<128, 128, 32, 2, 4, 4, false>;
using ConfigDual = GemmConfig<128, 64, 32, 2, 4, 4, true>;

template <typename T, GemmKind kKind, Activation kAct>
struct EpilogueFor {
  using type = EpiBias<T>;
};
template <typename T, Activation kAct>
struct EpilogueFor<T, GemmKind::kFwdAct, kAct> {
  using type = EpiFwdAct<T, kAct>;
};
template <typename T>
struct EpilogueFor<T, GemmKind::kFwdAct, Activation::kSwiglu> {
  using type = EpiFwdSwiglu<T>;
};
template <typename T, Activation kAct>
struct EpilogueFor<T, GemmKind::kBwdAct, kAct> {
  using type = EpiBwdAct<T, kAct>;
};

template <typename T, GemmKind kKind, Activation kAct>
cudaError_t run_ffn_gemm_(const FfnGemmParams& params, cudaStream_t stream) {
  constexpr bool kDual = kKind == GemmKind::kFwdAct && kAct == Activation::kSwiglu;
  using Cfg = std::conditional_t<kDual, ConfigDual, ConfigDefault>;
  constexpr bool kAKMajor = kKind != GemmKind::kBiasTN;
  constexpr bool kBKMajor = kKind == GemmKind::kBiasNT || kKind == GemmKind::kFwdAct;
  using Epi = typename EpilogueFor<T, kKind, kAct>::type;
  if (params.M <= 0 || params.N <= 0) return cudaSuccess;
  const int64_t tiles = static_cast<int64_t>((params.M - 1) / Cfg::BM + 1) * ((params.N - 1) / Cfg::BN + 1);
  if (tiles > 0x7FFFFFFF) return cudaErrorInvalidValue;  // the tile index is an int
  const dim3 grid(static_cast<unsigned>(tiles));
  auto kernel = &_ffn_gemm_kernel<T, Cfg, kAKMajor, kBKMajor, Epi>;
  if constexpr (Cfg::kSmemBytes > 48 * 1024) {
    // Above 48 KiB of dynamic shared memory needs an opt-in (per device, so set every call).
    FASTATTN_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  }
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(params);
  FASTATTN_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace ffn
}  // namespace fastattn
