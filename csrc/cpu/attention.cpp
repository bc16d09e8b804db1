// CPU FlashAttention-2 (forward and backward) for the ``cpu`` backend: torch.ops.fastattn.cpu_attention_*.
//
// Layout: flash (B, L, H, D), any strides with a contiguous head dim; lse (B, H, Lq) fp32,
// natural log. Every tile GEMM is fp32 and register-blocked (attention_gemm.h) on operands
// packed once per task into compact fp32 buffers (K^T / V per forward task; Q / dO rows per
// backward task, K^T / V^T / K per key block): no BLAS call overhead, no cache-set aliasing of
// the (.., L, H, D) row strides. fp16 / bf16 are converted to fp32 by that packing, so
// probabilities and dS are never rounded to the input dtype. exp: exp_fast (attention_common.h).
//
// Tiles that every row sees whole, without elementwise features (masks, ALiBi, softcap,
// dropout), take the fused path: the softmax (forward) or P and dS (backward) are computed in
// the GEMM epilogues while the scores are in registers. Other tiles take the general path:
// prepare_scores per row, then the same vectorized math over the stored tile.
//
// Visibility of key j to query i: ``lo(i) <= j < hi(i)`` with lo / hi from causal and the
// sliding window (i + shift is query i's diagonal), then key_padding_mask and a bool
// attn_mask; the score is scale * q.k, soft-capped (softcap * tanh(. / softcap)), plus the
// ALiBi bias -slope * |i + shift - j| and a float attn_mask. Tiles outside [lo, hi) are
// never visited. A row that sees no key gets output 0 and lse -inf; the backward reads lse
// -inf as +inf, so every probability of that row and its gradients are 0.
//
// Forward: parallel over (batch, head, chunk of query blocks); online softmax over key blocks.
// Backward: delta = rowsum(dO * O); then parallel over (batch, kv head, key split): each
// task owns its keys' dK / dV (summed over the kv head's query heads, no k/v copies) and its
// split's dQ (accumulated in a compact buffer, stored once); the splits are summed in a fixed order.
// No atomic accumulation (only the task counter is atomic): bitwise reproducible by
// construction, whichever thread runs a task. The split count depends on the shapes
// only (not on the thread count).
//
// Dropout: attention_philox.h (the Triton backend's mask, bit for bit), regenerated in the
// backward, never stored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_common.h"
#include "cpu/attention_gemm.h"
#include "cpu/attention_philox.h"

namespace fastattn_cpu {
namespace {

using fastattn_cpu_common::vec_scale;
using Vec = at::vec::Vectorized<float>;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kUnbounded = -1;

// Tile sizes (queries x keys). Forward: torch's CPU flash kernel's split for long sequences
// (256 KiB of fp32 scores, L2-resident). Backward: 128 x 128 (five 64 KiB-class operands per
// tile in L2; 126-row tiles, whole 6-row register blocks, measured slower: a 16-key tail block).
constexpr int64_t kFwdBlockM = 128;
constexpr int64_t kFwdBlockN = 512;
// Forward tasks wanted per thread (load balance; the forward's bits do not depend on the split).
constexpr int64_t kFwdTasksPerThread = 2;
constexpr int64_t kBwdBlockM = 128;
constexpr int64_t kBwdBlockN = 128;
// Backward tasks wanted before key blocks are split over tasks (shape-only rule).
constexpr int64_t kBwdMinTasks = 8;

// Runs body(next_task) on torch's threads, once per thread; next_task() hands out 0, 1, 2, ...
// (>= tasks when done) in turn, so a thread that is slowed or descheduled (a shared machine)
// does not hold the others back as a static split would. The results never depend on which
// thread runs a task.
template <class Body>
inline void parallel_tasks(int64_t tasks, const Body& body) {
  std::atomic<int64_t> next{0};
  const auto next_task = [&next] { return next.fetch_add(1, std::memory_order_relaxed); };
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1,
                   [&](int64_t, int64_t) { body(next_task); });
}

struct Strides3 {
  int64_t b, l, h;
};

// Row stride usable as a GEMM leading dimension: a length-1 sequence may have any stride.
inline Strides3 strides_of(const at::Tensor& t) {
  const int64_t l = t.size(1) > 1 ? t.stride(1) : t.size(3);
  return {t.stride(0), l, t.stride(2)};
}

// Everything a tile needs besides the q / k / v / o pointers.
struct Params {
  int64_t batch, heads, heads_kv, lq, lk, dim;
  float scale, softcap;
  int64_t shift;         // query i's diagonal is key i + shift
  int64_t left, right;   // window: lo(i) = i + shift - left, hi(i) = i + shift + right + 1; -1 unbounded
  const bool* kpm = nullptr;
  int64_t kpm_sb = 0, kpm_sl = 0;
  const void* mask = nullptr;
  at::ScalarType mask_type = at::kBool;
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0, mask_sk = 0;
  const float* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0;
  float dropout_p = 0.f;
  uint64_t seed = 0;
  uint32_t offset = 0;

