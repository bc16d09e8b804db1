// CPU residual + LayerNorm / RMSNorm: fastattn::cpu_norm_fwd / cpu_norm_bwd.
//
// Blocks of rows handed out to the threads one at a time (parallel_blocks); each row is read
// from memory once per direction and its passes run on fp32 copies that stay in L1/L2, while
// the next rows are prefetched. The kernels are bound by memory bandwidth: forward reads x and
// residual and writes h and y, backward reads dy, dh and h and writes dx (and dresidual only
// when it differs from dx); outputs come from the buffer pool (buffer_pool.h), reused rather
// than faulted in on every call.
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
#include <memory>
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
  int64_t elem_bytes = 4;

  Rows() = default;
  explicit Rows(const at::Tensor& t)
      : data(t.data_ptr()), dtype(t.scalar_type()), stride(t.stride(0)), elem_bytes(t.element_size()) {}
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
  // Whether row stores may bypass the caches (stream_vec): fp32 rows, each 64-byte aligned.
  bool can_stream() const {
    return is_float() && reinterpret_cast<uintptr_t>(data) % 64 == 0 && (stride * elem_bytes) % 64 == 0;
  }
  // Asks for the cache line holding elements [j, j + kVec) of row i (a hint: never faults).
  void prefetch(int64_t i, int64_t j) const {
    if (present()) __builtin_prefetch(static_cast<const char*>(data) + (i * stride + j) * elem_bytes, 0, 2);
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

const auto vec_add = [](Vec u, Vec v) { return u + v; };

// Sum of f(j, count) over the vector steps of [0, n), on four independent accumulators: one
// chain would wait on the add latency at every step.
template <typename F>
float sum_row(int64_t n, const F& f) {
  Vec acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) {
    acc0 = acc0 + f(j, kVec);
    acc1 = acc1 + f(j + kVec, kVec);
    acc2 = acc2 + f(j + 2 * kVec, kVec);
    acc3 = acc3 + f(j + 3 * kVec, kVec);
  }
  for (; j < n; j += kVec) acc0 = acc0 + f(j, std::min(kVec, n - j));
  return at::vec::vec_reduce_all<float>(vec_add, (acc0 + acc1) + (acc2 + acc3));
}

struct FwdArgs {
  Rows x, residual, y, h;
  const float* weight = nullptr;  // (n,) fp32 copies, or null
  const float* bias = nullptr;
  float* mean = nullptr;  // (rows,), null for RMSNorm
  float* rstd = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  float eps = 0.f;
  bool is_rms = false;
  bool store_h = false;
  bool stream_y = false;  // y written around the caches (stream_vec)
  DropoutRng rng;
};

// Scratch rows of one task (fp32, n each), left uninitialized: fp32 rows without dropout use
// none of them, and their untouched pages then cost nothing.
struct Scratch {
  std::unique_ptr<float[]> buf;
  int64_t n;
  Scratch(int slots, int64_t n_) : buf(new float[static_cast<size_t>(slots) * n_]), n(n_) {}
  float* slot(int k) { return buf.get() + k * n; }
};

