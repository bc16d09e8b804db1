// CPU residual + LayerNorm / RMSNorm: fastattn::cpu_norm_fwd / cpu_norm_bwd.
//
// One task per block of rows (at::parallel_for); each row is read from memory once per
// direction and its passes run on fp32 copies that stay in L1/L2:
//   forward:  h = x * keep / (1 - p) + residual (stored in h's dtype; the statistics are taken
//             on h as stored, so backward sees the same h, mean and rstd), mean = E[h],
//             rstd = 1 / sqrt(E[(h - mean)^2] + eps) (RMSNorm: E[h^2]), y = xhat * w + b.
//   backward: xhat = (h - mean) * rstd, g = dy * w, c1 = E[xhat * g], c2 = E[g] (0 for RMSNorm),
//             dh = rstd * (g - xhat * c1 - c2) + dh_prenorm, dresidual = dh,
//             dx = dh * keep / (1 - p); dweight = sum(dy * xhat), dbias = sum(dy) from per-block
//             fp32 partial rows summed in block order (deterministic for any thread count).
// Dropout bits: the Triton backend's (row_kernels.h norm_dropout_row), regenerated in backward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "buffer_pool.h"
#include "row_kernels.h"

namespace fastattn_cpu {
namespace {

// A (rows, n) operand of any supported dtype with a unit last stride, read or written as fp32
// rows: fp32 rows are used in place, others go through a caller's scratch row.
struct Rows {
  void* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t stride = 0;

  Rows() = default;
  explicit Rows(const at::Tensor& t) : data(t.data_ptr()), dtype(t.scalar_type()), stride(t.stride(0)) {}
  bool present() const { return data != nullptr; }
  bool is_float() const { return dtype == at::kFloat; }
  template <typename T>
  T* row(int64_t i) const { return static_cast<T*>(data) + i * stride; }

  // Row i as fp32: in place for fp32, else converted into scratch.
  const float* load(int64_t i, int64_t n, float* scratch) const {
    switch (dtype) {
      case at::kFloat: return row<float>(i);
      case at::kBFloat16: row_to_float(row<c10::BFloat16>(i), scratch, n); return scratch;
      case at::kHalf: row_to_float(row<c10::Half>(i), scratch, n); return scratch;
      default: TORCH_CHECK(false, "unsupported dtype ", dtype);
    }
  }
  // Where to compute row i in fp32: the row itself for fp32, else scratch (then store()).
  float* target(int64_t i, float* scratch) const { return is_float() ? row<float>(i) : scratch; }
  // Writes a row computed in target(i, scratch) (no-op for fp32).
  void store(int64_t i, int64_t n, const float* src) const {
    switch (dtype) {
      case at::kFloat: return;
      case at::kBFloat16: row_from_float(src, row<c10::BFloat16>(i), n); return;
      case at::kHalf: row_from_float(src, row<c10::Half>(i), n); return;
      default: TORCH_CHECK(false, "unsupported dtype ", dtype);
    }
  }
};

void check_dtype(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, name,
              " must be float32, bfloat16 or float16, got ", d);
}

// A (rows, n) operand on the CPU with a contiguous last dimension.
void check_rows(const at::Tensor& t, int64_t rows, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n, name, " must have shape (", rows, ", ", n,
              "), got ", t.sizes());
  TORCH_CHECK(n <= 1 || t.stride(1) == 1, name, " must have a contiguous last dimension");
  check_dtype(t, name);
}

void check_param(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, name, " must have shape (", n, ",), got ", t->sizes());
  check_dtype(*t, name);
}

float row_sum(const float* v, int64_t n) {
  Vec acc(0.f);
  for_each_vec(n, [&](int64_t j, int64_t c) { acc = acc + Vec::loadu(v + j, c); });
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
}

struct FwdArgs {
  Rows x, residual, y, h;
  const float* weight = nullptr;  // (n,) fp32 copies, or null
  const float* bias = nullptr;
  float* mean = nullptr;  // (rows,), null for RMSNorm
  float* rstd = nullptr;
  int64_t n = 0;
  float eps = 0.f;
  bool is_rms = false;
  bool store_h = false;
  DropoutRng rng;
};