  bool elementwise() const { return softcap > 0.f || alibi != nullptr || mask != nullptr || kpm != nullptr; }
  bool dropout() const { return dropout_p > 0.f; }
  int64_t lo(int64_t i) const { return left == kUnbounded ? 0 : std::max<int64_t>(0, i + shift - left); }
  int64_t hi(int64_t i) const {
    return right == kUnbounded ? lk : std::min<int64_t>(lk, std::max<int64_t>(0, i + shift + right + 1));
  }
  // Queries that see at least one key of [j0, j1) (before the elementwise masks).
  int64_t first_query(int64_t j0) const { return right == kUnbounded ? 0 : std::max<int64_t>(0, j0 - shift - right); }
  int64_t end_query(int64_t j1) const { return left == kUnbounded ? lq : std::min<int64_t>(lq, j1 - shift + left); }
};

template <typename mask_t>
inline void add_float_mask(const Params& p, const mask_t* row, int64_t j0, int64_t c0, int64_t c1, float* s) {
  for (int64_t c = c0; c < c1; ++c) s[c] += static_cast<float>(row[(j0 + c) * p.mask_sk]);
}

// Rewrites s (the raw q.k of query i over keys [j0, j0 + n)) into what the online softmax
// reads: -inf where the key is not visible; elsewhere, with elementwise features, the final
// score (returns 1), else s is left raw and the return value is the scale still to apply.
// dcap (softcap only): d score / d (scale q.k) = 1 - tanh^2.
inline float prepare_scores(const Params& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* s,
                            float* dcap) {
  const int64_t c0 = std::min(n, std::max<int64_t>(0, p.lo(i) - j0));
  const int64_t c1 = std::max(c0, std::min(n, p.hi(i) - j0));
  if (dcap != nullptr) std::fill(dcap, dcap + n, 0.f);
  std::fill(s, s + c0, kNegInf);
  std::fill(s + c1, s + n, kNegInf);
  if (c1 == c0 || !p.elementwise()) return p.scale;
  const Vec scale(p.scale);
  if (p.softcap > 0.f) {
    const Vec cap(p.softcap), inv_cap(1.f / p.softcap), one(1.f);
    int64_t c = c0;
    for (; c < c1; c += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), c1 - c);
      const Vec t = (Vec::loadu(s + c, count) * scale * inv_cap).tanh();
      (t * cap).store(s + c, count);
      if (dcap != nullptr) (one - t * t).store(dcap + c, count);
    }
  } else {
    for (int64_t c = c0; c < c1; c += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), c1 - c);
      (Vec::loadu(s + c, count) * scale).store(s + c, count);
    }
  }
  if (p.alibi != nullptr) {
    const float slope = p.alibi[b * p.alibi_sb + h * p.alibi_sh];
    const float diag = static_cast<float>(i + p.shift - j0);
    for (int64_t c = c0; c < c1; ++c) s[c] -= slope * std::abs(diag - static_cast<float>(c));
  }
  if (p.mask != nullptr) {
    const int64_t row = b * p.mask_sb + h * p.mask_sh + i * p.mask_sq;
    switch (p.mask_type) {
      case at::kBool: {
        const bool* m = static_cast<const bool*>(p.mask) + row;
        for (int64_t c = c0; c < c1; ++c)
          if (!m[(j0 + c) * p.mask_sk]) s[c] = kNegInf;
        break;
      }
      case at::kFloat: add_float_mask(p, static_cast<const float*>(p.mask) + row, j0, c0, c1, s); break;
      case at::kBFloat16: add_float_mask(p, static_cast<const at::BFloat16*>(p.mask) + row, j0, c0, c1, s); break;
      case at::kHalf: add_float_mask(p, static_cast<const at::Half*>(p.mask) + row, j0, c0, c1, s); break;
      default: TORCH_CHECK(false, "attn_mask dtype");
    }
  }
  if (p.kpm != nullptr) {
    const bool* m = p.kpm + b * p.kpm_sb;
    for (int64_t c = c0; c < c1; ++c)
      if (!m[(j0 + c) * p.kpm_sl]) s[c] = kNegInf;
  }
  return 1.f;
}

inline float vec_max(const float* x, int64_t n) {
  Vec acc(kNegInf);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + c));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x[c] = exp(x[c] * mult - sub); returns the sum. exp(-inf) = 0.
inline float vec_exp_sum(float* x, int64_t n, float mult, float sub) {
  const Vec vm(mult), vs(sub);
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec e = fastattn_cpu_common::exp_fast(at::vec::fmsub(Vec::loadu(x + c), vm, vs));
    e.store(x + c);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  if (c < n) {
    const int64_t count = n - c;
    const Vec e = fastattn_cpu_common::exp_fast(at::vec::fmsub(Vec::loadu(x + c, count), vm, vs));
    e.store(x + c, count);
    float tail[Vec::size()];
    e.store(tail, count);
    for (int64_t t = 0; t < count; ++t) sum += tail[t];
  }
  return sum;
}

// Epilogues of the tile GEMMs (attention_gemm.h) for tiles that every row sees whole, without
// elementwise features: the row-wise work runs on C's rows while they are in registers.

// Forward S = Q K^T -> P = exp(S * scale - m) with online softmax state per row: m (row_max),
// lane-wise sums of P (sum_vec) and the output accumulators o. m is lazy: it moves only when a
// score exceeds it by kLazyMaxSlack, and then rescales this row's P stored so far in this tile,
// its sums and o (in the first tile of a row: always, at its first panel). P <= e^kLazyMaxSlack.
constexpr float kLazyMaxSlack = 8.f;
// Lane-wise max without at::vec::maximum's NaN propagation (2 more instructions; a NaN score
// reaches the output through exp anyway), and "any lane > limit".
inline Vec fast_max(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}
inline bool any_above(const Vec& x, float limit) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(limit), _CMP_GT_OQ) != 0;
#else
  return (x > Vec(limit)).zero_mask() != (1 << Vec::size()) - 1;
