// CPU emulation of flash_ptx_sm90.cuh (wgmma, its fences and groups, the async-proxy fence),
// used with flash_emu_ptx.h (-DFASTATTN_FLASH_PTX_SM90_HEADER pointing here).
//
// Follows the PTX ISA, independently of the kernel:
//   * a warpgroup is 4 consecutive warps (threads 128 k .. 128 k + 127); wgmma.* are
//     warpgroup collectives (a divergent or mismatched call deadlocks / fails);
//   * wgmma.mma_async only records the operation (register A operands captured at issue);
//     it executes when a wait_group retires its commit group: shared memory is read then,
//     and only then do the accumulators change, so a missing wait, or a tile overwritten
//     while a wgmma may still read it, gives wrong results; accumulators touched between
//     issue and retirement, a wgmma without a wgmma.fence since the last wait_group,
//     non-uniform descriptors and wgmma still in flight at exit are reported;
//   * operands in shared memory are read only through the descriptor: start address,
//     leading / stride byte offsets and swizzle mode decoded from the bits, element addresses
//     from the canonical K-major / MN-major layouts (cute mma_traits_sm90_gmma.hpp: K-major
//     ((8,m),(T,2)):((W T,SBO),(1,T)), MN-major ((T,W,m),(8,k)):((1,T,LBO),(W T,SBO)) for
//     swizzled modes, the interleaved forms otherwise), then the swizzle Swizzle<B,4,3> on
//     the byte address (bits [4, 4+B) ^= bits [7, 7+B), B = 3 / 2 / 1 for 128 / 64 / 32 B);
//   * shared memory written by cp.async (generic proxy) must be followed by
//     fence.proxy.async from the writing thread before a wgmma reads it;
//   * accumulator fragment of m64nNk16 (fp32): warp w of the warpgroup owns rows 16 w ..
//     16 w + 15, d[4 i + c] = D[16 w + g][8 i + 2 t + c], d[4 i + 2 + c] = D[16 w + g + 8][...]
//     (g = lane / 4, t = lane % 4); register A: the m16n8k16 A fragment of the warp's 16 rows.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastattn {
namespace flash {

enum EmuSm90Op { kOpWgmmaSsF16 = 101, kOpWgmmaSsBf16, kOpWgmmaRsF16, kOpWgmmaRsBf16, kOpWgmmaFence, kOpWgmmaCommit,
                 kOpWgmmaWait, kOpShflLane0 };

inline unsigned char* dynamic_smem_sm90() { return emu::g_cta->smem.data(); }

inline int warp_uniform(int x) {
  emu::Slot s{};
  s.op = kOpShflLane0;
  s.u[0] = static_cast<uint32_t>(x);
  return static_cast<int>(emu::warp_collective(s)[0].u[0]);
}

// Byte address of element (mn, k) of a 16-bit operand described by desc (mn = M or N index).
inline uint32_t emu_desc_address(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFFu) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFFu) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFFu) << 4;
  const uint32_t base_offset = static_cast<uint32_t>((desc >> 49) & 7u);
  const uint32_t mode = static_cast<uint32_t>(desc >> 62);
  if (base_offset != 0) emu::fail("wgmma descriptor: base offset != 0 is not emulated");
  if ((desc >> 46 & 7u) != 0 || (desc >> 52 & 0x3FFu) != 0 || (desc >> 14 & 3u) != 0 || (desc >> 30 & 3u) != 0) {
    emu::fail("wgmma descriptor: reserved bits set");
  }
  const int swizzle_bits = mode == 1 ? 3 : mode == 2 ? 2 : mode == 3 ? 1 : 0;
  const uint32_t row_bytes = 16u << swizzle_bits;  // bytes of one row of the swizzle pattern
  uint32_t off;
  if (!mn_major) {
    off = mode == 0 ? (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo
                    : (mn % 8) * row_bytes + (mn / 8) * sbo + k * 2;
  } else {
    const int per_row = static_cast<int>(row_bytes / 2);  // elements along MN in one pattern row
    off = mode == 0 ? (mn % 8) * 2 + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo
                    : (mn % per_row) * 2 + (mn / per_row) * lbo + (k % 8) * row_bytes + (k / 8) * sbo;
  }
  if (swizzle_bits > 0 && ((start >> 7) & ((1u << swizzle_bits) - 1)) != 0) {
    emu::fail("wgmma descriptor: start address is not in row 0 of the swizzle pattern (base offset 0)");
  }
  const uint32_t addr = start + off;
  return addr ^ (((addr >> 7) & ((1u << swizzle_bits) - 1)) << 4);
}

