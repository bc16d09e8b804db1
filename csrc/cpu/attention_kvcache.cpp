// CPU decoding attention over a KV cache (flash-attn's flash_attn_with_kvcache) for the ``cpu``
// backend: torch.ops.fastattn.cpu_attention_kvcache_fwd, and cpu_attention_kvcache_append, which
// writes a step's new keys / values into the cache before it.
//
// The new keys / values are already in the cache; query i of sequence b (absolute position
// cache_seqlens[b] - Lq + i) attends over positions [lo(i), hi(i)) of the first
// cache_seqlens[b] cache positions, lo / hi from causal and the window (bottom-right aligned
// per sequence). Cache rows: contiguous (row cache_batch_idx[b] or b) or paged
// (block_table[b][j / block_size], entries past the sequence's last block never read).
//
// Split-KV (flash-decoding): the visible key range of each sequence is cut into chunks of
// ``chunk`` keys; one task per (sequence, kv head, chunk), all under one at::parallel_for, so
// a single long sequence uses every thread. A task processes the kv head's whole query group
// (G query heads x Lq queries) at once, so each K / V row is read from memory once per group:
// decoding is bandwidth-bound and that is the traffic that matters. Each task keeps an online
// softmax in fp32; a sequence with one chunk writes its output directly, otherwise the chunks'
// normalized outputs and lse go to fp32 scratch and are combined by logsumexp in a second
// parallel pass. The chunk size depends on the shapes and the thread count only (so results
// are bitwise reproducible for a given thread count).
//
// Scores: q is pre-scaled by softmax_scale (by scale / softcap with softcap, then
// s = softcap * tanh(q.k)), minus the ALiBi bias slope * |position - j|. fp16 / bf16 K / V
// tiles are converted to fp32 (a tile stays in L1 / L2), fp32 tiles are read in place.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/attention_common.h"

namespace fastattn_cpu_kvcache {
namespace {

using namespace fastattn_cpu_common;
// Keys per tile: the (G * Lq) x kTile scores, the transposed K tile (D x kTile) and the fp32
// copies of half-precision K / V tiles stay in L1 / L2. A multiple of the vector width.
constexpr int64_t kTile = 64;
// Smallest automatic chunk: per-task costs (q load, scratch write, combine) stay negligible.
constexpr int64_t kMinChunk = 256;
// Automatic chunking aims at this many tasks per thread: equal-size chunks balance the static
// partition of at::parallel_for when sequences have different lengths.
constexpr int64_t kTasksPerThread = 8;

struct Params {
  int64_t batch, lq, heads, heads_kv, group, dim;
  float q_scale;         // folded into q: softmax_scale, or softmax_scale / softcap
  float softcap;         // 0: none
  int64_t left, right;   // window around the query's position; -1 unbounded (causal: right = 0)
  int64_t block_size;    // paged cache: positions per block; 0: contiguous cache
  int64_t cache_rows;    // contiguous: batch_cache; paged: num_blocks
  int64_t capacity;      // positions per sequence
  int64_t k_s0, k_s1, k_s2, v_s0, v_s1, v_s2;  // cache strides (dims 0, 1, 2)
  int64_t q_sb, q_sl, q_sh;
  const int32_t* seqlens = nullptr;     // (B,)
  const int32_t* block_table = nullptr; // (B, max_blocks) contiguous
  int64_t max_blocks = 0;
  const int32_t* batch_idx = nullptr;   // (B,) or null
  AlibiSlopes alibi;

