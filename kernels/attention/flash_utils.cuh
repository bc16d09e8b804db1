// Device helpers shared by the attention kernels: tile copies, fragment packing, the score
// mask (causal / window / key padding / attn_mask / ALiBi / sequence bounds), soft-capping and the
// dropout keep decisions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "../common/philox.cuh"
#include "flash_params.h"

#ifdef FASTATTN_FLASH_PTX_HEADER
#include FASTATTN_FLASH_PTX_HEADER
#else
#include "flash_ptx.cuh"
#endif

namespace fastattn {
namespace flash {

constexpr float kInf = __builtin_huge_valf();
constexpr float kLog2e = 1.4426950408889634f;

// Shared-memory tiles are (rows, kHeadDim) with a row stride of kHeadDim + 8 elements: the
// extra 16 bytes put the 8 rows read by one ldmatrix 8x8 matrix in 8 different 16-byte bank
// groups (kHeadDim / 8 is a multiple of 4, so (kHeadDim / 8 + 1) is odd), no swizzle needed.
template <int kCols>
struct SmemStride {
  static constexpr int value = kCols + 8;
};

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Two fp32 values -> one 32-bit register of two T (a in the low half): the casting point of
// P and dS before they become mma A operands, and of every output.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// The four A-operand registers of one 16x16 block built from two adjacent fp32 accumulator
// n-tiles (columns 0-7 in lo, 8-15 in hi): the accumulator layout of row g / g+8, columns
// 2t, 2t+1 is exactly the A layout, so S becomes P without leaving registers (FA2).
template <typename T>
__device__ __forceinline__ void acc_to_a_operand(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// Asynchronously copies a (kRows, kCols) tile starting at gmem (row stride row_stride, 16-byte
// aligned rows) into smem (row stride kCols + 8). Rows >= rows_valid and columns >= cols_valid
// are zero-filled, so padded rows never inject NaN/Inf garbage into the GEMMs. Each thread
// owns one 16-byte column chunk and walks down the rows with a running pointer: computing
// every row offset from scratch lets the compiler hoist them all out of the key loop, which
// costs two registers per row and spills.
template <int kRows, int kCols, int kNThreads, typename T>
__device__ __forceinline__ void cp_async_tile(T* smem, const T* gmem, int64_t row_stride, int rows_valid,
                                              int cols_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kRowsPerIter = kNThreads / kChunksPerRow;  // threads beyond rows * chunks idle
  constexpr int kIters = (kRows + kRowsPerIter - 1) / kRowsPerIter;
  constexpr int kStride = SmemStride<kCols>::value;
  static_assert(kRowsPerIter >= 1, "one row per pass at least");
  if (tid >= kRowsPerIter * kChunksPerRow) return;
  const int r0 = tid / kChunksPerRow;
  const int c = (tid % kChunksPerRow) * 8;
  const bool col_valid = c < cols_valid;
  const T* src = gmem + r0 * row_stride + c;
  const int64_t step = kRowsPerIter * row_stride;
  const uint32_t dst = smem_u32(smem + r0 * kStride + c);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int r = r0 + it * kRowsPerIter;
    if (kRows % kRowsPerIter == 0 || r < kRows) {
      const bool valid = col_valid && r < rows_valid;
      cp_async_16(dst + it * kRowsPerIter * kStride * static_cast<int>(sizeof(T)), valid ? src : gmem, valid);
    }
    src += step;
  }
}

// Blocks [begin, end) of a loop over one sequence: end <= begin when there is nothing to visit.
struct BlockRange {
  int begin, end;
};

// The kBlockN key blocks that query rows [m0, m0 + kBlockM) visit: all of them clipped to the
// causal / window band (flash-attn's local attention skips the blocks outside it on both sides).
template <int kBlockM, int kBlockN>
__device__ __forceinline__ BlockRange key_block_range(const FlashAttnParams& p, int m0) {
  BlockRange r{0, (p.seqlen_k + kBlockN - 1) / kBlockN};
  if (p.window_right >= 0) {
    const int last_key = min(m0 + kBlockM, p.seqlen_q) - 1 + p.causal_shift + p.window_right;  // of the last row
    r.end = last_key < 0 ? 0 : min(r.end, last_key / kBlockN + 1);
  }
  if (p.window_left >= 0) {
    const int first_key = m0 + p.causal_shift - p.window_left;  // of the first row
    r.begin = first_key <= 0 ? 0 : first_key / kBlockN;
  }
  return r;
}

// The kBlockM query blocks (of m_blocks) that see a key of [n0, n0 + kBlockN): the transpose of
// key_block_range, for the dK/dV kernel.
template <int kBlockN, int kBlockM>
__device__ __forceinline__ BlockRange query_block_range(const FlashAttnParams& p, int n0, int m_blocks) {
  BlockRange r{0, m_blocks};
  if (p.window_right >= 0) {
    const int first_query = n0 - p.causal_shift - p.window_right;  // first query that sees key n0
    r.begin = first_query <= 0 ? 0 : first_query / kBlockM;
  }
  if (p.window_left >= 0) {
    const int last_query = n0 + kBlockN - 1 - p.causal_shift + p.window_left;  // last that sees the last key
    r.end = last_query < 0 ? 0 : min(r.end, last_query / kBlockM + 1);
  }
  return r;
}

// Whether the tile rows [m0, m0 + kRows) x keys [n0, n0 + kCols) needs ScoreMask per element:
// per-element data (padding, attn_mask, ALiBi), the sequence end, or a band edge crossing it.
template <int kRows, int kCols>
__device__ __forceinline__ bool tile_needs_mask(const FlashAttnParams& p, int m0, int n0) {
  if (p.has_element_scores() || n0 + kCols > p.seqlen_k) return true;
  if (p.window_right >= 0 && n0 + kCols - 1 > m0 + p.causal_shift + p.window_right) return true;
  return p.window_left >= 0 && n0 < m0 + kRows - 1 + p.causal_shift - p.window_left;
}

// tanh from ex2 and rcp: 1 - 2 / (1 + 2^(2 x log2 e)). Absolute error ~1e-7, which is what the
// softmax feels (tanh.approx.f32 is only good to ~2^-11 relative); saturates to +-1, no NaN.
__device__ __forceinline__ float fast_tanh(float x) {
  return 1.f - 2.f * fast_rcp(1.f + fast_exp2(2.f * kLog2e * x));
}

// Soft-capped score in raw units (FlashAttnParams::softcap_raw / softcap_scale); the capped
// score times softcap_scale is the tanh again, which gives the backward its 1 - tanh^2.
__device__ __forceinline__ float softcap_score(const FlashAttnParams& p, float s) {
  return p.softcap_raw * fast_tanh(s * p.softcap_scale);
}

// softcap_score on every element of kTiles accumulator n-tiles.
template <int kTiles>
__device__ __forceinline__ void softcap_scores(const FlashAttnParams& p, float (&acc)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] = softcap_score(p, acc[t][e]);
  }
}