#endif
}
struct SoftmaxEpilogue {
  float* row_max;   // (M,)
  float* row_sum;   // (M,): the general path's scalar sums, rescaled alike
  float* sum_vec;   // (M, Vec::size())
  float* o;         // (M, D)
  int64_t D;
  float scale;
  template <int NV, bool kFull>
  void store(int64_t row, int64_t col, const PanelReg* acc, float* c_row, int64_t cols) const {
    constexpr int64_t S = Vec::size();
    Vec x[NV];
    Vec x_max(kNegInf);
    for (int v = 0; v < NV; ++v) {
      x[v] = kFull ? Vec(acc[v]) : Vec::set(Vec(kNegInf), Vec(acc[v]), std::max<int64_t>(0, cols - v * S));
      x_max = fast_max(x_max, x[v]);
    }
    float m = row_max[row];
    // Raw scores above (m + slack) / scale (scale > 0)? All of them while m is -inf.
    if (any_above(x_max, (m + kLazyMaxSlack) / scale)) m = move_max(row, col, x_max, c_row);
    const Vec vs(scale), vm(m);
    Vec sum = Vec::loadu(sum_vec + row * S);
    for (int v = 0; v < NV; ++v) {
      const Vec e = fastattn_cpu_common::exp_fast(at::vec::fmsub(x[v], vs, vm));  // 0 past cols
      sum = sum + e;
      if constexpr (kFull) {
        e.store(c_row + v * S);
      } else if (cols > v * S) {
        e.store(c_row + v * S, std::min<int64_t>(S, cols - v * S));
      }
    }
    sum.store(sum_vec + row * S);
  }
  // The rare path, out of line so that store() stays small enough to inline into the GEMM.
  [[gnu::noinline]] float move_max(int64_t row, int64_t col, Vec x_max, float* c_row) const {
    const float m = row_max[row];
    const float new_max = std::max(
        m, scale * at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x_max));
    const float factor = std::exp(m - new_max);  // 0 while m is -inf
    vec_scale(c_row - col, col, factor);
    vec_scale(sum_vec + row * Vec::size(), Vec::size(), factor);
    vec_scale(o + row * D, D, factor);
    row_sum[row] *= factor;
    row_max[row] = new_max;
    return new_max;
  }
};

// Backward S = Q K^T -> P = exp(S * mult - lse) (lse +inf for rows that see no key: P = 0).
struct ProbsEpilogue {
  const float* lse;  // (M,)
  float mult;
  template <int NV, bool kFull>
  void store(int64_t row, int64_t, const PanelReg* acc, float* c_row, int64_t cols) const {
    const Vec vm(mult), vl(lse[row]);
    for (int v = 0; v < NV; ++v) {
      const Vec e = fastattn_cpu_common::exp_fast(at::vec::fmsub(Vec(acc[v]), vm, vl));
      if constexpr (kFull) {
        e.store(c_row + v * Vec::size());
      } else if (cols > v * Vec::size()) {
        e.store(c_row + v * Vec::size(), std::min<int64_t>(Vec::size(), cols - v * Vec::size()));
      }
    }
  }
};

// Backward dP = dO V^T -> dS * scale = P * (dP - delta) * scale, P read back from its tile.
struct DScoresEpilogue {
  const float* probs;  // (M, ldp)
  int64_t ldp;
  const float* delta;  // (M,)
  float scale;
  template <int NV, bool kFull>
  void store(int64_t row, int64_t col, const PanelReg* acc, float* c_row, int64_t cols) const {
    const Vec vd(delta[row]), vs(scale);
    const float* pr = probs + row * ldp + col;
    for (int v = 0; v < NV; ++v) {
      if constexpr (kFull) {
        (Vec::loadu(pr + v * Vec::size()) * (Vec(acc[v]) - vd) * vs).store(c_row + v * Vec::size());
      } else if (cols > v * Vec::size()) {
        const int64_t count = std::min<int64_t>(Vec::size(), cols - v * Vec::size());
        (Vec::loadu(pr + v * Vec::size(), count) * (Vec(acc[v]) - vd) * vs).store(c_row + v * Vec::size(), count);
      }
    }
  }
};

// Backward without dropout / softcap, one pass: s[c] = P = exp(s[c] * mult - lse);
// dp[c] = dS * scale = P * (dp[c] - delta) * scale.
inline void probs_and_dscores(float* s, float* dp, int64_t n, float mult, float lse, float delta, float scale) {
  const Vec vm(mult), vl(lse), vd(delta), vs(scale);
  for (int64_t c = 0; c < n; c += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - c);
    const Vec e = fastattn_cpu_common::exp_fast(at::vec::fmsub(Vec::loadu(s + c, count), vm, vl));
    const Vec ds = e * (Vec::loadu(dp + c, count) - vd) * vs;
    if (count == Vec::size()) {
      e.store(s + c);
      ds.store(dp + c);
    } else {
      e.store(s + c, count);
      ds.store(dp + c, count);
    }
  }
}

template <typename scalar_t>
inline void store_row(const float* src, scalar_t* dst, int64_t n, float factor) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<scalar_t>(src[c] * factor);
}

