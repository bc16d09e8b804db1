// CPU feed-forward: fastattn::cpu_ffn_fwd / cpu_ffn_bwd.
//
// The GEMMs are torch's CPU BLAS (at::mm / at::addmm: MKL or oneDNN); everything between them
// is one vectorized pass over the GEMM output, in place where the contract allows:
//   forward:  z = x @ w1^T (b1 added by the pass for fp32, by addmm for bf16/fp16 so z is rounded
//             once), one pass: z += b1, a = act(z) * keep / (1 - p); y = a @ w2^T + b2 (addmm).
//             With save_z false, a overwrites z (swiglu: its gate half).
//   backward: z recomputed the same way when not saved; da = dy @ w2; one pass over rows:
//             dz = da * keep / (1 - p) * act'(z) (swiglu: both halves; in place over da
//             otherwise), a_d = act(z) * keep / (1 - p) (the dw2 GEMM's operand), and the
//             per-block fp32 partial sums of db1 (of dz as stored) and db2 (of dy);
//             dw2 = dy^T @ a_d, dx = dz @ w1, dw1 = dz^T @ x.
// Casting points: GEMMs accumulate in fp32 (oneDNN for bf16/fp16) and round to x's dtype; the
// bias, activation, dropout and act' run in fp32 and round once when stored.
// Dropout bits: the Triton backend's (row_kernels.h ffn_dropout_row), regenerated in backward.
// Workspace: the temporaries no caller sees (forward's a with save_z; backward's da / dz and a_d
// with a saved z) live in grow-only buffers reused across calls, so they never page-fault again
// (a fresh 16 MiB buffer: ~4k page faults, several ms on the development machine, more than the
// pass that fills it). y, z and the gradients stay fresh tensors.
// Tried and slower on the 2-core development machine (fwd+bwd M2048 d512 F2048 gelu fp32):
// the GEMMs in row chunks with chunk-sized intermediates (4x the GEMM calls, weight gradients
// accumulated over chunks), and one buffer for a_d then da (one allocation less, one more
// activation pass).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "row_kernels.h"

namespace fastattn_cpu {
namespace {

enum class Act { kRelu, kGelu, kGeluTanh, kSilu, kSwiglu };

Act parse_activation(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "gelu") return Act::kGelu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "silu") return Act::kSilu;
  if (name == "swiglu") return Act::kSwiglu;
  TORCH_CHECK(false, "activation must be one of relu, gelu, gelu_tanh, silu, swiglu; got '", name, "'");
}

inline Vec sigmoid(const Vec& z) {
  // exp(-z) overflows to inf for z << 0: 1 / inf = 0, no NaN.
  const Vec one(1.f);
  return one / (one + z.neg().exp());
}

