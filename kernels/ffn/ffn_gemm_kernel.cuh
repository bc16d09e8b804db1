// Tensor-core GEMM with a fused epilogue, shared by every FFN matmul (see ffn_params.h).
//
// C (M, N) = A (M, K) @ B (K, N), fp32 accumulation, one BM x BN tile per CTA:
//   - mma.sync.aligned.m16n8k16 (fp16 or bf16 inputs, fp32 accumulators), sm_80 and later;
//   - operand tiles streamed global -> shared with 16-byte cp.async in a STAGES-deep ring
//     (zero-filled past M, N, K), or with predicated 2-byte loads when an operand is not
//     16-byte aligned (vec_loads = false);
//   - shared tiles keep the global contiguous dimension contiguous and are XOR-swizzled per
//     16-byte chunk, so the ldmatrix reads of 8 rows hit 8 distinct bank groups;
//   - fragments loaded with ldmatrix.x4: plain for a K-contiguous operand, .trans for an
//     M- or N-contiguous one, which gives the NT / NN / TN layouts from one kernel body;
//   - kDual (swiglu forward): the CTA also computes the tile F rows further down B (the "up"
//     half of w1) into a second accumulator, so gate and up of one column meet in registers.
//
// Expected speed (an expectation, not a measurement: no GPU was available when this was
// written). The target in the issue is "within 5% of cuBLAS, epilogue included" on an H200;
// this design cannot reach it there. mma.sync + ldmatrix + a 4-stage cp.async ring is the
// Ampere recipe (CUTLASS 2.x), which gets within roughly 10-20% of cuBLAS on A100. On
// H100/H200 cuBLAS runs wgmma + TMA (sm_90a) mainloops that the legacy mma.sync path cannot
// feed as fast; together with this kernel's simpler choices (no register double-buffering of
// fragments, epilogue stores straight from registers, no split-K) expect roughly 40-60% of
// cuBLAS's GEMM throughput at large M, N, K on an H200. What the fusion buys regardless: no
// separate bias / activation / dropout / act' passes (each a read and a write of M x d_hidden)
// and no stored dropout mask. Reaching cuBLAS needs a wgmma/TMA mainloop (CUTLASS 3 / CuTe),
// which this project does not depend on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ffn_epilogue.cuh"
#include "ffn_params.h"

namespace fastattn {
namespace ffn {

// CTA tile BM x BN (x2 along N when kDual), K step BK, WARPS_M x WARPS_N warps, STAGES-deep
// shared-memory ring.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_, bool DUAL_>
struct GemmConfig {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr bool kDual = DUAL_;
  static constexpr int kHalves = kDual ? 2 : 1;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WM / 16, NI = WN / 8;              // m16n8 mma tiles per warp
  static constexpr int kBRows = BN * kHalves;                   // B tile extent along N
  static constexpr int kStageElems = BM * BK + kBRows * BK;
  static constexpr int kSmemBytes = STAGES * kStageElems * 2;
  static_assert(BM % (16 * WARPS_M) == 0 && BN % (16 * WARPS_N) == 0, "warp tile must be whole 16x16 blocks");
  static_assert(BK % 16 == 0, "BK must be a multiple of the mma K (16)");
  static_assert(STAGES >= 2, "the cp.async ring needs at least two stages");
};

// A ROWS x COLS tile of 2-byte elements in shared memory, COLS contiguous, chunks of 8
// elements (16 bytes) XOR-swizzled by row: 8 consecutive rows read at the same logical chunk
// land in 8 different 16-byte bank groups (conflict-free ldmatrix).
template <int ROWS, int COLS>
struct SmemTile {
  static constexpr int kChunksPerRow = COLS / 8;
  static constexpr int kElems = ROWS * COLS;
  static_assert(COLS % 8 == 0, "tile rows must be whole 16-byte chunks");
  static_assert(kChunksPerRow == 4 || kChunksPerRow % 8 == 0, "swizzle defined for 64-byte or 128*k-byte rows");

  static __device__ __forceinline__ int swizzle(int row) {
    // 64-byte rows: two rows share a 128-byte bank line, so rows 2i and 2i+1 keep the same XOR.
    if constexpr (kChunksPerRow == 4) {
      return (row >> 1) & 3;
    } else {
      return row & 7;
    }
  }
  // Element offset of the logical chunk `chunk` (8 elements) of row `row`.
  static __device__ __forceinline__ int offset(int row, int chunk) {
    return row * COLS + ((chunk ^ swizzle(row)) << 3);
  }
};

// --- PTX wrappers -----------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte async copy; bytes src_bytes..15 of the destination are zero-filled (0 = all zeros,
// nothing read).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_ptr) {
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem_ptr))
                 : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem_ptr))
                 : "memory");
  }
}

