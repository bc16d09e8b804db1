// Cross-check of the sm_90a forward kernel's shared-memory layouts and wgmma descriptors
// against CUTLASS / CuTe (tests/test_cuda_attention.py builds it with g++ against the headers
// of the nvidia-cutlass wheel and runs it; exit code 0 = everything agrees).
//
// Three parties must agree on where element (row, col) of a tile lives: the kernel's cp.async
// writer (flash_sm90_desc.h sw128_chunk_offset), the descriptors the kernel builds
// (make_smem_desc / desc_advance, as flash_fwd_sm90_kernel.cuh uses them), and the emulator's
// descriptor decoder (emulation/flash_emu_ptx_sm90.h emu_desc_address). CuTe is the reference:
// GMMA::Layout_K_SW128_Atom / Layout_MN_SW128_Atom tiled to the kernel's tile shapes give the
// byte address of every element (the swizzle applied to the pointer), and make_gmma_desc gives
// the descriptor bits of every k-step slice the kernel feeds to wgmma. The register fragments
// the emulator assumes (accumulator D, register A) are compared with cute's CLayout / ALayout.
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdio>

#include "flash_emu_ptx.h"
#include "../flash_sm90_desc.h"
#include "flash_emu_ptx_sm90.h"

namespace {

using namespace cute;
using fastattn::flash::desc_advance;
using fastattn::flash::emu_desc_address;
using fastattn::flash::make_smem_desc;
using fastattn::flash::SmemSwizzle;
using fastattn::flash::sw128_chunk_offset;

alignas(1024) half_t g_buf[256 * 128];
int g_failures = 0;

void expect(bool ok, const char* what, int a, int b, int c) {
  if (!ok && g_failures++ < 20) std::printf("MISMATCH %s (%d, %d, %d)\n", what, a, b, c);
}

template <class Tensor>
long byte_offset(const Tensor& t, int i, int j) {
  return static_cast<long>(reinterpret_cast<const char*>(raw_pointer_cast(&t(i, j))) -
                           reinterpret_cast<const char*>(g_buf));
}

// CuTe's descriptor of a slice; its start address is computed here (cast_smem_ptr_to_uint does
// not exist on the host), as the slice pointer's offset from the 1024-aligned buffer.
template <SM90::GMMA::Major kMajor, class Slice>
uint64_t cute_desc(const Slice& slice) {
  GmmaDescriptor d = SM90::GMMA::make_gmma_desc<kMajor>(slice);
  const long start = reinterpret_cast<const char*>(raw_pointer_cast(slice.data())) - reinterpret_cast<const char*>(g_buf);
  d.bitfield.start_address_ = static_cast<uint16_t>(start >> 4);
  return d.desc_;
}

// Q / K: (kRows, kCols) K-major tiles (rows = M or N, columns = the head dim = K), read in
// slabs of kSlab rows (64 for one warpgroup's Q rows, all kRows for K as the B operand).
template <int kRows, int kCols, int kSlab>
void check_k_major() {
  auto layout = tile_to_shape(GMMA::Layout_K_SW128_Atom<half_t>{}, Shape<Int<kRows>, Int<kCols>>{});
  auto t = make_tensor(make_smem_ptr(g_buf), layout);
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kCols; ++c) {
      expect(sw128_chunk_offset<kRows>(r, c / 8) + (c % 8) * 2 == byte_offset(t, r, c), "K-major writer", kRows, r, c);
    }
  }
  // Every slab x every 16-column k-step.
  for (int slab = 0; slab < kRows / kSlab; ++slab) {
    for (int kk = 0; kk < kCols / 16; ++kk) {
      const uint64_t desc = desc_advance(make_smem_desc(slab * kSlab * 128, 16, 1024, SmemSwizzle::k128B),
                                         (kk / 4) * kRows * 128 + (kk % 4) * 32);
      auto slice = local_tile(t, Shape<Int<kSlab>, _16>{}, make_coord(slab, kk));
      expect(desc == cute_desc<SM90::GMMA::Major::K>(slice), "K-major descriptor", kRows, slab, kk);
      for (int m = 0; m < kSlab; ++m) {
        for (int k = 0; k < 16; ++k) {
          expect(emu_desc_address(desc, false, m, k) == byte_offset(t, slab * kSlab + m, kk * 16 + k),
                 "K-major decode", kRows, m, k);
        }
      }
    }
  }
}

