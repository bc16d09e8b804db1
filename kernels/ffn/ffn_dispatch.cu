// Runtime (dtype, kind, activation) -> the matching instantiation: the CUTLASS sm_90a kernel
// (run_ffn_gemm_sm90_) when all of these hold, else the hand-written one (run_ffn_gemm_):
//   - built with FASTATTN_HAVE_CUTLASS and the caller set allow_sm90;
//   - the current device runs this library's sm_90a image (an sm_80/sm_90 or PTX-JIT image
//     would run CUTLASS's sm90 kernels as empty stubs);
//   - ffn_sm90_serves(): plain GEMMs, and relu / gelu / gelu_tanh / silu epilogues without
//     dropout (dropout and swiglu stay hand-written, see ffn_params.h);
//   - TMA-describable operands: 16-byte aligned bases (bias too), row strides and contiguous
//     extents multiples of 8 elements (the last two checked by CUTLASS's can_implement), K > 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common/philox.cuh"
#include "../common/sm90a_image.h"
#include "ffn_params.h"
#include "ffn_sm90.h"

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

#ifdef FASTATTN_HAVE_CUTLASS
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

bool sm90_operands_ok(const FfnGemmParams& p) {
  const bool fwd = p.kind == GemmKind::kFwdAct, bwd = p.kind == GemmKind::kBwdAct;
  const void* out = fwd ? p.act_out : p.C;
  const int64_t ld_out = fwd ? p.ld_act : p.ldc;
  bool ok = p.K > 0 && aligned16(p.A) && aligned16(p.B) && aligned16(out) && aligned16(p.bias) && p.lda % 8 == 0 &&
            p.ldb % 8 == 0 && ld_out % 8 == 0;
  if (fwd || bwd) ok = ok && aligned16(p.Z) && p.ldz % 8 == 0;
  if (bwd) ok = ok && p.Z != nullptr && aligned16(p.act_out) && p.ld_act % 8 == 0;
  return ok;
}

template <typename T, GemmKind kKind>
cudaError_t sm90_activation(const FfnGemmParams& params, cudaStream_t stream, bool& launched) {
  switch (params.act) {
    case Activation::kRelu:
      return sm90::run_ffn_gemm_sm90_<T, kKind, Activation::kRelu>(params, stream, launched);
    case Activation::kGelu:
      return sm90::run_ffn_gemm_sm90_<T, kKind, Activation::kGelu>(params, stream, launched);
    case Activation::kGeluTanh:
      return sm90::run_ffn_gemm_sm90_<T, kKind, Activation::kGeluTanh>(params, stream, launched);
    case Activation::kSilu:
      return sm90::run_ffn_gemm_sm90_<T, kKind, Activation::kSilu>(params, stream, launched);
    default:
      launched = false;
      return cudaSuccess;
  }
}

template <typename T>
cudaError_t sm90_kind(const FfnGemmParams& params, cudaStream_t stream, bool& launched) {
  switch (params.kind) {
    case GemmKind::kBiasNT:
      return sm90::run_ffn_gemm_sm90_<T, GemmKind::kBiasNT, Activation::kNone>(params, stream, launched);
    case GemmKind::kBiasNN:
      return sm90::run_ffn_gemm_sm90_<T, GemmKind::kBiasNN, Activation::kNone>(params, stream, launched);
    case GemmKind::kBiasTN:
      return sm90::run_ffn_gemm_sm90_<T, GemmKind::kBiasTN, Activation::kNone>(params, stream, launched);
    case GemmKind::kFwdAct:
      return sm90_activation<T, GemmKind::kFwdAct>(params, stream, launched);
    case GemmKind::kBwdAct:
      return sm90_activation<T, GemmKind::kBwdAct>(params, stream, launched);
    default:
      launched = false;
      return cudaSuccess;
  }
}

// Runs the CUTLASS kernel when it serves params (launched = true), else leaves the GEMM to
// the hand-written kernel.
cudaError_t try_sm90(const FfnGemmParams& params, cudaStream_t stream, bool& launched) {
  launched = false;
  if (!params.allow_sm90 || !ffn_sm90_serves(params.kind, params.act, params.has_dropout) ||
      !sm90_operands_ok(params) || !device_runs_sm90a()) {
    return cudaSuccess;
  }
  if (params.dtype == DType::kFloat16) return sm90_kind<__half>(params, stream, launched);
  if (params.dtype == DType::kBFloat16) return sm90_kind<__nv_bfloat16>(params, stream, launched);
  return cudaSuccess;
}
#endif  // FASTATTN_HAVE_CUTLASS

}  // namespace

bool ffn_sm90_device_ready() {
#ifdef FASTATTN_HAVE_CUTLASS
  return device_runs_sm90a();
#else
  return false;
#endif
}

cudaError_t run_ffn_gemm(const FfnGemmParams& host_params, cudaStream_t stream) {
  if (host_params.M == 0 || host_params.N == 0) return cudaSuccess;
  if (!(host_params.dropout_p >= 0.f && host_params.dropout_p < 1.f)) return cudaErrorInvalidValue;
  FfnGemmParams params = host_params;
  params.has_dropout = params.dropout_p > 0.f;
  params.dropout_threshold = dropout_threshold(params.dropout_p);
  params.dropout_scale = 1.f / (1.f - params.dropout_p);
#ifdef FASTATTN_HAVE_CUTLASS
  bool launched = false;
  const cudaError_t sm90_status = try_sm90(params, stream, launched);
  if (launched || sm90_status != cudaSuccess) return sm90_status;
#endif
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
