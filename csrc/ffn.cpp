// CUDA implementations of fastattn::ffn_fwd and fastattn::ffn_bwd (schemas in csrc/ops.cpp):
// allocate outputs, fill FfnGemmParams, call the plain launchers of kernels/ffn.
//
//   ffn_fwd: z = x @ w1^T + b1, a = dropout(act(z)) (one GEMM, fused epilogue);
//            y = a @ w2^T + b2 (one GEMM). Returns (y, z), z = empty (0,) unless save_z.
//   ffn_bwd: [z recompute GEMM]; dz and a_d from dy @ w2 (fused epilogue); dw2 = dy^T a_d;
//            dx = dz w1; dw1 = dz^T x; db2, db1 = column sums. Returns (dx, dw1, db1, dw2,
//            db2), db1 / db2 = empty (0,) when b1 / b2 is None.
// The public Python function has validated shapes and dtypes; the checks here guard direct
// torch.ops callers. Which engine runs each GEMM (CUTLASS sm_90a or the hand-written kernel) is
// decided in kernels/ffn/ffn_dispatch.cu; FASTATTN_FFN_CUTLASS=0 in the environment (read per
// call) keeps every GEMM on the hand-written kernel; ffn_cutlass_serves reports that choice.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "ffn/ffn_params.h"

namespace fastattn {
namespace {

using at::Tensor;
using ffn::Activation;
using ffn::FfnColSumParams;
using ffn::FfnGemmParams;
using ffn::GemmKind;

Activation parse_activation(c10::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "swiglu") return Activation::kSwiglu;
  TORCH_CHECK(false, "fastattn::ffn: activation must be relu, gelu, gelu_tanh, silu or swiglu, got ",
              std::string(name));
}

// Tensor-core kernels: fp16 / bf16 only (float32 is served by the triton backend).
DType half_dtype(const Tensor& x) {
  const DType dtype = kernel_dtype(x.scalar_type(), "x");
  TORCH_CHECK(dtype != DType::kFloat32, "fastattn::ffn (cuda): x must be float16 or bfloat16, got ",
              x.scalar_type());
  return dtype;
}

// Kernel-side sizes are int (ffn::kMaxDim leaves room for tile arithmetic).
int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= ffn::kMaxDim, "fastattn::ffn (cuda): ", what, " = ", v, " is above ",
              ffn::kMaxDim);
  return static_cast<int>(v);
}

void check_operand(const Tensor& t, const char* name, const Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), "fastattn::ffn: ", name, " must be on ", x.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fastattn::ffn: ", name, " must have dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fastattn::ffn: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.dim() != 2 || t.size(1) <= 1 || t.stride(1) == 1, "fastattn::ffn: ", name,
              " needs a contiguous last dimension");
  TORCH_CHECK(t.dim() != 1 || t.size(0) <= 1 || t.stride(0) == 1, "fastattn::ffn: ", name,
              " must be contiguous");
}

const void* optional_ptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr() : nullptr;
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// 16-byte cp.async needs 16-byte aligned bases and row strides that are multiples of 8.
bool vec_ok(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(0) <= 1 || t.stride(0) % 8 == 0);
}

bool cutlass_allowed() {
  const char* value = std::getenv("FASTATTN_FFN_CUTLASS");
  return value == nullptr || std::string(value) != "0";
}

FfnGemmParams gemm_params(DType dtype, GemmKind kind, Activation act, int64_t M, int64_t N, int64_t K,
                          const Tensor& A, const Tensor& B) {
  FfnGemmParams p{};
  p.dtype = dtype;
  p.kind = kind;
  p.act = act;
  p.M = to_int(M, "GEMM M");
  p.N = to_int(N, "GEMM N");
  p.K = to_int(K, "GEMM K");
  p.A = A.data_ptr();
  p.lda = A.stride(0);
  p.B = B.data_ptr();
  p.ldb = B.stride(0);
  p.vec_loads = vec_ok(A) && vec_ok(B);
  p.allow_sm90 = cutlass_allowed();
  return p;
}

void set_dropout(FfnGemmParams& p, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn::ffn: dropout_p must be in [0, 1), got ",
              dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
}

void run_gemm(const FfnGemmParams& p, cudaStream_t stream, const char* what) {
  check_cuda_status(ffn::run_ffn_gemm(p, stream), what);
}