// act(z) (out) and, with kGrad, act'(z) (grad) of the single-input activations, the formulas of
// fastattn/activations.py.
template <Act A, bool kGrad>
inline void activation(const Vec& z, Vec& out, Vec& grad) {
  if constexpr (A == Act::kRelu) {
    const Vec zero(0.f);
    out = at::vec::maximum(z, zero);
    if constexpr (kGrad) grad = Vec(1.f) & (z > zero);
  } else if constexpr (A == Act::kGelu) {
    // cdf = (1 + erf(u)) / 2, u = z / sqrt(2), erf by Abramowitz & Stegun 7.1.26 (|error| <=
    // 1.5e-7, ATen's Vectorized<float>::erf): 1 - erf(|u|) = r(t) t exp(-u^2), t = 1 / (1 +
    // p|u|). exp(-u^2) = exp(-z^2 / 2) also gives the pdf: one exp per element for act and act'.
    // cdf is formed from q = (1 - erf(|u|)) / 2 directly, without cancellation for z << 0.
    // exp_u20 (ATen's polynomial exp, 20 ulp): |gelu error| <= 4.2e-7 over z in [-12, 12] (torch's
    // fp32 F.gelu: 1.2e-6), |gelu' error| <= 2.6e-7; a third less time for the forward pass.
    const Vec one(1.f), half(0.5f);
    const Vec u = z * Vec(static_cast<float>(M_SQRT1_2));
    const Vec t = one / at::vec::fmadd(Vec(0.3275911f), u.abs(), one);
    Vec r = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
    r = at::vec::fmadd(r, t, Vec(1.421413741f));
    r = at::vec::fmadd(r, t, Vec(-0.284496736f));
    r = at::vec::fmadd(r, t, Vec(0.254829592f));
    // exp(-u^2) is 0 from u^2 = 80 on (true q < 1e-35): below that, q and z * e would be
    // subnormal, and each subnormal operation costs ~100x (a 2x slower FFN for |z| > 12).
    const Vec uu = u * u;
    const Vec e = uu.neg().exp_u20() & (uu < Vec(80.f));
    const Vec q = half * r * t * e;
    const Vec cdf = Vec::blendv(one - q, q, u < Vec(0.f));
    out = z * cdf;
    if constexpr (kGrad) grad = at::vec::fmadd(z * e, Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2)), cdf);
  } else if constexpr (A == Act::kGeluTanh) {
    const Vec k(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5)), c(0.044715f), half(0.5f), one(1.f);
    const Vec z2 = z * z;
    const Vec t = (k * (z + c * z2 * z)).tanh();
    out = half * z * (one + t);
    if constexpr (kGrad) grad = half * (one + t) + half * z * (one - t * t) * k * (one + Vec(3.f * 0.044715f) * z2);
  } else if constexpr (A == Act::kSilu) {
    const Vec s = sigmoid(z);
    out = z * s;
    if constexpr (kGrad) grad = s * (Vec(1.f) + z * (Vec(1.f) - s));
  }
}

struct EpilogueArgs {
  int64_t rows = 0;
  int64_t f = 0;                     // width of a (d_ff)
  const float* bias = nullptr;       // b1 (d_hidden,) fp32 to add to z here, or null
  DropoutRng rng;
};

// Rows of y (rows, d_out) the forward pass sets to b2, for the in-place addmm y += a @ w2^T:
// the broadcast is not a separate parallel pass (addmm's copy of b2 into its output).
template <typename T>
struct OutputInit {
  T* y = nullptr;         // (rows, d_out) contiguous, or null
  const T* b2 = nullptr;  // (d_out,) contiguous
  int64_t d_out = 0;
};

// Forward pass over rows of z (rows, d_hidden): z += bias (written back when write_z), a = act(z)
// * keep. a may alias z (then write_z is false): every element is read before it is written.
template <typename T, Act A>
void forward_epilogue(const EpilogueArgs& e, T* z, int64_t ldz, T* a, int64_t lda, bool write_z,
                      const OutputInit<T>& init) {
  const int64_t f = e.f;
  const RowBlocks blocks(e.rows);
  at::parallel_for(0, blocks.count, blocks.grain(e.f), [&](int64_t b0, int64_t b1) {
    std::vector<float> keep(e.rng.enabled ? f : 0);
    for (int64_t i = blocks.begin(b0); i < blocks.end(b1 - 1); ++i) {
      if (e.rng.enabled) ffn_dropout_row(e.rng, i, f, keep.data());
      if (init.y) std::memcpy(init.y + i * init.d_out, init.b2, init.d_out * sizeof(T));
      T* zr = z + i * ldz;
      T* ar = a + i * lda;
      for_each_vec(f, [&](int64_t j, int64_t c) {
        Vec out, unused;
        if constexpr (A == Act::kSwiglu) {
          Vec gate = load_n(zr + j, c), up = load_n(zr + f + j, c);
          if (e.bias) {
            gate = gate + Vec::loadu(e.bias + j, c);
            up = up + Vec::loadu(e.bias + f + j, c);
            if (write_z) {
              store_n(zr + j, gate, c);
              store_n(zr + f + j, up, c);
            }
          }
          out = gate * sigmoid(gate) * up;
        } else {
          Vec zv = load_n(zr + j, c);
          if (e.bias) {
            zv = zv + Vec::loadu(e.bias + j, c);
            if (write_z) store_n(zr + j, zv, c);
          }
          activation<A, false>(zv, out, unused);
        }
        if (e.rng.enabled) out = out * Vec::loadu(keep.data() + j, c);
        store_n(ar + j, out, c);
      });
    }
  });
}