// --------------------------------------------------------------------------------------------
// Forward
// --------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_kernel(const Params& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse) {
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();  // (B, Lq, H, D)
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();  // (B, Lk, Hkv, D)
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();  // (B, Lk, Hkv, D)
  scalar_t* o_ptr = out.data_ptr<scalar_t>();            // (B, Lq, H, D) contiguous
  float* lse_ptr = lse.data_ptr<float>();                // (B, H, Lq)
  const Strides3 sq = strides_of(q), sk = strides_of(k), sv = strides_of(v);
  const int64_t D = p.dim, H = p.heads, group = p.heads / p.heads_kv;
  const int64_t BM = kFwdBlockM, BN = kFwdBlockN;
  const int64_t q_blocks = (p.lq + BM - 1) / BM;
  static_assert(kFwdBlockN % kPanelWidth == 0, "key blocks start on a panel");

  // Tasks: (batch, head, chunk of query blocks), the chunk's blocks interleaved (c, c + chunks,
  // ...) so that causal chunks cost alike; chunks only where heads are too few for the threads.
  const int64_t chunks = std::min(q_blocks, (kFwdTasksPerThread * at::get_num_threads() + p.batch * H - 1) /
                                                (p.batch * H));
  const int64_t W = kPanelWidth, Dp = padded_dim(D), dim_panels = (D + W - 1) / W;
  const int64_t max_keys = (p.lk + W - 1) / W * W;

  const int64_t tasks = p.batch * H * chunks;
  // Buffers sized for the problem when it is smaller than a tile (small calls are dominated by
  // fixed costs): rows of S hold ld_s >= any key block's panels.
  const int64_t rows = std::min(BM, p.lq), ld_s = std::min(BN, max_keys);
  parallel_tasks(tasks, [&](const auto& next_task) {
    std::vector<float> scores(rows * ld_s), acc(rows * D), row_max(rows), row_sum(rows);  // S, O, m, l
    std::vector<float> q_rows(rows * Dp);  // the query block as compact fp32 rows
    std::vector<float> sum_vec(rows * Vec::size());  // SoftmaxEpilogue's lane-wise sums
    // The task's keys as fp32 GEMM panels, packed once per task (L2-resident, read by each of its
    // query blocks): K^T (D x keys) panels of keys, then V (keys x D) panels of head dims.
    std::vector<float> key_panels(max_keys * D + dim_panels * max_keys * W);
    std::vector<uint8_t> keep(p.dropout() ? rows * ld_s : 0);
    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t chunk = task % chunks, h = (task / chunks) % H, b = task / (chunks * H);
      const int64_t hk = h / group;
      const int64_t last_block = chunk + (q_blocks - 1 - chunk) / chunks * chunks;
      const int64_t keys_begin = p.lo(chunk * BM) / W * W;
      const int64_t keys_end = std::max(keys_begin, p.hi(std::min(p.lq, (last_block + 1) * BM) - 1));
      const int64_t keys = keys_end - keys_begin, v_panel_stride = keys * W;
      float* kt_pan = key_panels.data();
      float* v_pan = kt_pan + (keys + W - 1) / W * D * W;
      pack_panels_transposed(k_ptr + b * sk.b + keys_begin * sk.l + hk * sk.h, keys, D, sk.l, kt_pan, D * W);
      pack_panels(v_ptr + b * sv.b + keys_begin * sv.l + hk * sv.h, keys, D, sv.l, v_pan, v_panel_stride);
      for (int64_t qb = chunk; qb < q_blocks; qb += chunks) {
        const int64_t i0 = qb * BM, m = std::min(BM, p.lq - i0);
        pack_rows(q_ptr + b * sq.b + i0 * sq.l + h * sq.h, m, D, sq.l, q_rows.data(), Dp);
        const float* q_tile = q_rows.data();  // (m, Dp)
        std::fill(acc.begin(), acc.begin() + m * D, 0.f);
        std::fill(row_max.begin(), row_max.end(), kNegInf);
        std::fill(row_sum.begin(), row_sum.end(), 0.f);
        std::fill(sum_vec.begin(), sum_vec.end(), 0.f);
        // Key blocks start on a panel; prepare_scores hides the keys before lo(i).
        const int64_t j_begin = p.lo(i0) / W * W, j_end = p.hi(i0 + m - 1);
        for (int64_t j0 = j_begin; j0 < j_end; j0 += BN) {
          const int64_t n = std::min(BN, j_end - j0);
          const Panels kt_block{kt_pan + (j0 - keys_begin) / W * D * W, D * W};
          // Every row sees the whole tile and nothing else applies: the softmax in the GEMM's epilogue.
          if (!p.elementwise() && !p.dropout() && p.lo(i0 + m - 1) <= j0 && p.hi(i0) >= j0 + n) {
            panel_gemm_epilogue(m, n, D, q_tile, Dp, 1, kt_block, scores.data(), ld_s,
                                SoftmaxEpilogue{row_max.data(), row_sum.data(), sum_vec.data(), acc.data(), D,
                                                p.scale});
            panel_gemm(m, D, n, scores.data(), ld_s, 1, {v_pan + (j0 - keys_begin) * W, v_panel_stride}, acc.data(), D,
                       true);
            continue;
          }
          panel_gemm(m, n, D, q_tile, Dp, 1, kt_block, scores.data(), ld_s, false);
          if (p.dropout())
            dropout_keep_tile(p.seed, p.offset, static_cast<uint32_t>(b * H + h), i0, m, j0, n, p.dropout_p,
                              keep.data(), ld_s);
          for (int64_t r = 0; r < m; ++r) {
            float* s = scores.data() + r * ld_s;
            const float mult = prepare_scores(p, b, h, i0 + r, j0, n, s, nullptr);
            const float new_max = std::max(row_max[r], vec_max(s, n) * mult);
            float* o = acc.data() + r * D;
            if (new_max == kNegInf) {  // nothing visible yet: P = 0, O stays 0
              std::fill(s, s + n, 0.f);
            } else {
              const float alpha = row_max[r] == kNegInf ? 0.f : std::exp(row_max[r] - new_max);
              row_sum[r] = row_sum[r] * alpha + vec_exp_sum(s, n, mult, new_max);
              row_max[r] = new_max;
              if (alpha != 1.f) {
                vec_scale(o, D, alpha);
                vec_scale(sum_vec.data() + r * Vec::size(), Vec::size(), alpha);
              }
            }
            if (p.dropout()) {
              const float inv_keep = 1.f / (1.f - p.dropout_p);
              const uint8_t* kr = keep.data() + r * ld_s;
              for (int64_t c = 0; c < n; ++c) s[c] = kr[c] ? s[c] * inv_keep : 0.f;
            }
          }
          panel_gemm(m, D, n, scores.data(), ld_s, 1, {v_pan + (j0 - keys_begin) * W, v_panel_stride}, acc.data(), D,
                     true);
        }
        for (int64_t r = 0; r < m; ++r) {
          const int64_t i = i0 + r;
          scalar_t* o = o_ptr + ((b * p.lq + i) * H + h) * D;
          const float sum = row_sum[r] + at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; },
                                                                        Vec::loadu(sum_vec.data() + r * Vec::size()));
          const bool dead = sum == 0.f;
          store_row(acc.data() + r * D, o, D, dead ? 0.f : 1.f / sum);
          lse_ptr[(b * H + h) * p.lq + i] = dead ? kNegInf : row_max[r] + std::log(sum);
        }
      }
    }
  });
}

