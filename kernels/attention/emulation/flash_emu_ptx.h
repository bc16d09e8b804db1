// CPU emulation of the primitives in flash_ptx.cuh, for verifying the unmodified attention
// kernels on machines without a GPU (tests/test_cuda_attention.py builds flash_emu.cpp with
// g++ and -DFASTATTN_FLASH_PTX_HEADER pointing here).
//
// Every CUDA thread of a block is a fiber on one OS thread. Warp-collective operations
// (ldmatrix, mma, shfl) deposit their operands in a per-warp scratch slot and wait until all
// 32 lanes arrived, so a collective reached by a divergent subset of a warp deadlocks and is
// reported, as are mismatched collectives (lanes at different operations). __syncthreads is a
// barrier over the live fibers. cp.async copies are performed either when issued ("eager") or
// only when a cp.async.wait_group retires them ("deferred"): running both modes exposes a
// missing wait (stale data) and a missing barrier before a buffer is refilled. Shared memory
// starts filled with 0xFF bytes (NaN in fp16 / bf16) so reads of never-written tiles show up.
// Fragment layouts follow the PTX ISA (ldmatrix, mma.m16n8k16), independently of the kernels.
// The runtime also carries what flash_emu_ptx_sm90.h needs: warpgroup collectives (4 warps,
// released like warp collectives), per-thread wgmma groups, and per-16-byte-chunk tracking of
// cp.async data not yet fenced for the async proxy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <setjmp.h>
#include <vector_functions.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#undef __grid_constant__
#define __grid_constant__

