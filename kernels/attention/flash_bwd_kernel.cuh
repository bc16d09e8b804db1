// FlashAttention-2 backward kernels on mma.sync m16n8k16 tensor cores (sm_80+).
//
//   1. flash_bwd_preprocess_kernel: delta = rowsum(dO * O) (fp32, (B, H, Lq)).
//   2. flash_bwd_dkdv_kernel: one CTA per (key block, batch, kv head, split); loops over the
//      query heads of its GQA group (its contiguous share of them when num_splits > 1) and over
//      the query blocks, with dK and dV in fp32 registers:
//        S^T = K Q^T, dP^T = V dO^T (fp32) -> softcap, mask, ALiBi ->
//        P^T = exp2(S^T scale log2(e) - lse log2(e)), dS^T = P^T (dP^T - delta) (x 1 - tanh^2
//        under softcap, tanh recomputed from S as flash-attn does)
//        dV += P^T dO, dK += dS^T Q (P^T and dS^T reused in registers as A operands).
//      Each warp owns 16 keys and (kSplitD > 1, large head dims) a slice of the head dim;
//      the warps of one slice group recompute the same S^T / dP^T to keep the accumulators
//      within 255 registers.  Non-deterministic mode also writes dS to shared memory and adds
//      dQ += dS K to the fp32 dq_accum with atomics.
//      With num_splits > 1 each CTA stores its fp32 dK / dV partial instead of dK / dV.
//   3. flash_bwd_dq_kernel (deterministic mode): one CTA per query block, loops over the key
//      blocks: S, dP, dS as in the forward layout, dQ += dS K in registers, no atomics.
//   Both kernels visit only the blocks of the causal / window band (query_block_range,
//   key_block_range); softcap, window and ALiBi are runtime data, not template flags.
//   4. flash_bwd_reduce_dkdv_kernel (num_splits > 1): dK, dV = sum of the partials in split
//      order (deterministic), cast.
#pragma once

#include "flash_utils.cuh"

namespace fastattn {
namespace flash {

template <typename T_, int kHeadDim_, int kBlockM_, int kNWarps_, int kSplitD_, bool kIsDropout_, bool kAtomicDq_>
struct BwdDkdvTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per inner iteration
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kSplitD = kSplitD_;
  static constexpr bool kIsDropout = kIsDropout_;
  static constexpr bool kAtomicDq = kAtomicDq_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kBlockN = 16 * (kNWarps / kSplitD);  // keys per CTA, 16 per warp row
  static constexpr int kDSlice = kHeadDim / kSplitD;        // dK/dV columns per warp
  static constexpr int kStride = SmemStride<kHeadDim>::value;
  static constexpr int kDsStride = kBlockM + 8;  // sdS row stride (elements)
  // sK, sV (kBlockN rows), sQ and sdO double-buffered (2 x kBlockM rows each), lse and delta
  // double-buffered (fp32), sdS (kBlockN x kBlockM, T) when dQ is accumulated here.
  static constexpr int kSmemKV = 2 * kBlockN * kStride * static_cast<int>(sizeof(T));
  static constexpr int kSmemQdO = 4 * kBlockM * kStride * static_cast<int>(sizeof(T));
  static constexpr int kSmemStats = 4 * kBlockM * static_cast<int>(sizeof(float));
  static constexpr int kSmemDs = kAtomicDq ? kBlockN * kDsStride * static_cast<int>(sizeof(T)) : 0;
  static constexpr int kSmemBytes = kSmemKV + kSmemQdO + kSmemStats + kSmemDs;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim buckets are multiples of 32");
  static_assert(kNWarps % kSplitD == 0 && kDSlice % 16 == 0, "whole warps and 16-column steps per slice");
  static_assert(kBlockM % 16 == 0, "query blocks are whole mma k-steps");
};

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kIsDropout_>
struct BwdDqTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr bool kIsDropout = kIsDropout_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStride = SmemStride<kHeadDim>::value;
  // sQ, sdO (kBlockM rows each), sK and sV double-buffered (2 x kBlockN rows each).
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * kStride * static_cast<int>(sizeof(T));
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim buckets are multiples of 32");
  static_assert(kBlockM == 16 * kNWarps, "one 16-row m-tile per warp");
  static_assert(kBlockN % 16 == 0, "key blocks are whole mma k-steps");
};

