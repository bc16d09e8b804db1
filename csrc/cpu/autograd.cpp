// The cpu backend's eager entry points: each op's forward and backward as one C++ autograd node
// (torch::autograd::Function) over the kernels' own ops, called through the dispatcher:
//   fastattn::cpu_norm_autograd       -> cpu_norm_fwd / cpu_norm_bwd        (norm.cpp)
//   fastattn::cpu_attention_autograd  -> cpu_attention_fwd / _bwd           (attention.cpp)
//   fastattn::cpu_ffn_autograd        -> cpu_ffn_fwd / cpu_ffn_bwd          (ffn.cpp)
//
// Why: in a small model on a CPU a kernel takes tens of microseconds, and a Python
// torch.autograd.Function costs about as much again per op (apply and ctx, the backward called
// back into Python, the reshapes recorded as views). Here one Python call records the node
// (or, without grad, only runs the forward), the reshapes happen below autograd, and the
// backward runs without Python. Every plain eager call on the cpu backend comes here
// (fastattn/cpu/<op>.py eager_plan, from fastattn/ops/_custom_op.py) after the Python layer
// has validated the inputs and selected the backend; anything that traces sees the custom ops
// and their register_autograd rules instead. The arguments are the kernels' (same scalars, same
// meaning); the results are bit-identical to the custom ops' (tests/test_eager_path.py).
//
// Autocast is off inside (forward and backward), as in the Python path: the kernels choose their
// own casting points (the FFN's GEMMs must not turn bf16 under a CPU autocast region).
// Like @once_differentiable: the backward is not differentiable; under create_graph its
// outputs carry a DelayedError node that raises when differentiated.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastattn_cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// The kernels' ops: looked up once, called through the dispatcher (under a fake tensor mode
// their fake functions run, so the nodes trace like any composite).
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using NormFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, double, int64_t, int64_t, bool,
    bool, at::ScalarType);
using NormBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&,
    const OptTensor&, double, int64_t, int64_t, bool, std::optional<at::ScalarType>);
using AttentionFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, const OptTensor&, const OptTensor&, double,
                                                        double, bool, int64_t, int64_t, int64_t, double, int64_t,
                                                        int64_t);
using AttentionBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, double, double, bool, int64_t, int64_t, int64_t, double,
    int64_t, int64_t);
using FfnFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                  const at::Tensor&, const OptTensor&, c10::string_view, double,
                                                  int64_t, int64_t, bool);
using FfnBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
    const OptTensor&, c10::string_view, double, int64_t, int64_t);

// Autocast off for the scope (the kernels' own GEMMs and casts must see the real dtypes).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

OptTensor present(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// (..., n) -> (rows, n) with a unit last stride (a view when the layout allows).
at::Tensor as_rows(const at::Tensor& t, int64_t n) {
  at::Tensor rows = t.reshape({-1, n});
  return rows.stride(1) == 1 || n == 1 ? rows : rows.contiguous();
}

// once_differentiable: with create_graph, the gradients get a node that raises if used.
variable_list not_differentiable_again(variable_list grads, const variable_list& inputs) {
  if (!at::GradMode::is_enabled()) return grads;
  bool any = false;
  for (const auto& t : inputs) any = any || (t.defined() && t.requires_grad());
  if (!any) return grads;
  // The error node is attached only to inputs that require grad (as in Python's
  // once_differentiable, detached aliases that do).
  for (auto& t : grads) {
    if (!t.defined()) continue;
    t = t.detach();
    t.set_requires_grad(true);
  }
  return torch::autograd::DelayedError(
             "trying to differentiate twice a function that was marked with @once_differentiable "
             "(fastattn's cpu autograd nodes)",
             static_cast<int64_t>(grads.size()))
      .apply(std::move(grads));
}

// (rows, d_out) rows of x (..., d_model) -> (..., d_out)
at::Tensor shaped_like(const at::Tensor& rows, const at::Tensor& x) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = rows.size(1);
  return rows.view(shape);
}