// --------------------------------------------------------------------------------------------
// Backward
// --------------------------------------------------------------------------------------------
template <typename scalar_t>
void delta_kernel(const Params& p, const at::Tensor& dout, const at::Tensor& out, at::Tensor& delta) {
  const scalar_t* do_ptr = dout.const_data_ptr<scalar_t>();  // (B, Lq, H, D)
  const scalar_t* o_ptr = out.const_data_ptr<scalar_t>();    // (B, Lq, H, D)
  float* delta_ptr = delta.data_ptr<float>();                 // (B, H, Lq)
  const Strides3 sd = strides_of(dout), so = strides_of(out);
  const int64_t H = p.heads, D = p.dim;
  at::parallel_for(0, p.batch * p.lq, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.lq, i = row % p.lq;
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* d = do_ptr + b * sd.b + i * sd.l + h * sd.h;
        const scalar_t* o = o_ptr + b * so.b + i * so.l + h * so.h;
        float sum = 0.f;
        if constexpr (std::is_same_v<scalar_t, float>) {
          Vec acc(0.f);
          int64_t c = 0;
          for (; c + Vec::size() <= D; c += Vec::size())
            acc = at::vec::fmadd(Vec::loadu(d + c), Vec::loadu(o + c), acc);
          sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
          for (; c < D; ++c) sum += d[c] * o[c];
        } else {
          for (int64_t c = 0; c < D; ++c) sum += static_cast<float>(d[c]) * static_cast<float>(o[c]);
        }
        delta_ptr[(b * H + h) * p.lq + i] = sum;
      }
    }
  });
}

// Splits of each kv head's key blocks over tasks: enough tasks for the machine, decided by
// the shapes alone so the summation order (and the bits) never depend on the thread count.
inline int64_t backward_splits(const Params& p, int64_t key_blocks) {
  const int64_t heads = p.batch * p.heads_kv;
  return std::max<int64_t>(1, std::min(key_blocks, (kBwdMinTasks + heads - 1) / heads));
}