// Head-dim bucket -> tile configuration (0 spills under 255 registers, see
// docs/cuda_attention.md). dK/dV: 8 warps; d <= 128 gives each warp 16 keys x d (128-key
// blocks), d > 128 splits the head dim over 2 warps (64-key blocks).
template <typename T, int kHeadDim, bool kIsDropout, bool kAtomicDq>
using BwdDkdvTraitsFor = BwdDkdvTraits<T, kHeadDim, (kHeadDim <= 96 ? 64 : 32), 8, (kHeadDim <= 128 ? 1 : 2),
                                       kIsDropout, kAtomicDq>;

template <typename T, int kHeadDim, bool kIsDropout>
using BwdDqTraitsFor = BwdDqTraits<T, kHeadDim, 64, (kHeadDim <= 128 ? 64 : 32), 4, kIsDropout>;

constexpr int kPreprocessWarps = 8;

// delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in fp32; one warp per row.
template <typename T>
__global__ void __launch_bounds__(kPreprocessWarps * 32) flash_bwd_preprocess_kernel(const __grid_constant__ FlashBwdParams params) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kPreprocessWarps + threadIdx.x / 32;  // (b, i, h)
  const int64_t n_rows = static_cast<int64_t>(params.batch) * params.seqlen_q * params.nheads;
  if (row >= n_rows) return;
  const int h = static_cast<int>(row % params.nheads);
  const int i = static_cast<int>((row / params.nheads) % params.seqlen_q);
  const int b = static_cast<int>(row / (static_cast<int64_t>(params.nheads) * params.seqlen_q));
  const T* o = static_cast<const T*>(params.out) + b * params.o_batch_stride + i * params.o_row_stride +
               h * params.o_head_stride;  // (D,)
  const T* d_o = static_cast<const T*>(params.dout) + b * params.do_batch_stride + i * params.do_row_stride +
                 h * params.do_head_stride;  // (D,)
  float acc = 0.f;
  for (int c = lane * 8; c < params.head_dim; c += 32 * 8) {
    const uint4 ov = *reinterpret_cast<const uint4*>(o + c);
    const uint4 dv = *reinterpret_cast<const uint4*>(d_o + c);
    const T* oe = reinterpret_cast<const T*>(&ov);
    const T* de = reinterpret_cast<const T*>(&dv);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc += to_float(oe[e]) * to_float(de[e]);
  }
#pragma unroll
  for (int m = 16; m >= 1; m /= 2) acc += shfl_xor(acc, m);
  if (lane == 0) params.delta[(static_cast<int64_t>(b) * params.nheads + h) * params.seqlen_q + i] = acc;
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1) flash_bwd_dkdv_kernel(const __grid_constant__ FlashBwdParams params) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kStride = Tr::kStride;
  constexpr int kDsStride = Tr::kDsStride;
  constexpr int kDSlice = Tr::kDSlice;
  constexpr int kQT = BM / 8;            // score n-tiles (queries) per warp row
  constexpr int kST = kDSlice / 8;       // dK/dV n-tiles per warp
  constexpr int kNThreads = Tr::kNThreads;

  unsigned char* smem = dynamic_smem();
  T* sK = reinterpret_cast<T*>(smem);  // (BN, kStride)
  T* sV = sK + BN * kStride;           // (BN, kStride)
  T* sQ = sV + BN * kStride;           // (2, BM, kStride)
  T* sdO = sQ + 2 * BM * kStride;      // (2, BM, kStride)
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * kStride);  // (2, BM): lse * log2(e), +inf if dead
  float* sDelta = sLse + 2 * BM;                                    // (2, BM)
  T* sdS = reinterpret_cast<T*>(sDelta + 2 * BM);                   // (BN, kDsStride): dS^T

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int kw = warp / Tr::kSplitD;  // this warp's 16 keys
  const int dw = warp % Tr::kSplitD;  // this warp's head-dim slice
  const int g = lane / 4;
  const int tq = lane % 4;
  const int n_block = blockIdx.x;
  const int hk = blockIdx.y / params.num_splits;
  const int split = blockIdx.y % params.num_splits;
  const int b = blockIdx.z;
  const int group = params.nheads / params.nheads_kv;
  // This split's query heads [h_begin, h_begin + n_heads) of the group (sizes differ by <= 1).
  const int h_begin = hk * group + split * group / params.num_splits;
  const int n_heads = hk * group + (split + 1) * group / params.num_splits - h_begin;
  const int Lq = params.seqlen_q;
  const int Lk = params.seqlen_k;
  const int n0 = n_block * BN;

  const T* k_ptr = static_cast<const T*>(params.k) + b * params.k_batch_stride + hk * params.k_head_stride +
                   n0 * params.k_row_stride;  // (BN, D) tile of (B, Lk, Hkv, D)
  const T* v_ptr = static_cast<const T*>(params.v) + b * params.v_batch_stride + hk * params.v_head_stride +
                   n0 * params.v_row_stride;
  T* dk_ptr = static_cast<T*>(params.dk) + b * params.dk_batch_stride + hk * params.dk_head_stride;
  T* dv_ptr = static_cast<T*>(params.dv) + b * params.dv_batch_stride + hk * params.dv_head_stride;

  // Query blocks that see at least one key of this block (the causal / window band).
  const BlockRange m_range = query_block_range<BN, BM>(params, n0, (Lq + BM - 1) / BM);
  const int m_begin = m_range.begin;
  const int m_count = m_range.end - m_begin;

  float acc_dk[kST][4];
  float acc_dv[kST][4];
