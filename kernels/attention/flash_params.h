// Parameters of the FlashAttention-2 kernels and the plain C++ entry points that launch them.
//
// Filled by csrc/attention.cpp (the only place that sees torch tensors). Strides are in
// elements. Contract with the host:
//   * q, k, v, out, dout and the gradients have a contiguous last dim, head_dim % 8 == 0,
//     16-byte aligned base pointers and strides that are multiples of 8 elements (the host
//     pads / copies when the user's tensors are not), so 16-byte vector accesses are legal;
//   * head_dim <= 256; the kernel instantiated for the next larger bucket (32, 64, 96, 128,
//     192, 256) serves it, masking the columns >= head_dim;
//   * lse, delta, dq_accum, dk_accum and dv_accum are fp32 and contiguous with the layouts
//     given below.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/static_switch.h"

namespace fastattn {
namespace flash {

// How attn_mask's elements are read.
enum class MaskKind : int {
  kNone = 0,
  kBool = 1,       // 1 byte per element, 0 = the key is ignored
  kElemType = 2,   // q's dtype (fp16 / bf16), added to the scaled scores
  kFloat32 = 3,    // fp32, added to the scaled scores
};

// Fields shared by forward and backward.
struct FlashAttnParams {
  const void* q;  // (B, Lq, H, D)
  const void* k;  // (B, Lk, Hkv, D)
  const void* v;  // (B, Lk, Hkv, D)
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  const uint8_t* key_padding_mask;  // (B, Lk) bool, 0 = padding; or nullptr
  int64_t kpm_batch_stride, kpm_col_stride;

  const void* attn_mask;  // (B, H, Lq, Lk), any strides (0 = broadcast); or nullptr
  MaskKind attn_mask_kind;
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;

  int batch, nheads, nheads_kv, seqlen_q, seqlen_k;
  int head_dim;  // the real head dim (multiple of 8, <= the kernel's bucket)

  float softmax_scale;
  float scale_log2;  // softmax_scale * log2(e): the kernels work with exp2

  bool is_causal;     // read by the sm_90a kernel; the mma.sync kernels read the window (below)
  int causal_shift;  // the diagonal: Lk - Lq (bottom-right) or 0 (top-left), of causal, window and ALiBi
  // Sliding window (flash-attn's window_size): query i sees key j iff
  // i + causal_shift - window_left <= j <= i + causal_shift + window_right; -1 = unbounded on
  // that side. The host sets window_right = 0 under causal, so the mma.sync kernels see causal
  // as a window; their key-block loops skip the blocks outside it on both sides.
  int window_left, window_right;

  // Soft-capping of the scores (kernel units = raw q.k): s -> softcap_raw * tanh(s * softcap_scale)
  // with softcap_raw = softcap / softmax_scale and softcap_scale = softmax_scale / softcap;
  // both 0 = off. The backward multiplies dS by 1 - tanh^2, recomputed from S.
  float softcap_raw, softcap_scale;

  // ALiBi: -slope[b, h] * |j - (i + causal_shift)| added to the scaled (and capped) scores.
  const float* alibi_slopes;  // (B, H) fp32 with batch stride alibi_batch_stride (0 for (H,)); or nullptr
  int64_t alibi_batch_stride;

  bool is_dropout;
  uint32_t dropout_threshold;  // dropped iff philox bits < threshold (common/philox.cuh)
  float rp_dropout;            // 1 / (1 - p)
  uint64_t seed, offset;

  DType dtype;  // kFloat16 or kBFloat16

