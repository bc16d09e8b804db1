// The one registration of every fastattn op schema. Implementations live in one file per op
// (TORCH_LIBRARY_IMPL(fastattn, CUDA, m)); fake tensors and autograd are registered from Python
// (fastattn/cuda/<op>.py). Optional outputs are returned as empty (0,)-shaped tensors, because
// schemas cannot return None.
#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  // Attention, flash layout (B, L, H, D); lse (B, H, Lq) fp32. flash-attn 2 extras last, with
  // defaults that turn them off: window (left, right), -1 = unbounded (causal sets right to 0);
  // softcap > 0 caps the scaled scores with tanh; alibi_slopes (H,) or (B, H) fp32.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_mask, "
      "float softmax_scale, bool causal, bool causal_top_left, float dropout_p, int seed, int offset, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? attn_mask, float softmax_scale, bool causal, "
      "bool causal_top_left, float dropout_p, int seed, int offset, bool deterministic, "
      "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");

  // Residual + LayerNorm/RMSNorm on rows (M, N). h: (M, N) h_dtype, or (0,) when store_h is
  // false (h is x itself); mean: (M,) fp32, or (0,) for RMSNorm; rstd: (M,) fp32.
  m.def(
      "norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
      "int seed, int offset, bool is_rms, bool store_h, ScalarType h_dtype) "
      "-> (Tensor y, Tensor h, Tensor mean, Tensor rstd)");
  // dresidual: (M, N) residual_dtype, or (0,) when residual_dtype is None; dweight / dbias:
  // (N,) in weight's / bias's dtype, or (0,) when absent. bias is read for its dtype only.
  m.def(
      "norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor? mean, Tensor rstd, Tensor? weight, Tensor? bias, "
      "float dropout_p, int seed, int offset, bool is_rms, ScalarType? residual_dtype) "
      "-> (Tensor dx, Tensor dresidual, Tensor dweight, Tensor dbias)");

  // Feed-forward on rows (M, d_model), fp16/bf16: z = x @ w1^T + b1, a = dropout(act(z)),
  // y = a @ w2^T + b2; activation relu | gelu | gelu_tanh | silu | swiglu. z: (M, d_hidden),
  // or (0,) when save_z is false (backward recomputes it when given z = None); db1 / db2:
  // (d_hidden,) / (d_out,), or (0,) when b1 / b2 is None.
  m.def(
      "ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, float dropout_p, "
      "int seed, int offset, bool save_z) -> (Tensor y, Tensor z)");
  m.def(
      "ffn_bwd(Tensor dy, Tensor? z, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, "
      "float dropout_p, int seed, int offset) -> (Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2)");
  // Whether ffn_fwd / ffn_bwd would run a GEMM on the CUTLASS sm_90a kernels on CUDA device
  // `device` (TMA-compatible operands assumed): the activation GEMMs of `activation` with or
  // without dropout, or the plain GEMMs when activation is None. A host query for tests.
  m.def("ffn_cutlass_serves(int device, str? activation=None, bool dropout=False) -> bool");
}