template <typename scalar_t>
void backward_kernel(const Params& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq_acc,
                     int64_t splits, at::Tensor& dk, at::Tensor& dv) {
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();      // (B, Lq, H, D)
  const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();      // (B, Lk, Hkv, D)
  const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();      // (B, Lk, Hkv, D)
  const scalar_t* do_ptr = dout.const_data_ptr<scalar_t>();  // (B, Lq, H, D)
  const float* lse_ptr = lse.const_data_ptr<float>();        // (B, H, Lq)
  const float* delta_ptr = delta.const_data_ptr<float>();    // (B, H, Lq)
  float* dq_ptr = dq_acc.data_ptr<float>();                  // (splits, B, Lq, H, D) fp32
  scalar_t* dk_ptr = dk.data_ptr<scalar_t>();                // (B, Lk, Hkv, D) contiguous
  scalar_t* dv_ptr = dv.data_ptr<scalar_t>();                // (B, Lk, Hkv, D) contiguous
  const Strides3 sq = strides_of(q), sk = strides_of(k), sv = strides_of(v), sd = strides_of(dout);
  const int64_t D = p.dim, H = p.heads, Hkv = p.heads_kv, group = H / Hkv;
  const int64_t BM = kBwdBlockM, BN = kBwdBlockN;
  const int64_t key_blocks = (p.lk + BN - 1) / BN;
  const int64_t LS = padded_dim(BN);  // row stride of the score tiles: aligned rows
  const float inv_keep = p.dropout() ? 1.f / (1.f - p.dropout_p) : 1.f;

  const int64_t W = kPanelWidth, Dp = padded_dim(D);

  const int64_t tasks = p.batch * Hkv * splits;
  parallel_tasks(tasks, [&](const auto& next_task) {
    std::vector<float> scores(BM * LS), dprobs(BM * LS), dk_acc(BN * D), dv_acc(BN * D), dcap(BN);
    // This key block: K^T and V^T panels (D x BN: the B operands of S and dP), K rows (BN x Dp: of dQ).
    const int64_t kt_size = (BN + W - 1) / W * D * W;
    std::vector<float> key_panels(2 * kt_size + BN * Dp);
    float* kt_pan = key_panels.data();
    float* vt_pan = kt_pan + kt_size;
    float* k_rows = vt_pan + kt_size;
    // The task's queries of every query head of its kv head, Q then dO, as compact fp32 rows
    // (group, 2, rows, Dp), packed once per task: the A operands of S / dP and the (row-major)
    // B operands of dK += dS^T Q / dV += P^T dO.
    std::vector<float> query_rows;
    // dQ of those queries (group, rows, D), accumulated here (compact: no cache-set aliasing of
    // the (B, Lq, H, D) rows) and stored once per task.
    std::vector<float> dq_rows;
    std::vector<float> lse_tile(BM);
    std::vector<uint8_t> keep(p.dropout() ? BM * LS : 0);
    for (int64_t task = next_task(); task < tasks; task = next_task()) {
      const int64_t split = task % splits, hk = (task / splits) % Hkv, b = task / (splits * Hkv);
      const scalar_t* k_head = k_ptr + b * sk.b + hk * sk.h;
      const scalar_t* v_head = v_ptr + b * sv.b + hk * sv.h;
      float* dq_split = dq_ptr + split * p.batch * p.lq * H * D;
      const int64_t kb_begin = split * key_blocks / splits, kb_end = (split + 1) * key_blocks / splits;
      const int64_t rows_begin = p.first_query(kb_begin * BN);
      const int64_t rows = std::max<int64_t>(0, p.end_query(std::min(p.lk, kb_end * BN)) - rows_begin);
      const int64_t rows_size = rows * Dp;
      query_rows.resize(std::max<size_t>(query_rows.size(), group * 2 * rows_size));
      dq_rows.assign(group * rows * D, 0.f);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = hk * group + g;
        float* dst = query_rows.data() + g * 2 * rows_size;
        pack_rows(q_ptr + b * sq.b + rows_begin * sq.l + h * sq.h, rows, D, sq.l, dst, Dp);
        pack_rows(do_ptr + b * sd.b + rows_begin * sd.l + h * sd.h, rows, D, sd.l, dst + rows_size, Dp);
      }
      for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
        const int64_t j0 = kb * BN, n = std::min(BN, p.lk - j0);
        pack_panels_transposed(k_head + j0 * sk.l, n, D, sk.l, kt_pan, D * W);
        pack_panels_transposed(v_head + j0 * sv.l, n, D, sv.l, vt_pan, D * W);
        pack_rows(k_head + j0 * sk.l, n, D, sk.l, k_rows, Dp);
        std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
        const int64_t i_begin = p.first_query(j0), i_end = p.end_query(j0 + n);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const float* lse_row = lse_ptr + (b * H + h) * p.lq;
          const float* delta_row = delta_ptr + (b * H + h) * p.lq;
          const float* q_rows = query_rows.data() + (h - hk * group) * 2 * rows_size;  // (rows, Dp)
          const float* do_rows = q_rows + rows_size;
          float* dq_head = dq_rows.data() + (h - hk * group) * rows * D;  // (rows, D)
          for (int64_t i0 = i_begin; i0 < i_end; i0 += BM) {
            const int64_t m = std::min(BM, i_end - i0);
            const float* q_tile = q_rows + (i0 - rows_begin) * Dp;  // (m, Dp)
            const float* do_tile = do_rows + (i0 - rows_begin) * Dp;
            // Every row sees the whole tile and nothing else applies: P and dS in the GEMMs' epilogues.
            const bool fused = !p.elementwise() && !p.dropout() && p.lo(i0 + m - 1) <= j0 && p.hi(i0) >= j0 + n;
            if (fused) {
              for (int64_t r = 0; r < m; ++r)
                lse_tile[r] = lse_row[i0 + r] == kNegInf ? std::numeric_limits<float>::infinity() : lse_row[i0 + r];
              panel_gemm_epilogue(m, n, D, q_tile, Dp, 1, {kt_pan, D * W}, scores.data(), LS,
                                  ProbsEpilogue{lse_tile.data(), p.scale});
              panel_gemm_epilogue(m, n, D, do_tile, Dp, 1, {vt_pan, D * W}, dprobs.data(), LS,
                                  DScoresEpilogue{scores.data(), LS, delta_row + i0, p.scale});
            } else {
              panel_gemm(m, n, D, q_tile, Dp, 1, {kt_pan, D * W}, scores.data(), LS, false);
              panel_gemm(m, n, D, do_tile, Dp, 1, {vt_pan, D * W}, dprobs.data(), LS, false);
              if (p.dropout())
                dropout_keep_tile(p.seed, p.offset, static_cast<uint32_t>(b * H + h), i0, m, j0, n, p.dropout_p,
                                  keep.data(), LS);
              for (int64_t r = 0; r < m; ++r) {
                const int64_t i = i0 + r;
                float* s = scores.data() + r * LS;   // -> P (then P * Z)
                float* dp = dprobs.data() + r * LS;  // -> dS * scale
                const float mult = prepare_scores(p, b, h, i, j0, n, s, p.softcap > 0.f ? dcap.data() : nullptr);
                const float lse_i = lse_row[i] == kNegInf ? std::numeric_limits<float>::infinity() : lse_row[i];
                const float delta_i = delta_row[i];
                if (!p.dropout() && p.softcap == 0.f) {  // the common case in one pass
                  probs_and_dscores(s, dp, n, mult, lse_i, delta_i, p.scale);
                  continue;
                }
                vec_exp_sum(s, n, mult, lse_i);
                if (p.dropout()) {
                  const uint8_t* kr = keep.data() + r * LS;
                  for (int64_t c = 0; c < n; ++c) {
                    const float z = kr[c] ? inv_keep : 0.f;
                    dp[c] = s[c] * (dp[c] * z - delta_i);
                    s[c] *= z;
                  }
                } else {
                  const Vec vdelta(delta_i);
                  int64_t c = 0;
                  for (; c + Vec::size() <= n; c += Vec::size())
                    (Vec::loadu(s + c) * (Vec::loadu(dp + c) - vdelta)).store(dp + c);
                  for (; c < n; ++c) dp[c] = s[c] * (dp[c] - delta_i);
                }
                if (p.softcap > 0.f) {
                  for (int64_t c = 0; c < n; ++c) dp[c] *= dcap[c];
                }
                vec_scale(dp, n, p.scale);
              }
            }
            // dV += P^T dO, dK += dS^T Q (A read transposed), dQ += dS K.
            panel_gemm(n, D, m, scores.data(), 1, LS, {do_tile, W, Dp}, dv_acc.data(), D, true);
            panel_gemm(n, D, m, dprobs.data(), 1, LS, {q_tile, W, Dp}, dk_acc.data(), D, true);
            panel_gemm(m, D, n, dprobs.data(), LS, 1, {k_rows, W, Dp}, dq_head + (i0 - rows_begin) * D, D, true);
          }
        }
        for (int64_t c = 0; c < n; ++c) {
          const int64_t row = ((b * p.lk + j0 + c) * Hkv + hk) * D;
          store_row(dk_acc.data() + c * D, dk_ptr + row, D, 1.f);
          store_row(dv_acc.data() + c * D, dv_ptr + row, D, 1.f);
        }
      }
      // This split's dQ of these heads is this task's alone: every row written (0 where no key
      // of the split is seen), so the buffer needs no zeroing.
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < p.lq; ++i) {
          float* dst = dq_split + ((b * p.lq + i) * H + hk * group + g) * D;
          if (i >= rows_begin && i < rows_begin + rows)
            std::copy_n(dq_rows.data() + (g * rows + i - rows_begin) * D, D, dst);
          else
            std::fill(dst, dst + D, 0.f);
        }
    }
  });
}

