// FlashAttention-3-style forward kernel on Hopper warpgroup MMA (wgmma, sm_90a).
//
// One CTA computes 128 query rows of one (batch, head) with 2 warpgroups of 64 rows each.
// Q, K and V live in shared memory in the 128-byte-swizzled layout of flash_sm90_desc.h; per
// key block of kBlockN keys
//   S = Q K^T        wgmma m64n{kBlockN}k16, both operands from shared memory (SS)
//   O += P V         wgmma m64n{D}k16, P from registers (RS), V through an MN-major descriptor
// with the softmax of block n overlapping the P V wgmma of block n - 1 (FlashAttention-3's
// intra-warpgroup pipelining):
//   issue S(n) = Q K(n)^T; issue O += P(n-1) V(n-1); wait for S(n); mask + online softmax of
//   S(n) while P V runs; wait for P V; rescale O.
// K and V each have a 2-stage ring filled by cp.async from all threads one block ahead:
// K(n+1) and V(n) load while block n computes. The S accumulator layout is the m16n8 fragment
// per warp, so masking, the exp2 softmax and the epilogue (O / l, lse) are those of the
// mma.sync kernel (flash_fwd_kernel.cuh), with the same outputs. No dropout, sliding window,
// softcap or ALiBi (the dispatcher sends those to the mma.sync kernel).
#pragma once

#include "flash_sm90_desc.h"
#include "flash_utils.cuh"

#ifdef FASTATTN_FLASH_PTX_SM90_HEADER
#include FASTATTN_FLASH_PTX_SM90_HEADER
#define FASTATTN_SM90_KERNEL_BODY 1
#else
#include "flash_ptx_sm90.cuh"
#ifdef FASTATTN_SM90A
#define FASTATTN_SM90_KERNEL_BODY 1
#endif
#endif

namespace fastattn {
namespace flash {

template <typename T_, int kHeadDim_, int kBlockN_>
struct FwdSm90Traits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarpgroups = 2;
  static constexpr int kNThreads = kNWarpgroups * 128;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  // sQ, then sK[2], then sV[2]: every tile a multiple of 1024 bytes (swizzle period).
  static constexpr int kSmemBytes = kQBytes + 4 * kKVBytes;
  static_assert(sizeof(T) == 2, "fp16 / bf16");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "wgmma N of O");
  static_assert(kBlockN == 64 || kBlockN == 80 || kBlockN == 128, "wgmma N of S");
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "tiles start on the swizzle period");
};

// Head-dim bucket -> configuration: 128 x 128 tiles for d <= 128 (S and O accumulators 64
// registers each for d = 128, 160 KiB of shared memory; 80 KiB for d = 64); 128 x 80 for
// d = 256 (O alone is 128 registers; 224 KiB of shared memory).
template <typename T, int kHeadDim>
using FwdSm90TraitsFor = FwdSm90Traits<T, kHeadDim, (kHeadDim == 256 ? 80 : 128)>;

// cp.async of a (kRows, kCols) tile into the swizzled layout, zero-filling rows >= rows_valid
// and columns >= cols_valid. Each thread keeps one 16-byte column chunk and walks down rows in
// steps that are multiples of 8, so its swizzled chunk position never changes.
template <int kRows, int kCols, int kNThreads, typename T>
__device__ __forceinline__ void cp_async_tile_sw128(uint32_t smem, const T* gmem, int64_t row_stride, int rows_valid,
                                                    int cols_valid, int tid) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kRowsPerIter = kNThreads / kChunksPerRow;
  static_assert(kRowsPerIter % 8 == 0 && kRows % kRowsPerIter == 0, "whole swizzle periods per pass");
  const int r0 = tid / kChunksPerRow;
  const int c = tid % kChunksPerRow;
  const bool col_valid = c * 8 < cols_valid;
  const T* src = gmem + r0 * row_stride + c * 8;
  const int64_t step = kRowsPerIter * row_stride;
  const uint32_t dst = smem + sw128_chunk_offset<kRows>(r0, c);
  // Rows left below r0, compared with constants: r0 + it * kRowsPerIter per pass would be
  // hoisted out of the key loop as kRows / kRowsPerIter live registers.
  const int rows_left = rows_valid - r0;
