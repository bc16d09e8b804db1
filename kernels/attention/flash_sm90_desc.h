// Shared-memory matrix descriptors of wgmma and the 128-byte-swizzled tile layout they
// describe (kernel side; emulation/flash_emu_ptx_sm90.h decodes descriptors independently).
//
// Descriptor (PTX ISA "Matrix Descriptor Format", cute::GmmaDescriptor): bits 0-13 start
// address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4, 49-51 base
// offset, 62-63 swizzle mode (0 none, 1 128B, 2 64B, 3 32B).
//
// Tiles: a (kRows x kCols) 16-bit tile is stored as kCols / 64 column blocks of kRows x 128
// bytes; inside a block row r is 128 bytes at r * 128 and its 16-byte chunk c sits at chunk
// position c ^ (r % 8) (cute Swizzle<3,4,3> on byte addresses, blocks 1024-byte aligned). The
// same bytes are then
//   * K-major (cute Layout_K_SW128_Atom, rows = M or N, columns = K): SBO = 1024 (next 8 rows),
//     LBO unused (1), the k-th 16-column step inside a block at start + 32 k;
//   * MN-major (cute Layout_MN_SW128_Atom, rows = K, columns = N): SBO = 1024 (next 8 rows of
//     K), LBO = kRows * 128 (next 64 columns of N), the k-th 16-row step at start + 2048 k.
#pragma once

#include <cstdint>

namespace fastattn {
namespace flash {

enum class SmemSwizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

__host__ __device__ constexpr uint64_t make_smem_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                      SmemSwizzle swizzle) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFFu) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) |
         (static_cast<uint64_t>(static_cast<uint32_t>(swizzle)) << 62);
}

// Advances a descriptor's start address by a byte offset (multiple of 16, no carry out of the
// 14-bit field: shared-memory addresses are below 256 KiB).
__host__ __device__ constexpr uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// Byte offset of 16-byte chunk c (columns 8 c .. 8 c + 7) of row r in the swizzled tile above.
template <int kRows>
__host__ __device__ constexpr uint32_t sw128_chunk_offset(int r, int c) {
  return static_cast<uint32_t>((c / 8) * kRows * 128 + r * 128 + (((c % 8) ^ (r % 8)) << 4));
}

}  // namespace flash
}  // namespace fastattn