// V: written as (kKeys, kCols) rows like K, read as the MN-major B operand (N = head dim,
// K = keys), 16 keys per wgmma.
template <int kKeys, int kCols>
void check_mn_major() {
  auto layout = tile_to_shape(GMMA::Layout_MN_SW128_Atom<half_t>{}, Shape<Int<kCols>, Int<kKeys>>{}, Step<_2, _1>{});
  auto t = make_tensor(make_smem_ptr(g_buf), layout);  // (head dim, key)
  for (int key = 0; key < kKeys; ++key) {
    for (int c = 0; c < kCols; ++c) {
      expect(sw128_chunk_offset<kKeys>(key, c / 8) + (c % 8) * 2 == byte_offset(t, c, key), "MN-major writer", kKeys,
             key, c);
    }
  }
  for (int kk = 0; kk < kKeys / 16; ++kk) {
    // LBO (next 64 head-dim columns) is 0 when there is no next block, as in cute.
    const uint64_t desc =
        desc_advance(make_smem_desc(0, kCols > 64 ? kKeys * 128 : 0, 1024, SmemSwizzle::k128B), kk * 16 * 128);
    auto slice = local_tile(t, Shape<Int<kCols>, _16>{}, make_coord(0, kk));
    expect(desc == cute_desc<SM90::GMMA::Major::MN>(slice), "MN-major descriptor", kKeys, kCols, kk);
    for (int n = 0; n < kCols; ++n) {
      for (int k = 0; k < 16; ++k) {
        expect(emu_desc_address(desc, true, n, k) == byte_offset(t, n, kk * 16 + k), "MN-major decode", kKeys, n, k);
      }
    }
  }
}

// Register fragments: the emulator's accumulator (D) and register-A coordinates against cute's
// CLayout_64xN and ALayout_64x16 ((thread, value) -> m + 64 * column).
template <int N>
void check_fragments() {
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < N / 2; ++v) {
      int r, c;
      fastattn::flash::emu_acc_coord(t, v, r, c);
      expect(r + 64 * c == SM90::GMMA::CLayout_64xN<N>{}(t, v), "accumulator fragment", N, t, v);
    }
  }
  for (int t = 0; t < 128; ++t) {
    for (int v = 0; v < 8; ++v) {
      int r, c;
      fastattn::flash::emu_a_coord(t, v, r, c);
      expect(r + 64 * c == SM90::GMMA::ALayout_64x16{}(t, v), "register A fragment", 16, t, v);
    }
  }
}

}  // namespace

int main() {
  // The kernel's tiles: Q 128 x d (64-row slabs), K 128 x d (d <= 128) or 80 x 256 (one slab),
  // V the same as MN-major; plus a 64-row K for the 64-wide S shape.
  check_fragments<64>();
  check_fragments<80>();
  check_fragments<128>();
  check_fragments<256>();
  check_k_major<128, 64, 64>();
  check_k_major<128, 128, 64>();
  check_k_major<128, 256, 64>();
  check_k_major<128, 64, 128>();
  check_k_major<128, 128, 128>();
  check_k_major<80, 256, 80>();
  check_k_major<64, 64, 64>();
  check_mn_major<128, 64>();
  check_mn_major<128, 128>();
  check_mn_major<80, 256>();
  check_mn_major<64, 128>();
  std::printf("%s: %d mismatches\n", g_failures == 0 ? "OK" : "FAILED", g_failures);
  return g_failures == 0 ? 0 : 1;
}