#pragma unroll
  for (int it = 0; it < kRows / kRowsPerIter; ++it) {
    const bool valid = col_valid && it * kRowsPerIter < rows_left;
    cp_async_16(dst + it * kRowsPerIter * 128, valid ? src : gmem, valid);
    src += step;
  }
}

// Online softmax of one block of scores in the accumulator layout (rows g and g + 8 of the
// warp's 16, 8-column chunks): new row max (quad shuffles), alpha = exp2 of the max change,
// s <- P = exp2(s * scale * log2(e) - max * scale * log2(e)), row sums rescaled and updated.
template <int kRegs>
__device__ __forceinline__ void online_softmax(float (&s)[kRegs], float (&row_max)[2], float (&row_sum)[2],
                                               float (&alpha)[2], float scale_log2) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = row_max[half];
#pragma unroll
    for (int i = 0; i < kRegs / 4; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * half], s[4 * i + 2 * half + 1]));
    mx = fmaxf(mx, shfl_xor(mx, 1));
    mx = fmaxf(mx, shfl_xor(mx, 2));
    // No visible key so far: max stays -inf and subtracting 0 keeps exp2(-inf) = 0, not NaN.
    const float m_use = mx == -kInf ? 0.f : mx * scale_log2;
    alpha[half] = fast_exp2(row_max[half] * scale_log2 - m_use);
    row_max[half] = mx;
    float sum = row_sum[half] * alpha[half];
#pragma unroll
    for (int i = 0; i < kRegs / 4; ++i) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float p = fast_exp2(fmaf(s[4 * i + 2 * half + c], scale_log2, -m_use));
        s[4 * i + 2 * half + c] = p;
        sum += p;
      }
    }
    row_sum[half] = sum;
  }
}

