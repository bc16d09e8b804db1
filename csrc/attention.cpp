// CUDA implementation of fastattn::attention_fwd / attention_bwd: boundary checks, head-dim
// padding and alignment copies, output allocation, params filling, launch on the current
// stream (kernels/attention/).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "attention/flash_params.h"
#include "checks.h"
#include "common/philox.cuh"

namespace fastattn {
namespace {

using flash::FlashAttnParams;
using flash::FlashBwdParams;
using flash::FlashFwdParams;
using flash::MaskKind;

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGridYZ = 65535;  // heads and batch are grid dimensions y and z

int64_t round_up_to_8(int64_t d) { return (d + 7) / 8 * 8; }

// The kernels read and write 16-byte vectors: last dim padded with zeros to a multiple of 8
// (zero q/k columns add nothing to q.k, zero v columns give output columns that are dropped),
// unit last stride, other strides multiples of 8 elements, 16-byte aligned base. Views that
// already qualify (e.g. slices of a packed qkv tensor) are used in place.
at::Tensor kernel_operand(const at::Tensor& t, int64_t padded_dim) {
  at::Tensor x = t;
  if (x.size(3) != padded_dim) x = at::constant_pad_nd(x, {0, padded_dim - x.size(3)}, 0);
  bool aligned = x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i < 3; ++i) aligned = aligned && (x.stride(i) % 8 == 0 || x.size(i) == 1);
  return aligned ? x : x.contiguous();
}

// Drops the head-dim padding of an output (a copy only when there was padding).
at::Tensor unpad(const at::Tensor& t, int64_t head_dim) {
  return t.size(3) == head_dim ? t : t.narrow(3, 0, head_dim).contiguous();
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  CHECK_DEVICE(q);
  CHECK_SAME_DEVICE(k, q);
  CHECK_SAME_DEVICE(v, q);
  TORCH_CHECK(q.dim() == 4, "q must be 4-D (batch, seqlen_q, nheads, headdim), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must be 4-D (batch, seqlen_k, nheads_kv, headdim), got ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "attention kernels take float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must have the same dtype");
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2), head_dim = q.size(3);
  const int64_t seqlen_k = k.size(1), nheads_kv = k.size(2);
  CHECK_SHAPE(k, batch, seqlen_k, nheads_kv, head_dim);
  CHECK_SHAPE(v, batch, seqlen_k, nheads_kv, head_dim);
  TORCH_CHECK(batch > 0 && seqlen_q > 0 && seqlen_k > 0 && nheads > 0 && nheads_kv > 0,
              "attention needs non-empty q and k, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(nheads % nheads_kv == 0, "nheads (", nheads, ") must be a multiple of nheads_kv (", nheads_kv, ")");
  TORCH_CHECK(head_dim >= 1 && head_dim <= kMaxHeadDim, "head_dim must be in [1, ", kMaxHeadDim, "], got ", head_dim);
  TORCH_CHECK(batch <= kMaxGridYZ && nheads <= kMaxGridYZ, "batch and nheads must be at most ", kMaxGridYZ);
  TORCH_CHECK(seqlen_q < (int64_t{1} << 31) - 256 && seqlen_k < (int64_t{1} << 31) - 256,
              "sequence lengths must fit int32 kernel indexing");
  TORCH_CHECK(batch * seqlen_q * nheads / 8 < (int64_t{1} << 31), "batch * seqlen_q * nheads is too large");
}

void set_masks(FlashAttnParams& p, const at::Tensor& q, const std::optional<at::Tensor>& key_padding_mask,
               const std::optional<at::Tensor>& attn_mask) {
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2);
  const int64_t seqlen_k = p.seqlen_k;
  p.key_padding_mask = nullptr;
  p.kpm_batch_stride = p.kpm_col_stride = 0;
  if (key_padding_mask.has_value()) {
    const at::Tensor& kpm = *key_padding_mask;
    CHECK_SAME_DEVICE(kpm, q);
    TORCH_CHECK(kpm.scalar_type() == at::kBool, "key_padding_mask must be bool, got ", kpm.scalar_type());
    CHECK_SHAPE(kpm, batch, seqlen_k);
    p.key_padding_mask = static_cast<const uint8_t*>(kpm.data_ptr());
    p.kpm_batch_stride = kpm.stride(0);
    p.kpm_col_stride = kpm.stride(1);
  }
  p.attn_mask = nullptr;
  p.attn_mask_kind = MaskKind::kNone;
  p.mask_batch_stride = p.mask_head_stride = p.mask_row_stride = p.mask_col_stride = 0;
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    CHECK_SAME_DEVICE(mask, q);
    CHECK_SHAPE(mask, batch, nheads, seqlen_q, seqlen_k);
    if (mask.scalar_type() == at::kBool) {
      p.attn_mask_kind = MaskKind::kBool;
    } else if (mask.scalar_type() == q.scalar_type()) {
      p.attn_mask_kind = MaskKind::kElemType;
    } else {
      TORCH_CHECK(mask.scalar_type() == at::kFloat, "attn_mask must be bool, q's dtype or float32, got ",
                  mask.scalar_type());
      p.attn_mask_kind = MaskKind::kFloat32;
    }
    p.attn_mask = mask.data_ptr();
    p.mask_batch_stride = mask.stride(0);
    p.mask_head_stride = mask.stride(1);
    p.mask_row_stride = mask.stride(2);
    p.mask_col_stride = mask.stride(3);
  }
}