// Output of a query tile none of whose rows sees a key: 0, lse -inf.
template <int kBlockM, int kHeadDim, int kNThreads, typename T>
__device__ __forceinline__ void store_empty_tile(const FlashFwdParams& params, T* o_ptr, float* lse_ptr, int m0,
                                                 int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  for (int idx = tid; idx < kBlockM * kChunksPerRow; idx += kNThreads) {
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * 8;
    if (m0 + r < params.seqlen_q && c < params.head_dim) {
      *reinterpret_cast<uint4*>(o_ptr + (m0 + r) * params.o_row_stride + c) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  for (int r = tid; r < kBlockM; r += kNThreads) {
    if (m0 + r < params.seqlen_q) lse_ptr[m0 + r] = -kInf;
  }
}

// Which (query i, key j) pairs take part, and their score in the units of the raw dot
// product: s (- ALiBi / softmax_scale + attn_mask / softmax_scale), or -inf. Keeping raw units
// lets every exp2 fold the scale into one FFMA, exp2(s * scale * log2(e) - max'). Only the two
// per-(batch, head) base pointers and two factors live in registers; sizes, strides, window and
// flags are read from the kernel parameters (constant bank), which keeps the register cost of
// masking low. Soft-capping comes before (softcap_score), on every element.
template <typename T>
struct ScoreMask {
  const FlashAttnParams& p;
  const uint8_t* kpm;  // key_padding_mask row of this batch, or nullptr
  const char* mask;    // attn_mask plane of this (batch, head), or nullptr
  float inv_scale;     // 1 / softmax_scale: attn_mask and ALiBi are added to the scaled scores
  float alibi_slope;   // ALiBi slope of this (batch, head) / softmax_scale, or 0

  __device__ __forceinline__ ScoreMask(const FlashAttnParams& params, int b, int h)
      : p(params),
        kpm(params.key_padding_mask == nullptr ? nullptr : params.key_padding_mask + b * params.kpm_batch_stride),
        mask(nullptr),
        inv_scale(1.f / params.softmax_scale),
        alibi_slope(params.alibi_slopes == nullptr
                        ? 0.f
                        : params.alibi_slopes[b * params.alibi_batch_stride + h] * inv_scale) {
    if (params.attn_mask != nullptr) {
      const int64_t off = b * params.mask_batch_stride + h * params.mask_head_stride;
      const int elem_bytes = params.attn_mask_kind == MaskKind::kBool      ? 1
                             : params.attn_mask_kind == MaskKind::kFloat32 ? 4
                                                                            : 2;
      mask = static_cast<const char*>(params.attn_mask) + off * elem_bytes;
    }
  }

  __device__ __forceinline__ float score(int i_in, int j_in, float s) const {
    const int i = opaque_int(i_in);
    const int j = opaque_int(j_in);
    if (i >= p.seqlen_q || j >= p.seqlen_k) return -kInf;
    const int rel = j - (i + p.causal_shift);  // the key's offset from the query's diagonal
    if (p.window_right >= 0 && rel > p.window_right) return -kInf;
    if (p.window_left >= 0 && rel < -p.window_left) return -kInf;
    if (kpm != nullptr && kpm[j * p.kpm_col_stride] == 0) return -kInf;
    if (p.alibi_slopes != nullptr) s -= alibi_slope * static_cast<float>(rel < 0 ? -rel : rel);
    if (mask != nullptr) {
      const int64_t off = i * p.mask_row_stride + j * p.mask_col_stride;
      if (p.attn_mask_kind == MaskKind::kBool) {
        if (reinterpret_cast<const uint8_t*>(mask)[off] == 0) return -kInf;
      } else if (p.attn_mask_kind == MaskKind::kElemType) {
        s += to_float(reinterpret_cast<const T*>(mask)[off]) * inv_scale;
      } else {
        s += reinterpret_cast<const float*>(mask)[off] * inv_scale;
      }
    }
    return s;
  }
};

// Dropout keep decisions of the logical (B, H, Lq, Lk) probability tensor, element
// e = ((b * H + h) * Lq + i) * Lk + j (common/philox.cuh fixes the bits of each e).
// Two horizontally adjacent elements e, e + 1: one Philox call unless they straddle a group.
__device__ __forceinline__ void dropout_keep2(uint64_t seed, uint64_t offset, uint64_t e, uint32_t threshold,
                                              bool& keep0, bool& keep1) {
  const uint4 bits = dropout_bits4(seed, offset, e >> 2);
  const int lane = static_cast<int>(e & 3);
  keep0 = uint4_lane(bits, lane) >= threshold;
  if (lane != 3) {
    keep1 = uint4_lane(bits, lane + 1) >= threshold;
  } else {
    keep1 = dropout_bits4(seed, offset, (e >> 2) + 1).x >= threshold;
  }
}

// Keep bits of the element pairs (e0 + 8 nt, e0 + 8 nt + 1), nt < kNTiles, of one accumulator
// row (bit 2 nt + c). A rolled loop on purpose: unrolled, the compiler interleaves all the
// Philox rounds and the extra live registers spill the large head-dim kernels.
template <int kNTiles>
__device__ __forceinline__ uint32_t dropout_row_bits(const FlashAttnParams& p, uint64_t e0) {
  static_assert(kNTiles <= 16, "two bits per n-tile in 32 bits");
  uint32_t bits = 0;
#pragma unroll 1
  for (int nt = 0; nt < kNTiles; ++nt) {
    bool keep0, keep1;
    dropout_keep2(p.seed, p.offset, e0 + 8 * nt, p.dropout_threshold, keep0, keep1);
    bits |= (static_cast<uint32_t>(keep0) | (static_cast<uint32_t>(keep1) << 1)) << (2 * nt);
  }
  return bits;
}

// Keep bits of the transposed dK/dV layout: element (query i0 + 8 nt + c, key j0 + 8 r) at bit
// 4 nt + 2 r + c, nt < kNTiles (one Philox call per element: consecutive queries are Lk apart).
template <int kNTiles>
__device__ __forceinline__ uint32_t dropout_col_bits(const FlashAttnParams& p, uint64_t row0, int i0, int j0) {
  static_assert(kNTiles <= 8, "four bits per n-tile in 32 bits");
  const uint64_t lk = static_cast<uint64_t>(p.seqlen_k);
  uint32_t bits = 0;
#pragma unroll 1
  for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint64_t i = static_cast<uint64_t>(i0 + nt * 8 + (e % 2));
      const uint64_t j = static_cast<uint64_t>(j0 + (e / 2) * 8);
      const bool keep = dropout_keep(p.seed, p.offset, (row0 + i) * lk + j, p.dropout_threshold);
      bits |= static_cast<uint32_t>(keep) << (4 * nt + e);
    }
  }
  return bits;
}

}  // namespace flash
}  // namespace fastattn