template <typename Tr>
__global__ void __launch_bounds__(Tr::kNThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ FlashFwdParams params) {
#ifdef FASTATTN_SM90_KERNEL_BODY
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kSRegs = BN / 2;  // S accumulator registers per thread (m64nBNk16)
  constexpr int kORegs = D / 2;   // O accumulator registers per thread (m64nDk16)
  constexpr SmemSwizzle kSw = SmemSwizzle::k128B;

  const uint32_t sQ = smem_u32(dynamic_smem_sm90());
  const uint32_t sK = sQ + Tr::kQBytes;        // stage s at sK + s * kKVBytes
  const uint32_t sV = sK + 2 * Tr::kKVBytes;   // stage s at sV + s * kKVBytes

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int wg = warp_uniform(tid / 128);
  const int m_block = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / (params.nheads / params.nheads_kv);
  const int Lq = params.seqlen_q;
  const int Lk = params.seqlen_k;
  const int m0 = m_block * BM;
  // Query row of accumulator row g (g + 8 for the second half) of this thread.
  const int row0 = m0 + 64 * wg + 16 * ((tid % 128) / 32) + lane / 4;
  const int col0 = 2 * (lane % 4);  // column of accumulator element 0 inside an 8-column chunk

  const T* q_ptr = static_cast<const T*>(params.q) + b * params.q_batch_stride + h * params.q_head_stride +
                   m0 * params.q_row_stride;
  const T* k_ptr = static_cast<const T*>(params.k) + b * params.k_batch_stride + hk * params.k_head_stride;
  const T* v_ptr = static_cast<const T*>(params.v) + b * params.v_batch_stride + hk * params.v_head_stride;
  T* o_ptr = static_cast<T*>(params.out) + b * params.o_batch_stride + h * params.o_head_stride;
  float* lse_ptr = params.lse + (static_cast<int64_t>(b) * params.nheads + h) * Lq;

  // No window here (fwd_uses_sm90 routes window, softcap and ALiBi to the mma.sync kernel): the
  // range starts at block 0.
  const int n_end = key_block_range<BM, BN>(params, m0).end;
  if (n_end == 0) {
    store_empty_tile<BM, D, Tr::kNThreads>(params, o_ptr, lse_ptr, m0, tid);
    return;
  }
  const ScoreMask<T> mask(params, b, h);
  const bool has_element_mask = params.has_element_mask();

  // Descriptors (flash_sm90_desc.h, checked against cute by emulation/sm90_layout_check.cpp):
  // Q rows of this warpgroup and K(stage), both K-major; V(stage) MN-major (N = head dim,
  // LBO = next 64 head-dim columns, 0 when there is none).
  const uint64_t desc_q = make_smem_desc(sQ + wg * 64 * 128, 16, 1024, kSw);
  const uint64_t desc_k = make_smem_desc(sK, 16, 1024, kSw);
  const uint64_t desc_v = make_smem_desc(sV, D > 64 ? BN * 128 : 0, 1024, kSw);

  auto load_k = [&](int n) {
    cp_async_tile_sw128<BN, D, Tr::kNThreads>(sK + (n % 2) * Tr::kKVBytes, k_ptr + n * BN * params.k_row_stride,
                                              params.k_row_stride, Lk - n * BN, params.head_dim, tid);
  };
  auto load_v = [&](int n) {
    cp_async_tile_sw128<BN, D, Tr::kNThreads>(sV + (n % 2) * Tr::kKVBytes, v_ptr + n * BN * params.v_row_stride,
                                              params.v_row_stride, Lk - n * BN, params.head_dim, tid);
  };
  // Issues S = Q K(n)^T (D / 16 wgmma, k-step kk at +32 bytes inside a 64-column block).
  auto issue_qk = [&](float (&s)[kSRegs], int n) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<T, BN, 0>(s, desc_advance(desc_q, (kk / 4) * BM * 128 + (kk % 4) * 32),
                         desc_advance(desc_k, (n % 2) * Tr::kKVBytes + (kk / 4) * BN * 128 + (kk % 4) * 32), kk > 0);
    }
  };
  // Issues O += P V(n) (BN / 16 wgmma, 16 keys = 2048 bytes each).
  auto issue_pv = [&](float (&o)[kORegs], const uint32_t (&p)[BN / 16][4], int n) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      wgmma_rs<T, D, 1>(o, p[kk], desc_advance(desc_v, (n % 2) * Tr::kKVBytes + kk * 16 * 128), 1);
    }
  };
  // Scores in raw units, -inf where masked, only in the blocks that need it: sequence end and
  // causal diagonal as one column limit per row (no loads), key padding / attn_mask per element.
  auto apply_mask = [&](float (&s)[kSRegs], int n) {
    const int n0 = n * BN;
    if (n0 + BN > Lk || (params.is_causal && n0 + BN - 1 > m0 + params.causal_shift)) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = row0 + half * 8;
        const int limit = (params.is_causal ? min(Lk, i + params.causal_shift + 1) : Lk) - n0 - col0;
#pragma unroll
        for (int e = 0; e < kSRegs / 2; ++e) {
          const int k = 4 * (e / 2) + 2 * half + e % 2;
          if (8 * (e / 2) + e % 2 >= limit) s[k] = -kInf;
        }
      }
    }
    if (has_element_mask) {
#pragma unroll
      for (int e = 0; e < kSRegs; ++e) {
        s[e] = mask.score(row0 + ((e % 4) / 2) * 8, n0 + 8 * (e / 4) + col0 + (e % 2), s[e]);
      }
    }
  };
  // P (fp32 in the S accumulator) -> the A registers of O += P V: 16 keys = 2 chunks per k-step.
  auto pack_p = [&](uint32_t (&p)[BN / 16][4], const float (&s)[kSRegs]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      p[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      p[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      p[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      p[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  float acc_o[kORegs];
  float acc_s[kSRegs];
  uint32_t p[BN / 16][4];
  // After the wait for O += P V: O and P are this thread's again (the asm fences keep the
  // compiler from touching them inside the asynchronous window).
  auto retire_pv = [&] {
    wgmma_fence_regs(acc_o);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_fence_regs(p[kk]);
  };
  float row_max[2] = {-kInf, -kInf};
  float row_sum[2] = {0.f, 0.f};
  float alpha[2];
#pragma unroll
  for (int e = 0; e < kORegs; ++e) acc_o[e] = 0.f;

  // Block 0: Q and K(0), then S(0) while V(0) and K(1) load.
  cp_async_tile_sw128<BM, D, Tr::kNThreads>(sQ, q_ptr, params.q_row_stride, Lq - m0, params.head_dim, tid);
  load_k(0);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async_smem();  // this thread's cp.async data -> visible to wgmma (async proxy)
  block_sync();
  wgmma_fence();
  issue_qk(acc_s, 0);
  wgmma_commit();
  load_v(0);
  if (n_end > 1) load_k(1);
  cp_async_commit();
  wgmma_wait<0>();
  wgmma_fence_regs(acc_s);
  apply_mask(acc_s, 0);
  online_softmax(acc_s, row_max, row_sum, alpha, params.scale_log2);

  for (int n = 1; n < n_end; ++n) {
    cp_async_wait<0>();
    fence_proxy_async_smem();
    // V(n-1) and K(n) landed for every thread; every warpgroup retired S(n-1) (K stage
    // (n+1) % 2) and P V(n-2) (V stage n % 2), so both stages can be refilled.
    block_sync();

    pack_p(p, acc_s);  // casting point of P
    wgmma_fence();
    issue_qk(acc_s, n);
    wgmma_commit();
    issue_pv(acc_o, p, n - 1);
    wgmma_commit();
    // The next stages load while the tensor cores run (other buffers than these wgmma read).
    load_v(n);
    if (n + 1 < n_end) load_k(n + 1);
    cp_async_commit();
    if (has_element_mask) {
      // Per-element masks: retire P V first, so the mask loads do not compete with the live
      // P registers (no overlap on this path, but no spills either).
      wgmma_wait<0>();
      retire_pv();
      wgmma_fence_regs(acc_s);
      apply_mask(acc_s, n);
      online_softmax(acc_s, row_max, row_sum, alpha, params.scale_log2);
    } else {
      wgmma_wait<1>();  // S(n) done, P V(n-1) still runs under the softmax
      wgmma_fence_regs(acc_s);
      apply_mask(acc_s, n);
      online_softmax(acc_s, row_max, row_sum, alpha, params.scale_log2);
      wgmma_wait<0>();
      retire_pv();
    }
#pragma unroll
    for (int e = 0; e < kORegs; ++e) acc_o[e] *= alpha[(e % 4) / 2];
  }

  // O += P V of the last block.
  cp_async_wait<0>();
  fence_proxy_async_smem();
  block_sync();
  pack_p(p, acc_s);
  wgmma_fence();
  issue_pv(acc_o, p, n_end - 1);
  wgmma_commit();
  wgmma_wait<0>();
  retire_pv();

  // Epilogue: normalise, cast (casting point of O), store O and the fp32 lse.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += shfl_xor(sum, 1);
    sum += shfl_xor(sum, 2);
    const bool dead = !(sum > 0.f);  // the row saw no key
    const float inv = dead ? 0.f : 1.f / sum;
    const int i = row0 + half * 8;
    if (i < Lq) {
      if (lane % 4 == 0) lse_ptr[i] = dead ? -kInf : row_max[half] * params.softmax_scale + logf(sum);
      T* o_row = o_ptr + i * params.o_row_stride;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const int d = dt * 8 + col0;
        if (d < params.head_dim) {
          *reinterpret_cast<uint32_t*>(o_row + d) =
              pack2<T>(acc_o[4 * dt + 2 * half] * inv, acc_o[4 * dt + 2 * half + 1] * inv);
        }
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  // Not sm_90a (another arch, or 9.0 without the "a"): a stub the launcher never starts
  // (device_runs_sm90a() is false wherever this image is the one the device runs).
  __trap();
#endif
}

}  // namespace flash
}  // namespace fastattn