#pragma unroll
  for (int dt = 0; dt < kST; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc_dk[dt][e] = 0.f;
      acc_dv[dt][e] = 0.f;
    }
  }

  if (m_count > 0) {
    const int n_iters = n_heads * m_count;  // (query head of the split, query block) pairs
    const bool has_softcap = params.has_softcap();

    // Issues the cp.async loads of Q / dO for iteration it into buffer buf and fills the
    // lse / delta rows with plain stores (made visible by the next block_sync).
    auto load_query_block = [&](int it, int buf) {
      const int h = h_begin + it / m_count;
      const int m_start = (m_begin + it % m_count) * BM;
      const T* q_ptr = static_cast<const T*>(params.q) + b * params.q_batch_stride + h * params.q_head_stride +
                       m_start * params.q_row_stride;
      const T* do_ptr = static_cast<const T*>(params.dout) + b * params.do_batch_stride +
                        h * params.do_head_stride + m_start * params.do_row_stride;
      cp_async_tile<BM, D, kNThreads>(sQ + buf * BM * kStride, q_ptr, params.q_row_stride, Lq - m_start,
                                      params.head_dim, tid);
      cp_async_tile<BM, D, kNThreads>(sdO + buf * BM * kStride, do_ptr, params.do_row_stride, Lq - m_start,
                                      params.head_dim, tid);
      const int64_t stat0 = (static_cast<int64_t>(b) * params.nheads + h) * Lq + m_start;
      for (int r = tid; r < BM; r += kNThreads) {
        float lse2 = kInf;  // rows past Lq or without any key: P = exp2(x - inf) = 0
        float delta = 0.f;
        if (m_start + r < Lq) {
          const float lse = params.lse[stat0 + r];
          if (lse != -kInf) lse2 = lse * kLog2e;
          delta = params.delta[stat0 + r];
        }
        sLse[buf * BM + r] = lse2;
        sDelta[buf * BM + r] = delta;
      }
    };

    cp_async_tile<BN, D, kNThreads>(sK, k_ptr, params.k_row_stride, Lk - n0, params.head_dim, tid);
    cp_async_tile<BN, D, kNThreads>(sV, v_ptr, params.v_row_stride, Lk - n0, params.head_dim, tid);
    load_query_block(0, 0);
    cp_async_commit();

    const uint32_t sK_addr = smem_u32(sK);
    const uint32_t sV_addr = smem_u32(sV);
    const uint32_t sdS_addr = smem_u32(sdS);
    const int a_off = (lane % 16) * kStride + (lane / 16) * 8;
    const int b_off = ((lane % 8) + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8;
    const int bt_off = ((lane % 8) + ((lane / 8) % 2) * 8) * kStride + (lane / 16) * 8;
    // A operand from the transposed dS^T tile (stored [key][query]): same lane pattern as b_off.
    const int at_ds_off = ((lane % 8) + (lane / 16) * 8) * kDsStride + ((lane / 8) % 2) * 8;

    for (int it = 0; it < n_iters; ++it) {
      const int buf = it % 2;
      const int h = h_begin + it / m_count;
      const int m_start = (m_begin + it % m_count) * BM;
      if (it + 1 < n_iters) {
        load_query_block(it + 1, buf ^ 1);  // buffer freed by the block_sync ending iteration it-1
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      block_sync();  // Q / dO / lse / delta of iteration it (and K, V) visible to every thread

      const uint32_t sQ_addr = smem_u32(sQ + buf * BM * kStride);
      const uint32_t sdO_addr = smem_u32(sdO + buf * BM * kStride);
      const float* lse2 = sLse + buf * BM;
      const float* delta = sDelta + buf * BM;

      // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BM queries.
      float acc_s[kQT][4];
      float acc_dp[kQT][4];
#pragma unroll
      for (int nt = 0; nt < kQT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc_s[nt][e] = 0.f;
          acc_dp[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a_k[4], a_v[4];
        ldmatrix_x4(a_k, sK_addr + (kw * 16 * kStride + kk * 16 + a_off) * sizeof(T));
        ldmatrix_x4(a_v, sV_addr + (kw * 16 * kStride + kk * 16 + a_off) * sizeof(T));
#pragma unroll
        for (int nn = 0; nn < BM / 16; ++nn) {
          uint32_t bq[4], bdo[4];
          ldmatrix_x4(bq, sQ_addr + (nn * 16 * kStride + kk * 16 + b_off) * sizeof(T));
          ldmatrix_x4(bdo, sdO_addr + (nn * 16 * kStride + kk * 16 + b_off) * sizeof(T));
          mma_16816<T>(acc_s[2 * nn], a_k, bq[0], bq[1]);
          mma_16816<T>(acc_s[2 * nn + 1], a_k, bq[2], bq[3]);
          mma_16816<T>(acc_dp[2 * nn], a_v, bdo[0], bdo[1]);
          mma_16816<T>(acc_dp[2 * nn + 1], a_v, bdo[2], bdo[3]);
        }
      }

      // Element (key j, query i): acc_s becomes P^T (x 1/(1-p) where kept, 0 where dropped:
      // the operand of dV), acc_dp becomes dS^T = P^T (dP^T * Z - delta) (Z = keep / (1-p)),
      // times 1 - tanh^2 under softcap (tanh = the capped score * softcap_scale).
      if (has_softcap) {
        softcap_scores(params, acc_s);
      }
      const bool need_mask = tile_needs_mask<BM, BN>(params, m_start, n0);
      const ScoreMask<T> mask(params, b, h);
      uint32_t keep_bits = 0;
      if constexpr (Tr::kIsDropout) {
        const uint64_t drop_row0 = (static_cast<uint64_t>(b) * params.nheads + h) * Lq;
        keep_bits = dropout_col_bits<kQT>(params, drop_row0, m_start + 2 * tq, n0 + kw * 16 + g);
      }
#pragma unroll
      for (int nt = 0; nt < kQT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = n0 + kw * 16 + g + (e / 2) * 8;
          const int il = nt * 8 + 2 * tq + (e % 2);  // query row inside the block
          const int i = m_start + il;
          const float s = acc_s[nt][e];
          const float x = need_mask ? mask.score(i, j, s) : s;
          float p = fast_exp2(fmaf(x, params.scale_log2, -lse2[il]));
          float dp = acc_dp[nt][e];
          float ds;
          if constexpr (Tr::kIsDropout) {
            const bool keep = (keep_bits >> (4 * nt + e)) & 1u;
            dp = keep ? dp * params.rp_dropout : 0.f;
            ds = p * (dp - delta[il]);
            p = keep ? p * params.rp_dropout : 0.f;
          } else {
            ds = p * (dp - delta[il]);
          }
          if (has_softcap) {
            const float t = s * params.softcap_scale;
            ds *= 1.f - t * t;
          }
          acc_dp[nt][e] = ds;
          acc_s[nt][e] = p;
        }
      }

      // dV += P^T dO and dK += dS^T Q over this warp's head-dim slice (casting point of P, dS).
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        uint32_t a_p[4], a_ds[4];
        acc_to_a_operand<T>(a_p, acc_s[2 * kk], acc_s[2 * kk + 1]);
        acc_to_a_operand<T>(a_ds, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < kDSlice / 16; ++dn) {
          const int col = dw * kDSlice + dn * 16;
          uint32_t bdo[4], bq[4];
          ldmatrix_x4_trans(bdo, sdO_addr + (kk * 16 * kStride + col + bt_off) * sizeof(T));
          ldmatrix_x4_trans(bq, sQ_addr + (kk * 16 * kStride + col + bt_off) * sizeof(T));
          mma_16816<T>(acc_dv[2 * dn], a_p, bdo[0], bdo[1]);
          mma_16816<T>(acc_dv[2 * dn + 1], a_p, bdo[2], bdo[3]);
          mma_16816<T>(acc_dk[2 * dn], a_ds, bq[0], bq[1]);
          mma_16816<T>(acc_dk[2 * dn + 1], a_ds, bq[2], bq[3]);
        }
      }

      if constexpr (Tr::kAtomicDq) {
        // dS^T -> shared memory (one copy per key group), then dQ_partial = dS K with the
        // warps re-partitioned over (16-query m-tile, 32-column chunk) and fp32 atomics.
        if (dw == 0) {
#pragma unroll
          for (int nt = 0; nt < kQT; ++nt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int r = kw * 16 + g + half * 8;
              *reinterpret_cast<uint32_t*>(sdS + r * kDsStride + nt * 8 + 2 * tq) =
                  pack2<T>(acc_dp[nt][2 * half], acc_dp[nt][2 * half + 1]);
            }
          }
        }
        block_sync();
        constexpr int kMTilesQ = BM / 16;
        constexpr int kItems = kMTilesQ * (D / 32);
        float* dq_base = params.dq_accum + (static_cast<int64_t>(b) * Lq * params.nheads + h) * params.head_dim;
        for (int item = warp; item < kItems; item += Tr::kNWarps) {
          const int mt = item % kMTilesQ;
          const int col0 = (item / kMTilesQ) * 32;
          float acc_dq[4][4];
#pragma unroll
          for (int t = 0; t < 4; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dq[t][e] = 0.f;
          }
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            uint32_t a[4], bk0[4], bk1[4];
            ldmatrix_x4_trans(a, sdS_addr + (kk * 16 * kDsStride + mt * 16 + at_ds_off) * sizeof(T));
            ldmatrix_x4_trans(bk0, sK_addr + (kk * 16 * kStride + col0 + bt_off) * sizeof(T));
            ldmatrix_x4_trans(bk1, sK_addr + (kk * 16 * kStride + col0 + 16 + bt_off) * sizeof(T));
            mma_16816<T>(acc_dq[0], a, bk0[0], bk0[1]);
            mma_16816<T>(acc_dq[1], a, bk0[2], bk0[3]);
            mma_16816<T>(acc_dq[2], a, bk1[0], bk1[1]);
            mma_16816<T>(acc_dq[3], a, bk1[2], bk1[3]);
          }
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int i = m_start + mt * 16 + g + half * 8;
            if (i < Lq) {
              float* dq_row = dq_base + static_cast<int64_t>(i) * params.nheads * params.head_dim;
#pragma unroll
              for (int t = 0; t < 4; ++t) {
                const int d = col0 + t * 8 + 2 * tq;
                if (d < params.head_dim) {
                  atomic_add_f32(dq_row + d, acc_dq[t][2 * half]);
                  atomic_add_f32(dq_row + d + 1, acc_dq[t][2 * half + 1]);
                }
              }
            }
          }
        }
      }
      block_sync();  // every warp is done with buffer buf (and sdS) before they are refilled
    }
  }

  // dK = scale * dS^T Q, dV: cast (casting point of dK, dV) and store this warp's slice; with
  // splits the unscaled fp32 partial goes to dk_accum / dv_accum (scaled by the reduction).
  if (params.num_splits > 1) {
    const int64_t row0 = ((static_cast<int64_t>(split) * params.batch + b) * Lk + n0) * params.nheads_kv + hk;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int jl = kw * 16 + g + half * 8;
      if (n0 + jl < Lk) {
        const int64_t off = (row0 + static_cast<int64_t>(jl) * params.nheads_kv) * params.head_dim;
#pragma unroll
        for (int dt = 0; dt < kST; ++dt) {
          const int d = dw * kDSlice + dt * 8 + 2 * tq;
          if (d < params.head_dim) {
            *reinterpret_cast<float2*>(params.dk_accum + off + d) =
                make_float2(acc_dk[dt][2 * half], acc_dk[dt][2 * half + 1]);
            *reinterpret_cast<float2*>(params.dv_accum + off + d) =
                make_float2(acc_dv[dt][2 * half], acc_dv[dt][2 * half + 1]);
          }
        }
      }
    }
    return;
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = n0 + kw * 16 + g + half * 8;
    if (j < Lk) {
      T* dk_row = dk_ptr + j * params.dk_row_stride;
      T* dv_row = dv_ptr + j * params.dv_row_stride;
#pragma unroll
      for (int dt = 0; dt < kST; ++dt) {
        const int d = dw * kDSlice + dt * 8 + 2 * tq;
        if (d < params.head_dim) {
          *reinterpret_cast<uint32_t*>(dk_row + d) = pack2<T>(acc_dk[dt][2 * half] * params.softmax_scale,
                                                              acc_dk[dt][2 * half + 1] * params.softmax_scale);
          *reinterpret_cast<uint32_t*>(dv_row + d) = pack2<T>(acc_dv[dt][2 * half], acc_dv[dt][2 * half + 1]);
        }
      }
    }
  }
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1) flash_bwd_dq_kernel(const __grid_constant__ FlashBwdParams params) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kStride = Tr::kStride;
  constexpr int kNT = BN / 8;
  constexpr int kDT = D / 8;
  constexpr int kNThreads = Tr::kNThreads;

  T* sQ = reinterpret_cast<T*>(dynamic_smem());  // (BM, kStride)
  T* sdO = sQ + BM * kStride;                     // (BM, kStride)
  T* sK = sdO + BM * kStride;                     // (2, BN, kStride)
  T* sV = sK + 2 * BN * kStride;                  // (2, BN, kStride)

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int g = lane / 4;
  const int tq = lane % 4;
  const int m_block = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (params.nheads / params.nheads_kv);
  const int Lq = params.seqlen_q;
  const int Lk = params.seqlen_k;
  const int m0 = m_block * BM;

  const T* q_ptr = static_cast<const T*>(params.q) + b * params.q_batch_stride + h * params.q_head_stride +
                   m0 * params.q_row_stride;  // (BM, D) tile of (B, Lq, H, D)
  const T* do_ptr = static_cast<const T*>(params.dout) + b * params.do_batch_stride + h * params.do_head_stride +
                    m0 * params.do_row_stride;
  const T* k_ptr = static_cast<const T*>(params.k) + b * params.k_batch_stride + hk * params.k_head_stride;
  const T* v_ptr = static_cast<const T*>(params.v) + b * params.v_batch_stride + hk * params.v_head_stride;
  T* dq_ptr = static_cast<T*>(params.dq) + b * params.dq_batch_stride + h * params.dq_head_stride;

  const BlockRange blocks = key_block_range<BM, BN>(params, m0);
  const int n_end = blocks.end;

  // This warp's two accumulator rows: lse (log2 units, +inf when the row is dead or past Lq).
  float lse2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = m0 + warp * 16 + g + half * 8;
    lse2[half] = kInf;
    delta[half] = 0.f;
    if (i < Lq) {
      const int64_t idx = (static_cast<int64_t>(b) * params.nheads + h) * Lq + i;
      const float lse = params.lse[idx];
      if (lse != -kInf) lse2[half] = lse * kLog2e;
      delta[half] = params.delta[idx];
    }
  }

  float acc_dq[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dq[dt][e] = 0.f;
  }

  if (n_end > blocks.begin) {
    const ScoreMask<T> mask(params, b, h);
    const bool has_softcap = params.has_softcap();
    const uint64_t drop_row0 = (static_cast<uint64_t>(b) * params.nheads + h) * Lq;

    cp_async_tile<BM, D, kNThreads>(sQ, q_ptr, params.q_row_stride, Lq - m0, params.head_dim, tid);
    cp_async_tile<BM, D, kNThreads>(sdO, do_ptr, params.do_row_stride, Lq - m0, params.head_dim, tid);
    const int k0 = blocks.begin * BN;
    cp_async_tile<BN, D, kNThreads>(sK, k_ptr + k0 * params.k_row_stride, params.k_row_stride, Lk - k0,
                                    params.head_dim, tid);
    cp_async_tile<BN, D, kNThreads>(sV, v_ptr + k0 * params.v_row_stride, params.v_row_stride, Lk - k0,
                                    params.head_dim, tid);
    cp_async_commit();

    const uint32_t sQ_addr = smem_u32(sQ);
    const uint32_t sdO_addr = smem_u32(sdO);
    const int a_off = (lane % 16) * kStride + (lane / 16) * 8;
    const int b_off = ((lane % 8) + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8;
    const int bt_off = ((lane % 8) + ((lane / 8) % 2) * 8) * kStride + (lane / 16) * 8;

    for (int n = blocks.begin; n < n_end; ++n) {
      const int buf = (n - blocks.begin) % 2;
      const int n0 = n * BN;
      if (n + 1 < n_end) {
        // Buffer buf ^ 1 was freed by the block_sync ending iteration n - 1.
        cp_async_tile<BN, D, kNThreads>(sK + (buf ^ 1) * BN * kStride, k_ptr + (n0 + BN) * params.k_row_stride,
                                        params.k_row_stride, Lk - n0 - BN, params.head_dim, tid);
        cp_async_tile<BN, D, kNThreads>(sV + (buf ^ 1) * BN * kStride, v_ptr + (n0 + BN) * params.v_row_stride,
                                        params.v_row_stride, Lk - n0 - BN, params.head_dim, tid);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      block_sync();

      const uint32_t sK_addr = smem_u32(sK + buf * BN * kStride);
      const uint32_t sV_addr = smem_u32(sV + buf * BN * kStride);

      // S = Q K^T, dP = dO V^T for this warp's 16 queries x BN keys.
      float acc_s[kNT][4];
      float acc_dp[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc_s[nt][e] = 0.f;
          acc_dp[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a_q[4], a_do[4];
        ldmatrix_x4(a_q, sQ_addr + (warp * 16 * kStride + kk * 16 + a_off) * sizeof(T));
        ldmatrix_x4(a_do, sdO_addr + (warp * 16 * kStride + kk * 16 + a_off) * sizeof(T));
#pragma unroll
        for (int nn = 0; nn < BN / 16; ++nn) {
          uint32_t bk[4], bv[4];
          ldmatrix_x4(bk, sK_addr + (nn * 16 * kStride + kk * 16 + b_off) * sizeof(T));
          ldmatrix_x4(bv, sV_addr + (nn * 16 * kStride + kk * 16 + b_off) * sizeof(T));
          mma_16816<T>(acc_s[2 * nn], a_q, bk[0], bk[1]);
          mma_16816<T>(acc_s[2 * nn + 1], a_q, bk[2], bk[3]);
          mma_16816<T>(acc_dp[2 * nn], a_do, bv[0], bv[1]);
          mma_16816<T>(acc_dp[2 * nn + 1], a_do, bv[2], bv[3]);
        }
      }

      // dS = P (dP * Z - delta) (x 1 - tanh^2 under softcap), into acc_dp.
      if (has_softcap) {
        softcap_scores(params, acc_s);
      }
      const bool need_mask = tile_needs_mask<BM, BN>(params, m0, n0);
      uint32_t keep_bits[2] = {0u, 0u};
      if constexpr (Tr::kIsDropout) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = m0 + warp * 16 + g + half * 8;
          keep_bits[half] = dropout_row_bits<kNT>(params, (drop_row0 + i) * static_cast<uint64_t>(Lk) + n0 + 2 * tq);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = m0 + warp * 16 + g + half * 8;
          const int j = n0 + nt * 8 + 2 * tq;
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int e = 2 * half + c;
            const float s = acc_s[nt][e];
            const float x = need_mask ? mask.score(i, j + c, s) : s;
            const float p = fast_exp2(fmaf(x, params.scale_log2, -lse2[half]));
            float dp = acc_dp[nt][e];
            if constexpr (Tr::kIsDropout) dp = ((keep_bits[half] >> (2 * nt + c)) & 1u) ? dp * params.rp_dropout : 0.f;
            float ds = p * (dp - delta[half]);
            if (has_softcap) {
              const float t = s * params.softcap_scale;
              ds *= 1.f - t * t;
            }
            acc_dp[nt][e] = ds;
          }
        }
      }

      // dQ += dS K (casting point of dS).
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        acc_to_a_operand<T>(a, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
#pragma unroll
        for (int dn = 0; dn < D / 16; ++dn) {
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, sK_addr + (kk * 16 * kStride + dn * 16 + bt_off) * sizeof(T));
          mma_16816<T>(acc_dq[2 * dn], a, bk[0], bk[1]);
          mma_16816<T>(acc_dq[2 * dn + 1], a, bk[2], bk[3]);
        }
      }
      block_sync();  // every warp is done with buffer buf before it is refilled
    }
  }

  // dQ = scale * dS K: cast (casting point of dQ) and store; rows that see no key get 0.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = m0 + warp * 16 + g + half * 8;
    if (i < Lq) {
      T* dq_row = dq_ptr + i * params.dq_row_stride;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const int d = dt * 8 + 2 * tq;
        if (d < params.head_dim) {
          *reinterpret_cast<uint32_t*>(dq_row + d) = pack2<T>(acc_dq[dt][2 * half] * params.softmax_scale,
                                                              acc_dq[dt][2 * half + 1] * params.softmax_scale);
        }
      }
    }
  }
}