template <typename T>
inline float emu_desc_element(uint64_t desc, bool mn_major, int mn, int k) {
  const uint32_t addr = emu_desc_address(desc, mn_major, mn, k);
  if (addr + 2 > emu::g_cta->smem.size()) emu::fail("wgmma operand outside shared memory");
  if (emu::g_cta->async_stale[addr / 16]) {
    emu::fail("wgmma reads shared memory written by cp.async without fence.proxy.async by the writer");
  }
  return emu_b16_to_float<T>(smem_u16(addr));
}

// Row / column of accumulator element e of thread t (0..127) of a warpgroup.
inline void emu_acc_coord(int t, int e, int& row, int& col) {
  const int lane = t % 32;
  row = 16 * (t / 32) + lane / 4 + ((e % 4) / 2) * 8;
  col = 8 * (e / 4) + 2 * (lane % 4) + (e % 2);
}

// Row / column of 16-bit element v (register v / 2, half v % 2) of the register A operand
// of thread t: the m16n8k16 A fragment of warp t / 32's 16 rows.
inline void emu_a_coord(int t, int v, int& row, int& col) {
  const int lane = t % 32, reg = v / 2;
  row = 16 * (t / 32) + lane / 4 + (reg % 2) * 8;
  col = 2 * (lane % 4) + (v % 2) + (reg / 2) * 8;
}

template <typename T, int N, int kTransB>
inline void emu_execute(emu::WgmmaOp& op, emu::WarpgroupState& wg) {
  constexpr int kRegs = N / 2;
  // The accumulators must be what they were at issue (or what the previous in-flight wgmma on
  // them produced).
  const std::vector<float>& expect = op.chained >= 0 ? wg.ops[op.chained].d_out : op.d_issue;
  for (int t = 0; t < 128; ++t) {
    if (std::memcmp(op.d[t], expect.data() + t * kRegs, kRegs * sizeof(float)) != 0) {
      emu::fail("wgmma accumulator registers modified while the wgmma was in flight");
    }
  }
  static float A[64][16], B[16][N], D[64][N];
  const bool rs = op.op == kOpWgmmaRsF16 || op.op == kOpWgmmaRsBf16;
  for (int t = 0; t < 128; ++t) {
    for (int e = 0; e < kRegs; ++e) {
      int r, c;
      emu_acc_coord(t, e, r, c);
      D[r][c] = op.scale_d ? op.d[t][e] : 0.f;
    }
    if (rs) {
      for (int v = 0; v < 8; ++v) {
        int r, c;
        emu_a_coord(t, v, r, c);
        A[r][c] = emu_elem<T>(op.a[t][v / 2], v % 2);
      }
    }
  }
  if (!rs) {
    for (int m = 0; m < 64; ++m) {
      for (int k = 0; k < 16; ++k) A[m][k] = emu_desc_element<T>(op.desc_a, false, m, k);
    }
  }
  for (int k = 0; k < 16; ++k) {
    for (int n = 0; n < N; ++n) B[k][n] = emu_desc_element<T>(op.desc_b, kTransB == 1, n, k);
  }
  for (int m = 0; m < 64; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = D[m][n];
      for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
      D[m][n] = acc;
    }
  }
  if (op.chained >= 0) std::vector<float>().swap(wg.ops[op.chained].d_out);
  std::vector<float>().swap(op.d_issue);
  op.d_out.resize(128 * kRegs);
  for (int t = 0; t < 128; ++t) {
    for (int e = 0; e < kRegs; ++e) {
      int r, c;
      emu_acc_coord(t, e, r, c);
      op.d[t][e] = D[r][c];
      op.d_out[t * kRegs + e] = D[r][c];
    }
  }
  op.done = true;
}

