// Host emulation of the CUDA execution model, to run kernels/ device code on a CPU in tests
// (no GPU needed). Every CUDA thread of a block is a fiber (ucontext) on the calling OS thread;
// fibers run round-robin and switch only at barriers, blocks run one after the other.
// __syncthreads is a block barrier; a warp shuffle writes its value to a per-warp buffer, waits
// for the 32 lanes, reads, and waits again. Include it BEFORE any kernel header, compile with
// a host C++17 compiler (g++ -I<cuda include>), and launch with fastattn_emu::emulate_launch().
//
// Scope: the intrinsics the fastattn kernels use (threadIdx/blockIdx/blockDim/gridDim,
// __syncthreads, __shfl_xor_sync on float, rsqrtf, __shared__ arrays). Warps must keep their
// 32 lanes converged around shuffles, as the kernels require on hardware anyway. Exited
// threads stop counting at barriers (as on sm_70+). Not thread-safe: one launch at a time.
#pragma once

#include <cuda_runtime_api.h>
#include <ucontext.h>
#include <vector_functions.h>

#include <cmath>
#include <cstddef>
#include <functional>
#include <vector>

// Block-shared storage: one instance per kernel instantiation, valid because blocks run
// sequentially.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace fastattn_emu {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  uint3 thread_index;
  bool done = false;
};

struct Launch {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<Barrier> warp_barriers;
  std::vector<float> warp_buffers;  // 32 per warp
  Barrier block_barrier;
  const std::function<void()>* body = nullptr;
  int current = 0;
};

inline Launch* g_launch = nullptr;

inline void yield_to_scheduler() {
  Launch& l = *g_launch;
  swapcontext(&l.fibers[l.current].context, &l.scheduler);
}

inline void arrive_and_wait(Barrier& b) {
  const unsigned generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield_to_scheduler();
}

inline void arrive_and_drop(Barrier& b) {
  --b.expected;
  if (b.arrived > 0 && b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void fiber_main() {
  Launch& l = *g_launch;
  const int self = l.current;
  (*l.body)();
  arrive_and_drop(l.block_barrier);
  arrive_and_drop(l.warp_barriers[self / 32]);
  l.fibers[self].done = true;
}  // returns to the scheduler through uc_link

// Runs body() as the kernel for every block of `grid` with `block` threads per block.
inline void emulate_launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  constexpr std::size_t kStackBytes = 64 * 1024;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  const int warps = (threads + 31) / 32;
  Launch launch;
  launch.body = &body;
  launch.fibers.resize(threads);
  for (auto& f : launch.fibers) f.stack.resize(kStackBytes);
  g_launch = &launch;
  blockDim = block;
  gridDim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = make_uint3(bx, by, bz);
        launch.block_barrier = Barrier{threads, 0, 0};
        launch.warp_barriers.assign(warps, Barrier{});
        for (int w = 0; w < warps; ++w) launch.warp_barriers[w].expected = (w + 1) * 32 <= threads ? 32 : threads % 32;
        launch.warp_buffers.assign(32 * warps, 0.f);
        for (int t = 0; t < threads; ++t) {
          Fiber& f = launch.fibers[t];
          f.done = false;
          f.thread_index = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = &launch.scheduler;
          makecontext(&f.context, fiber_main, 0);
        }
        int live = threads;
        while (live > 0) {
          live = 0;
          for (int t = 0; t < threads; ++t) {
            if (launch.fibers[t].done) continue;
            launch.current = t;
            threadIdx = launch.fibers[t].thread_index;
            swapcontext(&launch.scheduler, &launch.fibers[t].context);
            live += launch.fibers[t].done ? 0 : 1;
          }
        }
      }
    }
  }
  g_launch = nullptr;
}

}  // namespace fastattn_emu

inline void __syncthreads() { fastattn_emu::arrive_and_wait(fastattn_emu::g_launch->block_barrier); }

inline float __shfl_xor_sync(unsigned /*mask*/, float value, int lane_mask) {
  fastattn_emu::Launch& l = *fastattn_emu::g_launch;
  const int self = l.current;
  const int warp = self / 32, lane = self % 32;
  float* buffer = l.warp_buffers.data() + 32 * warp;
  buffer[lane] = value;
  fastattn_emu::arrive_and_wait(l.warp_barriers[warp]);
  const float other = buffer[lane ^ lane_mask];
  fastattn_emu::arrive_and_wait(l.warp_barriers[warp]);  // nobody overwrites before all have read
  return other;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
