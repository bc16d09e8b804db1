// Counter-based dropout randomness shared by every CUDA kernel of fastattn.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), the
// generator of curand's Philox4_32_10 and of triton.language.random, written out here because
// the toolkit on build machines may lack the curand headers.
//
// Keep decision of element e (a 64-bit linear index into the logical tensor, independent of
// strides) under RngState(seed, offset):
//     bits = philox(key = (seed, 0), counter = (lo32(e / 4), hi32(e / 4), offset, 0))[e % 4]
//     keep = bits >= threshold(p)          with threshold(p) = round(p * 2^32), saturated,
//     done for p in double precision
// It is a pure function of (seed, offset, e), so forward and backward, and every kernel variant
// (vectorised or scalar), regenerate the same mask. One Philox call yields the bits of four
// consecutive elements. The Triton equivalent is
//     triton.language.random.philox(seed, e // 4 (lo, hi), offset, 0)[e % 4] >= threshold.
#pragma once

#include <vector_functions.h>
#include <vector_types.h>

#include <cstdint>

namespace fastattn {

struct PhiloxKey {
  uint32_t k0, k1;
};

struct PhiloxCounter {
  uint32_t c0, c1, c2, c3;
};

// The 10-round Philox4x32 bijection: four 32-bit outputs for one 128-bit counter.
__host__ __device__ __forceinline__ uint4 philox4x32_10(PhiloxCounter c, PhiloxKey k) {
  constexpr uint32_t kMulA = 0xD2511F53u;
  constexpr uint32_t kMulB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u;
  constexpr uint32_t kKeyB = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_a = static_cast<uint64_t>(kMulA) * c.c0;
    const uint64_t prod_b = static_cast<uint64_t>(kMulB) * c.c2;
    const uint32_t hi_a = static_cast<uint32_t>(prod_a >> 32), lo_a = static_cast<uint32_t>(prod_a);
    const uint32_t hi_b = static_cast<uint32_t>(prod_b >> 32), lo_b = static_cast<uint32_t>(prod_b);
    c = PhiloxCounter{hi_b ^ c.c1 ^ k.k0, lo_b, hi_a ^ c.c3 ^ k.k1, lo_a};
    k.k0 += kKeyA;
    k.k1 += kKeyB;
  }
  return make_uint4(c.c0, c.c1, c.c2, c.c3);
}

// Random bits of the four elements 4*group .. 4*group+3.
__host__ __device__ __forceinline__ uint4 dropout_bits4(uint64_t seed, uint64_t offset, uint64_t group) {
  const PhiloxKey key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  const PhiloxCounter ctr{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                          static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  return philox4x32_10(ctr, key);
}

__host__ __device__ __forceinline__ uint32_t uint4_lane(const uint4& v, int lane) {
  return lane == 0 ? v.x : lane == 1 ? v.y : lane == 2 ? v.z : v.w;
}

// Integer threshold so that P(bits < threshold) = p up to 2^-32: compared as integers, the
// decision is exact and identical on every architecture. Computed on the host from the
// double-precision p (fastattn/cuda/philox.py mirrors it).
inline uint32_t dropout_threshold(double p) {
  const double scaled = p * 4294967296.0;
  if (scaled <= 0.0) return 0u;
  if (scaled >= 4294967295.0) return 0xFFFFFFFFu;
  return static_cast<uint32_t>(scaled + 0.5);
}

// Keep decision of one element (scalar paths).
__host__ __device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t e,
                                                      uint32_t threshold) {
  return uint4_lane(dropout_bits4(seed, offset, e >> 2), static_cast<int>(e & 3)) >= threshold;
}

// Keep decisions of kN consecutive elements starting at e0, with e0 % 4 == 0 and kN % 4 == 0
// (vectorised paths): kN / 4 Philox calls.
template <int kN>
__device__ __forceinline__ void dropout_keep_n(uint64_t seed, uint64_t offset, uint64_t e0,
                                               uint32_t threshold, bool (&keep)[kN]) {
  static_assert(kN % 4 == 0, "vectorised dropout needs groups of four elements");
#pragma unroll
  for (int g = 0; g < kN / 4; ++g) {
    const uint4 bits = dropout_bits4(seed, offset, (e0 >> 2) + g);
    keep[4 * g + 0] = bits.x >= threshold;
    keep[4 * g + 1] = bits.y >= threshold;
    keep[4 * g + 2] = bits.z >= threshold;
    keep[4 * g + 3] = bits.w >= threshold;
  }
}

}  // namespace fastattn