// ---------------------------------------------------------------------------------------------
// Residual + LayerNorm / RMSNorm: y, h shaped like x (h: (0,) when store_h is false, h is x).
// ---------------------------------------------------------------------------------------------
struct NormNode : torch::autograd::Function<NormNode> {
  // The residual's gradient: none (no residual), dx itself (no dropout, x's dtype), or its own.
  enum ResidualGrad : int64_t { kNoResidual = 0, kSameAsDx = 1, kOwnTensor = 2 };

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps, double dropout_p,
                               int64_t seed, int64_t offset, bool is_rms, bool store_h, at::ScalarType h_dtype) {
    const NoAutocast no_autocast;
    static const auto fwd = kernel_op<NormFwd>("fastattn::cpu_norm_fwd");
    const int64_t n = x.size(-1);
    const at::Tensor x2 = as_rows(x, n);
    const OptTensor r2 = residual.has_value() ? OptTensor(as_rows(*residual, n)) : std::nullopt;
    auto [y, h, mean, rstd] = fwd.call(x2, r2, weight, bias, eps, dropout_p, seed, offset, is_rms, store_h, h_dtype);
    ctx->save_for_backward({store_h ? h : x2, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()),
                            is_rms ? at::Tensor() : mean, rstd});
    // dresidual equals dx without dropout when the dtypes match: one tensor serves both
    const bool shared = residual.has_value() && dropout_p == 0.0 && residual->scalar_type() == x.scalar_type();
    ctx->saved_data["p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["is_rms"] = is_rms;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    ctx->saved_data["residual"] = static_cast<int64_t>(residual.has_value() ? (shared ? kSameAsDx : kOwnTensor)
                                                                            : kNoResidual);
    ctx->saved_data["residual_dtype"] =
        static_cast<int64_t>(residual.has_value() ? residual->scalar_type() : x.scalar_type());
    ctx->saved_data["shape"] = x.sizes();
    ctx->set_materialize_grads(false);
    if (!store_h) {
      ctx->mark_non_differentiable({h});
      return {y.view(x.sizes()), h};
    }
    return {y.view(x.sizes()), h.view(x.sizes())};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const NoAutocast no_autocast;
    static const auto bwd = kernel_op<NormBwd>("fastattn::cpu_norm_bwd");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &rstd = saved[4];
    variable_list result(11);
    if (!grads[0].defined() && !grads[1].defined()) return result;
    const int64_t rows = h.size(0), n = h.size(1);
    const auto x_dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
    const int64_t residual = ctx->saved_data["residual"].toInt();
    const at::Tensor dy = grads[0].defined() ? grads[0].reshape({rows, n}).contiguous()
                                             : at::zeros({rows, n}, h.options().dtype(x_dtype));
    const OptTensor dh = grads[1].defined() ? OptTensor(grads[1].reshape({rows, n}).contiguous()) : std::nullopt;
    const std::optional<at::ScalarType> residual_dtype =
        residual == kOwnTensor ? std::optional<at::ScalarType>(
                            static_cast<at::ScalarType>(ctx->saved_data["residual_dtype"].toInt()))
                      : std::nullopt;
    at::Tensor dx, dresidual, dweight, dbias;
    {
      at::AutoGradMode no_grad(false);
      std::tie(dx, dresidual, dweight, dbias) =
          bwd.call(dy, dh, h, present(saved[3]), rstd, present(saved[1]), present(saved[2]),
                   ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(),
                   ctx->saved_data["offset"].toInt(), ctx->saved_data["is_rms"].toBool(), residual_dtype);
    }
    const auto shape = ctx->saved_data["shape"].toIntVector();
    result[0] = dx.view(shape);
    if (residual == kSameAsDx) result[1] = result[0];
    if (residual == kOwnTensor) result[1] = dresidual.view(shape);
    if (saved[1].defined()) result[2] = dweight;
    if (saved[2].defined()) result[3] = dbias;
    return not_differentiable_again(std::move(result), grads);
  }
};

