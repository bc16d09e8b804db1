// Variable-length (packed) batches for the ``cpu`` backend: torch.ops.fastattn.cpu_attention_varlen_*.
//
// Sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q (total_q, H, D) and
// cu_seqlens_k[b]:cu_seqlens_k[b+1] of k / v (total_k, Hkv, D). A thin driver over the dense
// kernels of attention.cpp (fastattn::cpu_attention_fwd / _bwd, called through the dispatcher,
// so that file is not touched): each sequence is a (1, L, H, D) view of the packed tensors (no
// copy, no padding) with its own bottom-right diagonal (shift = Lk_b - Lq_b) and ALiBi row;
// the kernels parallelize within the sequence; the per-sequence results are written into the
// packed outputs. Sequences without queries or keys keep output 0, lse -inf and zero
// gradients. Dropout: sequence b uses offset + b (as the reference backend), so every sequence
// gets its own mask, regenerated in the backward.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>
#include <vector>

namespace fastattn_cpu_varlen {
namespace {

using OptTensor = std::optional<at::Tensor>;
using FwdSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const OptTensor&, const OptTensor&, const OptTensor&, double,
                                                        double, bool, int64_t, int64_t, int64_t, double, int64_t,
                                                        int64_t);
using BwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const OptTensor&, const OptTensor&, const OptTensor&, double, double, bool, int64_t, int64_t, int64_t, double,
    int64_t, int64_t);

struct Sequence {
  int64_t index, q_begin, q_len, k_begin, k_len;
};

// Sequences that have queries and keys (the others keep the outputs' initial values).
std::vector<Sequence> sequences(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                                const at::Tensor& cu_k) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3, "fastattn cpu varlen: q and k must be (total, H, D)");
  for (const at::Tensor* cu : {&cu_q, &cu_k})
    TORCH_CHECK(cu->device().is_cpu() && cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->size(0) >= 2 &&
                    cu->size(0) == cu_q.size(0),
                "fastattn cpu varlen: cu_seqlens must be int32 (batch + 1,) CPU tensors of one size");
  const at::Tensor cq = cu_q.contiguous(), ck = cu_k.contiguous();
  const int32_t* oq = cq.const_data_ptr<int32_t>();
  const int32_t* ok = ck.const_data_ptr<int32_t>();
  const int64_t batch = cq.size(0) - 1;
  TORCH_CHECK(oq[0] == 0 && ok[0] == 0 && oq[batch] == q.size(0) && ok[batch] == k.size(0),
              "fastattn cpu varlen: cu_seqlens must start at 0 and end at the packed lengths");
  std::vector<Sequence> out;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(oq[b + 1] >= oq[b] && ok[b + 1] >= ok[b], "fastattn cpu varlen: cu_seqlens must be non-decreasing");
    if (oq[b + 1] > oq[b] && ok[b + 1] > ok[b]) out.push_back({b, oq[b], oq[b + 1] - oq[b], ok[b], ok[b + 1] - ok[b]});
  }
  return out;
}

// (1, L, H, D) view of rows [begin, begin + len) of a packed (total, H, D) tensor.
at::Tensor rows(const at::Tensor& t, int64_t begin, int64_t len) { return t.narrow(0, begin, len).unsqueeze(0); }

OptTensor alibi_of(const OptTensor& slopes, int64_t b) {
  if (!slopes.has_value() || slopes->dim() == 1) return slopes;
  return slopes->select(0, b);  // (H,)
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                              const OptTensor& alibi_slopes, double softmax_scale, double softcap,
                                              bool causal, int64_t window_left, int64_t window_right,
                                              double dropout_p, int64_t seed, int64_t offset) {
  static const auto dense = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastattn::cpu_attention_fwd", "")
                                .typed<FwdSignature>();
  const std::vector<Sequence> seqs = sequences(q, k, cu_seqlens_q, cu_seqlens_k);
  at::Tensor out = at::zeros(q.sizes(), q.options());  // (total_q, H, D)
  at::Tensor lse = at::full({q.size(1), q.size(0)}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(at::kFloat));  // (H, total_q)
  for (const Sequence& s : seqs) {
    auto [o, l] = dense.call(rows(q, s.q_begin, s.q_len), rows(k, s.k_begin, s.k_len), rows(v, s.k_begin, s.k_len),
                             std::nullopt, std::nullopt, alibi_of(alibi_slopes, s.index), softmax_scale, softcap,
                             causal, s.k_len - s.q_len, window_left, window_right, dropout_p, seed,
                             offset + s.index);
    out.narrow(0, s.q_begin, s.q_len).copy_(o.squeeze(0));
    lse.narrow(1, s.q_begin, s.q_len).copy_(l.squeeze(0));
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    const OptTensor& alibi_slopes, double softmax_scale, double softcap, bool causal, int64_t window_left,
    int64_t window_right, double dropout_p, int64_t seed, int64_t offset) {
  static const auto dense = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("fastattn::cpu_attention_bwd", "")
                                .typed<BwdSignature>();
  const std::vector<Sequence> seqs = sequences(q, k, cu_seqlens_q, cu_seqlens_k);
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0),
              "fastattn cpu varlen: lse must be (H, total_q)");
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  for (const Sequence& s : seqs) {
    auto [g_q, g_k, g_v] = dense.call(
        rows(dout, s.q_begin, s.q_len), rows(q, s.q_begin, s.q_len), rows(k, s.k_begin, s.k_len),
        rows(v, s.k_begin, s.k_len), rows(out, s.q_begin, s.q_len), lse.narrow(1, s.q_begin, s.q_len).unsqueeze(0),
        std::nullopt, std::nullopt, alibi_of(alibi_slopes, s.index), softmax_scale, softcap, causal,
        s.k_len - s.q_len, window_left, window_right, dropout_p, seed, offset + s.index);
    dq.narrow(0, s.q_begin, s.q_len).copy_(g_q.squeeze(0));
    dk.narrow(0, s.k_begin, s.k_len).copy_(g_k.squeeze(0));
    dv.narrow(0, s.k_begin, s.k_len).copy_(g_v.squeeze(0));
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn_cpu_varlen

TORCH_LIBRARY_FRAGMENT(fastattn, m) {
  // q (total_q, H, D), k / v (total_k, Hkv, D), cu_seqlens int32 (batch + 1,); causal / window
  // bottom-right per sequence; -> out (total_q, H, D), lse (H, total_q) fp32.
  m.def(
      "cpu_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? alibi_slopes, float softmax_scale, float softcap, bool causal, int window_left, int window_right, "
      "float dropout_p, int seed, int offset) -> (Tensor out, Tensor lse)");
  m.def(
      "cpu_attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? alibi_slopes, float softmax_scale, float softcap, "
      "bool causal, int window_left, int window_right, float dropout_p, int seed, int offset) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("cpu_attention_varlen_fwd", &fastattn_cpu_varlen::varlen_fwd);
  m.impl("cpu_attention_varlen_bwd", &fastattn_cpu_varlen::varlen_bwd);
}