// d += a @ b for one m16n8k16 tile (PTX ISA fragment layouts: a row-major 16x16 in 4 regs,
// b "col" 16x8 in 2 regs, c/d 16x8 fp32 in 4 regs).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// --- global -> shared tile copy ---------------------------------------------------------------
// Copies a ROWS x COLS tile whose element (r, c) is g[grow(r) * ld + col0 + c], zero outside
// row_limit / col_limit. Rows split in halves of kHalfRows: half h starts at logical row row0
// and global row row0 + h * half_offset (the swiglu up half of w1); both halves are masked by
// row_limit on the logical row.
template <int ROWS, int COLS, int kThreads, int kHalfRows>
__device__ __forceinline__ void load_tile(uint16_t* smem, const uint16_t* g, int64_t ld, int row0, int col0,
                                          int row_limit, int col_limit, int half_offset, bool vec_loads) {
  using Tile = SmemTile<ROWS, COLS>;
  constexpr int kChunks = ROWS * Tile::kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int chunk_id = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = chunk_id / Tile::kChunksPerRow;
    const int chunk = chunk_id % Tile::kChunksPerRow;
    const int row = row0 + r % kHalfRows;
    const int col = col0 + chunk * 8;
    const int in_row = col_limit - col;
    const int valid = row < row_limit ? (in_row < 0 ? 0 : (in_row > 8 ? 8 : in_row)) : 0;
    const int64_t grow = static_cast<int64_t>(row) + static_cast<int64_t>(r / kHalfRows) * half_offset;
    uint16_t* dst = smem + Tile::offset(r, chunk);
    // Out-of-range addresses are never formed: a fully masked chunk points at the base.
    const uint16_t* src = valid > 0 ? g + grow * ld + col : g;
    if (vec_loads) {
      cp_async_16(dst, src, valid * 2);
    } else {
      uint16_t e[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) e[j] = j < valid ? src[j] : uint16_t(0);
      uint4 packed;
      packed.x = e[0] | (static_cast<uint32_t>(e[1]) << 16);
      packed.y = e[2] | (static_cast<uint32_t>(e[3]) << 16);
      packed.z = e[4] | (static_cast<uint32_t>(e[5]) << 16);
      packed.w = e[6] | (static_cast<uint32_t>(e[7]) << 16);
      *reinterpret_cast<uint4*>(dst) = packed;
    }
  }
}

// --- the kernel ---------------------------------------------------------------------------------
// kAKMajor: A (M, K) with K contiguous, else A stored (K, M) with M contiguous.
// kBKMajor: B stored (N, K) with K contiguous (a weight used as W^T), else (K, N).
// Tile order: a 1-D grid walked in groups of kGroupM tile rows (Triton's grouped ordering), so
// the CTAs resident at one time share A rows and B columns in L2 instead of each streaming a
// different row panel of A against one column panel of B.
constexpr int kGroupM = 8;