namespace fastattn {
namespace emu {

struct Dim3 {
  unsigned x, y, z;
};

enum class Wait { kNone, kWarp, kWarpgroup, kBlock };

enum class Schedule { kRoundRobin = 0, kLowestWarpFirst = 1, kHighestWarpFirst = 2 };

struct Copy {
  uint32_t dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t start;
  jmp_buf ctx;
  std::vector<char> stack;
  bool started = false;
  bool done = false;
  Wait wait = Wait::kNone;
  int tid = 0;
  int parity = 0;                         // scratch slot set of the next warp collective
  int group_parity = 0;                   // same for warpgroup collectives
  std::vector<Copy> open_group;           // cp.async issued, not yet committed
  std::vector<std::vector<Copy>> groups;  // committed, not yet retired
  std::vector<uint32_t> unfenced;         // 16-byte chunks this thread's cp.async wrote (generic proxy)
  // wgmma (flash_emu_ptx_sm90.h): indices into Warpgroup::ops
  bool wgmma_fenced = false;               // wgmma.fence since the last wait_group
  int wgmma_issued = 0;                    // mma_async issued by this thread so far
  std::vector<int> wgmma_open;             // issued, not yet committed
  std::vector<std::vector<int>> wgmma_groups;  // committed, not yet retired
};

// Operands one lane deposits for a warp collective.
struct Slot {
  int op;
  uint32_t u[6];
  float f;
};

struct WarpState {
  int arrived = 0;
  Slot slots[2][32];
};

// Operands one thread deposits for a warpgroup collective (wgmma).
struct GroupSlot {
  int op;
  uint32_t a[4];
  uint64_t desc_a, desc_b;
  int scale_d;
  float* d;
};

struct WarpgroupState;

// One wgmma.mma_async of a warpgroup, executed when a wait_group retires it.
struct WgmmaOp {
  void (*execute)(WgmmaOp&, WarpgroupState&);  // the shape / dtype specific emulation
  int op;
  uint64_t desc_a, desc_b;
  int scale_d;
  bool done = false;
  int chained = -1;                        // earlier op on the same accumulators, in flight at issue
  uint32_t a[128][4];                      // register A operands (RS), captured at issue
  float* d[128];                           // each thread's accumulator registers
  std::vector<float> d_issue, d_out;       // accumulators at issue / after execution, 128 x n
};

struct WarpgroupState {
  int arrived = 0;
  GroupSlot slots[2][128];
  std::vector<WgmmaOp> ops;
};

struct Cta {
  Dim3 block_idx{0, 0, 0};
  int n_threads = 0;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  std::vector<WarpgroupState> warpgroups;
  std::vector<unsigned char> async_stale;  // per 16-byte chunk: written by cp.async, not yet fenced for wgmma
  int block_arrived = 0;
  bool deferred_copies = false;
  Schedule schedule = Schedule::kRoundRobin;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;  // first failure inside a fiber (exceptions cannot cross fibers)
};

inline Cta* g_cta = nullptr;
inline Fiber* g_current = nullptr;
inline jmp_buf g_scheduler;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

inline void yield_to_scheduler() {
  if (_setjmp(g_current->ctx) == 0) _longjmp(g_scheduler, 1);
}

inline void fiber_main() {
  try {
    g_cta->body(g_cta->body_arg);
  } catch (const std::exception& err) {
    if (g_cta->error.empty()) g_cta->error = err.what();
  }
  g_current->done = true;
  _longjmp(g_scheduler, 1);
}

inline int lane_id() { return g_current->tid % 32; }
inline int warp_id() { return g_current->tid / 32; }

inline void perform(const Copy& c) {
  unsigned char* dst = g_cta->smem.data() + c.dst;
  if (c.dst + 16 > g_cta->smem.size() || c.dst % 16 != 0) fail("cp.async destination out of shared memory or misaligned");
  g_cta->async_stale[c.dst / 16] = 1;
  g_current->unfenced.push_back(c.dst / 16);
  if (c.valid) {
    if (reinterpret_cast<uintptr_t>(c.src) % 16 != 0) fail("cp.async source not 16-byte aligned");
    std::memcpy(dst, c.src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}

// Runs one block to completion; reports deadlocks (divergent collectives) as errors.
inline void run_block(Cta& cta) {
  g_cta = &cta;
  cta.error.clear();
  // Fibers (and their stacks) are reused from block to block.
  cta.fibers.resize(cta.n_threads);
  cta.warps.assign((cta.n_threads + 31) / 32, WarpState());
  cta.warpgroups.resize(static_cast<size_t>(cta.n_threads / 128));
  for (WarpgroupState& wg : cta.warpgroups) {
    wg.arrived = 0;
    wg.ops.clear();
  }
  cta.async_stale.assign(cta.smem.size() / 16 + 1, 0);
  cta.block_arrived = 0;
  std::fill(cta.smem.begin(), cta.smem.end(), static_cast<unsigned char>(0xFF));
  constexpr size_t kStack = 256 * 1024;
  for (int t = 0; t < cta.n_threads; ++t) {
    Fiber& f = cta.fibers[t];
    f.tid = t;
    f.started = false;
    f.done = false;
    f.wait = Wait::kNone;
    f.parity = 0;
    f.group_parity = 0;
    f.open_group.clear();
    f.groups.clear();
    f.unfenced.clear();
    f.wgmma_fenced = false;
    f.wgmma_issued = 0;
    f.wgmma_open.clear();
    f.wgmma_groups.clear();
    f.stack.resize(kStack);
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = f.stack.data();
    f.start.uc_stack.ss_size = kStack;
    f.start.uc_link = nullptr;
    makecontext(&f.start, fiber_main, 0);
  }
  const int n_warps = static_cast<int>(cta.warps.size());
  for (;;) {
    bool progressed = false;
    bool all_done = true;
    for (const Fiber& f : cta.fibers) all_done = all_done && f.done;
    if (all_done) break;
    // Which warp(s) run this round: all (lockstep), or only the lowest / highest-numbered warp
    // with a runnable lane, which lets one warp run ahead to the next block barrier and so
    // exposes a shared-memory buffer refilled while another warp still reads it.
    int first = 0, last = n_warps - 1;
    if (cta.schedule != Schedule::kRoundRobin) {
      int chosen = -1;
      for (int i = 0; i < n_warps; ++i) {
        const int w = cta.schedule == Schedule::kLowestWarpFirst ? i : n_warps - 1 - i;
        for (int t = w * 32; t < std::min(cta.n_threads, w * 32 + 32) && chosen < 0; ++t) {
          if (!cta.fibers[t].done && cta.fibers[t].wait == Wait::kNone) chosen = w;
        }
        if (chosen >= 0) break;
      }
      if (chosen >= 0) first = last = chosen;
    }
    for (int t = first * 32; t < std::min(cta.n_threads, last * 32 + 32); ++t) {
      Fiber& f = cta.fibers[t];
      if (f.done || f.wait != Wait::kNone) continue;
      progressed = true;
      g_current = &f;
      if (_setjmp(g_scheduler) == 0) {
        if (!f.started) {
          f.started = true;
          setcontext(&f.start);
        }
        _longjmp(f.ctx, 1);
      }
      if (!cta.error.empty()) fail(cta.error);
    }
    // Release completed barriers.
    int live = 0;
    for (const Fiber& f : cta.fibers) live += f.done ? 0 : 1;
    if (cta.block_arrived > 0 && cta.block_arrived == live) {
      for (Fiber& f : cta.fibers) {
        if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
      }
      cta.block_arrived = 0;
      progressed = true;
    }
    for (size_t w = 0; w < cta.warps.size(); ++w) {
      WarpState& ws = cta.warps[w];
      if (ws.arrived == 0) continue;
      int lanes = 0;
      for (int t = static_cast<int>(w) * 32; t < std::min<int>(cta.n_threads, static_cast<int>(w) * 32 + 32); ++t) {
        lanes += cta.fibers[t].done ? 0 : 1;
      }
      if (ws.arrived == 32 && lanes == 32) {
        for (int t = static_cast<int>(w) * 32; t < static_cast<int>(w) * 32 + 32; ++t) cta.fibers[t].wait = Wait::kNone;
        ws.arrived = 0;
        progressed = true;
      }
    }
    for (size_t w = 0; w < cta.warpgroups.size(); ++w) {
      WarpgroupState& wg = cta.warpgroups[w];
      if (wg.arrived == 0) continue;
      const int first_tid = static_cast<int>(w) * 128;
      int lanes = 0;
      for (int t = first_tid; t < first_tid + 128; ++t) lanes += cta.fibers[t].done ? 0 : 1;
      if (wg.arrived == 128 && lanes == 128) {
        for (int t = first_tid; t < first_tid + 128; ++t) cta.fibers[t].wait = Wait::kNone;
        wg.arrived = 0;
        progressed = true;
      }
    }
    if (!progressed) fail("deadlock: a warp or warpgroup collective or barrier was not reached by every thread");
  }
  for (const Fiber& f : cta.fibers) {
    if (!f.wgmma_open.empty() || !f.wgmma_groups.empty()) fail("the kernel exited with wgmma still in flight");
  }
  g_current = nullptr;
}

// A lane enters a warp collective with operand slot s; returns the slot set to read.
inline Slot* warp_collective(const Slot& s) {
  Fiber& f = *g_current;
  WarpState& ws = g_cta->warps[warp_id()];
  const int par = f.parity;
  f.parity ^= 1;
  ws.slots[par][lane_id()] = s;
  ws.arrived += 1;
  f.wait = Wait::kWarp;
  yield_to_scheduler();
  Slot* all = ws.slots[par];
  for (int l = 0; l < 32; ++l) {
    if (all[l].op != s.op) fail("warp collective mismatch: lanes of one warp are at different operations");
  }
  return all;
}

// A thread enters a warpgroup collective (4 consecutive warps, 128 threads) with slot s;
// returns the slots of the warpgroup.
inline GroupSlot* warpgroup_collective(const GroupSlot& s) {
  Fiber& f = *g_current;
  if (f.tid / 128 >= static_cast<int>(g_cta->warpgroups.size())) fail("warpgroup collective in an incomplete warpgroup");
  WarpgroupState& wg = g_cta->warpgroups[f.tid / 128];
  const int par = f.group_parity;
  f.group_parity ^= 1;
  wg.slots[par][f.tid % 128] = s;
  wg.arrived += 1;
  f.wait = Wait::kWarpgroup;
  yield_to_scheduler();
  GroupSlot* all = wg.slots[par];
  for (int t = 0; t < 128; ++t) {
    if (all[t].op != s.op) fail("warpgroup collective mismatch: threads of one warpgroup are at different operations");
  }
  return all;
}

}  // namespace emu
}  // namespace fastattn

#define threadIdx (::fastattn::emu::Dim3{static_cast<unsigned>(::fastattn::emu::g_current->tid), 0u, 0u})
#define blockIdx (::fastattn::emu::g_cta->block_idx)

namespace fastattn {
namespace flash {

using std::max;
using std::min;

enum EmuOp { kOpLdsm = 1, kOpLdsmT = 2, kOpMmaF16 = 3, kOpMmaBf16 = 4, kOpShfl = 5 };

inline unsigned char* dynamic_smem() { return emu::g_cta->smem.data(); }

inline uint32_t smem_u32(const void* ptr) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  const unsigned char* base = emu::g_cta->smem.data();
  if (p < base || p > base + emu::g_cta->smem.size()) emu::fail("pointer is not in shared memory");
  return static_cast<uint32_t>(p - base);
}

inline void block_sync() {
  emu::Fiber& f = *emu::g_current;
  emu::g_cta->block_arrived += 1;
  f.wait = emu::Wait::kBlock;
  emu::yield_to_scheduler();
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const emu::Copy c{dst, src, valid};
  if (emu::g_cta->deferred_copies) {
    emu::g_current->open_group.push_back(c);
  } else {
    emu::perform(c);
  }
}

inline void cp_async_commit() {
  emu::Fiber& f = *emu::g_current;
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

template <int kPending>
inline void cp_async_wait() {
  emu::Fiber& f = *emu::g_current;
  while (static_cast<int>(f.groups.size()) > kPending) {
    for (const emu::Copy& c : f.groups.front()) emu::perform(c);
    f.groups.erase(f.groups.begin());
  }
}

inline uint16_t smem_u16(uint32_t addr) {
  uint16_t v;
  if (addr % 2 != 0 || addr + 2 > emu::g_cta->smem.size()) emu::fail("ldmatrix read outside shared memory");
  std::memcpy(&v, emu::g_cta->smem.data() + addr, 2);
  return v;
}

// ldmatrix .x4: lane 8i + r gives the address of row r of matrix i (16 contiguous bytes).
inline void ldmatrix_x4_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::Slot s{};
  s.op = trans ? kOpLdsmT : kOpLdsm;
  s.u[0] = addr;
  if (addr % 16 != 0) emu::fail("ldmatrix row address not 16-byte aligned");
  const emu::Slot* all = emu::warp_collective(s);
  const int t = emu::lane_id();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      // row t/4, columns 2(t%4), 2(t%4)+1
      const uint32_t row = all[8 * i + t / 4].u[0];
      lo = smem_u16(row + 2 * (2 * (t % 4)));
      hi = smem_u16(row + 2 * (2 * (t % 4) + 1));
    } else {
      // rows 2(t%4), 2(t%4)+1 of column t/4
      lo = smem_u16(all[8 * i + 2 * (t % 4)].u[0] + 2 * (t / 4));
      hi = smem_u16(all[8 * i + 2 * (t % 4) + 1].u[0] + 2 * (t / 4));
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_x4_impl(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_x4_impl(r, addr, true); }

template <typename T>
inline float emu_b16_to_float(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

template <typename T>
inline float emu_elem(uint32_t reg, int hi) {
  return emu_b16_to_float<T>(static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFFu));
}

// mma.m16n8k16.row.col, fragments per the PTX ISA (g = lane / 4, t = lane % 4):
// A regs {a0: (g, 2t..2t+1), a1: (g+8, 2t..), a2: (g, 2t+8..), a3: (g+8, 2t+8..)},
// B regs {b0: (k 2t..2t+1, n g), b1: (k 2t+8.., n g)}, D {d0,d1: (g, 2t..), d2,d3: (g+8, 2t..)}.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Slot s{};
  s.op = std::is_same<T, __half>::value ? kOpMmaF16 : kOpMmaBf16;
  for (int i = 0; i < 4; ++i) s.u[i] = a[i];
  s.u[4] = b0;
  s.u[5] = b1;
  const emu::Slot* all = emu::warp_collective(s);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    for (int c = 0; c < 2; ++c) {
      A[g][2 * t + c] = emu_elem<T>(all[l].u[0], c);
      A[g + 8][2 * t + c] = emu_elem<T>(all[l].u[1], c);
      A[g][2 * t + 8 + c] = emu_elem<T>(all[l].u[2], c);
      A[g + 8][2 * t + 8 + c] = emu_elem<T>(all[l].u[3], c);
      B[2 * t + c][g] = emu_elem<T>(all[l].u[4], c);
      B[2 * t + 8 + c][g] = emu_elem<T>(all[l].u[5], c);
    }
  }
  const int g = emu::lane_id() / 4, t = emu::lane_id() % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[e] = acc;
  }
}

inline float fast_exp2(float x) { return std::exp2(x); }

inline float fast_rcp(float x) { return 1.f / x; }

inline float shfl_xor(float x, int lane_mask) {
  emu::Slot s{};
  s.op = kOpShfl;
  s.f = x;
  const emu::Slot* all = emu::warp_collective(s);
  return all[emu::lane_id() ^ lane_mask].f;
}

inline int opaque_int(int x) { return x; }

inline void atomic_add_f32(float* addr, float x) { *addr += x; }

}  // namespace flash
}  // namespace fastattn
