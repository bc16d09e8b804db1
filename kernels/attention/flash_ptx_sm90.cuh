// The sm_90a (Hopper) primitives of the wgmma forward kernel, one inline-PTX wrapper each:
// warpgroup MMA (wgmma.mma_async, SS and RS forms), wgmma.fence / commit_group / wait_group and
// the generic -> async proxy fence that makes cp.async data visible to wgmma.
//
// As for flash_ptx.cuh, emulation/flash_emu_ptx_sm90.h provides the same functions on the CPU
// (the kernel includes FASTATTN_FLASH_PTX_SM90_HEADER instead when it is defined). The
// shared-memory matrix descriptors are built by flash_sm90_desc.h; the emulation decodes them
// on its own.
//
// wgmma exists only on sm_90a: on other targets every wrapper compiles to a trap, and the
// launcher never starts the kernel there (flash_fwd_sm90_launch_template.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTATTN_SM90A 1
#endif

namespace fastattn {
namespace flash {

// Dynamic shared memory aligned to the 1024-byte period of the 128-byte swizzle, so a tile
// placed at a multiple of 1024 starts at row 0 of the swizzle pattern (descriptor base offset 0).
__device__ __forceinline__ unsigned char* dynamic_smem_sm90() {
  extern __shared__ __align__(1024) unsigned char flash_smem_sm90[];
  return flash_smem_sm90;
}

// x of lane 0. Marks a value as warp-uniform for the compiler, so what derives from it (the
// warpgroup's descriptors) can live in uniform registers instead of per-thread ones.
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

// Orders this warpgroup's register accesses before the wgmma that follow: needed before the
// first wgmma and whenever the accumulators or the A registers were touched since the last one.
__device__ __forceinline__ void wgmma_fence() {
#ifdef FASTATTN_SM90A
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Closes the group of wgmma issued since the previous commit.
__device__ __forceinline__ void wgmma_commit() {
#ifdef FASTATTN_SM90A
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most kPending committed wgmma groups of this warpgroup are in flight; only
// then are their accumulators (and the registers / shared memory they read) usable again.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef FASTATTN_SM90A
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#else
  __trap();
#endif
}

// Writes through the generic proxy (st.shared, cp.async) become visible to the async proxy
// (wgmma operand reads) only after this fence by the writing thread, followed by a barrier.
__device__ __forceinline__ void fence_proxy_async_smem() {
#ifdef FASTATTN_SM90A
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

// Keeps the compiler from moving accesses of accumulators / A registers across the
// asynchronous wgmma window, and from reusing A registers inside it (the asm statements above
// only order memory, not registers): called on them after wgmma_wait.
template <int N>
__device__ __forceinline__ void wgmma_fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int N>
__device__ __forceinline__ void wgmma_fence_regs(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

#define FASTATTN_F8(d, i)                                                                                     \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define FASTATTN_F32(d) FASTATTN_F8(d, 0), FASTATTN_F8(d, 8), FASTATTN_F8(d, 16), FASTATTN_F8(d, 24)
#define FASTATTN_F40(d) FASTATTN_F32(d), FASTATTN_F8(d, 32)
#define FASTATTN_F64(d) FASTATTN_F32(d), FASTATTN_F8(d, 32), FASTATTN_F8(d, 40), FASTATTN_F8(d, 48), FASTATTN_F8(d, 56)
#define FASTATTN_F128(d)                                                                                      \
  FASTATTN_F64(d), FASTATTN_F8(d, 64), FASTATTN_F8(d, 72), FASTATTN_F8(d, 80), FASTATTN_F8(d, 88),              \
      FASTATTN_F8(d, 96), FASTATTN_F8(d, 104), FASTATTN_F8(d, 112), FASTATTN_F8(d, 120)
#define FASTATTN_D32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTATTN_D40 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"
#define FASTATTN_D64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, " \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, " \
  "%62, %63}"
#define FASTATTN_D128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
  "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, " \
  "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, " \
  "%62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, " \
  "%82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, " \
  "%102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, " \
  "%119, %120, %121, %122, %123, %124, %125, %126, %127}"

// D(64 x N, fp32) = A(64 x 16) * B(16 x N) (+ D when scale_d != 0), A and B in shared memory
// (descriptors), A K-major; kTransB = 0: B K-major, 1: B MN-major. Accumulator layout (PTX
// ISA, wgmma D fragments): warp w of the warpgroup owns rows 16 w .. 16 w + 15; with
// g = lane / 4, t = lane % 4: d[4 i + c] = D[16 w + g][8 i + 2 t + c],
// d[4 i + 2 + c] = D[16 w + g + 8][8 i + 2 t + c] (the m16n8 fragment per 8-column chunk i).
#define FASTATTN_WGMMA_SS(SHAPE, TYPE, DSTR, DOUT, DESCS, SCALE, TRANS)                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                          \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " DSTR ", " DESCS ", p, 1, 1, 0, " \
               TRANS ";\n}\n"                                                                              \
               : DOUT                                                                                     \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransB))

// Same with A (64 x 16) from registers, per warp the mma.m16n8k16 A fragment of its 16 rows:
// a[0] = A[16 w + g][2 t..], a[1] = A[16 w + g + 8][2 t..], a[2] = A[16 w + g][2 t + 8..],
// a[3] = A[16 w + g + 8][2 t + 8..].
#define FASTATTN_WGMMA_RS(SHAPE, TYPE, DSTR, DOUT, AREGS, DESC, SCALE, TRANS)                              \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                          \
               "wgmma.mma_async.sync.aligned." SHAPE ".f32." TYPE "." TYPE " " DSTR ", " AREGS ", " DESC     \
               ", p, 1, 1, " TRANS ";\n}\n"                                                                \
               : DOUT                                                                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB))

// Instantiated shapes: N = 64 / 128 (S and O of head dims <= 128), 80 / 256 (S and O of 256).
template <typename T, int N, int kTransB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 80 || N == 128 || N == 256, "instantiated shapes: m64n{64,80,128,256}k16");
#ifdef FASTATTN_SM90A
  if constexpr (N == 64 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_SS("m64n64k16", "f16", FASTATTN_D32, FASTATTN_F32(d), "%32, %33", "%34", "%35");
  } else if constexpr (N == 64) {
    FASTATTN_WGMMA_SS("m64n64k16", "bf16", FASTATTN_D32, FASTATTN_F32(d), "%32, %33", "%34", "%35");
  } else if constexpr (N == 80 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_SS("m64n80k16", "f16", FASTATTN_D40, FASTATTN_F40(d), "%40, %41", "%42", "%43");
  } else if constexpr (N == 80) {
    FASTATTN_WGMMA_SS("m64n80k16", "bf16", FASTATTN_D40, FASTATTN_F40(d), "%40, %41", "%42", "%43");
  } else if constexpr (N == 128 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_SS("m64n128k16", "f16", FASTATTN_D64, FASTATTN_F64(d), "%64, %65", "%66", "%67");
  } else if constexpr (N == 128) {
    FASTATTN_WGMMA_SS("m64n128k16", "bf16", FASTATTN_D64, FASTATTN_F64(d), "%64, %65", "%66", "%67");
  } else if constexpr (N == 256 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_SS("m64n256k16", "f16", FASTATTN_D128, FASTATTN_F128(d), "%128, %129", "%130", "%131");
  } else if constexpr (N == 256) {
    FASTATTN_WGMMA_SS("m64n256k16", "bf16", FASTATTN_D128, FASTATTN_F128(d), "%128, %129", "%130", "%131");
  }