  int64_t position(int64_t b, int64_t i) const { return seqlens[b] - lq + i; }
  int64_t lo(int64_t b, int64_t i) const {
    return left == kUnbounded ? 0 : std::max<int64_t>(0, position(b, i) - left);
  }
  int64_t hi(int64_t b, int64_t i) const {
    const int64_t n = seqlens[b];
    return right == kUnbounded ? n : std::min<int64_t>(n, std::max<int64_t>(0, position(b, i) + right + 1));
  }
  // Keys some query of sequence b sees: [lo(first query), hi(last query)) (both monotone in i).
  int64_t range_begin(int64_t b) const { return lo(b, 0); }
  int64_t range_end(int64_t b) const { return std::max(range_begin(b), hi(b, lq - 1)); }
  // Offset of position j of sequence b, kv head hk, in a cache with strides s0, s1, s2.
  int64_t row_offset(int64_t b, int64_t j, int64_t s0, int64_t s1, int64_t s2, int64_t hk) const {
    if (block_size == 0) return (batch_idx ? batch_idx[b] : b) * s0 + j * s1 + hk * s2;
    return static_cast<int64_t>(block_table[b * max_blocks + j / block_size]) * s0 + (j % block_size) * s1 +
           hk * s2;
  }
  // End of the positions stored contiguously from j (the block's end when paged), capped at end.
  int64_t run_end(int64_t j, int64_t end) const {
    return block_size == 0 ? end : std::min(end, (j / block_size + 1) * block_size);
  }
};

// Rows of the next tile of one kv head, prefetched one row per row of the current tile as it
// is consumed (K rows while K is transposed, V rows during P.V): the next tile's DRAM traffic
// overlaps this tile's compute without bursts that fill the line-fill buffers. The hardware
// prefetchers alone leave decoding latency-bound: a kv head's rows are Hkv * D apart.
struct NextRows {
  const char* base = nullptr;
  int64_t ld_bytes = 0, rows = 0, row_bytes = 0;

  template <typename scalar_t>
  NextRows(const scalar_t* src, int64_t n, int64_t ld, int64_t dim)
      : base(reinterpret_cast<const char*>(src)), ld_bytes(ld * static_cast<int64_t>(sizeof(scalar_t))), rows(n),
        row_bytes(dim * static_cast<int64_t>(sizeof(scalar_t))) {}
  NextRows() = default;