// Two CTAs of 256 threads per SM: at most 128 registers per thread.
template <typename T, typename Cfg, bool kAKMajor, bool kBKMajor, typename Epi>
__global__ void __launch_bounds__(Cfg::kThreads, 2) _ffn_gemm_kernel(const FfnGemmParams p) {
  static_assert(Epi::kDual == Cfg::kDual, "dual epilogue needs the dual tile");
  static_assert(!Cfg::kDual || kBKMajor, "the dual (swiglu) tile is only used with B = w1 (N, K)");
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int MI = Cfg::MI, NI = Cfg::NI, H = Cfg::kHalves;
  static_assert(NI % 2 == 0, "B fragments are loaded two n8 tiles at a time");
  // Shared tiles in global orientation: rows x contiguous columns.
  using ATile = SmemTile<kAKMajor ? BM : BK, kAKMajor ? BK : BM>;
  using BTile = SmemTile<kBKMajor ? Cfg::kBRows : BK, kBKMajor ? BK : Cfg::kBRows>;

  extern __shared__ __align__(128) unsigned char ffn_smem[];
  uint16_t* smem_a = reinterpret_cast<uint16_t*>(ffn_smem);  // STAGES x ATile
  uint16_t* smem_b = smem_a + STAGES * ATile::kElems;        // STAGES x BTile

  const int tiles_m = (p.M - 1) / BM + 1, tiles_n = (p.N - 1) / BN + 1;  // M, N >= 1
  const int tiles_per_group = kGroupM * tiles_n;
  const int tile = static_cast<int>(blockIdx.x);
  const int first_m = (tile / tiles_per_group) * kGroupM;
  const int group_m = min(tiles_m - first_m, kGroupM);
  const int m0 = (first_m + (tile % tiles_per_group) % group_m) * BM;
  const int n0 = ((tile % tiles_per_group) / group_m) * BN;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  const uint16_t* gA = static_cast<const uint16_t*>(p.A);  // (M, K) or (K, M), raw 2-byte elements
  const uint16_t* gB = static_cast<const uint16_t*>(p.B);  // (N, K) or (K, N)

  auto load_stage = [&](int stage, int k_tile) {
    const int k0 = k_tile * BK;
    uint16_t* sa = smem_a + stage * ATile::kElems;
    uint16_t* sb = smem_b + stage * BTile::kElems;
    if constexpr (kAKMajor) {
      load_tile<BM, BK, Cfg::kThreads, BM>(sa, gA, p.lda, m0, k0, p.M, p.K, 0, p.vec_loads);
    } else {
      load_tile<BK, BM, Cfg::kThreads, BK>(sa, gA, p.lda, k0, m0, p.K, p.M, 0, p.vec_loads);
    }
    if constexpr (kBKMajor) {
      load_tile<Cfg::kBRows, BK, Cfg::kThreads, BN>(sb, gB, p.ldb, n0, k0, p.N, p.K, p.N, p.vec_loads);
    } else {
      load_tile<BK, Cfg::kBRows, Cfg::kThreads, BK>(sb, gB, p.ldb, k0, n0, p.K, p.N, 0, p.vec_loads);
    }
  };

  float acc[H][MI][NI][4];
#pragma unroll
  for (int h = 0; h < H; ++h)
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[h][mi][ni][e] = 0.f;

  const int k_tiles = p.K > 0 ? (p.K - 1) / BK + 1 : 0;
  // Prologue: STAGES - 1 tiles in flight. Every iteration commits one group (possibly empty)
  // so that wait_group<STAGES - 2> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix.x4: lane l addresses row (l % 8) of 8x8 matrix (l / 8).
  const int ld_mat = lane >> 3, ld_row = lane & 7;

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    // Tile kt visible to all warps, and every warp is done reading the stage refilled below.
    __syncthreads();
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, next);
    cp_async_commit();

    const uint16_t* sa = smem_a + (kt % STAGES) * ATile::kElems;
    const uint16_t* sb = smem_b + (kt % STAGES) * BTile::kElems;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      uint32_t a_frag[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        // matrices 0..3 = (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
        const int m = warp_m * Cfg::WM + mi * 16 + (ld_mat & 1) * 8;
        const int k = kk * 16 + (ld_mat >> 1) * 8;
        if constexpr (kAKMajor) {
          ldmatrix_x4<false>(a_frag[mi], sa + ATile::offset(m + ld_row, k / 8));
        } else {
          ldmatrix_x4<true>(a_frag[mi], sa + ATile::offset(k + ld_row, m / 8));
        }
      }
      uint32_t b_frag[H][NI][2];
#pragma unroll
      for (int h = 0; h < H; ++h) {
#pragma unroll
        for (int np = 0; np < NI / 2; ++np) {
          // matrices 0..3 = (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
          const int n = h * BN + warp_n * Cfg::WN + np * 16 + (ld_mat >> 1) * 8;
          const int k = kk * 16 + (ld_mat & 1) * 8;
          uint32_t r[4];
          if constexpr (kBKMajor) {
            ldmatrix_x4<false>(r, sb + BTile::offset(n + ld_row, k / 8));
          } else {
            ldmatrix_x4<true>(r, sb + BTile::offset(k + ld_row, n / 8));
          }
          b_frag[h][2 * np][0] = r[0];
          b_frag[h][2 * np][1] = r[1];
          b_frag[h][2 * np + 1][0] = r[2];
          b_frag[h][2 * np + 1][1] = r[3];
        }
      }
#pragma unroll
      for (int h = 0; h < H; ++h)
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma_m16n8k16<T>(acc[h][mi][ni], a_frag[mi], b_frag[h][ni]);
    }
  }
  cp_async_wait<0>();

  // Accumulator layout of m16n8: c0, c1 at (lane / 4, 2 * (lane % 4) + {0, 1}), c2, c3 eight
  // rows below.
  const int row_base = m0 + warp_m * Cfg::WM + (lane >> 2);
  const int col_base = n0 + warp_n * Cfg::WN + 2 * (lane & 3);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_base + mi * 16 + half * 8;
        const int col = col_base + ni * 8;
        if constexpr (Cfg::kDual) {
          Epi::apply(p, row, col, acc[0][mi][ni][2 * half], acc[0][mi][ni][2 * half + 1],
                     acc[1][mi][ni][2 * half], acc[1][mi][ni][2 * half + 1]);
        } else {
          Epi::apply(p, row, col, acc[0][mi][ni][2 * half], acc[0][mi][ni][2 * half + 1]);
        }
      }
}

}  // namespace ffn
}  // namespace fastattn
