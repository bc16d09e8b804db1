// Runtime (dtype, kind, activation) -> the matching instantiation of run_ffn_gemm_.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/philox.cuh"
#include "ffn_params.h"

namespace fastattn {
namespace ffn {
namespace {

template <typename T, GemmKind kKind>
cudaError_t dispatch_activation(const FfnGemmParams& params, cudaStream_t stream) {
  switch (params.act) {
    case Activation::kRelu:
      return run_ffn_gemm_<T, kKind, Activation::kRelu>(params, stream);
    case Activation::kGelu:
      return run_ffn_gemm_<T, kKind, Activation::kGelu>(params, stream);
    case Activation::kGeluTanh:
      return run_ffn_gemm_<T, kKind, Activation::kGeluTanh>(params, stream);
    case Activation::kSilu:
      return run_ffn_gemm_<T, kKind, Activation::kSilu>(params, stream);
    case Activation::kSwiglu:
      return run_ffn_gemm_<T, kKind, Activation::kSwiglu>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t dispatch_kind(const FfnGemmParams& params, cudaStream_t stream) {
  switch (params.kind) {
    case GemmKind::kBiasNT:
      return run_ffn_gemm_<T, GemmKind::kBiasNT, Activation::kNone>(params, stream);
    case GemmKind::kBiasNN:
      return run_ffn_gemm_<T, GemmKind::kBiasNN, Activation::kNone>(params, stream);
    case GemmKind::kBiasTN:
      return run_ffn_gemm_<T, GemmKind::kBiasTN, Activation::kNone>(params, stream);
    case GemmKind::kFwdAct:
      return dispatch_activation<T, GemmKind::kFwdAct>(params, stream);
    case GemmKind::kBwdAct:
      return dispatch_activation<T, GemmKind::kBwdAct>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t run_ffn_gemm(const FfnGemmParams& host_params, cudaStream_t stream) {
  if (host_params.M == 0 || host_params.N == 0) return cudaSuccess;
  if (!(host_params.dropout_p >= 0.f && host_params.dropout_p < 1.f)) return cudaErrorInvalidValue;
  FfnGemmParams params = host_params;
  params.has_dropout = params.dropout_p > 0.f;
  params.dropout_threshold = dropout_threshold(params.dropout_p);
  params.dropout_scale = 1.f / (1.f - params.dropout_p);
  switch (params.dtype) {
    case DType::kFloat16:
      return dispatch_kind<__half>(params, stream);
    case DType::kBFloat16:
      return dispatch_kind<__nv_bfloat16>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace ffn
}  // namespace fastattn