// --------------------------------------------------------------------------------------------
// Op boundary
// --------------------------------------------------------------------------------------------
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "fastattn cpu attention: tensors must be on the CPU");
    TORCH_CHECK(t->dim() == 4, "fastattn cpu attention: q, k, v must be (B, L, H, D)");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fastattn cpu attention: q, k, v must share a dtype");
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, "fastattn cpu attention: the head dim must be contiguous");
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "fastattn cpu attention: dtype must be float32, bfloat16 or float16, got ", q.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "fastattn cpu attention: k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "fastattn cpu attention: batch / head dim mismatch");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "fastattn cpu attention: nheads % nheads_kv != 0");
}

// A sequence dim whose stride is below the head dim (broadcast / overlapping rows) is no GEMM
// operand: such rare views are copied.
at::Tensor gemm_ready(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) < t.size(3) ? t.contiguous() : t;
}

Params make_params(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& key_padding_mask,
                   const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& alibi_slopes,
                   double softmax_scale, double softcap, bool causal, int64_t shift, int64_t window_left,
                   int64_t window_right, double dropout_p, int64_t seed, int64_t offset) {
  Params p;
  p.batch = q.size(0);
  p.lq = q.size(1);
  p.heads = q.size(2);
  p.dim = q.size(3);
  p.lk = k.size(1);
  p.heads_kv = k.size(2);
  p.scale = static_cast<float>(softmax_scale);
  p.softcap = static_cast<float>(softcap);
  p.shift = shift;
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fastattn cpu attention: window sizes must be >= -1");
  p.left = window_left;
  p.right = causal ? (window_right == kUnbounded ? 0 : std::min<int64_t>(window_right, 0)) : window_right;
  if (key_padding_mask.has_value()) {
    const at::Tensor& kpm = *key_padding_mask;
    TORCH_CHECK(kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == p.batch && kpm.size(1) == p.lk,
                "fastattn cpu attention: key_padding_mask must be bool (B, Lk)");
    p.kpm = kpm.const_data_ptr<bool>();
    p.kpm_sb = kpm.stride(0);
    p.kpm_sl = kpm.stride(1);
  }
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.dim() == 4 && mask.size(0) == p.batch && mask.size(1) == p.heads && mask.size(2) == p.lq &&
                    mask.size(3) == p.lk,
                "fastattn cpu attention: attn_mask must be (B, H, Lq, Lk)");
    const auto type = mask.scalar_type();
    TORCH_CHECK(type == at::kBool || type == at::kFloat || type == q.scalar_type(),
                "fastattn cpu attention: attn_mask must be bool, float32 or q's dtype");
    p.mask = mask.const_data_ptr();
    p.mask_type = type;
    p.mask_sb = mask.stride(0);
    p.mask_sh = mask.stride(1);
    p.mask_sq = mask.stride(2);
    p.mask_sk = mask.stride(3);
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& slopes = *alibi_slopes;
    TORCH_CHECK(slopes.scalar_type() == at::kFloat, "fastattn cpu attention: alibi_slopes must be float32");
    if (slopes.dim() == 1) {
      TORCH_CHECK(slopes.size(0) == p.heads, "fastattn cpu attention: alibi_slopes must be (H,) or (B, H)");
      p.alibi_sb = 0;
      p.alibi_sh = slopes.stride(0);
    } else {
      TORCH_CHECK(slopes.dim() == 2 && slopes.size(0) == p.batch && slopes.size(1) == p.heads,
                  "fastattn cpu attention: alibi_slopes must be (H,) or (B, H)");
      p.alibi_sb = slopes.stride(0);
      p.alibi_sh = slopes.stride(1);
    }
    p.alibi = slopes.const_data_ptr<float>();
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn cpu attention: dropout_p must be in [0, 1)");
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint32_t>(offset);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 const std::optional<at::Tensor>& attn_mask,
                                                 const std::optional<at::Tensor>& alibi_slopes, double softmax_scale,
                                                 double softcap, bool causal, int64_t shift, int64_t window_left,
                                                 int64_t window_right, double dropout_p, int64_t seed,
                                                 int64_t offset) {
  check_qkv(q_in, k_in, v_in);
  const at::Tensor q = gemm_ready(q_in), k = gemm_ready(k_in), v = gemm_ready(v_in);
  const Params p = make_params(q, k, key_padding_mask, attn_mask, alibi_slopes, softmax_scale, softcap, causal, shift,
                               window_left, window_right, dropout_p, seed, offset);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.lq}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_cpu_attention_fwd", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) forward_kernel<scalar_t>(p, q, k, v, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& alibi_slopes, double softmax_scale,
    double softcap, bool causal, int64_t shift, int64_t window_left, int64_t window_right, double dropout_p,
    int64_t seed, int64_t offset) {
  check_qkv(q_in, k_in, v_in);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes() &&
                  dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "fastattn cpu attention: dout and out must have q's shape and dtype");
  TORCH_CHECK(dout_in.stride(3) == 1 && out_in.stride(3) == 1, "fastattn cpu attention: dout / out head dim strides");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "fastattn cpu attention: lse must be fp32 (B, H, Lq)");
  const at::Tensor q = gemm_ready(q_in), k = gemm_ready(k_in), v = gemm_ready(v_in);
  const at::Tensor dout = gemm_ready(dout_in), out = out_in, lse_c = lse.contiguous();
  const Params p = make_params(q, k, key_padding_mask, attn_mask, alibi_slopes, softmax_scale, softcap, causal, shift,
                               window_left, window_right, dropout_p, seed, offset);
  const int64_t splits = backward_splits(p, (p.lk + kBwdBlockN - 1) / kBwdBlockN);
  const bool accumulate_in_place = splits == 1 && q.scalar_type() == at::kFloat;
  at::Tensor delta = at::empty({p.batch, p.heads, p.lq}, q.options().dtype(at::kFloat));
  at::Tensor dq_acc = accumulate_in_place ? at::empty(q.sizes(), q.options())
                                          : at::empty({splits, p.batch, p.lq, p.heads, p.dim},
                                                      q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn_cpu_attention_bwd", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      delta_kernel<scalar_t>(p, dout, out, delta);
      backward_kernel<scalar_t>(p, dout, q, k, v, lse_c, delta, dq_acc, splits, dk, dv);
    }
  });
  if (accumulate_in_place) return {dq_acc, dk, dv};
  return {dq_acc.sum(0).to(q.scalar_type()), dk, dv};
}