  void fetch(int64_t r) const {
    if (r >= rows) return;
    const char* row = base + r * ld_bytes;
    for (int64_t offset = 0; offset < row_bytes; offset += 64) __builtin_prefetch(row + offset, 0, 1);
  }
};

// dst (dim x kTile) = src (rows x dim, row stride ld) transposed: keys become vector lanes, so
// the scores need no horizontal reductions. Whole 16 x 16 blocks take at::vec's shuffles.
inline void transpose_tile(const float* src, int64_t ld, int64_t rows, int64_t dim, float* dst,
                           const NextRows& next) {
  constexpr int64_t kB = 16;
  const int64_t full_r = rows / kB * kB, full_d = dim / kB * kB;
  for (int64_t r = 0; r < full_r; r += kB) {
    for (int64_t f = r; f < r + kB; ++f) next.fetch(f);
    for (int64_t d = 0; d < full_d; d += kB)
      at::vec::transpose_mxn<float, kB, kB>(src + r * ld + d, ld, dst + d * kTile + r, kTile);
  }
  for (int64_t f = full_r; f < kTile; ++f) next.fetch(f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = r < full_r ? full_d : 0; d < dim; ++d) dst[d * kTile + r] = src[r * ld + d];
}

// scores (R rows, row stride kTile) over keys [0, n) = q (R rows of dim) . kt (dim x kTile).
// The kt buffer is kTile wide, so whole vectors past n read finite scratch and are ignored.
template <int R>
inline void scores_block(const float* q, int64_t dim, const float* kt, int64_t n, float* scores) {
  for (int64_t c = 0; c < n; c += Vec::size()) {
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = Vec(0.f);
    for (int64_t d = 0; d < dim; ++d) {
      const Vec k = Vec::loadu(kt + d * kTile + c);
      for (int r = 0; r < R; ++r) acc[r] = at::vec::fmadd(Vec(q[r * dim + d]), k, acc[r]);
    }
    for (int r = 0; r < R; ++r) acc[r].store(scores + r * kTile + c);
  }
}

// acc (R rows of dim) += probs (R rows, stride kTile) over keys [c0, c1) . v (rows of dim, ld),
// in register chunks of kChunk vectors per row.
template <int R>
inline void pv_block(const float* probs, int64_t c0, int64_t c1, const float* v, int64_t ld, float* acc,
                     int64_t dim, const NextRows& next) {
  constexpr int kChunk = 4;
  constexpr int64_t W = Vec::size();
  for (int64_t d0 = 0; d0 < dim; d0 += kChunk * W) {
    int64_t count[kChunk];
    for (int k = 0; k < kChunk; ++k) count[k] = std::clamp<int64_t>(dim - d0 - k * W, 0, W);
    Vec a[R][kChunk];
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < kChunk; ++k) a[r][k] = Vec::loadu(acc + r * dim + d0 + k * W, count[k]);
    for (int64_t c = c0; c < c1; ++c) {
      if (d0 == 0) next.fetch(c);
      const float* v_row = v + c * ld + d0;
      Vec vv[kChunk];
      for (int k = 0; k < kChunk; ++k) vv[k] = Vec::loadu(v_row + k * W, count[k]);
      for (int r = 0; r < R; ++r) {
        const Vec p(probs[r * kTile + c]);
        for (int k = 0; k < kChunk; ++k) a[r][k] = at::vec::fmadd(p, vv[k], a[r][k]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < kChunk; ++k) a[r][k].store(acc + r * dim + d0 + k * W, count[k]);
  }
}

// Blocks of up to 4 rows: each K^T / V vector load feeds 4 FMAs.
template <typename Fn>
inline void for_row_blocks(int64_t rows, const Fn& fn) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) fn(r, std::integral_constant<int, 4>());
  switch (rows - r) {
    case 3: fn(r, std::integral_constant<int, 3>()); break;
    case 2: fn(r, std::integral_constant<int, 2>()); break;
    case 1: fn(r, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// Per-thread state of one task. Rows r = (hk * Lq + i) * G + g: query i of head hk * G + g.
struct TaskState {
  std::vector<float> q, acc, row_max, row_sum, scores, kt, k_buf, v_buf;
  std::vector<int64_t> c0, c1;  // per query: visible columns of the current tile
  TaskState(int64_t lq, int64_t rows, int64_t group_rows, int64_t dim, bool convert)
      : q(rows * dim), acc(rows * dim), row_max(rows), row_sum(rows), scores(group_rows * kTile, 0.f),
        kt(dim * kTile, 0.f), k_buf(convert ? kTile * dim : 0), v_buf(convert ? kTile * dim : 0), c0(lq), c1(lq) {}
};

// Online softmax of every head of sequence b over keys [j_begin, j_end). Tile by tile, the kv
// heads are taken in turn, so each cache row (Hkv * D values) is consumed whole while it is
// in cache; within a kv head, its G query heads are processed together.
template <typename scalar_t>
void attend_chunk(const Params& p, const scalar_t* k_cache, const scalar_t* v_cache, int64_t b, int64_t j_begin,
                  int64_t j_end, TaskState& st) {
  const int64_t D = p.dim, G = p.group, group_rows = p.lq * G;
  std::fill(st.acc.begin(), st.acc.end(), 0.f);
  std::fill(st.row_max.begin(), st.row_max.end(), kNegInf);
  std::fill(st.row_sum.begin(), st.row_sum.end(), 0.f);
  for (int64_t j0 = j_begin; j0 < j_end;) {
    const int64_t j1 = std::min(p.run_end(j0, j_end), j0 + kTile), n = j1 - j0;
    const int64_t next = j1 < j_end ? std::min(p.run_end(j1, j_end), j1 + kTile) - j1 : 0;
    bool any = false;
    for (int64_t i = 0; i < p.lq; ++i) {
      st.c0[i] = std::clamp<int64_t>(p.lo(b, i) - j0, 0, n);
      st.c1[i] = std::clamp<int64_t>(p.hi(b, i) - j0, st.c0[i], n);
      any = any || st.c1[i] > st.c0[i];
    }
    for (int64_t hk = 0; any && hk < p.heads_kv; ++hk) {
      const int64_t base = hk * group_rows;  // the kv head's first row
      const NextRows next_k = next > 0 ? NextRows(k_cache + p.row_offset(b, j1, p.k_s0, p.k_s1, p.k_s2, hk), next,
                                                  p.k_s1, D)
                                       : NextRows();
      const NextRows next_v = next > 0 ? NextRows(v_cache + p.row_offset(b, j1, p.v_s0, p.v_s1, p.v_s2, hk), next,
                                                  p.v_s1, D)
                                       : NextRows();
      int64_t ldk, ldv;
      const float* k = rows_fp32(k_cache + p.row_offset(b, j0, p.k_s0, p.k_s1, p.k_s2, hk), n, p.k_s1, D,
                                 st.k_buf.data(), ldk);
      transpose_tile(k, ldk, n, D, st.kt.data(), next_k);
      for_row_blocks(group_rows, [&](int64_t r, auto block) {
        scores_block<decltype(block)::value>(st.q.data() + (base + r) * D, D, st.kt.data(), n,
                                             st.scores.data() + r * kTile);
      });
      // Masks and the online-softmax update; every row's scores become probabilities (0
      // outside its visible keys).
      for (int64_t i = 0; i < p.lq; ++i) {
        const int64_t c0 = st.c0[i], c1 = st.c1[i];
        for (int64_t g = 0; g < G; ++g) {
          const int64_t local = i * G + g, r = base + local;
          float* s = st.scores.data() + local * kTile;
          if (c1 == c0) {
            std::fill(s, s + n, 0.f);
            continue;
          }
          std::fill(s, s + c0, kNegInf);
          std::fill(s + c1, s + n, kNegInf);
          if (p.softcap > 0.f) {
            const Vec cap(p.softcap);
            for (int64_t c = c0; c < c1; c += Vec::size()) {
              const int64_t count = std::min<int64_t>(Vec::size(), c1 - c);
              (Vec::loadu(s + c, count).tanh() * cap).store(s + c, count);
            }
          }
          if (p.alibi.ptr != nullptr) {
            const float slope = p.alibi.ptr[b * p.alibi.sb + (hk * G + g) * p.alibi.sh];
            const float pos = static_cast<float>(p.position(b, i) - j0);
            for (int64_t c = c0; c < c1; ++c) s[c] -= slope * std::abs(pos - static_cast<float>(c));
          }
          float tile_max = kNegInf;
          for (int64_t c = c0; c < c1; ++c) tile_max = std::max(tile_max, s[c]);
          const float new_max = std::max(st.row_max[r], tile_max);
          const float alpha = st.row_max[r] == kNegInf ? 0.f : std::exp(st.row_max[r] - new_max);
          st.row_sum[r] = st.row_sum[r] * alpha + vec_exp_sum(s, n, new_max);
          st.row_max[r] = new_max;
          if (alpha != 1.f) vec_scale(st.acc.data() + r * D, D, alpha);
        }
      }
      const float* v = rows_fp32(v_cache + p.row_offset(b, j0, p.v_s0, p.v_s1, p.v_s2, hk), n, p.v_s1, D,
                                 st.v_buf.data(), ldv);
      for_row_blocks(group_rows, [&](int64_t r, auto block) {
        constexpr int R = decltype(block)::value;
        // Columns any row of the block sees (the others' probabilities there are 0).
        int64_t c0 = n, c1 = 0;
        for (int64_t row = r; row < r + R; ++row) {
          c0 = std::min(c0, st.c0[row / G]);
          c1 = std::max(c1, st.c1[row / G]);
        }
        // The first block fetches the next tile's V rows as it goes, and any it does not visit.
        const NextRows& fetch = r == 0 ? next_v : NextRows();
        if (c0 < c1)
          pv_block<R>(st.scores.data() + r * kTile, c0, c1, v, ldv, st.acc.data() + (base + r) * D, D, fetch);
        for (int64_t f = 0; f < kTile; ++f)
          if (f < c0 || f >= c1) fetch.fetch(f);
      });
    }
    j0 = j1;
  }
}

// Keys per chunk: every sequence's key range in one chunk when one thread runs, else chunks
// sized so that there are about kTasksPerThread tasks per thread (at least kMinChunk keys,
// whole tiles).
int64_t choose_chunk(const Params& p, int64_t forced) {
  if (forced > 0) return forced;
  int64_t longest = 0, total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = p.range_end(b) - p.range_begin(b);
    longest = std::max(longest, n);
    total += n;
  }
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || longest <= kMinChunk) return std::max<int64_t>(longest, 1);
  const int64_t target = threads * kTasksPerThread;
  int64_t chunk = (total + target - 1) / target;
  chunk = std::max(kMinChunk, (chunk + kTile - 1) / kTile * kTile);
  return std::min(chunk, longest);
}

template <typename scalar_t>
void kvcache_kernel(const Params& p, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    int64_t chunk, at::Tensor& out, at::Tensor& lse) {
  const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();        // (B, Lq, H, D)
  const scalar_t* k_ptr = k_cache.const_data_ptr<scalar_t>();  // (B_cache, L, Hkv, D) or (blocks, bs, Hkv, D)
  const scalar_t* v_ptr = v_cache.const_data_ptr<scalar_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();  // (B, Lq, H, D) contiguous
  float* lse_ptr = lse.data_ptr<float>();      // (B, H, Lq)
  const int64_t D = p.dim, H = p.heads, G = p.group, Lq = p.lq, rows = H * Lq;

  // Tasks: (b, chunk c) flattened; chunk_first[b]: index of b's first chunk among all.
  std::vector<int64_t> chunk_first(p.batch + 1, 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = p.range_end(b) - p.range_begin(b);
    chunk_first[b + 1] = chunk_first[b] + std::max<int64_t>(1, (n + chunk - 1) / chunk);
  }
  const int64_t chunks = chunk_first[p.batch];
  const bool split = chunks > p.batch;
  // Partial outputs of split sequences: (chunks, H, Lq, D) normalized, lse (chunks, H, Lq).
  at::Tensor part_o = split ? at::empty({chunks, H, Lq, D}, q.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor part_lse = split ? at::empty({chunks, H, Lq}, q.options().dtype(at::kFloat)) : at::Tensor();
  float* part_o_ptr = split ? part_o.data_ptr<float>() : nullptr;
  float* part_lse_ptr = split ? part_lse.data_ptr<float>() : nullptr;

  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    TaskState st(Lq, rows, Lq * G, D, !std::is_same_v<scalar_t, float>);
    int64_t b = 0;
    for (int64_t global_chunk = begin; global_chunk < end; ++global_chunk) {
      while (chunk_first[b + 1] <= global_chunk) ++b;
      const int64_t c = global_chunk - chunk_first[b];
      const bool own_chunks = chunk_first[b + 1] - chunk_first[b] > 1;
      const int64_t j_begin = std::min(p.range_begin(b) + c * chunk, p.range_end(b));
      const int64_t j_end = std::min(j_begin + chunk, p.range_end(b));
      for (int64_t hk = 0; hk < p.heads_kv; ++hk)
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t g = 0; g < G; ++g) {
            const scalar_t* src = q_ptr + b * p.q_sb + i * p.q_sl + (hk * G + g) * p.q_sh;
            float* dst = st.q.data() + ((hk * Lq + i) * G + g) * D;
            row_to_fp32(src, dst, D);
            vec_scale(dst, D, p.q_scale);
          }
      attend_chunk<scalar_t>(p, k_ptr, v_ptr, b, j_begin, j_end, st);
      for (int64_t hk = 0; hk < p.heads_kv; ++hk)
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = (hk * Lq + i) * G + g, h = hk * G + g;
            const bool dead = st.row_sum[r] == 0.f;
            const float inv = dead ? 0.f : 1.f / st.row_sum[r];
            const float row_lse = dead ? kNegInf : st.row_max[r] + std::log(st.row_sum[r]);
            const float* acc = st.acc.data() + r * D;
            if (own_chunks) {
              float* dst = part_o_ptr + ((global_chunk * H + h) * Lq + i) * D;
              for (int64_t d = 0; d < D; ++d) dst[d] = acc[d] * inv;
              part_lse_ptr[(global_chunk * H + h) * Lq + i] = row_lse;
            } else {
              scalar_t* dst = o_ptr + ((b * Lq + i) * H + h) * D;
              for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inv);
              lse_ptr[(b * H + h) * Lq + i] = row_lse;
            }
          }
    }
  });
  if (!split) return;

  // Combine: out = sum_c exp(lse_c - lse) o_c with lse = log sum_c exp(lse_c).
  at::parallel_for(0, p.batch * H * Lq, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % Lq, h = (row / Lq) % H, b = row / (Lq * H);
      const int64_t first = chunk_first[b], last = chunk_first[b + 1];
      if (last - first == 1) continue;  // written by its task
      float top = kNegInf;
      for (int64_t c = first; c < last; ++c) top = std::max(top, part_lse_ptr[(c * H + h) * Lq + i]);
      scalar_t* dst = o_ptr + ((b * Lq + i) * H + h) * D;
      if (top == kNegInf) {
        std::fill(dst, dst + D, static_cast<scalar_t>(0.f));
        lse_ptr[(b * H + h) * Lq + i] = kNegInf;
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      float total = 0.f;
      for (int64_t c = first; c < last; ++c) {
        const float l = part_lse_ptr[(c * H + h) * Lq + i];
        if (l == kNegInf) continue;
        const float w = std::exp(l - top);
        total += w;
        const float* part = part_o_ptr + ((c * H + h) * Lq + i) * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * part[d];
      }
      const float inv = 1.f / total;
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(acc[d] * inv);
      lse_ptr[(b * H + h) * Lq + i] = top + std::log(total);
    }
  });
}