#else
  __trap();
#endif
}

template <typename T, int N, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 80 || N == 128 || N == 256, "instantiated shapes: m64n{64,80,128,256}k16");
#ifdef FASTATTN_SM90A
  if constexpr (N == 64 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_RS("m64n64k16", "f16", FASTATTN_D32, FASTATTN_F32(d), "{%32, %33, %34, %35}", "%36",
                      "%37", "%38");
  } else if constexpr (N == 64) {
    FASTATTN_WGMMA_RS("m64n64k16", "bf16", FASTATTN_D32, FASTATTN_F32(d), "{%32, %33, %34, %35}", "%36",
                      "%37", "%38");
  } else if constexpr (N == 80 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_RS("m64n80k16", "f16", FASTATTN_D40, FASTATTN_F40(d), "{%40, %41, %42, %43}", "%44",
                      "%45", "%46");
  } else if constexpr (N == 80) {
    FASTATTN_WGMMA_RS("m64n80k16", "bf16", FASTATTN_D40, FASTATTN_F40(d), "{%40, %41, %42, %43}", "%44",
                      "%45", "%46");
  } else if constexpr (N == 128 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_RS("m64n128k16", "f16", FASTATTN_D64, FASTATTN_F64(d), "{%64, %65, %66, %67}", "%68",
                      "%69", "%70");
  } else if constexpr (N == 128) {
    FASTATTN_WGMMA_RS("m64n128k16", "bf16", FASTATTN_D64, FASTATTN_F64(d), "{%64, %65, %66, %67}", "%68",
                      "%69", "%70");
  } else if constexpr (N == 256 && std::is_same<T, __half>::value) {
    FASTATTN_WGMMA_RS("m64n256k16", "f16", FASTATTN_D128, FASTATTN_F128(d), "{%128, %129, %130, %131}", "%132",
                      "%133", "%134");
  } else if constexpr (N == 256) {
    FASTATTN_WGMMA_RS("m64n256k16", "bf16", FASTATTN_D128, FASTATTN_F128(d), "{%128, %129, %130, %131}", "%132",
                      "%133", "%134");
  }
#else
  __trap();
#endif
}

#undef FASTATTN_WGMMA_SS
#undef FASTATTN_WGMMA_RS
#undef FASTATTN_D32
#undef FASTATTN_D40
#undef FASTATTN_D64
#undef FASTATTN_D128
#undef FASTATTN_F32
#undef FASTATTN_F40
#undef FASTATTN_F64
#undef FASTATTN_F128
#undef FASTATTN_F8

}  // namespace flash
}  // namespace fastattn