// out (N,) = sum over rows of X (M, N), deterministic (see kernels/ffn/ffn_colsum.cu).
Tensor column_sum(const Tensor& X, DType dtype, cudaStream_t stream) {
  const int M = to_int(X.size(0), "rows"), N = to_int(X.size(1), "columns");
  Tensor out = at::empty({X.size(1)}, X.options());
  Tensor partial = at::empty({ffn::ffn_colsum_chunks(M), X.size(1)}, X.options().dtype(at::kFloat));
  FfnColSumParams p{};
  p.dtype = dtype;
  p.M = M;
  p.N = N;
  p.X = X.data_ptr();
  p.ldx = X.stride(0);
  p.partial = partial.data_ptr<float>();
  p.out = out.data_ptr();
  check_cuda_status(ffn::run_ffn_colsum(p, stream), "fastattn::ffn_bwd bias-gradient reduction");
  return out;
}

struct Dims {
  int64_t M, d_model, d_hidden, d_ff, d_out;
};

Dims check_inputs(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1, const Tensor& w2,
                  const std::optional<Tensor>& b2, Activation act) {
  CHECK_DEVICE(x);
  TORCH_CHECK(x.dim() == 2, "fastattn::ffn: x must be 2-D (M, d_model), got ", x.sizes());
  TORCH_CHECK(w1.dim() == 2 && w2.dim() == 2, "fastattn::ffn: w1 and w2 must be 2-D");
  const Dims d{x.size(0), x.size(1), w1.size(0), w2.size(1), w2.size(0)};
  TORCH_CHECK(d.d_hidden == (act == Activation::kSwiglu ? 2 * d.d_ff : d.d_ff),
              "fastattn::ffn: w1 has ", d.d_hidden, " rows, w2 has d_ff = ", d.d_ff,
              " columns (swiglu needs 2 * d_ff rows)");
  check_operand(x, "x", x, {d.M, d.d_model});
  check_operand(w1, "w1", x, {d.d_hidden, d.d_model});
  check_operand(w2, "w2", x, {d.d_out, d.d_ff});
  if (has(b1)) check_operand(*b1, "b1", x, {d.d_hidden});
  if (has(b2)) check_operand(*b2, "b2", x, {d.d_out});
  return d;
}