// --------------------------------------------------------------------------------------------
// Op boundary: shapes, dtypes and every index a kernel would dereference
// --------------------------------------------------------------------------------------------
void check_index(const at::Tensor& t, const char* name, int64_t dim, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == dim && t.size(0) == rows,
              "fastattn cpu kvcache: ", name, " must be int32 on the CPU with ", dim, " dims and ", rows, " rows");
}

std::tuple<at::Tensor, at::Tensor> kvcache_fwd(const at::Tensor& q_in, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& cache_seqlens_in,
                                               const std::optional<at::Tensor>& block_table_in,
                                               const std::optional<at::Tensor>& cache_batch_idx_in,
                                               const std::optional<at::Tensor>& alibi_slopes, double softmax_scale,
                                               double softcap, bool causal, int64_t window_left,
                                               int64_t window_right, int64_t chunk_size) {
  for (const at::Tensor* t : {&q_in, &k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 4, "fastattn cpu kvcache: q and the caches must be 4-D CPU");
    TORCH_CHECK(t->scalar_type() == q_in.scalar_type(), "fastattn cpu kvcache: q and the caches must share a dtype");
    TORCH_CHECK(t->stride(3) == 1 || t->size(3) == 1, "fastattn cpu kvcache: the head dim must be contiguous");
  }
  const auto dtype = q_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastattn cpu kvcache: dtype must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "fastattn cpu kvcache: k_cache and v_cache shapes differ");
  TORCH_CHECK(k_cache.size(3) == q_in.size(3), "fastattn cpu kvcache: head dims differ");
  TORCH_CHECK(k_cache.size(2) > 0 && q_in.size(2) % k_cache.size(2) == 0,
              "fastattn cpu kvcache: nheads % nheads_kv != 0");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "fastattn cpu kvcache: window sizes must be >= -1");
  const at::Tensor q = q_in.size(3) == 1 ? q_in.contiguous() : q_in;
  Params p;
  p.batch = q.size(0);
  p.lq = q.size(1);
  p.heads = q.size(2);
  p.dim = q.size(3);
  p.heads_kv = k_cache.size(2);
  p.group = p.heads / p.heads_kv;
  p.softcap = static_cast<float>(softcap);
  p.q_scale = static_cast<float>(softcap > 0.0 ? softmax_scale / softcap : softmax_scale);
  p.left = window_left;
  p.right = causal ? (window_right == kUnbounded ? 0 : std::min<int64_t>(window_right, 0)) : window_right;
  p.q_sb = q.stride(0);
  p.q_sl = q.stride(1);
  p.q_sh = q.stride(2);
  p.k_s0 = k_cache.stride(0);
  p.k_s1 = k_cache.stride(1);
  p.k_s2 = k_cache.stride(2);
  p.v_s0 = v_cache.stride(0);
  p.v_s1 = v_cache.stride(1);
  p.v_s2 = v_cache.stride(2);
  p.cache_rows = k_cache.size(0);

  const at::Tensor cache_seqlens = cache_seqlens_in.contiguous();
  check_index(cache_seqlens, "cache_seqlens", 1, p.batch);
  p.seqlens = cache_seqlens.const_data_ptr<int32_t>();
  at::Tensor block_table, batch_idx;
  if (block_table_in.has_value()) {
    TORCH_CHECK(!cache_batch_idx_in.has_value(), "fastattn cpu kvcache: block_table and cache_batch_idx exclude");
    block_table = block_table_in->contiguous();
    check_index(block_table, "block_table", 2, p.batch);
    p.block_table = block_table.const_data_ptr<int32_t>();
    p.max_blocks = block_table.size(1);
    p.block_size = k_cache.size(1);
    p.capacity = p.max_blocks * p.block_size;
  } else {
    p.block_size = 0;
    p.capacity = k_cache.size(1);
    if (cache_batch_idx_in.has_value()) {
      batch_idx = cache_batch_idx_in->contiguous();
      check_index(batch_idx, "cache_batch_idx", 1, p.batch);
      p.batch_idx = batch_idx.const_data_ptr<int32_t>();
    } else {
      TORCH_CHECK(p.cache_rows >= p.batch, "fastattn cpu kvcache: the cache has fewer rows than q's batch");
    }
  }
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t n = p.seqlens[b];
    TORCH_CHECK(n >= 0 && n <= p.capacity, "fastattn cpu kvcache: cache_seqlens[", b, "] = ", n,
                " is outside [0, ", p.capacity, "]");
    if (p.block_table != nullptr) {
      for (int64_t blk = 0; blk * p.block_size < n; ++blk) {
        const int64_t id = p.block_table[b * p.max_blocks + blk];
        TORCH_CHECK(id >= 0 && id < p.cache_rows, "fastattn cpu kvcache: block_table[", b, ", ", blk, "] = ", id,
                    " is outside [0, ", p.cache_rows, ")");
      }
    } else if (p.batch_idx != nullptr) {
      TORCH_CHECK(p.batch_idx[b] >= 0 && p.batch_idx[b] < p.cache_rows, "fastattn cpu kvcache: cache_batch_idx[",
                  b, "] = ", p.batch_idx[b], " is outside [0, ", p.cache_rows, ")");
    }
  }
  p.alibi = alibi_slopes_of(alibi_slopes, p.batch, p.heads, "fastattn cpu kvcache");
  TORCH_CHECK(chunk_size >= 0, "fastattn cpu kvcache: chunk_size must be >= 0 (0: automatic)");

  at::Tensor out = at::empty({p.batch, p.lq, p.heads, p.dim}, q.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.lq}, q.options().dtype(at::kFloat));
  const int64_t chunk = choose_chunk(p, chunk_size);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fastattn_cpu_attention_kvcache_fwd", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) kvcache_kernel<scalar_t>(p, q, k_cache, v_cache, chunk, out, lse);
  });
  return {out, lse};
}