  __host__ __device__ bool has_element_mask() const { return key_padding_mask != nullptr || attn_mask != nullptr; }
  // Per-element work in the mma.sync kernels' ScoreMask beyond the block bounds: every tile is masked.
  __host__ __device__ bool has_element_scores() const { return has_element_mask() || alibi_slopes != nullptr; }
  __host__ __device__ bool has_window() const { return window_left >= 0 || (window_right >= 0 && !is_causal); }
  __host__ __device__ bool has_softcap() const { return softcap_raw > 0.f; }
};

struct FlashFwdParams : FlashAttnParams {
  void* out;  // (B, Lq, H, D)
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;  // (B, H, Lq) contiguous, natural log; -inf for rows that see no key
};

struct FlashBwdParams : FlashAttnParams {
  const void* out;   // (B, Lq, H, D)
  const void* dout;  // (B, Lq, H, D)
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const float* lse;  // (B, H, Lq) contiguous
  float* delta;      // (B, H, Lq) contiguous, written by the preprocess kernel
  float* dq_accum;   // (B, Lq, H, D) contiguous fp32, zero-initialised; unused when deterministic
  void* dq;          // (B, Lq, H, D); written only when deterministic
  void* dk;          // (B, Lk, Hkv, D)
  void* dv;          // (B, Lk, Hkv, D)
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  // false: dq accumulates in dq_accum with fp32 atomics inside the dK/dV kernel (the host
  // scales and casts it); true: a separate dQ kernel loops over key blocks, no atomics.
  bool deterministic;
  int num_sms;     // SMs of the device (flash::device_sm_count()); 0 = unknown, never split
  int num_splits;  // dK/dV CTAs per (key block, kv head), each over a contiguous range of the
                   // group's query heads: bwd_num_splits(); 1 = dK/dV written directly
  float* dk_accum;  // (num_splits, B, Lk, Hkv, D) contiguous fp32 partials; only when num_splits > 1
  float* dv_accum;  // same layout, for dV
};

// Keys per dK/dV CTA for a head dim (BwdDkdvTraitsFor, held to it by a static_assert in the
// launch template): the host needs it to size the grid before choosing the splits.
constexpr int bwd_dkdv_block_n(int head_dim) { return head_dim <= 128 ? 128 : 64; }

// Splits of a GQA group's query heads over dK/dV CTAs. The base grid (key blocks x Hkv x B,
// one CTA per SM) leaves SMs idle for MQA / GQA with a small batch; splitting costs an fp32
// partial per split and a reduction. Picks the split count with the fewest (waves x heads per
// CTA), the smallest on ties; 1 when the base grid fills the device or the group is one head.
// A pure function of the shapes and num_sms, so deterministic runs stay reproducible.
inline int bwd_num_splits(const FlashBwdParams& p) {
  const int group = p.nheads / p.nheads_kv;
  const int64_t base = static_cast<int64_t>((p.seqlen_k + bwd_dkdv_block_n(p.head_dim) - 1) /
                                            bwd_dkdv_block_n(p.head_dim)) * p.nheads_kv * p.batch;
  if (group <= 1 || p.num_sms <= 0 || base >= p.num_sms) return 1;
  int best = 1;
  int64_t best_cost = group;  // 1 wave of base CTAs, each over the whole group
  for (int s = 2; s <= group; ++s) {
    const int64_t waves = (base * s + p.num_sms - 1) / p.num_sms;
    const int64_t cost = waves * ((group + s - 1) / s);
    if (cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

// Per (dtype, head-dim bucket, dropout) launchers, explicitly instantiated in the generated
// files under instantiations/ (generate_instantiations.py).
template <typename T, int kHeadDim, bool kIsDropout>
cudaError_t run_flash_fwd_(const FlashFwdParams& params, cudaStream_t stream);

template <typename T, int kHeadDim, bool kIsDropout>
cudaError_t run_flash_bwd_(const FlashBwdParams& params, cudaStream_t stream);

// sm_90a wgmma forward (flash_fwd_sm90_kernel.cuh), head-dim buckets 64, 128, 256, no dropout.
// Returns cudaErrorNoKernelImageForDevice without launching when the build has no sm_90a code.
template <typename T, int kHeadDim>
cudaError_t run_flash_fwd_sm90_(const FlashFwdParams& params, cudaStream_t stream);

template <typename T>
cudaError_t run_flash_bwd_preprocess_(const FlashBwdParams& params, cudaStream_t stream);

// dK, dV = the sum of the num_splits fp32 partials in split order, cast (num_splits > 1).
template <typename T>
cudaError_t run_flash_bwd_reduce_dkdv_(const FlashBwdParams& params, cudaStream_t stream);

// Entry points for the host glue: dispatch on dtype, head dim and dropout (flash_api.cu).
// Forward: the sm_90a wgmma kernel when fwd_uses_sm90 holds (no dropout, window, softcap or
// ALiBi), else the mma.sync kernel.
bool fwd_uses_sm90(const FlashFwdParams& params);
cudaError_t run_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);
// Preprocess (delta = rowsum(dout * out)), then the dK/dV kernel, then (deterministic) dQ,
// then (num_splits > 1) the dK/dV reduction.
cudaError_t run_flash_bwd(const FlashBwdParams& params, cudaStream_t stream);
// Multiprocessor count of the current device (cached), for FlashBwdParams::num_sms.
int device_sm_count();

}  // namespace flash
}  // namespace fastattn