// Backward pass over rows: dz = da * keep * act'(z), a_d = act(z) * keep, db1/db2 partials.
// dz may alias da (not swiglu), a_d may alias z (a recomputed z): reads precede writes.
template <typename T, Act A>
void backward_epilogue(const EpilogueArgs& e, const T* z, int64_t ldz, const T* da, T* dz, int64_t lddz, T* a_d,
                       int64_t lda_d, const T* dy, int64_t d_out, float* db1_partial, float* db2_partial) {
  const int64_t f = e.f, d_hidden = A == Act::kSwiglu ? 2 * f : f;
  const RowBlocks blocks(e.rows);
  at::parallel_for(0, blocks.count, blocks.grain(e.f), [&](int64_t b0, int64_t b1) {
    std::vector<float> keep(e.rng.enabled ? f : 0);
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* db1 = db1_partial ? db1_partial + blk * d_hidden : nullptr;
      float* db2 = db2_partial ? db2_partial + blk * d_out : nullptr;
      for (int64_t i = blocks.begin(blk); i < blocks.end(blk); ++i) {
        if (e.rng.enabled) ffn_dropout_row(e.rng, i, f, keep.data());
        const T* zr = z + i * ldz;
        const T* dar = da + i * f;
        T* dzr = dz + i * lddz;
        T* adr = a_d + i * lda_d;
        for_each_vec(f, [&](int64_t j, int64_t c) {
          Vec dav = load_n(dar + j, c);
          Vec kv(1.f);
          if (e.rng.enabled) {
            kv = Vec::loadu(keep.data() + j, c);
            dav = dav * kv;
          }
          if constexpr (A == Act::kSwiglu) {
            Vec gate = load_n(zr + j, c), up = load_n(zr + f + j, c);
            if (e.bias) {
              gate = round_to<T>(gate + Vec::loadu(e.bias + j, c));
              up = round_to<T>(up + Vec::loadu(e.bias + f + j, c));
            }
            const Vec s = sigmoid(gate), silu = gate * s;
            const Vec dgate = round_to<T>(dav * up * s * (Vec(1.f) + gate * (Vec(1.f) - s)));
            const Vec dup = round_to<T>(dav * silu);
            store_n(adr + j, silu * up * kv, c);
            store_n(dzr + j, dgate, c);
            store_n(dzr + f + j, dup, c);
            if (db1) {
              (Vec::loadu(db1 + j, c) + dgate).store(db1 + j, c);
              (Vec::loadu(db1 + f + j, c) + dup).store(db1 + f + j, c);
            }
          } else {
            Vec zv = load_n(zr + j, c);
            if (e.bias) zv = round_to<T>(zv + Vec::loadu(e.bias + j, c));
            Vec out, grad;
            activation<A, true>(zv, out, grad);
            const Vec dzv = round_to<T>(dav * grad);
            store_n(adr + j, out * kv, c);
            store_n(dzr + j, dzv, c);
            if (db1) (Vec::loadu(db1 + j, c) + dzv).store(db1 + j, c);
          }
        });
        if (db2) {
          const T* dyr = dy + i * d_out;
          for_each_vec(d_out, [&](int64_t j, int64_t c) {
            (Vec::loadu(db2 + j, c) + load_n(dyr + j, c)).store(db2 + j, c);
          });
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Workspace pool. A call takes a Workspace for its duration (concurrent calls get different
// ones) and gives it back; each slot grows to the largest request up to kMaxSlotBytes (larger
// requests get a fresh tensor: no unbounded memory). Memory held: at most 2 x kMaxSlotBytes
// per concurrently running call, until fastattn::cpu_ffn_release_workspace.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kMaxSlotBytes = int64_t{64} << 20;

struct Workspace {
  at::Tensor slots[2];  // uint8 buffers

  // A (rows, cols) contiguous tensor of `options` over slot `slot` (fresh when too large).
  at::Tensor matrix(int slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
    const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
    if (bytes == 0 || bytes > kMaxSlotBytes) return at::empty({rows, cols}, options);
    at::Tensor& buffer = slots[slot];
    if (!buffer.defined() || buffer.numel() < bytes) {
      buffer = at::Tensor();  // the old buffer goes back before the larger one is taken
      buffer = at::empty({bytes}, options.dtype(at::kByte));
    }
    return at::from_blob(buffer.data_ptr(), {rows, cols}, options);
  }
};

class WorkspacePool {
 public:
  static WorkspacePool& instance() {
    static WorkspacePool* pool = new WorkspacePool();  // never destroyed: no exit-order issues
    return *pool;
  }
  std::unique_ptr<Workspace> take() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (idle_.empty()) return std::make_unique<Workspace>();
    std::unique_ptr<Workspace> w = std::move(idle_.back());
    idle_.pop_back();
    return w;
  }
  void give_back(std::unique_ptr<Workspace> w) {
    std::lock_guard<std::mutex> lock(mutex_);
    idle_.push_back(std::move(w));
  }
  void release_idle() {
    std::vector<std::unique_ptr<Workspace>> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
    }
  }

 private:
  std::mutex mutex_;
  std::vector<std::unique_ptr<Workspace>> idle_;
};

// A Workspace for the scope of one op call.
class ScopedWorkspace {
 public:
  ScopedWorkspace() : w_(WorkspacePool::instance().take()) {}
  ~ScopedWorkspace() { WorkspacePool::instance().give_back(std::move(w_)); }
  ScopedWorkspace(const ScopedWorkspace&) = delete;
  ScopedWorkspace& operator=(const ScopedWorkspace&) = delete;
  Workspace* operator->() { return w_.get(); }

 private:
  std::unique_ptr<Workspace> w_;
};

template <typename F>
void dispatch_activation(Act act, const F& f) {
  switch (act) {
    case Act::kRelu: return f(std::integral_constant<Act, Act::kRelu>{});
    case Act::kGelu: return f(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return f(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kSilu: return f(std::integral_constant<Act, Act::kSilu>{});
    case Act::kSwiglu: return f(std::integral_constant<Act, Act::kSwiglu>{});
  }
}

struct Shapes {
  int64_t rows, d_model, d_hidden, d_ff, d_out;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                    const at::Tensor& w2, const std::optional<at::Tensor>& b2, Act act) {
  const auto check_matrix = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
    TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type());
  };
  check_matrix(x, "x");
  check_matrix(w1, "w1");
  check_matrix(w2, "w2");
  const auto d = x.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kBFloat16 || d == at::kHalf, "x must be float32, bfloat16 or float16, got ",
              d);
  Shapes s{x.size(0), x.size(1), w1.size(0), w2.size(1), w2.size(0)};
  TORCH_CHECK(w1.size(1) == s.d_model, "w1 must have shape (d_hidden, ", s.d_model, "), got ", w1.sizes());
  TORCH_CHECK(s.d_hidden == (act == Act::kSwiglu ? 2 * s.d_ff : s.d_ff), "w1 has ", s.d_hidden,
              " rows, w2 needs ", act == Act::kSwiglu ? "2 * d_ff" : "d_ff", " with d_ff = ", s.d_ff);
  const auto check_bias = [&](const std::optional<at::Tensor>& t, int64_t size, const char* name) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->size(0) == size, name, " must be a CPU tensor of shape (",
                size, ",), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == d, name, " must have x's dtype ", d);
  };
  check_bias(b1, s.d_hidden, "b1");
  check_bias(b2, s.d_out, "b2");
  return s;
}

// z = x @ w1^T, plus b1 when addmm adds it (bf16/fp16: one rounding). Returns the fp32 bias the
// epilogue must add instead (fp32 inputs), empty when none.
std::pair<at::Tensor, std::vector<float>> pre_activation(const at::Tensor& x, const at::Tensor& w1,
                                                         const std::optional<at::Tensor>& b1) {
  if (b1.has_value() && x.scalar_type() != at::kFloat) return {at::addmm(*b1, x, w1.t()), {}};
  return {at::mm(x, w1.t()), param_as_float(b1, w1.size(0))};
}

std::tuple<at::Tensor, at::Tensor> cpu_ffn_fwd(const at::Tensor& x, const at::Tensor& w1,
                                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                               const std::optional<at::Tensor>& b2, c10::string_view activation,
                                               double dropout_p, int64_t seed, int64_t offset, bool save_z) {
  const Act act = parse_activation(std::string(activation));
  const Shapes s = check_inputs(x, w1, b1, w2, b2, act);
  at::Tensor z;  // (rows, d_hidden), contiguous
  std::vector<float> bias;
  std::tie(z, bias) = pre_activation(x, w1, b1);
  ScopedWorkspace workspace;
  at::Tensor a;
  if (save_z) {
    a = workspace->matrix(0, s.rows, s.d_ff, x.options());
  } else {
    a = act == Act::kSwiglu ? z.narrow(1, 0, s.d_ff) : z;  // in place
  }
  EpilogueArgs e;
  e.rows = s.rows;
  e.f = s.d_ff;
  e.bias = bias.empty() ? nullptr : bias.data();
  e.rng = DropoutRng(dropout_p, seed, offset);
  at::Tensor y = at::empty({s.rows, s.d_out}, x.options());
  const at::Tensor b2_contiguous = b2.has_value() ? b2->contiguous() : at::Tensor();
  dispatch_float_types(x.scalar_type(), "cpu_ffn_fwd", [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    OutputInit<scalar_t> init;
    if (b2.has_value()) init = {y.data_ptr<scalar_t>(), b2_contiguous.data_ptr<scalar_t>(), s.d_out};
    dispatch_activation(act, [&](auto tag) {
      forward_epilogue<scalar_t, decltype(tag)::value>(e, z.data_ptr<scalar_t>(), z.stride(0), a.data_ptr<scalar_t>(),
                                                       a.stride(0), save_z, init);
    });
  });
  // y = b2 + a @ w2^T: in place over the rows set to b2 (addmm copies self only when it is not
  // the output), one rounding for bf16/fp16 as in addmm(b2, a, w2^T).
  if (b2.has_value()) {
    y.addmm_(a, w2.t());
  } else {
    at::mm_out(y, a, w2.t());
  }
  return {y, save_z ? z : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cpu_ffn_bwd(
    const at::Tensor& dy_in, const std::optional<at::Tensor>& z_saved, const at::Tensor& x, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    c10::string_view activation, double dropout_p, int64_t seed, int64_t offset) {
  const Act act = parse_activation(std::string(activation));
  const Shapes s = check_inputs(x, w1, b1, w2, b2, act);
  TORCH_CHECK(dy_in.device().is_cpu() && dy_in.dim() == 2 && dy_in.size(0) == s.rows && dy_in.size(1) == s.d_out &&
                  dy_in.scalar_type() == x.scalar_type(),
              "dy must be a CPU tensor of shape (", s.rows, ", ", s.d_out, ") and x's dtype");
  const at::Tensor dy = dy_in.contiguous();
  at::Tensor z;
  std::vector<float> bias;
  const bool recomputed = !z_saved.has_value();
  if (recomputed) {
    std::tie(z, bias) = pre_activation(x, w1, b1);
  } else {
    TORCH_CHECK(z_saved->dim() == 2 && z_saved->size(0) == s.rows && z_saved->size(1) == s.d_hidden &&
                    z_saved->scalar_type() == x.scalar_type(),
                "z must have shape (", s.rows, ", ", s.d_hidden, ") and x's dtype");
    z = z_saved->contiguous();
  }
  ScopedWorkspace workspace;
  at::Tensor da = workspace->matrix(1, s.rows, s.d_ff, x.options());
  at::mm_out(da, dy, w2);  // (rows, d_ff)
  const bool swiglu = act == Act::kSwiglu;
  at::Tensor dz = swiglu ? at::empty({s.rows, s.d_hidden}, x.options()) : da;
  // a_d overwrites a recomputed z (its gate half for swiglu); a saved z belongs to autograd.
  at::Tensor a_d = recomputed ? (swiglu ? z.narrow(1, 0, s.d_ff) : z) : workspace->matrix(0, s.rows, s.d_ff, x.options());

  const RowBlocks blocks(s.rows);
  std::vector<float> db1_partial(b1.has_value() ? blocks.count * s.d_hidden : 0, 0.f);
  std::vector<float> db2_partial(b2.has_value() ? blocks.count * s.d_out : 0, 0.f);
  EpilogueArgs e;
  e.rows = s.rows;
  e.f = s.d_ff;
  e.bias = bias.empty() ? nullptr : bias.data();
  e.rng = DropoutRng(dropout_p, seed, offset);
  dispatch_float_types(x.scalar_type(), "cpu_ffn_bwd", [&](auto type_tag) {
    using scalar_t = decltype(type_tag);
    dispatch_activation(act, [&](auto tag) {
      backward_epilogue<scalar_t, decltype(tag)::value>(
          e, z.data_ptr<scalar_t>(), z.stride(0), da.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), dz.stride(0),
          a_d.data_ptr<scalar_t>(), a_d.stride(0), dy.data_ptr<scalar_t>(), s.d_out,
          db1_partial.empty() ? nullptr : db1_partial.data(), db2_partial.empty() ? nullptr : db2_partial.data());
    });
  });
  at::Tensor dw2 = at::mm(dy.t(), a_d);  // (d_out, d_ff)
  at::Tensor dx = at::mm(dz, w1);        // (rows, d_model)
  at::Tensor dw1 = at::mm(dz.t(), x);    // (d_hidden, d_model)
  at::Tensor db1 = at::empty({b1.has_value() ? s.d_hidden : 0}, x.options());
  at::Tensor db2 = at::empty({b2.has_value() ? s.d_out : 0}, x.options());
  if (b1.has_value()) reduce_partials(db1_partial, blocks.count, s.d_hidden, db1);
  if (b2.has_value()) reduce_partials(db2_partial, blocks.count, s.d_out, db2);
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace fastattn_cpu

// Schemas of the CUDA ops ffn_fwd / ffn_bwd (csrc/ops.cpp) under cpu_ names, for fp32 / bf16 /
// fp16. z: (rows, d_hidden), or (0,) when save_z is false (backward recomputes it when given
// z = None); db1 / db2: (0,) when b1 / b2 is None.
TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  m.def(
      "cpu_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, float dropout_p, "
      "int seed, int offset, bool save_z) -> (Tensor y, Tensor z)");
  m.def(
      "cpu_ffn_bwd(Tensor dy, Tensor? z, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, "
      "float dropout_p, int seed, int offset) -> (Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2)");
  // Frees the idle workspaces (the memory the two ops keep for their temporaries); calls
  // running now keep theirs.
  m.def("cpu_ffn_release_workspace() -> ()", [] { fastattn_cpu::WorkspacePool::instance().release_idle(); });
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_ffn_fwd", &fastattn_cpu::cpu_ffn_fwd);
  m.impl("cpu_ffn_bwd", &fastattn_cpu::cpu_ffn_bwd);
}
