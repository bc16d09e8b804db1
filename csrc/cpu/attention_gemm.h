// Register-blocked fp32 GEMM for the attention tiles (csrc/cpu/attention.cpp).
//
// C (M x N, row stride ldc) = or += A (M x K) B (K x N). A is read in place through two strides
// (element (i, k) at a[i * ars + k * acs]: row-major tiles and transposed tiles alike); B is
// packed into panels of kPanelWidth columns (or is row-major with a compact row stride) so that
// the inner loop reads it contiguously. Tile shapes here are small (K = head dim or one key /
// query block), where a BLAS call's own packing and dispatch cost dominate: with the operands
// packed once per task or key block this kernel measured 1.05-1.3x MKL's sgemm on the forward's
// and backward's 128 x 128 x 64 / 128 x 512 x 64 tiles. An epilogue functor may replace the
// plain store of C's rows (elementwise work fused into the GEMM).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastattn_cpu {

using PanelVec = at::vec::Vectorized<float>;
constexpr int64_t kPanelVecs = 4;
constexpr int64_t kPanelWidth = kPanelVecs * PanelVec::size();
// Rows per register block: 6 x 4 accumulators use 24 of AVX-512's 32 vector registers; AVX2 has 16.
constexpr int kPanelRows = PanelVec::size() >= 16 ? 6 : 3;
static_assert(kPanelRows <= 6, "panel_gemm_impl's remainder switch covers up to 5 rows");

// B (K x N) as panels: B[k][j] at data[(j / kPanelWidth) * panel_stride + k * row_stride + j % kPanelWidth].
// Packed panels (row_stride kPanelWidth) are zero past column N; a row-major B (panel_stride
// kPanelWidth, row_stride its ld) may hold anything there, as long as the row's vectors up to
// column N rounded up to PanelVec::size() are readable: those lanes only reach unstored results.
struct Panels {
  const float* data;
  int64_t panel_stride;
  int64_t row_stride = kPanelWidth;
};

// Row-major fp32 copy of src (rows x cols, row stride ld, any dtype) with row stride ldd >= cols,
// zero past column cols: a compact A operand (no cache-set aliasing of wide strides) or a
// row-major B (Panels{dst, kPanelWidth, ldd}).
template <typename scalar_t>
inline void pack_rows(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * ldd;
    const scalar_t* in = src + r * ld;
    for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<float>(in[c]);
    std::fill(out + cols, out + ldd, 0.f);
  }
}

// Packs src (rows x cols, row stride ld, any dtype) as panels of B = src: each panel is the
// pack_rows copy of its kPanelWidth columns.
template <typename scalar_t>
inline void pack_panels(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, float* dst,
                        int64_t panel_stride) {
  for (int64_t p = 0; p * kPanelWidth < cols; ++p) {
    const int64_t c0 = p * kPanelWidth;
    pack_rows(src + c0, rows, std::min(kPanelWidth, cols - c0), ld, dst + p * panel_stride, kPanelWidth);
  }
}

// Row stride of pack_rows copies: whole vectors.
inline int64_t padded_dim(int64_t cols) { return (cols + PanelVec::size() - 1) / PanelVec::size() * PanelVec::size(); }

#if defined(CPU_CAPABILITY_AVX512)
// dst[c * ldd + r] = src[r * lds + c] for a 16 x 16 fp32 block, in registers.
inline void transpose_16x16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4g + j]'s 128-bit lane l: column 4l + j of rows 4g..4g+3.
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    _mm512_storeu_ps(dst + (j + 0) * ldd, _mm512_shuffle_f32x4(a, c, 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ldd, _mm512_shuffle_f32x4(a, c, 0xdd));
    _mm512_storeu_ps(dst + (j + 4) * ldd, _mm512_shuffle_f32x4(b, d, 0x88));
    _mm512_storeu_ps(dst + (j + 12) * ldd, _mm512_shuffle_f32x4(b, d, 0xdd));
  }
}
#endif

// Packs src (rows x cols, row stride ld) as panels of B = src^T (cols x rows).
template <typename scalar_t>
inline void pack_panels_transposed(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, float* dst,
                                   int64_t panel_stride) {
  for (int64_t p = 0; p * kPanelWidth < rows; ++p) {
    const int64_t r0 = p * kPanelWidth, width = std::min(kPanelWidth, rows - r0);
    float* panel = dst + p * panel_stride;
    if (width < kPanelWidth) std::fill(panel, panel + cols * kPanelWidth, 0.f);
    int64_t r = 0, c_done = 0;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, float>) {
      c_done = cols / 16 * 16;
      for (; r + 16 <= width; r += 16)
        for (int64_t c = 0; c < c_done; c += 16)
          transpose_16x16(src + (r0 + r) * ld + c, ld, panel + c * kPanelWidth + r, kPanelWidth);
    }
#endif
    for (int64_t c = c_done; c < cols; ++c)
      for (int64_t rr = 0; rr < r; ++rr) panel[c * kPanelWidth + rr] = static_cast<float>(src[(r0 + rr) * ld + c]);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t rr = r; rr < width; ++rr) panel[c * kPanelWidth + rr] = static_cast<float>(src[(r0 + rr) * ld + c]);
  }
}