constexpr int kReduceThreads = 256;

// Blocks of the reduction: 4 columns per thread (head_dim is a multiple of 8).
inline unsigned reduce_dkdv_blocks(const FlashBwdParams& params) {
  const int64_t chunks = static_cast<int64_t>(params.batch) * params.seqlen_k * params.nheads_kv * params.head_dim / 4;
  return static_cast<unsigned>((chunks + kReduceThreads - 1) / kReduceThreads);
}

// dK = scale * sum_s dk_accum[s], dV = sum_s dv_accum[s], summed in split order (bitwise
// reproducible), cast and stored; 4 consecutive columns of one (b, j, hk) row per thread.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) flash_bwd_reduce_dkdv_kernel(const __grid_constant__ FlashBwdParams params) {
  const int64_t n = static_cast<int64_t>(params.batch) * params.seqlen_k * params.nheads_kv * params.head_dim;
  const int64_t idx = (static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x) * 4;
  if (idx >= n) return;
  const int d = static_cast<int>(idx % params.head_dim);
  const int64_t row = idx / params.head_dim;  // (b, j, hk)
  const int hk = static_cast<int>(row % params.nheads_kv);
  const int j = static_cast<int>((row / params.nheads_kv) % params.seqlen_k);
  const int b = static_cast<int>(row / (static_cast<int64_t>(params.nheads_kv) * params.seqlen_k));
  float4 dk = make_float4(0.f, 0.f, 0.f, 0.f);
  float4 dv = dk;
  for (int s = 0; s < params.num_splits; ++s) {
    const float4 k4 = *reinterpret_cast<const float4*>(params.dk_accum + s * n + idx);
    const float4 v4 = *reinterpret_cast<const float4*>(params.dv_accum + s * n + idx);
    dk = make_float4(dk.x + k4.x, dk.y + k4.y, dk.z + k4.z, dk.w + k4.w);
    dv = make_float4(dv.x + v4.x, dv.y + v4.y, dv.z + v4.z, dv.w + v4.w);
  }
  const float scale = params.softmax_scale;
  T* dk_out = static_cast<T*>(params.dk) + b * params.dk_batch_stride + j * params.dk_row_stride +
              hk * params.dk_head_stride + d;
  T* dv_out = static_cast<T*>(params.dv) + b * params.dv_batch_stride + j * params.dv_row_stride +
              hk * params.dv_head_stride + d;
  *reinterpret_cast<uint2*>(dk_out) =
      make_uint2(pack2<T>(dk.x * scale, dk.y * scale), pack2<T>(dk.z * scale, dk.w * scale));
  *reinterpret_cast<uint2*>(dv_out) = make_uint2(pack2<T>(dv.x, dv.y), pack2<T>(dv.z, dv.w));
}

}  // namespace flash
}  // namespace fastattn
