// Row-wise building blocks of the CPU norm and FFN kernels (norm.cpp, ffn.cpp): fp32 vector
// loads/stores of fp32/bf16/fp16 rows, the Triton backend's dropout bits, and the fixed row
// blocking that makes column sums (dweight, dbias, db1, db2) deterministic.
//
// Vectors are at::vec::Vectorized<float> (16 lanes with -DCPU_CAPABILITY_AVX512, 8 with AVX2,
// scalar otherwise). Every computation is in fp32; bf16/fp16 are only storage formats.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace fastattn_cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// ---------------------------------------------------------------------------------------------
// fp32 vectors from and to rows of T (float, c10::BFloat16, c10::Half)
// ---------------------------------------------------------------------------------------------
template <typename T>
inline Vec load_vec(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// The first `count` (< kVec) elements, zeros after them.
template <typename T>
inline Vec load_vec_partial(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, count);
  } else {
    float tmp[kVec] = {};
    for (int64_t i = 0; i < count; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline void store_vec(T* p, const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kVec);  // round to nearest even
  }
}

template <typename T>
inline void store_vec_partial(T* p, const Vec& v, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
    float tmp[kVec];
    v.store(tmp);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

// v rounded to T and back: the value a store to T then a load would give.
template <typename T>
inline Vec round_to(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    float tmp[kVec];
    store_vec(reinterpret_cast<T*>(tmp), v);
    return load_vec(reinterpret_cast<const T*>(tmp));
  }
}

// Stores v to p, 64-byte aligned, around the caches (a non-temporal store): no read of the
// line before it is written, and no eviction of cached data for it. For large outputs that
// are not read again soon; other threads are sure to see the writes after stream_fence().
inline void stream_vec(float* p, const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Applies f(j, count) over [0, n) in vector steps; count < kVec only for the tail.
template <typename F>
inline void for_each_vec(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) f(j, kVec);
  if (j < n) f(j, n - j);
}

template <typename T>
inline Vec load_n(const T* p, int64_t count) {
  return count == kVec ? load_vec(p) : load_vec_partial(p, count);
}

template <typename T>
inline void store_n(T* p, const Vec& v, int64_t count) {
  if (count == kVec) {
    store_vec(p, v);
  } else {
    store_vec_partial(p, v, count);
  }
}

// dst[0, n) = float(src[0, n)).
template <typename T>
inline void row_to_float(const T* src, float* dst, int64_t n) {
  for_each_vec(n, [&](int64_t j, int64_t c) { load_n(src + j, c).store(dst + j, c); });
}

// dst[0, n) = T(src[0, n)), rounded to nearest even.
template <typename T>
inline void row_from_float(const float* src, T* dst, int64_t n) {
  for_each_vec(n, [&](int64_t j, int64_t c) { store_n(dst + j, Vec::loadu(src + j, c), c); });
}

// Calls f(T{}) with T the C++ type of dtype: float, c10::BFloat16 or c10::Half.
template <typename F>
inline void dispatch_float_types(at::ScalarType dtype, const char* name, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, name, ": dtype must be float32, bfloat16 or float16, got ", dtype);
  }
}

