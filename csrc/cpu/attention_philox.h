// Dropout keep decisions of the CPU attention kernels: the same bits as the Triton backend
// (fastattn/triton/attention.py, module docstring), so one RngState gives one mask on both.
//
// keep(b, h, i, j): one Philox4x32-10 call, key (seed lo, seed hi), counter
// (gj, gi, b * H + h, offset) with gi = (i / 16) * 8 + i % 8 (gj likewise), serves the 2 x 2
// group of queries {i, i + 8} x keys {j, j + 8}; element (i, j) takes word
// 2 * ((i / 8) % 2) + (j / 8) % 2, read as a uniform like tl.uint_to_uniform_float
// (non-negative int32, negatives mirrored by ~x, times 2^-31 in fp32) and kept iff >= p.
#pragma once

#include <cstdint>

namespace fastattn_cpu {

struct PhiloxWords {
  uint32_t w[4];
};

inline PhiloxWords philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xCD9E8D57u} * c2;
    const uint64_t p1 = uint64_t{0xD2511F53u} * c0;
    c0 = static_cast<uint32_t>(p0 >> 32) ^ c1 ^ k0;
    c1 = static_cast<uint32_t>(p0);
    c2 = static_cast<uint32_t>(p1 >> 32) ^ c3 ^ k1;
    c3 = static_cast<uint32_t>(p1);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// tl.uint_to_uniform_float for 32-bit words.
inline float uint_to_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Fills keep[r * ld + c] (1 = kept, 0 = dropped) for queries [i0, i0 + rows) x keys
// [j0, j0 + cols) of head bh. Calls Philox once per 2 x 2 group that touches the tile.
inline void dropout_keep_tile(uint64_t seed, uint32_t offset, uint32_t bh, int64_t i0, int64_t rows,
                              int64_t j0, int64_t cols, float p, uint8_t* keep, int64_t ld) {
  const int64_t i1 = i0 + rows, j1 = j0 + cols;
  for (int64_t band_i = i0 / 16; band_i * 16 < i1; ++band_i) {
    for (int64_t u = 0; u < 8; ++u) {
      const int64_t qi[2] = {band_i * 16 + u, band_i * 16 + u + 8};
      const bool row_in[2] = {qi[0] >= i0 && qi[0] < i1, qi[1] >= i0 && qi[1] < i1};
      if (!row_in[0] && !row_in[1]) continue;
      const uint32_t gi = static_cast<uint32_t>(band_i * 8 + u);
      for (int64_t band_j = j0 / 16; band_j * 16 < j1; ++band_j) {
        for (int64_t t = 0; t < 8; ++t) {
          const int64_t kj[2] = {band_j * 16 + t, band_j * 16 + t + 8};
          const bool col_in[2] = {kj[0] >= j0 && kj[0] < j1, kj[1] >= j0 && kj[1] < j1};
          if (!col_in[0] && !col_in[1]) continue;
          const uint32_t gj = static_cast<uint32_t>(band_j * 8 + t);
          const PhiloxWords words = philox4x32_10(gj, gi, bh, offset, seed);
          for (int s = 0; s < 2; ++s) {
            if (!row_in[s]) continue;
            for (int h = 0; h < 2; ++h) {
              if (!col_in[h]) continue;
              keep[(qi[s] - i0) * ld + (kj[h] - j0)] = uint_to_uniform(words.w[2 * s + h]) >= p ? 1 : 0;
            }
          }
        }
      }
    }
  }
}

}  // namespace fastattn_cpu
