// FlashAttention-2 forward kernel on mma.sync m16n8k16 tensor cores (sm_80+).
//
// One CTA computes kBlockM query rows of one (batch, head); each warp owns 16 * kMTiles of
// those rows, so the online softmax runs entirely in the accumulator registers. Per key block
// of the causal / window band (key_block_range: blocks outside it are skipped on both sides):
//   S = Q K^T (fp32) -> softcap (tanh) -> mask + ALiBi -> row max / rescale (exp2)
//   -> P (fp16/bf16, in registers) -> O += P V.
// K of the next block loads while P V runs, V while Q K^T runs (cp.async). Softcap, window and
// ALiBi are runtime data (uniform branches), not template flags: no extra instantiations.
// Epilogue: O / rowsum (x 1/(1-p) with dropout) and lse = max * scale + log(rowsum), fp32.
#pragma once

#include "flash_utils.cuh"

namespace fastattn {
namespace flash {

template <typename T_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, bool kIsDropout_>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr bool kIsDropout = kIsDropout_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kMTiles = kBlockM / (16 * kNWarps);  // 16-row m-tiles per warp
  static constexpr int kStride = SmemStride<kHeadDim>::value;
  // sQ (kBlockM rows), sK and sV (kBlockN rows each).
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kStride * static_cast<int>(sizeof(T));
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head-dim buckets are multiples of 32");
  static_assert(kBlockM % (16 * kNWarps) == 0 && kMTiles >= 1, "each warp owns whole 16-row m-tiles");
  static_assert(kBlockN % 16 == 0, "key blocks are whole mma k-steps");
};

// Head-dim bucket -> tile configuration (0 spills under 255 registers for sm_80 and sm_90 with
// the extension's nvcc flags, checked by `fastattn build --check-cuda`). d <= 128: 128 query
// rows, each of 4 warps owns 2 m-tiles (every K/V fragment feeds two mma), 64-key blocks, 48
// for d = 96 (with the window / softcap / ALiBi code a 64-wide S spilled next to the 96-register
// O), 32 for d = 128 (the 64 x 4 fp32 output accumulators leave no room for a 64-wide S).
// d > 128: 64 x 64, one m-tile per warp (the output accumulator alone is d/2 registers).
template <int kHeadDim>
constexpr int fwd_block_n() { return kHeadDim == 128 ? 32 : kHeadDim == 96 ? 48 : 64; }

template <typename T, int kHeadDim, bool kIsDropout>
using FwdTraitsFor = FwdTraits<T, kHeadDim, (kHeadDim <= 128 ? 128 : 64), fwd_block_n<kHeadDim>(), 4, kIsDropout>;

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1) flash_fwd_kernel(const __grid_constant__ FlashFwdParams params) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kMT = Tr::kMTiles;
  constexpr int kStride = Tr::kStride;
  constexpr int kNT = BN / 8;  // score n-tiles per row
  constexpr int kDT = D / 8;   // output n-tiles per row

  T* sQ = reinterpret_cast<T*>(dynamic_smem());  // (BM, kStride)
  T* sK = sQ + BM * kStride;                      // (BN, kStride)
  T* sV = sK + BN * kStride;                      // (BN, kStride)

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int g = lane / 4;   // accumulator row inside an m-tile (and g + 8)
  const int tq = lane % 4;  // accumulator column pair 2 * tq inside an n-tile
  const int m_block = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (params.nheads / params.nheads_kv);
  const int Lq = params.seqlen_q;
  const int Lk = params.seqlen_k;
  const int m0 = m_block * BM;
  const int warp_row0 = warp * 16 * kMT;

  const T* q_ptr = static_cast<const T*>(params.q) + b * params.q_batch_stride + h * params.q_head_stride +
                   m0 * params.q_row_stride;  // (BM, D) tile of (B, Lq, H, D)
  T* o_ptr = static_cast<T*>(params.out) + b * params.o_batch_stride + h * params.o_head_stride;
  float* lse_ptr = params.lse + (static_cast<int64_t>(b) * params.nheads + h) * Lq;  // (Lq,) of (B, H, Lq)

  const BlockRange blocks = key_block_range<BM, BN>(params, m0);
  // K and V from the first visited block, the loop counted from 0 (block blocks.begin + it).
  const int n_count = blocks.end - blocks.begin;
  if (n_count <= 0) {
    store_empty_tile<BM, D, Tr::kNThreads>(params, o_ptr, lse_ptr, m0, tid);
    return;
  }
  const int k0 = blocks.begin * BN;
  const T* k_ptr = static_cast<const T*>(params.k) + b * params.k_batch_stride + hk * params.k_head_stride +
                   k0 * params.k_row_stride;  // (Lk - k0, D) of (B, Lk, Hkv, D)
  const T* v_ptr = static_cast<const T*>(params.v) + b * params.v_batch_stride + hk * params.v_head_stride +
                   k0 * params.v_row_stride;

  const ScoreMask<T> mask(params, b, h);
  const uint64_t drop_row0 = (static_cast<uint64_t>(b) * params.nheads + h) * Lq;

  cp_async_tile<BM, D, Tr::kNThreads>(sQ, q_ptr, params.q_row_stride, Lq - m0, params.head_dim, tid);
  cp_async_tile<BN, D, Tr::kNThreads>(sK, k_ptr, params.k_row_stride, Lk - k0, params.head_dim, tid);
  cp_async_commit();

  const uint32_t sQ_addr = smem_u32(sQ);
  const uint32_t sK_addr = smem_u32(sK);
  const uint32_t sV_addr = smem_u32(sV);
  // Per-lane ldmatrix row offsets (elements), see flash_ptx.cuh for the fragment layouts.
  const int a_off = (lane % 16) * kStride + (lane / 16) * 8;                   // A from a [m][k] tile
  const int b_off = ((lane % 8) + (lane / 16) * 8) * kStride + ((lane / 8) % 2) * 8;   // B from [n][k]
  const int bt_off = ((lane % 8) + ((lane / 8) % 2) * 8) * kStride + (lane / 16) * 8;  // B from [k][n]

  float acc_o[kMT][kDT][4];
  float row_max[kMT][2];  // running max of the raw scores, per accumulator row
  float row_sum[kMT][2];  // this thread's partial row sum of exp2((s - row_max) * scale * log2(e))
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      row_max[mt][half] = -kInf;
      row_sum[mt][half] = 0.f;
    }
  }

  for (int it = 0; it < n_count; ++it) {
    const int n0 = k0 + it * BN;
    cp_async_wait<0>();
    block_sync();  // K[n] (and Q) landed for every thread; every warp is done reading V[n-1]
    cp_async_tile<BN, D, Tr::kNThreads>(sV, v_ptr + it * BN * params.v_row_stride, params.v_row_stride, Lk - n0,
                                        params.head_dim, tid);
    cp_async_commit();

    // S = Q K^T
    float acc_s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ldmatrix_x4(a[mt], sQ_addr + ((warp_row0 + mt * 16) * kStride + kk * 16 + a_off) * sizeof(T));
      }
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, sK_addr + (nn * 16 * kStride + kk * 16 + b_off) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc_s[mt][2 * nn], a[mt], bf[0], bf[1]);
          mma_16816<T>(acc_s[mt][2 * nn + 1], a[mt], bf[2], bf[3]);
        }
      }
    }

    if (params.has_softcap()) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) softcap_scores(params, acc_s[mt]);
    }

    // Per-element masking (and ALiBi) only where the tile needs it (scores stay in raw units).
    if (tile_needs_mask<BM, BN>(params, m0, n0)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = m0 + warp_row0 + mt * 16 + g + (e / 2) * 8;
            const int j = n0 + nt * 8 + 2 * tq + (e % 2);
            acc_s[mt][nt][e] = mask.score(i, j, acc_s[mt][nt][e]);
          }
        }
      }
    }

    // Online softmax: new row max over the quad, rescale O and the row sum,
    // P = exp2(s * scale * log2(e) - max * scale * log2(e)) (one FFMA per element).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = row_max[mt][half];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
          mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * half], acc_s[mt][nt][2 * half + 1]));
        }
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        // A row with no visible key so far keeps max -inf; subtracting 0 instead keeps
        // exp2(-inf - max) = 0 rather than NaN.
        const float m_use = mx == -kInf ? 0.f : mx * params.scale_log2;
        const float alpha = fast_exp2(row_max[mt][half] * params.scale_log2 - m_use);
        row_max[mt][half] = mx;
        row_sum[mt][half] *= alpha;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc_o[mt][dt][2 * half] *= alpha;
          acc_o[mt][dt][2 * half + 1] *= alpha;
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float p = fast_exp2(fmaf(acc_s[mt][nt][2 * half + c], params.scale_log2, -m_use));
            acc_s[mt][nt][2 * half + c] = p;
            row_sum[mt][half] += p;
          }
        }
      }
    }

    // Dropout zeroes P after the row sum took it (the sum normalises the undropped softmax);
    // the 1 / (1 - p) factor is applied once in the epilogue.
    if constexpr (Tr::kIsDropout) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = m0 + warp_row0 + mt * 16 + g + half * 8;
          const uint32_t keep = dropout_row_bits<kNT>(params, (drop_row0 + i) * static_cast<uint64_t>(Lk) + n0 + 2 * tq);
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            if (!((keep >> (2 * nt)) & 1u)) acc_s[mt][nt][2 * half] = 0.f;
            if (!((keep >> (2 * nt + 1)) & 1u)) acc_s[mt][nt][2 * half + 1] = 0.f;
          }
        }
      }
    }

    cp_async_wait<0>();
    block_sync();  // V[n] landed; every warp is done reading K[n]
    if (it + 1 < n_count) {
      cp_async_tile<BN, D, Tr::kNThreads>(sK, k_ptr + (it + 1) * BN * params.k_row_stride, params.k_row_stride,
                                          Lk - n0 - BN, params.head_dim, tid);
      cp_async_commit();
    }

    // O += P V, P cast to T in registers (casting point of P).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) acc_to_a_operand<T>(a[mt], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, sV_addr + (kk * 16 * kStride + dn * 16 + bt_off) * sizeof(T));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(acc_o[mt][2 * dn], a[mt], bf[0], bf[1]);
          mma_16816<T>(acc_o[mt][2 * dn + 1], a[mt], bf[2], bf[3]);
        }
      }
    }
  }

  // Epilogue: normalise, cast (casting point of O), store O and the fp32 lse.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float sum = row_sum[mt][half];
      sum += shfl_xor(sum, 1);
      sum += shfl_xor(sum, 2);
      const bool dead = !(sum > 0.f);  // the row saw no key
      const float inv = dead ? 0.f : (Tr::kIsDropout ? params.rp_dropout : 1.f) / sum;
      const int i = m0 + warp_row0 + mt * 16 + g + half * 8;
      if (i < Lq) {
        if (tq == 0) lse_ptr[i] = dead ? -kInf : row_max[mt][half] * params.softmax_scale + logf(sum);
        T* o_row = o_ptr + i * params.o_row_stride;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          const int d = dt * 8 + 2 * tq;
          if (d < params.head_dim) {
            *reinterpret_cast<uint32_t*>(o_row + d) =
                pack2<T>(acc_o[mt][dt][2 * half] * inv, acc_o[mt][dt][2 * half + 1] * inv);
          }
        }
      }
    }
  }
}

}  // namespace flash
}  // namespace fastattn