// Register type of the micro-kernel: raw __m512 on AVX-512 (GCC keeps an array of
// Vectorized<float> objects in memory, storing every accumulator on every k step), else
// Vectorized<float>.
#if defined(CPU_CAPABILITY_AVX512)
using PanelReg = __m512;
inline PanelReg reg_zero() { return _mm512_setzero_ps(); }
inline PanelReg reg_load(const float* src) { return _mm512_loadu_ps(src); }
inline PanelReg reg_broadcast(float x) { return _mm512_set1_ps(x); }
inline PanelReg reg_fmadd(PanelReg a, PanelReg b, PanelReg c) { return _mm512_fmadd_ps(a, b, c); }
inline PanelReg reg_add(PanelReg a, PanelReg b) { return _mm512_add_ps(a, b); }
inline void reg_store(float* dst, PanelReg x) { _mm512_storeu_ps(dst, x); }
// The first count (0..16) lanes.
inline PanelReg reg_load_part(const float* src, int64_t count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), src);
}
inline void reg_store_part(float* dst, PanelReg x, int64_t count) {
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << count) - 1), x);
}
#else
using PanelReg = PanelVec;
inline PanelReg reg_zero() { return PanelVec(0.f); }
inline PanelReg reg_load(const float* src) { return PanelVec::loadu(src); }
inline PanelReg reg_broadcast(float x) { return PanelVec(x); }
inline PanelReg reg_fmadd(PanelReg a, PanelReg b, PanelReg c) { return at::vec::fmadd(a, b, c); }
inline PanelReg reg_add(PanelReg a, PanelReg b) { return a + b; }
inline void reg_store(float* dst, PanelReg x) { x.store(dst); }
inline PanelReg reg_load_part(const float* src, int64_t count) { return PanelVec::loadu(src, count); }
inline void reg_store_part(float* dst, PanelReg x, int64_t count) { x.store(dst, count); }
#endif

// What a GEMM does with each finished row of a register block: store(row, col, acc, c_row,
// cols) gets the NV accumulators of C's row `row`, columns [col, col + NV vectors), of which
// cols are real (all NV vectors when kFull), and c_row = &C[row][col].
struct PlainStore {
  template <int NV, bool kFull>
  void store(int64_t, int64_t, const PanelReg* acc, float* c_row, int64_t cols) const {
    constexpr int64_t S = PanelVec::size();
    for (int v = 0; v < NV; ++v) {
      if constexpr (kFull) {
        reg_store(c_row + v * S, acc[v]);
      } else {
        const int64_t count = std::min<int64_t>(S, cols - v * S);
        if (count > 0) reg_store_part(c_row + v * S, acc[v], count);
      }
    }
  }
};

// One MR x (NV vectors) block of C (rows row0.., columns col0..) over the whole K; cols (<= NV
// vectors, all of them when kFull) are real. kFull is a template argument: with a run-time flag
// GCC keeps the accumulators in memory.
template <int MR, int NV, bool kAccumulate, bool kFull, class Epilogue>
inline void panel_block(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs, float* c,
                        int64_t ldc, int64_t cols, int64_t row0, int64_t col0, const Epilogue& epilogue) {
  constexpr int64_t S = PanelVec::size();
  constexpr bool full = kFull;
  PanelReg acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = reg_zero();
  const float* ap[MR];
  for (int i = 0; i < MR; ++i) ap[i] = a + i * ars;
  for (int64_t k = 0; k < K; ++k) {
    PanelReg bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = reg_load(b + v * S);
    b += brs;
    for (int i = 0; i < MR; ++i) {
      const PanelReg av = reg_broadcast(*ap[i]);
      ap[i] += acs;
      for (int v = 0; v < NV; ++v) acc[i][v] = reg_fmadd(av, bv[v], acc[i][v]);
    }
  }
  // C += A B adds the block's product to C at the end rather than starting from C: a sum of
  // K-term partial sums (the GEMMs accumulate over key / query blocks), not one long running
  // sum, whose rounding error grows faster with the sequence length.
  if constexpr (kAccumulate) {
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) {
        const int64_t count = std::max<int64_t>(0, std::min<int64_t>(S, cols - v * S));
        const PanelReg old = full ? reg_load(c + i * ldc + v * S) : reg_load_part(c + i * ldc + v * S, count);
        acc[i][v] = reg_add(old, acc[i][v]);
      }
  }
  for (int i = 0; i < MR; ++i) epilogue.template store<NV, full>(row0 + i, col0, acc[i], c + i * ldc, cols);
}