// flash-attn 2 extras. Window: causal is its right edge at the diagonal; a side at least as long
// as both sequences reaches every key, so it becomes unbounded (which also keeps the kernels'
// index arithmetic in int range and lets such calls use the sm_90a forward). Softcap in the
// kernels' raw-score units. ALiBi slopes (H,) or (B, H) fp32, read with batch stride 0 for (H,).
void set_extras(FlashAttnParams& p, const at::Tensor& q, int64_t window_left, int64_t window_right, double softcap,
                const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window_left and window_right must be >= -1 (-1 = unbounded), got ",
              window_left, " and ", window_right);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "softcap must be a finite float >= 0 (0 = off), got ", softcap);
  const int64_t longest = std::max(p.seqlen_q, p.seqlen_k);
  p.window_left = window_left >= longest ? -1 : static_cast<int>(window_left);
  p.window_right = p.is_causal ? 0 : window_right >= longest ? -1 : static_cast<int>(window_right);
  p.softcap_raw = softcap > 0.0 ? static_cast<float>(softcap / p.softmax_scale) : 0.f;
  p.softcap_scale = softcap > 0.0 ? static_cast<float>(p.softmax_scale / softcap) : 0.f;
  p.alibi_slopes = nullptr;
  p.alibi_batch_stride = 0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& slopes = *alibi_slopes;
    CHECK_SAME_DEVICE(slopes, q);
    TORCH_CHECK(slopes.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", slopes.scalar_type());
    const bool per_head = slopes.dim() == 1 && slopes.size(0) == p.nheads;
    TORCH_CHECK(per_head || (slopes.dim() == 2 && slopes.size(0) == p.batch && slopes.size(1) == p.nheads),
                "alibi_slopes must have shape (nheads,) = (", p.nheads, ",) or (batch, nheads) = (", p.batch, ", ",
                p.nheads, "), got ", slopes.sizes());
    TORCH_CHECK(slopes.stride(-1) == 1 || p.nheads == 1, "alibi_slopes must have a unit head stride");
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_batch_stride = per_head ? 0 : slopes.stride(0);
  }
}