std::tuple<at::Tensor, at::Tensor> norm_autograd(const at::Tensor& x, const OptTensor& residual,
                                                 const OptTensor& weight, const OptTensor& bias, double eps,
                                                 double dropout_p, int64_t seed, int64_t offset, bool is_rms,
                                                 bool store_h, at::ScalarType h_dtype) {
  auto out = NormNode::apply(x, residual, weight, bias, eps, dropout_p, seed, offset, is_rms, store_h, h_dtype);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// Attention (flash layout): out (B, Lq, H, D), lse (B, H, Lq) fp32 (not differentiable).
// ---------------------------------------------------------------------------------------------
struct AttentionNode : torch::autograd::Function<AttentionNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& key_padding_mask, const OptTensor& attn_mask,
                               const OptTensor& alibi_slopes, double softmax_scale, double softcap, bool causal,
                               int64_t shift, int64_t window_left, int64_t window_right, double dropout_p,
                               int64_t seed, int64_t offset) {
    const NoAutocast no_autocast;
    static const auto fwd = kernel_op<AttentionFwd>("fastattn::cpu_attention_fwd");
    auto [out, lse] = fwd.call(q, k, v, key_padding_mask, attn_mask, alibi_slopes, softmax_scale, softcap, causal,
                               shift, window_left, window_right, dropout_p, seed, offset);
    ctx->save_for_backward({q, k, v, key_padding_mask.value_or(at::Tensor()), attn_mask.value_or(at::Tensor()),
                            alibi_slopes.value_or(at::Tensor()), out, lse});
    ctx->saved_data["scale"] = softmax_scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["shift"] = shift;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const NoAutocast no_autocast;
    static const auto bwd = kernel_op<AttentionBwd>("fastattn::cpu_attention_bwd");
    variable_list result(15);
    if (!grads[0].defined()) return result;  // out took no part in the loss
    const variable_list s = ctx->get_saved_variables();
    const auto& d = ctx->saved_data;
    at::Tensor dq, dk, dv;
    {
      at::AutoGradMode no_grad(false);
      std::tie(dq, dk, dv) =
          bwd.call(grads[0].contiguous(), s[0], s[1], s[2], s[6], s[7], present(s[3]), present(s[4]), present(s[5]),
                   d.at("scale").toDouble(), d.at("softcap").toDouble(), d.at("causal").toBool(),
                   d.at("shift").toInt(), d.at("window_left").toInt(), d.at("window_right").toInt(),
                   d.at("p").toDouble(), d.at("seed").toInt(), d.at("offset").toInt());
    }
    result[0] = dq;
    result[1] = dk;
    result[2] = dv;
    return not_differentiable_again(std::move(result), grads);
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const OptTensor& key_padding_mask, const OptTensor& attn_mask,
                                                      const OptTensor& alibi_slopes, double softmax_scale,
                                                      double softcap, bool causal, int64_t shift,
                                                      int64_t window_left, int64_t window_right, double dropout_p,
                                                      int64_t seed, int64_t offset) {
  auto out = AttentionNode::apply(q, k, v, key_padding_mask, attn_mask, alibi_slopes, softmax_scale, softcap, causal,
                                  shift, window_left, window_right, dropout_p, seed, offset);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// FFN: y (..., d_out) from x (..., d_model); z (the pre-activation) saved unless recomputed.
// ---------------------------------------------------------------------------------------------
struct FfnNode : torch::autograd::Function<FfnNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1,
                               const at::Tensor& w2, const OptTensor& b2, c10::string_view activation,
                               double dropout_p, int64_t seed, int64_t offset, bool save_z) {
    const NoAutocast no_autocast;
    static const auto fwd = kernel_op<FfnFwd>("fastattn::cpu_ffn_fwd");
    const at::Tensor x2 = as_rows(x, x.size(-1));
    auto [y, z] = fwd.call(x2, w1, b1, w2, b2, activation, dropout_p, seed, offset, save_z);
    ctx->save_for_backward({x2, w1, b1.value_or(at::Tensor()), w2, b2.value_or(at::Tensor()),
                            save_z ? z : at::Tensor()});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["shape"] = x.sizes();
    ctx->set_materialize_grads(false);
    return {shaped_like(y, x)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const NoAutocast no_autocast;
    static const auto bwd = kernel_op<FfnBwd>("fastattn::cpu_ffn_bwd");
    variable_list result(10);
    if (!grads[0].defined()) return result;
    const variable_list s = ctx->get_saved_variables();  // x2, w1, b1, w2, b2, z
    const auto& d = ctx->saved_data;
    const std::string activation = d.at("activation").toStringRef();
    at::Tensor dx, dw1, db1, dw2, db2;
    {
      at::AutoGradMode no_grad(false);
      std::tie(dx, dw1, db1, dw2, db2) =
          bwd.call(grads[0].reshape({-1, grads[0].size(-1)}).contiguous(), present(s[5]), s[0], s[1], present(s[2]),
                   s[3], present(s[4]), activation, d.at("p").toDouble(), d.at("seed").toInt(),
                   d.at("offset").toInt());
    }
    result[0] = dx.view(d.at("shape").toIntVector());
    result[1] = dw1;
    if (s[2].defined()) result[2] = db1;
    result[3] = dw2;
    if (s[4].defined()) result[4] = db2;
    return not_differentiable_again(std::move(result), grads);
  }
};

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return t.has_value() && t->requires_grad(); }