// float values of a (n,) parameter of any supported dtype (null: absent).
inline std::vector<float> param_as_float(const c10::optional<at::Tensor>& t, int64_t n) {
  if (!t.has_value()) return {};
  std::vector<float> out(n);
  const at::Tensor c = t->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "param_as_float", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(p[j]);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Dropout: the Triton backend's bits (triton.language.random, Philox4x32-10), so one RngState
// gives the same mask on the triton and cpu backends.
// ---------------------------------------------------------------------------------------------
constexpr int kPhiloxLanes = 16;  // Philox evaluations per batch (one AVX-512 vector of words)

// Philox4x32-10 of kPhiloxLanes counters at once (c[word][lane], overwritten by the output),
// key (k0, k1). Written lane-parallel so the compiler vectorizes the 32x32->64 products.
inline void philox4x32_10_batch(uint32_t (&c)[4][kPhiloxLanes], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const uint64_t pb = uint64_t{0xCD9E8D57u} * c[2][l];
      const uint64_t pa = uint64_t{0xD2511F53u} * c[0][l];
      const uint32_t c1 = c[1][l], c3 = c[3][l];
      c[0][l] = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
      c[1][l] = static_cast<uint32_t>(pb);
      c[2][l] = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
      c[3][l] = static_cast<uint32_t>(pa);
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// tl.uint_to_uniform_float of a 32-bit word: non-negative int32 (negatives mirrored by ~x)
// times 2^-31 (4.6566127342e-10 in fp32), in [0, 1).
inline float philox_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Dropout of one row, as multipliers: z[j] = scale if kept else 0.
struct DropoutRng {
  bool enabled = false;
  float p = 0.f;      // compared in fp32, as the Triton kernels receive it
  float scale = 1.f;  // 1 / (1 - p) rounded to fp32
  uint64_t seed = 0;
  uint64_t offset = 0;

  DropoutRng() = default;
  DropoutRng(double dropout_p, int64_t seed_, int64_t offset_) {
    TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
    TORCH_CHECK(dropout_p == 0.0 || (seed_ >= 0 && offset_ >= 0), "seed and offset must be non-negative");
    enabled = dropout_p > 0.0;
    p = static_cast<float>(dropout_p);
    scale = static_cast<float>(1.0 / (1.0 - dropout_p));
    seed = static_cast<uint64_t>(seed_);
    offset = static_cast<uint64_t>(offset_);
  }
};

// Norm (fastattn/triton/norm.py _keep_mask): element (row, col) is kept iff
// uniform(philox(key = seed, counter = (col, row, offset, 0))[0]) >= p; one call per element.
inline void norm_dropout_row(const DropoutRng& rng, int64_t row, int64_t n, float* z) {
  const uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
  for (int64_t j0 = 0; j0 < n; j0 += kPhiloxLanes) {
    uint32_t c[4][kPhiloxLanes];
    for (int l = 0; l < kPhiloxLanes; ++l) {
      c[0][l] = static_cast<uint32_t>(j0 + l);
      c[1][l] = static_cast<uint32_t>(row);
      c[2][l] = static_cast<uint32_t>(rng.offset);
      c[3][l] = 0;
    }
    philox4x32_10_batch(c, k0, k1);
    const int64_t count = std::min<int64_t>(kPhiloxLanes, n - j0);
    for (int64_t l = 0; l < count; ++l) z[j0 + l] = philox_uniform(c[0][l]) >= rng.p ? rng.scale : 0.f;
  }
}

// FFN (fastattn/triton/ffn.py _dropout_keep): unit (row, col) of the (M, F) activation is kept
// iff lane col % 4 of philox(key = seed, counter = (lo32(o), hi32(o), 0, 0)) with
// o = offset + row * ceil(F / 4) + col / 4 is, as a uniform, >= p; one call per 4 units.
inline void ffn_dropout_row(const DropoutRng& rng, int64_t row, int64_t f, float* z) {
  const uint32_t k0 = static_cast<uint32_t>(rng.seed), k1 = static_cast<uint32_t>(rng.seed >> 32);
  const int64_t groups = (f + 3) / 4;
  const uint64_t base = rng.offset + static_cast<uint64_t>(row) * static_cast<uint64_t>(groups);
  for (int64_t g0 = 0; g0 < groups; g0 += kPhiloxLanes) {
    uint32_t c[4][kPhiloxLanes];
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const uint64_t o = base + static_cast<uint64_t>(g0 + l);
      c[0][l] = static_cast<uint32_t>(o);
      c[1][l] = static_cast<uint32_t>(o >> 32);
      c[2][l] = 0;
      c[3][l] = 0;
    }
    philox4x32_10_batch(c, k0, k1);
    const int64_t count = std::min<int64_t>(kPhiloxLanes, groups - g0);
    for (int64_t l = 0; l < count; ++l) {
      for (int w = 0; w < 4; ++w) {
        const int64_t col = 4 * (g0 + l) + w;
        if (col < f) z[col] = philox_uniform(c[w][l]) >= rng.p ? rng.scale : 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic column sums: rows are cut into blocks that depend on the row count only (not on
// the thread count); each block accumulates its own fp32 partial row, and the partials are
// summed in block order, so the result is bitwise reproducible with any number of threads.
// ---------------------------------------------------------------------------------------------
struct RowBlocks {
  int64_t rows = 0;
  int64_t rows_per_block = 1;
  int64_t count = 0;

  explicit RowBlocks(int64_t rows_, int64_t max_blocks = 64, int64_t min_rows_per_block = 8) : rows(rows_) {
    rows_per_block = std::max<int64_t>(min_rows_per_block, (rows + max_blocks - 1) / std::max<int64_t>(max_blocks, 1));
    count = rows == 0 ? 0 : (rows + rows_per_block - 1) / rows_per_block;
  }
  int64_t begin(int64_t block) const { return block * rows_per_block; }
  // parallel_for grain (in blocks) so that a task has at least at::internal::GRAIN_SIZE
  // elements of `cols`-wide rows: small calls run on the calling thread, without a parallel
  // region to wake (and wait for) other threads.
  int64_t grain(int64_t cols) const {
    const int64_t per_block = std::max<int64_t>(1, rows_per_block * cols);
    return std::max<int64_t>(1, (at::internal::GRAIN_SIZE + per_block - 1) / per_block);
  }
  int64_t end(int64_t block) const { return std::min(rows, (block + 1) * rows_per_block); }
};

// Calls task(block, state) for every block in [0, count), state being the running thread's
// make_worker() result (its scratch rows). Blocks are handed out one at a time to whichever
// thread asks next, not split in equal shares up front, so a thread that the scheduler holds
// back (on a shared machine) does fewer blocks instead of making every other thread wait for
// its share. Which thread does a block never changes the results: each block writes its own
// rows and its own partial row. Calls of fewer than `grain` blocks run on the calling thread.
template <typename MakeWorker, typename Task>
inline void parallel_blocks(int64_t count, int64_t grain, const MakeWorker& make_worker, const Task& task) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (count + grain - 1) / std::max<int64_t>(grain, 1));
  if (threads <= 1 || at::in_parallel_region()) {
    auto worker = make_worker();
    for (int64_t b = 0; b < count; ++b) task(b, worker);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t b = next.fetch_add(1); b < count; b = next.fetch_add(1)) task(b, worker);
  });
}

// acc[0, n) += v[0, n) (fp32 rows).
inline void add_row(float* acc, const float* v, int64_t n) {
  for_each_vec(n, [&](int64_t j, int64_t c) { (Vec::loadu(acc + j, c) + Vec::loadu(v + j, c)).store(acc + j, c); });
}

// out[c] = sum over blocks b (in order) of partials[b * cols + c], written in out's dtype.
// A few adds per element: up to kSerialElements partial elements (64 blocks x 8192 columns)
// stay on the calling thread, where waking a second thread costs more than the work (on a
// loaded machine, a scheduler slice).
inline void reduce_partials(const float* partials, int64_t blocks, int64_t cols, at::Tensor& out) {
  constexpr int64_t kChunk = 1024, kSerialElements = int64_t{1} << 19;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "reduce_partials", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, blocks * kChunk));
    at::parallel_for(0, (cols + kChunk - 1) / kChunk, grain, [&](int64_t chunk0, int64_t chunk1) {
      float acc[kChunk];
      for (int64_t chunk = chunk0; chunk < chunk1; ++chunk) {
        const int64_t c0 = chunk * kChunk, len = std::min(kChunk, cols - c0);
        std::fill(acc, acc + len, 0.f);
        for (int64_t b = 0; b < blocks; ++b) add_row(acc, partials + b * cols + c0, len);
        for (int64_t c = 0; c < len; ++c) dst[c0 + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
}

inline void reduce_partials(const std::vector<float>& partials, int64_t blocks, int64_t cols, at::Tensor& out) {
  reduce_partials(partials.data(), blocks, cols, out);
}

}  // namespace fastattn_cpu