template <typename T, int N, int kTransB>
inline void emu_wgmma_issue(int op_code, float* d, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, int scale_d) {
  emu::Fiber& f = *emu::g_current;
  if (!f.wgmma_fenced) emu::fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
  emu::GroupSlot s{};
  s.op = op_code;
  for (int i = 0; i < 4; ++i) s.a[i] = a == nullptr ? 0u : a[i];
  s.desc_a = desc_a;
  s.desc_b = desc_b;
  s.scale_d = scale_d;
  s.d = d;
  const emu::GroupSlot* all = emu::warpgroup_collective(s);
  emu::WarpgroupState& wg = emu::g_cta->warpgroups[f.tid / 128];
  const int index = f.wgmma_issued++;
  if (index == static_cast<int>(wg.ops.size())) {
    emu::WgmmaOp op;
    op.execute = &emu_execute<T, N, kTransB>;
    op.op = op_code;
    op.desc_a = all[0].desc_a;
    op.desc_b = all[0].desc_b;
    op.scale_d = all[0].scale_d;
    op.d_issue.resize(128 * (N / 2));
    for (int t = 0; t < 128; ++t) {
      if (all[t].desc_a != op.desc_a || all[t].desc_b != op.desc_b || all[t].scale_d != op.scale_d) {
        emu::fail("wgmma descriptors / scale-d differ across the warpgroup");
      }
      std::memcpy(op.a[t], all[t].a, sizeof(op.a[t]));
      op.d[t] = all[t].d;
      std::memcpy(op.d_issue.data() + t * (N / 2), all[t].d, (N / 2) * sizeof(float));
    }
    for (int j = static_cast<int>(wg.ops.size()) - 1; j >= 0; --j) {
      if (wg.ops[j].d[0] == op.d[0]) {
        if (!wg.ops[j].done) op.chained = j;
        break;
      }
    }
    static_assert(N == 64 || N == 80 || N == 128 || N == 256, "the shapes of flash_ptx_sm90.cuh");
    wg.ops.push_back(std::move(op));
  } else if (wg.ops[index].op != op_code) {
    emu::fail("wgmma issued out of order within the warpgroup");
  }
  f.wgmma_open.push_back(index);
}

template <typename T, int N, int kTransB>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  emu_wgmma_issue<T, N, kTransB>(std::is_same<T, __half>::value ? kOpWgmmaSsF16 : kOpWgmmaSsBf16, d, nullptr, desc_a,
                                 desc_b, scale_d);
}

template <typename T, int N, int kTransB>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  emu_wgmma_issue<T, N, kTransB>(std::is_same<T, __half>::value ? kOpWgmmaRsF16 : kOpWgmmaRsBf16, d, a, 0, desc_b,
                                 scale_d);
}

inline void wgmma_fence() {
  emu::GroupSlot s{};
  s.op = kOpWgmmaFence;
  emu::warpgroup_collective(s);
  emu::g_current->wgmma_fenced = true;
}

inline void wgmma_commit() {
  emu::GroupSlot s{};
  s.op = kOpWgmmaCommit;
  emu::warpgroup_collective(s);
  emu::Fiber& f = *emu::g_current;
  f.wgmma_groups.push_back(std::move(f.wgmma_open));
  f.wgmma_open.clear();
}

template <int kPending>
inline void wgmma_wait() {
  emu::GroupSlot s{};
  s.op = kOpWgmmaWait;
  s.scale_d = kPending;
  emu::warpgroup_collective(s);
  emu::Fiber& f = *emu::g_current;
  emu::WarpgroupState& wg = emu::g_cta->warpgroups[f.tid / 128];
  while (static_cast<int>(f.wgmma_groups.size()) > kPending) {
    for (int index : f.wgmma_groups.front()) {
      if (!wg.ops[index].done) wg.ops[index].execute(wg.ops[index], wg);
    }
    f.wgmma_groups.erase(f.wgmma_groups.begin());
  }
  f.wgmma_fenced = false;
}

inline void fence_proxy_async_smem() {
  emu::Fiber& f = *emu::g_current;
  for (uint32_t chunk : f.unfenced) emu::g_cta->async_stale[chunk] = 0;
  f.unfenced.clear();
}

template <int N>
inline void wgmma_fence_regs(float (&)[N]) {}

template <int N>
inline void wgmma_fence_regs(uint32_t (&)[N]) {}

}  // namespace flash
}  // namespace fastattn