template <int MR, int NV, bool kAccumulate, class Epilogue>
inline void panel_cols(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs, float* c,
                       int64_t ldc, int64_t cols, int64_t row0, int64_t col0, const Epilogue& epilogue) {
  if (cols == NV * PanelVec::size())
    panel_block<MR, NV, kAccumulate, true>(K, a, ars, acs, b, brs, c, ldc, cols, row0, col0, epilogue);
  else
    panel_block<MR, NV, kAccumulate, false>(K, a, ars, acs, b, brs, c, ldc, cols, row0, col0, epilogue);
}

template <int MR, bool kAccumulate, class Epilogue>
inline void panel_rows(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b, int64_t brs, float* c,
                       int64_t ldc, int64_t cols, int64_t row0, int64_t col0, const Epilogue& epilogue) {
  switch ((cols + PanelVec::size() - 1) / PanelVec::size()) {
    case 1: panel_cols<MR, 1, kAccumulate>(K, a, ars, acs, b, brs, c, ldc, cols, row0, col0, epilogue); break;
    case 2: panel_cols<MR, 2, kAccumulate>(K, a, ars, acs, b, brs, c, ldc, cols, row0, col0, epilogue); break;
    case 3: panel_cols<MR, 3, kAccumulate>(K, a, ars, acs, b, brs, c, ldc, cols, row0, col0, epilogue); break;
    default: panel_cols<MR, 4, kAccumulate>(K, a, ars, acs, b, brs, c, ldc, cols, row0, col0, epilogue); break;
  }
}

template <bool kAccumulate, class Epilogue>
inline void panel_gemm_impl(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, Panels b,
                            float* c, int64_t ldc, const Epilogue& epilogue) {
  for (int64_t j0 = 0; j0 < N; j0 += kPanelWidth) {
    const float* panel = b.data + (j0 / kPanelWidth) * b.panel_stride;
    const int64_t cols = std::min(kPanelWidth, N - j0), brs = b.row_stride;
    // Whole blocks of kPanelRows rows; a remainder of 1 or 2 rows (1-2 FMAs per B load: load-bound)
    // joins the last whole block as two blocks of 3-4 rows.
    const int64_t rest = M % kPanelRows;
    const int64_t whole_end = M - rest - (kPanelRows == 6 && rest > 0 && rest <= 2 && M > kPanelRows ? kPanelRows : 0);
    int64_t i0 = 0;
    for (; i0 < whole_end; i0 += kPanelRows)
      panel_rows<kPanelRows, kAccumulate>(K, a + i0 * ars, ars, acs, panel, brs, c + i0 * ldc + j0, ldc, cols, i0, j0,
                                          epilogue);
    while (i0 < M) {
      const int64_t rows = M - i0 > 5 ? (M - i0 + 1) / 2 : M - i0;
      const float* a_rest = a + i0 * ars;
      float* c_rest = c + i0 * ldc + j0;
      switch (rows) {
        case 1: panel_rows<1, kAccumulate>(K, a_rest, ars, acs, panel, brs, c_rest, ldc, cols, i0, j0, epilogue); break;
        case 2: panel_rows<2, kAccumulate>(K, a_rest, ars, acs, panel, brs, c_rest, ldc, cols, i0, j0, epilogue); break;
        case 3: panel_rows<3, kAccumulate>(K, a_rest, ars, acs, panel, brs, c_rest, ldc, cols, i0, j0, epilogue); break;
        case 4: panel_rows<4, kAccumulate>(K, a_rest, ars, acs, panel, brs, c_rest, ldc, cols, i0, j0, epilogue); break;
        default:
          panel_rows<5, kAccumulate>(K, a_rest, ars, acs, panel, brs, c_rest, ldc, cols, i0, j0, epilogue);
          break;
      }
      i0 += rows;
    }
  }
}

// K steps per pass over C: a B panel chunk of kKBlock x kPanelWidth (32 KiB) stays in L1 while
// every row block reads it (a 512-deep panel streamed from L2 per row block measured ~7% slower).
constexpr int64_t kKBlock = 128;

// C (M x N, ldc) = A B, or C += A B with accumulate; A(i, k) = a[i * ars + k * acs].
inline void panel_gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, Panels b, float* c,
                       int64_t ldc, bool accumulate) {
  for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kKBlock) {
    const int64_t kc = std::min(kKBlock, K - k0);
    const Panels chunk{b.data + k0 * b.row_stride, b.panel_stride, b.row_stride};
    if (accumulate || k0 > 0)
      panel_gemm_impl<true>(M, N, kc, a + k0 * acs, ars, acs, chunk, c, ldc, PlainStore{});
    else
      panel_gemm_impl<false>(M, N, kc, a + k0 * acs, ars, acs, chunk, c, ldc, PlainStore{});
  }
}

// C = A B with the epilogue applied to every row of C as it leaves the registers (an elementwise
// function fused into the GEMM: no extra pass over C).
template <class Epilogue>
inline void panel_gemm_epilogue(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs, Panels b,
                                float* c, int64_t ldc, const Epilogue& epilogue) {
  panel_gemm_impl<false>(M, N, K, a, ars, acs, b, c, ldc, epilogue);
}

}  // namespace fastattn_cpu