std::tuple<Tensor, Tensor> ffn_fwd_cuda(const Tensor& x, const Tensor& w1, const std::optional<Tensor>& b1,
                                        const Tensor& w2, const std::optional<Tensor>& b2,
                                        c10::string_view activation, double dropout_p, int64_t seed,
                                        int64_t offset, bool save_z) {
  const Activation act = parse_activation(activation);
  const DType dtype = half_dtype(x);
  const Dims d = check_inputs(x, w1, b1, w2, b2, act);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Tensor y = at::empty({d.M, d.d_out}, x.options());
  Tensor z = save_z ? at::empty({d.M, d.d_hidden}, x.options()) : at::empty({0}, x.options());
  Tensor a = at::empty({d.M, d.d_ff}, x.options());  // dropout(act(z)), the second GEMM's A

  FfnGemmParams p1 = gemm_params(dtype, GemmKind::kFwdAct, act, d.M, d.d_ff, d.d_model, x, w1);
  p1.bias = optional_ptr(b1);
  p1.Z = save_z ? z.data_ptr() : nullptr;
  p1.ldz = d.d_hidden;
  p1.act_out = a.data_ptr();
  p1.ld_act = d.d_ff;
  set_dropout(p1, dropout_p, seed, offset);
  run_gemm(p1, stream, "fastattn::ffn_fwd first GEMM (x @ w1^T + activation)");

  FfnGemmParams p2 = gemm_params(dtype, GemmKind::kBiasNT, Activation::kNone, d.M, d.d_out, d.d_ff, a, w2);
  p2.bias = optional_ptr(b2);
  p2.C = y.data_ptr();
  p2.ldc = d.d_out;
  run_gemm(p2, stream, "fastattn::ffn_fwd second GEMM (a @ w2^T + b2)");
  return {y, z};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ffn_bwd_cuda(
    const Tensor& dy, const std::optional<Tensor>& z_saved, const Tensor& x, const Tensor& w1,
    const std::optional<Tensor>& b1, const Tensor& w2, const std::optional<Tensor>& b2,
    c10::string_view activation, double dropout_p, int64_t seed, int64_t offset) {
  const Activation act = parse_activation(activation);
  const DType dtype = half_dtype(x);
  const Dims d = check_inputs(x, w1, b1, w2, b2, act);
  check_operand(dy, "dy", x, {d.M, d.d_out});
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Tensor z;
  if (has(z_saved)) {
    z = *z_saved;
    check_operand(z, "z", x, {d.M, d.d_hidden});
  } else {  // recompute: z = x @ w1^T + b1, the plain biased GEMM (swiglu: all 2F columns)
    z = at::empty({d.M, d.d_hidden}, x.options());
    FfnGemmParams pz = gemm_params(dtype, GemmKind::kBiasNT, Activation::kNone, d.M, d.d_hidden, d.d_model, x, w1);
    pz.bias = optional_ptr(b1);
    // Same engine as the forward GEMM that produced z would have used: z is bitwise equal.
    pz.allow_sm90 = pz.allow_sm90 && ffn::ffn_sm90_serves(GemmKind::kFwdAct, act, dropout_p > 0.0);
    pz.C = z.data_ptr();
    pz.ldc = d.d_hidden;
    run_gemm(pz, stream, "fastattn::ffn_bwd recompute GEMM (x @ w1^T + b1)");
  }

  // dz = (dy @ w2) * keep / (1 - p) * act'(z); a_d = keep / (1 - p) * act(z).
  Tensor dz = at::empty({d.M, d.d_hidden}, x.options());
  Tensor a_d = at::empty({d.M, d.d_ff}, x.options());
  FfnGemmParams pa = gemm_params(dtype, GemmKind::kBwdAct, act, d.M, d.d_ff, d.d_out, dy, w2);
  pa.C = dz.data_ptr();
  pa.ldc = d.d_hidden;
  pa.Z = z.data_ptr();
  pa.ldz = z.stride(0);
  pa.act_out = a_d.data_ptr();
  pa.ld_act = d.d_ff;
  set_dropout(pa, dropout_p, seed, offset);
  run_gemm(pa, stream, "fastattn::ffn_bwd activation-gradient GEMM (dy @ w2)");

  // dw2 (d_out, F) = dy^T @ a_d: A = dy stored (K = M, d_out), B = a_d (K = M, F).
  Tensor dw2 = at::empty({d.d_out, d.d_ff}, x.options());
  FfnGemmParams pw2 = gemm_params(dtype, GemmKind::kBiasTN, Activation::kNone, d.d_out, d.d_ff, d.M, dy, a_d);
  pw2.C = dw2.data_ptr();
  pw2.ldc = d.d_ff;
  run_gemm(pw2, stream, "fastattn::ffn_bwd dw2 GEMM (dy^T @ a)");

  // dx (M, d_model) = dz @ w1: B = w1 (K = d_hidden, d_model).
  Tensor dx = at::empty({d.M, d.d_model}, x.options());
  FfnGemmParams px = gemm_params(dtype, GemmKind::kBiasNN, Activation::kNone, d.M, d.d_model, d.d_hidden, dz, w1);
  px.C = dx.data_ptr();
  px.ldc = d.d_model;
  run_gemm(px, stream, "fastattn::ffn_bwd dx GEMM (dz @ w1)");

  // dw1 (d_hidden, d_model) = dz^T @ x: A = dz stored (K = M, d_hidden), B = x (K = M, d_model).
  Tensor dw1 = at::empty({d.d_hidden, d.d_model}, x.options());
  FfnGemmParams pw1 = gemm_params(dtype, GemmKind::kBiasTN, Activation::kNone, d.d_hidden, d.d_model, d.M, dz, x);
  pw1.C = dw1.data_ptr();
  pw1.ldc = d.d_model;
  run_gemm(pw1, stream, "fastattn::ffn_bwd dw1 GEMM (dz^T @ x)");

  Tensor db1 = has(b1) ? column_sum(dz, dtype, stream) : at::empty({0}, x.options());
  Tensor db2 = has(b2) ? column_sum(dy, dtype, stream) : at::empty({0}, x.options());
  return {dx, dw1, db1, dw2, db2};
}

// The conditions run_ffn_gemm checks before the operands: the environment switch, the
// epilogue rule and the device image; kFwdAct and kBwdAct share the rule.
bool ffn_cutlass_serves(int64_t device, std::optional<c10::string_view> activation, bool dropout) {
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "fastattn::ffn_cutlass_serves: no CUDA device ",
              device, " (", static_cast<int>(c10::cuda::device_count()), " visible)");
  const bool rule =
      !activation.has_value() || ffn::ffn_sm90_serves(GemmKind::kFwdAct, parse_activation(*activation), dropout);
  if (!cutlass_allowed() || !rule) return false;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return ffn::ffn_sm90_device_ready();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("ffn_fwd", &ffn_fwd_cuda);
  m.impl("ffn_bwd", &ffn_bwd_cuda);
}

// No tensor argument to dispatch on: CompositeExplicitAutograd is the kernel the dispatcher
// picks for tensor-less calls.
TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("ffn_cutlass_serves", &ffn_cutlass_serves);
}

}  // namespace fastattn
