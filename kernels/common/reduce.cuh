// Deterministic sums across a warp and across the warps of a row (fixed reduction order, so
// the same inputs give bit-identical results on every run).
#pragma once

namespace fastattn {

__device__ __forceinline__ float warp_allreduce_sum(float v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// Sum over the kWarps warps that share one row; every thread of those warps gets the result.
// With kWarps > 1 the block must hold exactly that one row (every thread calls this; it
// synchronises) and `smem` holds kWarps floats.
template <int kWarps>
__device__ __forceinline__ float row_allreduce_sum(float v, float* smem) {
  v = warp_allreduce_sum(v);
  if constexpr (kWarps == 1) {
    return v;
  } else {
    const int lane = threadIdx.x % 32;
    const int warp = (threadIdx.x / 32) % kWarps;
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += smem[w];
    __syncthreads();  // smem may be reused by the next reduction
    return total;
  }
}

// Two sums at once (one synchronisation instead of two).
template <int kWarps>
__device__ __forceinline__ float2 row_allreduce_sum2(float a, float b, float2* smem) {
  a = warp_allreduce_sum(a);
  b = warp_allreduce_sum(b);
  if constexpr (kWarps == 1) {
    return make_float2(a, b);
  } else {
    const int lane = threadIdx.x % 32;
    const int warp = (threadIdx.x / 32) % kWarps;
    if (lane == 0) smem[warp] = make_float2(a, b);
    __syncthreads();
    float2 total = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      total.x += smem[w].x;
      total.y += smem[w].y;
    }
    __syncthreads();
    return total;
  }
}

}  // namespace fastattn