// bool (B, H, Lq, Lk): the kernels' keep mask (True = kept), for tests.
at::Tensor attention_dropout_mask(int64_t batch, int64_t heads, int64_t seqlen_q, int64_t seqlen_k, double dropout_p,
                                  int64_t seed, int64_t offset) {
  at::Tensor keep = at::empty({batch, heads, seqlen_q, seqlen_k}, at::TensorOptions().dtype(at::kBool));
  uint8_t* ptr = reinterpret_cast<uint8_t*>(keep.data_ptr<bool>());
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh)
      dropout_keep_tile(static_cast<uint64_t>(seed), static_cast<uint32_t>(offset), static_cast<uint32_t>(bh), 0,
                        seqlen_q, 0, seqlen_k, static_cast<float>(dropout_p), ptr + bh * seqlen_q * seqlen_k,
                        seqlen_k);
  });
  return keep;
}

}  // namespace
}  // namespace fastattn_cpu

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // Flash layout (B, L, H, D); lse (B, H, Lq) fp32. shift: query i's diagonal is key i + shift;
  // window_left / window_right: -1 = unbounded (causal caps window_right at 0).
  m.def(
      "cpu_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_mask, "
      "Tensor? alibi_slopes, float softmax_scale, float softcap, bool causal, int shift, int window_left, "
      "int window_right, float dropout_p, int seed, int offset) -> (Tensor out, Tensor lse)");
  m.def(
      "cpu_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? attn_mask, Tensor? alibi_slopes, float softmax_scale, float softcap, "
      "bool causal, int shift, int window_left, int window_right, float dropout_p, int seed, int offset) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "cpu_attention_dropout_mask(int batch, int heads, int seqlen_q, int seqlen_k, float dropout_p, int seed, "
      "int offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_attention_fwd", &fastattn_cpu::attention_fwd);
  m.impl("cpu_attention_bwd", &fastattn_cpu::attention_bwd);
}

TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("cpu_attention_dropout_mask", &fastattn_cpu::attention_dropout_mask);
}