// Row i in three passes: h = x * keep + residual (written, and summed in the same pass, the one
// reading x and residual), the centred sum of squares (RMSNorm: the sum of squares, taken in
// the first pass for fp32 h), y (written, while the next row's x and residual are prefetched).
void forward_row(const FwdArgs& a, int64_t i, Scratch& s) {
  const int64_t n = a.n;
  const float* x = a.x.load(i, n, s.slot(0));
  const float* res = a.residual.present() ? a.residual.load(i, n, s.slot(1)) : nullptr;
  const float* keep = nullptr;
  if (a.rng.enabled) {
    norm_dropout_row(a.rng, i, n, s.slot(2));
    keep = s.slot(2);
  }
  // Sum (LayerNorm) or sum of squares (RMSNorm) of v, the tail lanes of which load as zeros.
  const auto moment = [&](const Vec& v) { return a.is_rms ? v * v : v; };
  const float* h = x;  // h is x itself when nothing is stored
  float first_moment = 0.f;
  bool have_moment = false;
  if (a.store_h) {
    float* hw = a.h.target(i, s.slot(3));
    const float total = sum_row(n, [&](int64_t j, int64_t c) {
      Vec v = Vec::loadu(x + j, c);
      if (keep) v = v * Vec::loadu(keep + j, c);
      if (res) v = v + Vec::loadu(res + j, c);
      v.store(hw + j, c);
      return moment(v);
    });
    if (a.h.is_float()) {
      first_moment = total;
      have_moment = true;
    } else {
      a.h.store(i, n, hw);
      a.h.load(i, n, hw);  // statistics of h as stored (rounded)
    }
    h = hw;
  }
  if (!have_moment) first_moment = sum_row(n, [&](int64_t j, int64_t c) { return moment(Vec::loadu(h + j, c)); });

  const float inv_n = 1.f / static_cast<float>(n);
  float mean = 0.f, var = 0.f;
  if (a.is_rms) {
    var = first_moment * inv_n;
  } else {
    mean = first_moment * inv_n;
    const Vec vmean(mean);
    var = sum_row(n, [&](int64_t j, int64_t c) {
      const Vec d = Vec::loadu(h + j, c) - vmean;  // tail lanes load 0: masked
      return c == kVec ? d * d : Vec::set(Vec(0.f), d * d, c);
    }) * inv_n;
  }
  const float rstd = 1.f / std::sqrt(var + a.eps);
  if (a.mean) a.mean[i] = mean;
  a.rstd[i] = rstd;

  const bool prefetch = i + 1 < a.rows;
  float* y = a.y.target(i, s.slot(4));
  const Vec vmean(mean), vrstd(rstd);
  for_each_vec(n, [&](int64_t j, int64_t c) {
    if (prefetch) {
      a.x.prefetch(i + 1, j);
      a.residual.prefetch(i + 1, j);
    }
    Vec v = (Vec::loadu(h + j, c) - vmean) * vrstd;
    if (a.weight) v = v * Vec::loadu(a.weight + j, c);
    if (a.bias) v = v + Vec::loadu(a.bias + j, c);
    if (a.stream_y && c == kVec) {
      stream_vec(y + j, v);
    } else {
      v.store(y + j, c);
    }
  });
  a.y.store(i, n, y);
}

struct BwdArgs {
  Rows dy, dh, h, dx, dresidual;
  const float* mean = nullptr;  // null for RMSNorm
  const float* rstd = nullptr;
  const float* weight = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  bool stream_dx = false;  // dx and dresidual written around the caches (stream_vec)
  DropoutRng rng;
};

// Outputs (y, dx, dresidual) at least this large are written around the caches (stream_vec),
// as measured on a 2-core Xeon (2 MiB of L2 per core): a store through the caches first reads
// the line, which a streamed store saves (M4096 N4096 fp32 backward: 16 -> 11.5 ms on one
// thread), but an output that fits the last-level cache with the call's other tensors is
// faster written through it, and stays there for its reader (M4096 N1024, 16 MiB outputs:
// forward 1.3 -> 2.0 ms with y streamed, backward 1.5 -> 1.6 ms with dx streamed, in a loop).
constexpr int64_t kStreamBytes = int64_t{32} << 20;

// Rows processed together by backward_rows: their dweight / dbias contributions are summed in
// registers and added to the block's partial rows once per group, not once per row.
constexpr int64_t kBwdGroup = 8;
constexpr int kBwdSlots = 6;  // scratch rows per group row: h, dy, dh, keep, dresidual, dx

// One row of a backward group: fp32 views (in place or in scratch) and its constants.
struct BwdRow {
  const float* h;
  const float* dy;
  const float* dh;    // null without the prenorm gradient
  const float* keep;  // null without dropout
  float* dres;        // null without a separate dresidual
  float* dx;
  float mean, rstd, c1, c2;
};