// Writes k / v (B, Lnew, Hkv, D) into the caches at positions cache_seqlens[b] + i of sequence b
// (lengths before the append): one row copy of Hkv x D elements per (b, i), done here rather than
// by two index_put_ calls and the index tensors they need (a decoding step's largest fixed cost).
// The Python layer has checked the index values; the bounds are checked again per row.
void kvcache_append(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k_in, const at::Tensor& v_in,
                    const at::Tensor& cache_seqlens_in, const std::optional<at::Tensor>& block_table_in,
                    const std::optional<at::Tensor>& cache_batch_idx_in) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "fastattn cpu kvcache append: the caches "
              "must be 4-D and of one shape");
  TORCH_CHECK(k_in.dim() == 4 && v_in.sizes() == k_in.sizes(), "fastattn cpu kvcache append: k and v must be 4-D "
              "and of one shape");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == dtype && k_in.scalar_type() == dtype && v_in.scalar_type() == dtype,
              "fastattn cpu kvcache append: k, v and the caches must have one dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "fastattn cpu kvcache append: the caches' head dim "
              "must be contiguous");
  const int64_t batch = k_in.size(0), seqlen_new = k_in.size(1), heads_kv = k_in.size(2), dim = k_in.size(3);
  TORCH_CHECK(k_cache.size(2) == heads_kv && k_cache.size(3) == dim, "fastattn cpu kvcache append: k/v rows must "
              "match the caches' (nheads_kv, headdim)");
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor seqlens = cache_seqlens_in.contiguous();
  check_index(seqlens, "cache_seqlens", 1, batch);
  at::Tensor table, batch_idx;
  if (block_table_in.has_value()) {
    table = block_table_in->contiguous();
    check_index(table, "block_table", 2, batch);
  } else if (cache_batch_idx_in.has_value()) {
    batch_idx = cache_batch_idx_in->contiguous();
    check_index(batch_idx, "cache_batch_idx", 1, batch);
  }
  const int64_t rows = k_cache.size(0), cols = k_cache.size(1), elem = k_cache.element_size();
  const int32_t* n = seqlens.const_data_ptr<int32_t>();
  const auto copy_row = [&](const at::Tensor& src, at::Tensor& dst, int64_t b, int64_t i, int64_t row, int64_t col) {
    const char* from = static_cast<const char*>(src.const_data_ptr()) + (b * src.stride(0) + i * src.stride(1)) * elem;
    char* to = static_cast<char*>(dst.data_ptr()) + (row * dst.stride(0) + col * dst.stride(1)) * elem;
    for (int64_t h = 0; h < heads_kv; ++h) {
      std::memcpy(to + h * dst.stride(2) * elem, from + h * src.stride(2) * elem, dim * elem);
    }
  };
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < seqlen_new; ++i) {
      const int64_t position = static_cast<int64_t>(n[b]) + i;
      int64_t row = b, col = position;
      if (table.defined()) {
        const int64_t blk = position / cols;
        TORCH_CHECK(position >= 0 && blk < table.size(1), "fastattn cpu kvcache append: position ", position,
                    " of sequence ", b, " is past its block table");
        row = table.const_data_ptr<int32_t>()[b * table.size(1) + blk];
        col = position % cols;
      } else if (batch_idx.defined()) {
        row = batch_idx.const_data_ptr<int32_t>()[b];
      }
      TORCH_CHECK(row >= 0 && row < rows && col >= 0 && col < cols, "fastattn cpu kvcache append: slot (", row, ", ",
                  col, ") of sequence ", b, " is outside the cache");
      copy_row(k, k_cache, b, i, row, col);
      copy_row(v, v_cache, b, i, row, col);
    }
  }
}

}  // namespace
}  // namespace fastattn_cpu_kvcache

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // k, v (B, Lnew, Hkv, D) written in place into the caches (layouts as below) at positions
  // cache_seqlens[b] + i, cache_seqlens (B,) int32 the lengths before the append.
  m.def(
      "cpu_attention_kvcache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, "
      "Tensor cache_seqlens, Tensor? block_table, Tensor? cache_batch_idx) -> ()");
  // q (B, Lq, H, D); caches (B_cache, L, Hkv, D) or, with block_table (B, max_blocks), paged
  // (num_blocks, block_size, Hkv, D); cache_seqlens (B,) int32 valid positions (new tokens
  // included). window_left / window_right: -1 = unbounded (causal caps window_right at 0).
  // chunk_size: keys per split-KV task, 0 = automatic. -> out (B, Lq, H, D), lse (B, H, Lq) fp32.
  m.def(
      "cpu_attention_kvcache_fwd(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, "
      "Tensor? block_table, Tensor? cache_batch_idx, Tensor? alibi_slopes, float softmax_scale, float softcap, "
      "bool causal, int window_left, int window_right, int chunk_size) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_attention_kvcache_fwd", &fastattn_cpu_kvcache::kvcache_fwd);
  m.impl("cpu_attention_kvcache_append", &fastattn_cpu_kvcache::kvcache_append);
}