at::Tensor ffn_autograd(const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const at::Tensor& w2,
                        const OptTensor& b2, c10::string_view activation, double dropout_p, int64_t seed,
                        int64_t offset, bool save_z) {
  const bool records = at::GradMode::is_enabled() && (requires_grad(x) || requires_grad(w1) || requires_grad(b1) ||
                                                      requires_grad(w2) || requires_grad(b2));
  if (records) return FfnNode::apply(x, w1, b1, w2, b2, activation, dropout_p, seed, offset, save_z)[0];
  // Inference: nothing is saved, so the activation overwrites z in place (save_z false: one
  // (rows, d_ff) buffer fewer to write; the same arithmetic, the same y).
  static const auto fwd = kernel_op<FfnFwd>("fastattn::cpu_ffn_fwd");
  const NoAutocast no_autocast;
  const at::Tensor y = std::get<0>(fwd.call(as_rows(x, x.size(-1)), w1, b1, w2, b2, activation, dropout_p, seed,
                                            offset, /*save_z=*/false));
  return shaped_like(y, x);
}

}  // namespace
}  // namespace fastattn_cpu

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // x, residual (..., N); returns y and h shaped like x (h: (0,) when store_h is false).
  m.def(
      "cpu_norm_autograd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
      "int seed, int offset, bool is_rms, bool store_h, ScalarType h_dtype) -> (Tensor y, Tensor h)");
  m.def(
      "cpu_attention_autograd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_mask, "
      "Tensor? alibi_slopes, float softmax_scale, float softcap, bool causal, int shift, int window_left, "
      "int window_right, float dropout_p, int seed, int offset) -> (Tensor out, Tensor lse)");
  // x (..., d_model) -> y (..., d_out)
  m.def(
      "cpu_ffn_autograd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, float dropout_p, "
      "int seed, int offset, bool save_z) -> Tensor y");
}

// Autograd: the nodes above. CPU (inference mode, where the autograd keys are off): the same
// functions, which then record nothing.
TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("cpu_norm_autograd", &fastattn_cpu::norm_autograd);
  m.impl("cpu_attention_autograd", &fastattn_cpu::attention_autograd);
  m.impl("cpu_ffn_autograd", &fastattn_cpu::ffn_autograd);
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_norm_autograd", &fastattn_cpu::norm_autograd);
  m.impl("cpu_attention_autograd", &fastattn_cpu::attention_autograd);
  m.impl("cpu_ffn_autograd", &fastattn_cpu::ffn_autograd);
}