// Rows [i0, i0 + count) (count <= kBwdGroup) in two passes: per row, c1 = E[xhat * g] and
// c2 = E[g] (reading h and dy); then, column by column over the group, the gradients (reading
// dh, writing dx / dresidual) and the group's sums of dy * xhat and dy, added to the block's
// dweight / dbias rows (written, by the block's first group).
void backward_rows(const BwdArgs& a, int64_t i0, int64_t count, Scratch& s, float* dw_part, float* db_part,
                   bool first_in_block) {
  const int64_t n = a.n;
  const float inv_n = 1.f / static_cast<float>(n);
  BwdRow rows[kBwdGroup];
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = i0 + k;
    const int slot = static_cast<int>(k) * kBwdSlots;
    BwdRow& r = rows[k];
    r.h = a.h.load(i, n, s.slot(slot));
    r.dy = a.dy.load(i, n, s.slot(slot + 1));
    r.dh = a.dh.present() ? a.dh.load(i, n, s.slot(slot + 2)) : nullptr;
    r.keep = nullptr;
    if (a.rng.enabled) {
      norm_dropout_row(a.rng, i, n, s.slot(slot + 3));
      r.keep = s.slot(slot + 3);
    }
    r.dres = a.dresidual.present() ? a.dresidual.target(i, s.slot(slot + 4)) : nullptr;
    r.dx = a.dx.target(i, s.slot(slot + 5));
    r.mean = a.mean ? a.mean[i] : 0.f;
    r.rstd = a.rstd[i];
    const Vec vmean(r.mean), vrstd(r.rstd);
    // Tail lanes: g is 0 there (dy loads 0), so both products vanish.
    Vec s1a(0.f), s1b(0.f), s2a(0.f), s2b(0.f);
    const auto accumulate = [&](int64_t j, int64_t c, Vec& s1, Vec& s2) {
      a.dh.prefetch(i, j);  // read in the second pass
      const Vec xhat = (Vec::loadu(r.h + j, c) - vmean) * vrstd;
      Vec g = Vec::loadu(r.dy + j, c);
      if (a.weight) g = g * Vec::loadu(a.weight + j, c);
      s1 = s1 + xhat * g;
      s2 = s2 + g;
    };
    int64_t j = 0;
    for (; j + 2 * kVec <= n; j += 2 * kVec) {
      accumulate(j, kVec, s1a, s2a);
      accumulate(j + kVec, kVec, s1b, s2b);
    }
    for (; j < n; j += kVec) accumulate(j, std::min(kVec, n - j), s1a, s2a);
    r.c1 = at::vec::vec_reduce_all<float>(vec_add, s1a + s1b) * inv_n;
    r.c2 = a.mean ? at::vec::vec_reduce_all<float>(vec_add, s2a + s2b) * inv_n : 0.f;
  }

  for_each_vec(n, [&](int64_t j, int64_t c) {
    const Vec w = a.weight ? Vec::loadu(a.weight + j, c) : Vec(1.f);
    Vec dw = dw_part && !first_in_block ? Vec::loadu(dw_part + j, c) : Vec(0.f);
    Vec db = db_part && !first_in_block ? Vec::loadu(db_part + j, c) : Vec(0.f);
    for (int64_t k = 0; k < count; ++k) {
      const BwdRow& r = rows[k];
      if (i0 + count + k < a.rows) {  // the next group's first-pass rows
        a.h.prefetch(i0 + count + k, j);
        a.dy.prefetch(i0 + count + k, j);
      }
      const Vec vrstd(r.rstd);
      const Vec dyv = Vec::loadu(r.dy + j, c);
      const Vec xhat = (Vec::loadu(r.h + j, c) - Vec(r.mean)) * vrstd;
      Vec grad = vrstd * (dyv * w - xhat * Vec(r.c1) - Vec(r.c2));
      if (r.dh) grad = grad + Vec::loadu(r.dh + j, c);
      const Vec grad_dx = r.keep ? grad * Vec::loadu(r.keep + j, c) : grad;
      if (a.stream_dx && c == kVec) {
        if (r.dres) stream_vec(r.dres + j, grad);
        stream_vec(r.dx + j, grad_dx);
      } else {
        if (r.dres) grad.store(r.dres + j, c);
        grad_dx.store(r.dx + j, c);
      }
      dw = dw + dyv * xhat;
      db = db + dyv;
    }
    if (dw_part) dw.store(dw_part + j, c);
    if (db_part) db.store(db_part + j, c);
  });
  for (int64_t k = 0; k < count; ++k) {
    if (rows[k].dres) a.dresidual.store(i0 + k, n, rows[k].dres);
    a.dx.store(i0 + k, n, rows[k].dx);
  }
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
  a.rows = rows;
  a.n = n;
  a.eps = static_cast<float>(eps);
  a.is_rms = is_rms;
  a.store_h = store_h;
  a.stream_y = a.y.can_stream() && y.nbytes() >= kStreamBytes;
  a.rng = DropoutRng(dropout_p, seed, offset);

  const RowBlocks blocks(rows);
  parallel_blocks(blocks.count, blocks.grain(n), [&] { return Scratch(5, n); }, [&](int64_t blk, Scratch& s) {
    for (int64_t i = blocks.begin(blk); i < blocks.end(blk); ++i) forward_row(a, i, s);
    stream_fence();
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
  // (blocks, n) fp32 partial rows of dweight and dbias, set by each block's first group.
  const at::Tensor dw_partial = weight.has_value() ? empty_pooled({blocks.count, n}, at::kFloat) : at::Tensor();
  const at::Tensor db_partial = bias.has_value() ? empty_pooled({blocks.count, n}, at::kFloat) : at::Tensor();

  BwdArgs a;
  a.dy = Rows(dy);
  if (dh.has_value()) a.dh = Rows(*dh);
  a.h = Rows(h);
  a.dx = Rows(dx);
  if (residual_dtype.has_value()) a.dresidual = Rows(dresidual);
  a.mean = is_rms ? nullptr : mean_c.data_ptr<float>();
  a.rstd = rstd_c.data_ptr<float>();
  a.weight = weight.has_value() ? w.data() : nullptr;
  a.stream_dx = a.dx.can_stream() && (!a.dresidual.present() || a.dresidual.can_stream()) &&
                dx.nbytes() >= kStreamBytes;
  a.rows = rows;
  a.n = n;
  a.rng = DropoutRng(dropout_p, seed, offset);

  parallel_blocks(blocks.count, blocks.grain(n), [&] { return Scratch(kBwdGroup * kBwdSlots, n); },
                  [&](int64_t blk, Scratch& s) {
    float* dw_part = dw_partial.defined() ? dw_partial.data_ptr<float>() + blk * n : nullptr;
    float* db_part = db_partial.defined() ? db_partial.data_ptr<float>() + blk * n : nullptr;
    for (int64_t i = blocks.begin(blk); i < blocks.end(blk); i += kBwdGroup)
      backward_rows(a, i, std::min(kBwdGroup, blocks.end(blk) - i), s, dw_part, db_part, i == blocks.begin(blk));
    stream_fence();
  });
  if (weight.has_value()) reduce_partials(dw_partial.data_ptr<float>(), blocks.count, n, dweight);
  if (bias.has_value()) reduce_partials(db_partial.data_ptr<float>(), blocks.count, n, dbias);
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
  // Frees the buffer pool's idle blocks (outputs alive now keep theirs).
  m.def("cpu_release_buffers() -> ()", [] { fastattn_cpu::BufferPool::get().release_cached(); });
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_norm_fwd", &fastattn_cpu::cpu_norm_fwd);
  m.impl("cpu_norm_bwd", &fastattn_cpu::cpu_norm_bwd);
}