// Everything but the outputs; q, k, v are the (padded, aligned) kernel operands.
void set_common(FlashAttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& attn_mask,
                int64_t head_dim, double softmax_scale, bool causal, bool causal_top_left, double dropout_p,
                int64_t seed, int64_t offset, int64_t window_left, int64_t window_right, double softcap,
                const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.0, "softmax_scale must be positive, got ",
              softmax_scale);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1));
  p.nheads = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(1));
  p.nheads_kv = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(head_dim);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.is_causal = causal;
  p.causal_shift = causal_top_left ? 0 : p.seqlen_k - p.seqlen_q;
  p.is_dropout = dropout_p > 0.0;
  p.dropout_threshold = dropout_threshold(static_cast<float>(dropout_p));
  p.rp_dropout = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  p.dtype = kernel_dtype(q.scalar_type(), "q");
  set_masks(p, q, key_padding_mask, attn_mask);
  set_extras(p, q, window_left, window_right, softcap, alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 const std::optional<at::Tensor>& attn_mask, double softmax_scale,
                                                 bool causal, bool causal_top_left, double dropout_p, int64_t seed,
                                                 int64_t offset, int64_t window_left, int64_t window_right,
                                                 double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_qkv(q_in, k_in, v_in);
  c10::cuda::CUDAGuard device_guard(q_in.device());
  const int64_t head_dim = q_in.size(3);
  const int64_t padded_dim = round_up_to_8(head_dim);
  const at::Tensor q = kernel_operand(q_in, padded_dim);
  const at::Tensor k = kernel_operand(k_in, padded_dim);
  const at::Tensor v = kernel_operand(v_in, padded_dim);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2);
  at::Tensor out = at::empty({batch, seqlen_q, nheads, padded_dim}, q.options());
  at::Tensor lse = at::empty({batch, nheads, seqlen_q}, q.options().dtype(at::kFloat));

  FlashFwdParams p{};
  set_common(p, q, k, v, key_padding_mask, attn_mask, padded_dim, softmax_scale, causal, causal_top_left, dropout_p,
             seed, offset, window_left, window_right, softcap, alibi_slopes);
  p.out = out.data_ptr();
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  check_cuda_status(flash::run_flash_fwd(p, c10::cuda::getCurrentCUDAStream()), "attention_fwd");
  return {unpad(out, head_dim), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& attn_mask, double softmax_scale, bool causal, bool causal_top_left,
    double dropout_p, int64_t seed, int64_t offset, bool deterministic, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  check_qkv(q_in, k_in, v_in);
  CHECK_SAME_DEVICE(dout_in, q_in);
  CHECK_SAME_DEVICE(out_in, q_in);
  CHECK_SAME_DEVICE(lse_in, q_in);
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(),
              "dout and out must have q's dtype");
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), "dout and out must have q's shape ",
              q_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "lse must be float32, got ", lse_in.scalar_type());
  CHECK_SHAPE(lse_in, q_in.size(0), q_in.size(2), q_in.size(1));
  c10::cuda::CUDAGuard device_guard(q_in.device());

  const int64_t head_dim = q_in.size(3);
  const int64_t padded_dim = round_up_to_8(head_dim);
  const at::Tensor q = kernel_operand(q_in, padded_dim);
  const at::Tensor k = kernel_operand(k_in, padded_dim);
  const at::Tensor v = kernel_operand(v_in, padded_dim);
  const at::Tensor out = kernel_operand(out_in, padded_dim);
  const at::Tensor dout = kernel_operand(dout_in, padded_dim);
  const at::Tensor lse = lse_in.contiguous();
  const int64_t batch = q.size(0), seqlen_q = q.size(1), nheads = q.size(2);
  const int64_t seqlen_k = k.size(1), nheads_kv = k.size(2);
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);

  at::Tensor delta = at::empty({batch, nheads, seqlen_q}, f32);
  // Non-deterministic: dQ accumulates in fp32 with atomics (zeroed here), scaled and cast below.
  at::Tensor dq_accum = deterministic ? at::Tensor() : at::zeros({batch, seqlen_q, nheads, padded_dim}, f32);
  at::Tensor dq = deterministic ? at::empty({batch, seqlen_q, nheads, padded_dim}, q.options()) : at::Tensor();
  at::Tensor dk = at::empty({batch, seqlen_k, nheads_kv, padded_dim}, q.options());
  at::Tensor dv = at::empty({batch, seqlen_k, nheads_kv, padded_dim}, q.options());

  FlashBwdParams p{};
  set_common(p, q, k, v, key_padding_mask, attn_mask, padded_dim, softmax_scale, causal, causal_top_left, dropout_p,
             seed, offset, window_left, window_right, softcap, alibi_slopes);
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.o_batch_stride = out.stride(0);
  p.o_row_stride = out.stride(1);
  p.o_head_stride = out.stride(2);
  p.do_batch_stride = dout.stride(0);
  p.do_row_stride = dout.stride(1);
  p.do_head_stride = dout.stride(2);
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.dq = deterministic ? dq.data_ptr() : nullptr;
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (deterministic) {
    p.dq_batch_stride = dq.stride(0);
    p.dq_row_stride = dq.stride(1);
    p.dq_head_stride = dq.stride(2);
  }
  p.dk_batch_stride = dk.stride(0);
  p.dk_row_stride = dk.stride(1);
  p.dk_head_stride = dk.stride(2);
  p.dv_batch_stride = dv.stride(0);
  p.dv_row_stride = dv.stride(1);
  p.dv_head_stride = dv.stride(2);
  p.deterministic = deterministic;
  // MQA / GQA grids smaller than the device: the group's query heads split over dK/dV CTAs,
  // each writing an fp32 partial (every element, so not zeroed) that the reduction sums.
  p.num_sms = flash::device_sm_count();
  p.num_splits = flash::bwd_num_splits(p);
  at::Tensor dkv_accum;
  if (p.num_splits > 1) {
    dkv_accum = at::empty({2, p.num_splits, batch, seqlen_k, nheads_kv, padded_dim}, f32);
    p.dk_accum = dkv_accum[0].data_ptr<float>();
    p.dv_accum = dkv_accum[1].data_ptr<float>();
  }
  check_cuda_status(flash::run_flash_bwd(p, c10::cuda::getCurrentCUDAStream()), "attention_bwd");
  if (!deterministic) dq = dq_accum.mul_(softmax_scale).to(q.scalar_type());  // casting point of dQ
  return {unpad(dq, head_dim), unpad(dk, head_dim), unpad(dv, head_dim)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace fastattn