// Scratch rows of one task (fp32, n each).
struct Scratch {
  std::vector<float> buf;
  int64_t n;
  Scratch(int slots, int64_t n_) : buf(static_cast<size_t>(slots) * n_), n(n_) {}
  float* slot(int k) { return buf.data() + k * n; }
};

void forward_row(const FwdArgs& a, int64_t i, Scratch& s) {
  const int64_t n = a.n;
  const float* x = a.x.load(i, n, s.slot(0));
  const float* res = a.residual.present() ? a.residual.load(i, n, s.slot(1)) : nullptr;
  const float* keep = nullptr;
  if (a.rng.enabled) {
    norm_dropout_row(a.rng, i, n, s.slot(2));
    keep = s.slot(2);
  }
  const float* h = x;  // h is x itself when nothing is stored
  if (a.store_h) {
    float* hw = a.h.target(i, s.slot(3));
    for_each_vec(n, [&](int64_t j, int64_t c) {
      Vec v = Vec::loadu(x + j, c);
      if (keep) v = v * Vec::loadu(keep + j, c);
      if (res) v = v + Vec::loadu(res + j, c);
      v.store(hw + j, c);
    });
    if (!a.h.is_float()) {
      a.h.store(i, n, hw);
      a.h.load(i, n, hw);  // statistics of h as stored (rounded)
    }
    h = hw;
  }
  const float inv_n = 1.f / static_cast<float>(n);
  float mean = 0.f;
  Vec acc(0.f);
  if (!a.is_rms) {
    mean = row_sum(h, n) * inv_n;
    const Vec vmean(mean);
    for_each_vec(n, [&](int64_t j, int64_t c) {
      const Vec d = Vec::loadu(h + j, c) - vmean;  // tail lanes load 0: masked below
      acc = acc + (c == kVec ? d * d : Vec::set(Vec(0.f), d * d, c));
    });
  } else {
    for_each_vec(n, [&](int64_t j, int64_t c) {
      const Vec v = Vec::loadu(h + j, c);
      acc = acc + v * v;
    });
  }
  const float var = at::vec::vec_reduce_all<float>([](Vec u, Vec v) { return u + v; }, acc) * inv_n;
  const float rstd = 1.f / std::sqrt(var + a.eps);
  if (a.mean) a.mean[i] = mean;
  a.rstd[i] = rstd;

  float* y = a.y.target(i, s.slot(4));
  const Vec vmean(mean), vrstd(rstd);
  for_each_vec(n, [&](int64_t j, int64_t c) {
    Vec v = (Vec::loadu(h + j, c) - vmean) * vrstd;
    if (a.weight) v = v * Vec::loadu(a.weight + j, c);
    if (a.bias) v = v + Vec::loadu(a.bias + j, c);
    v.store(y + j, c);
  });
  a.y.store(i, n, y);
}

struct BwdArgs {
  Rows dy, dh, h, dx, dresidual;
  const float* mean = nullptr;  // null for RMSNorm
  const float* rstd = nullptr;
  const float* weight = nullptr;
  int64_t n = 0;
  DropoutRng rng;
};

void backward_row(const BwdArgs& a, int64_t i, Scratch& s, float* dw_part, float* db_part) {
  const int64_t n = a.n;
  const float* h = a.h.load(i, n, s.slot(0));
  const float* dy = a.dy.load(i, n, s.slot(1));
  const float* dh = a.dh.present() ? a.dh.load(i, n, s.slot(2)) : nullptr;
  const float* keep = nullptr;
  if (a.rng.enabled) {
    norm_dropout_row(a.rng, i, n, s.slot(3));
    keep = s.slot(3);
  }
  const Vec vmean(a.mean ? a.mean[i] : 0.f), vrstd(a.rstd[i]);
  Vec acc1(0.f), acc2(0.f);
  for_each_vec(n, [&](int64_t j, int64_t c) {
    const Vec xhat = (Vec::loadu(h + j, c) - vmean) * vrstd;
    Vec g = Vec::loadu(dy + j, c);
    if (a.weight) g = g * Vec::loadu(a.weight + j, c);
    // Tail lanes: g is 0 there (dy loads 0), so both products vanish.
    acc1 = acc1 + xhat * g;
    acc2 = acc2 + g;
  });
  const float inv_n = 1.f / static_cast<float>(n);
  const auto add = [](Vec u, Vec v) { return u + v; };
  const Vec c1(at::vec::vec_reduce_all<float>(add, acc1) * inv_n);
  const Vec c2(a.mean ? at::vec::vec_reduce_all<float>(add, acc2) * inv_n : 0.f);

  float* dres = a.dresidual.present() ? a.dresidual.target(i, s.slot(4)) : nullptr;
  float* dx = a.dx.target(i, s.slot(5));
  for_each_vec(n, [&](int64_t j, int64_t c) {
    const Vec dyv = Vec::loadu(dy + j, c);
    const Vec xhat = (Vec::loadu(h + j, c) - vmean) * vrstd;
    const Vec g = a.weight ? dyv * Vec::loadu(a.weight + j, c) : dyv;
    Vec grad = vrstd * (g - xhat * c1 - c2);
    if (dh) grad = grad + Vec::loadu(dh + j, c);
    if (dres) grad.store(dres + j, c);
    (keep ? grad * Vec::loadu(keep + j, c) : grad).store(dx + j, c);
    if (dw_part) (Vec::loadu(dw_part + j, c) + dyv * xhat).store(dw_part + j, c);
    if (db_part) (Vec::loadu(db_part + j, c) + dyv).store(db_part + j, c);
  });
  if (dres) a.dresidual.store(i, n, dres);
  a.dx.store(i, n, dx);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_norm_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p, int64_t seed, int64_t offset, bool is_rms,
    bool store_h, at::ScalarType h_dtype) {
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, hidden), got ", x.sizes());
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "hidden size must be positive");
  check_rows(x, rows, n, "x");
  if (residual.has_value()) check_rows(*residual, rows, n, "residual");
  check_param(weight, n, "weight");
  check_param(bias, n, "bias");
  TORCH_CHECK(!(is_rms && bias.has_value()), "RMSNorm takes no bias");
  TORCH_CHECK(h_dtype == at::kFloat || h_dtype == at::kBFloat16 || h_dtype == at::kHalf,
              "h_dtype must be float32, bfloat16 or float16, got ", h_dtype);
  TORCH_CHECK(store_h || (!residual.has_value() && dropout_p == 0.0 && h_dtype == x.scalar_type()),
              "h can only be x itself (store_h=False) without residual, dropout or a dtype change");
  TORCH_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);

  const auto opts = x.options();
  at::Tensor y = empty_pooled({rows, n}, x.scalar_type());
  at::Tensor h = store_h ? empty_pooled({rows, n}, h_dtype) : at::empty({0}, opts.dtype(h_dtype));
  at::Tensor mean = at::empty({is_rms ? 0 : rows}, opts.dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, opts.dtype(at::kFloat));
  const std::vector<float> w = param_as_float(weight, n), b = param_as_float(bias, n);

  FwdArgs a;
  a.x = Rows(x);
  if (residual.has_value()) a.residual = Rows(*residual);
  a.y = Rows(y);
  if (store_h) a.h = Rows(h);
  a.weight = weight.has_value() ? w.data() : nullptr;
  a.bias = bias.has_value() ? b.data() : nullptr;
  a.mean = is_rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.n = n;
  a.eps = static_cast<float>(eps);
  a.is_rms = is_rms;
  a.store_h = store_h;
  a.rng = DropoutRng(dropout_p, seed, offset);

  const RowBlocks blocks(rows);
  at::parallel_for(0, blocks.count, blocks.grain(n), [&](int64_t b0, int64_t b1) {
    Scratch s(5, n);
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t i = blocks.begin(blk); i < blocks.end(blk); ++i) forward_row(a, i, s);
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_norm_bwd(
    const at::Tensor& dy, const std::optional<at::Tensor>& dh, const at::Tensor& h,
    const std::optional<at::Tensor>& mean, const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double dropout_p, int64_t seed, int64_t offset, bool is_rms,
    std::optional<at::ScalarType> residual_dtype) {
  TORCH_CHECK(h.dim() == 2, "h must be 2-D (rows, hidden), got ", h.sizes());
  const int64_t rows = h.size(0), n = h.size(1);
  TORCH_CHECK(n > 0, "hidden size must be positive");
  check_rows(h, rows, n, "h");
  check_rows(dy, rows, n, "dy");
  if (dh.has_value()) check_rows(*dh, rows, n, "dh");
  check_param(weight, n, "weight");
  check_param(bias, n, "bias");
  TORCH_CHECK(is_rms || mean.has_value(), "LayerNorm backward needs mean");
  const at::Tensor rstd_c = rstd.contiguous();
  TORCH_CHECK(rstd_c.scalar_type() == at::kFloat && rstd_c.numel() == rows, "rstd must be float32 of shape (",
              rows, ",)");
  at::Tensor mean_c;
  if (!is_rms) {
    mean_c = mean->contiguous();
    TORCH_CHECK(mean_c.scalar_type() == at::kFloat && mean_c.numel() == rows, "mean must be float32 of shape (",
                rows, ",)");
  }
  if (residual_dtype.has_value()) {
    const auto d = *residual_dtype;
    TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf,
                "residual_dtype must be float32, bfloat16 or float16, got ", d);
  }

  const auto opts = dy.options();
  at::Tensor dx = empty_pooled({rows, n}, dy.scalar_type());
  at::Tensor dresidual = residual_dtype.has_value() ? empty_pooled({rows, n}, *residual_dtype) : at::empty({0}, opts);
  at::Tensor dweight = weight.has_value() ? at::empty({n}, opts.dtype(weight->scalar_type())) : at::empty({0}, opts);
  at::Tensor dbias = bias.has_value() ? at::empty({n}, opts.dtype(bias->scalar_type())) : at::empty({0}, opts);
  const std::vector<float> w = param_as_float(weight, n);

  const RowBlocks blocks(rows);
  std::vector<float> dw_partial(weight.has_value() ? blocks.count * n : 0, 0.f);
  std::vector<float> db_partial(bias.has_value() ? blocks.count * n : 0, 0.f);

  BwdArgs a;
  a.dy = Rows(dy);
  if (dh.has_value()) a.dh = Rows(*dh);
  a.h = Rows(h);
  a.dx = Rows(dx);
  if (residual_dtype.has_value()) a.dresidual = Rows(dresidual);
  a.mean = is_rms ? nullptr : mean_c.data_ptr<float>();
  a.rstd = rstd_c.data_ptr<float>();
  a.weight = weight.has_value() ? w.data() : nullptr;
  a.n = n;
  a.rng = DropoutRng(dropout_p, seed, offset);

  at::parallel_for(0, blocks.count, blocks.grain(n), [&](int64_t b0, int64_t b1) {
    Scratch s(6, n);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* dw_part = dw_partial.empty() ? nullptr : dw_partial.data() + blk * n;
      float* db_part = db_partial.empty() ? nullptr : db_partial.data() + blk * n;
      for (int64_t i = blocks.begin(blk); i < blocks.end(blk); ++i) backward_row(a, i, s, dw_part, db_part);
    }
  });
  if (weight.has_value()) reduce_partials(dw_partial, blocks.count, n, dweight);
  if (bias.has_value()) reduce_partials(db_partial, blocks.count, n, dbias);
  return {dx, dresidual, dweight, dbias};
}

}  // namespace
}  // namespace fastattn_cpu

// Schemas of the CUDA ops norm_fwd / norm_bwd (csrc/ops.cpp), under cpu_ names so this library
// loads without the CUDA extension. Optional outputs are (0,) tensors.
TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "cpu_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
      "int seed, int offset, bool is_rms, bool store_h, ScalarType h_dtype) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  m.def(
      "cpu_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "float dropout_p, int seed, int offset, bool is_rms, ScalarType? residual_dtype) "
      "-> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_norm_fwd", &fastattn_cpu::cpu_norm_fwd);
  m.impl("cpu_norm_bwd", &fastattn_cpu::cpu_norm_bwd);
}
