"""CPU FlashAttention-2 (csrc/cpu/attention.cpp): ``torch.ops.fastattn.cpu_attention_fwd`` / ``_bwd``.

Forward: one task per (batch, head, chunk of query blocks) under ``at::parallel_for`` (threads follow
``torch.get_num_threads()``), online softmax over key blocks, fp32 accumulation, the (Lq x Lk)
matrix never formed; lse (B, H, Lq) fp32 saved. Backward: delta = rowsum(dO * O), then one
task per (batch, kv head, key split) recomputes P per tile, owns its dK / dV (summed over the
kv head's query heads: GQA / MQA without k/v copies) and accumulates dQ into its split's fp32
buffer; splits are summed in a fixed order, so the backward is deterministic by construction
whatever ``options.deterministic`` says. Tile GEMMs: fp32 register-blocked kernels
(csrc/cpu/attention_gemm.h) on operands packed once per task (O(L) scratch per thread), with the
softmax (forward) and P / dS (backward) fused into their epilogues on unmasked tiles. fp16 / bf16
operands are converted to fp32 first.

Masks (causal in both alignments, sliding window, key_padding_mask, bool / float attn_mask
read through their strides, ALiBi, softcap) are applied per tile; key tiles a query block
cannot see are never visited. Rows that see no key: output 0, lse -inf, zero gradients.

Variable-length batches: :mod:`fastattn.cpu.attention_varlen` (the dense kernels per sequence,
on views). KV-cache decoding: :mod:`fastattn.cpu.attention_kvcache` (split-KV kernel).

Dropout: the Triton backend's keep mask bit for bit (Philox4x32-10, one call per 2 x 2 group
of scores; see csrc/cpu/attention_philox.h and fastattn/triton/attention.py), regenerated in
the backward, never stored. :func:`dropout_mask` materializes it for tests.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastattn.backends.capabilities import AttentionCapabilities
from fastattn.cpu import attention_kvcache, attention_varlen, ensure_loaded
from fastattn.options import AttentionInputs, AttentionOptions, KVCacheInputs, RngState, seed_offset

CAPABILITIES = AttentionCapabilities(
    min_head_dim=1, max_head_dim=256, window=True, softcap=True, alibi=True, varlen=True, kvcache=True,
    paged_kvcache=True,
)


def _shift(inputs: AttentionInputs, options: AttentionOptions) -> int:
    """Query i's diagonal is key i + shift (bottom-right alignment: seqlen_k - seqlen_q)."""
    return inputs.seqlen_k - inputs.seqlen_q if options.causal_alignment == "bottom_right" else 0


def _dropout_args(options: AttentionOptions, rng: Optional[RngState]) -> tuple[float, int, int]:
    if options.dropout_p == 0.0:
        return 0.0, 0, 0
    if rng is None:
        raise ValueError("dropout_p > 0 needs an RngState (drawn by the autograd layer)")
    return options.dropout_p, rng.seed, rng.offset


def _scalar_args(inputs: AttentionInputs, options: AttentionOptions) -> tuple:
    """softmax_scale, softcap, causal, shift, window_left, window_right: the scalars both ops'
    schemas take after the tensors and before dropout's."""
    return (
        options.softmax_scale,
        float(options.softcap),
        options.causal,
        _shift(inputs, options),
        int(options.window_left),
        int(options.window_right),
    )


def _op_args(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]) -> tuple:
    """The tail shared by both ops' schemas (after q, k, v, key_padding_mask, attn_mask)."""
    return (inputs.alibi_slopes, *_scalar_args(inputs, options), *_dropout_args(options, rng))


def forward(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]):
    """out (B, Lq, H, D) in q's dtype, lse (B, H, Lq) fp32 (natural log, -inf for dead rows);
    varlen: out (total_q, H, D), lse (H, total_q)."""
    if inputs.is_varlen:
        return attention_varlen.forward(inputs, options, _dropout_args(options, rng))
    ensure_loaded()
    return torch.ops.fastattn.cpu_attention_fwd(
        inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, inputs.attn_mask,
        *_op_args(inputs, options, rng),
    )


def eager_plan(inputs: AttentionInputs, options: AttentionOptions):
    """The plain eager call for inputs like these: ``run(q, k, v, key_padding_mask, attn_mask,
    alibi_slopes, rng) -> (out, lse)`` as :func:`forward` returns them, which records (when
    autograd needs it) one C++ autograd node (``cpu_attention_autograd``,
    csrc/cpu/autograd.cpp) over the same kernels as :func:`forward` / :func:`backward`; lse is
    not differentiable. None for varlen calls (the op's Python autograd.Function takes them)."""
    if inputs.is_varlen:
        return None
    ensure_loaded()
    op = torch.ops.fastattn.cpu_attention_autograd.default
    scalars, p = _scalar_args(inputs, options), options.dropout_p

    def run(q, k, v, key_padding_mask, attn_mask, alibi_slopes, rng: Optional[RngState]):
        seed, offset = seed_offset(rng)
        return op(q, k, v, key_padding_mask, attn_mask, alibi_slopes, *scalars, p, seed, offset)

    return run


def backward(
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    inputs: AttentionInputs,
    options: AttentionOptions,
    rng: Optional[RngState],
):
    """dq (B, Lq, H, D), dk and dv (B, Lk, Hkv, D) in the inputs' dtype; deterministic
    (varlen: (total_q, H, D) and (total_k, Hkv, D))."""
    if inputs.is_varlen:
        return attention_varlen.backward(dout, out, lse, inputs, options, _dropout_args(options, rng))
    ensure_loaded()
    return torch.ops.fastattn.cpu_attention_bwd(
        dout, inputs.q, inputs.k, inputs.v, out, lse, inputs.key_padding_mask, inputs.attn_mask,
        *_op_args(inputs, options, rng),
    )


def kvcache_append(inputs: KVCacheInputs, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes a decoding step's k, v (B, Lnew, Hkv, D) into the caches in place (one C++ call,
    :func:`fastattn.cpu.attention_kvcache.append`)."""
    attention_kvcache.append(inputs, k, v)


def kvcache_forward(inputs: KVCacheInputs, options: AttentionOptions):
    """One decoding step (see fastattn/ops/kvcache.py): out (B, Lq, H, D) in q's dtype, lse
    (B, H, Lq) fp32; split-KV kernel of :mod:`fastattn.cpu.attention_kvcache`."""
    return attention_kvcache.forward(inputs, options)


def dropout_mask(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (B, H, Lq, Lk): the keep mask the kernels apply (True = kept), None without dropout."""
    if options.dropout_p == 0.0:
        return None
    ensure_loaded()
    p, seed, offset = _dropout_args(options, rng)
    return torch.ops.fastattn.cpu_attention_dropout_mask(
        inputs.batch, inputs.nheads, inputs.seqlen_q, inputs.seqlen_k, p, seed, offset
    )


# --------------------------------------------------------------------------------------------
# Fake tensors of the ops (torch.compile, opcheck)
# --------------------------------------------------------------------------------------------
def _fwd_fake(q, k, v, key_padding_mask, attn_mask, alibi_slopes, *scalars):
    b, lq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, lq), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, key_padding_mask, attn_mask, alibi_slopes, *scalars):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _dropout_mask_fake(batch, heads, seqlen_q, seqlen_k, dropout_p, seed, offset):
    return torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.bool)


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake kernels of the cpu attention ops; called once by fastattn._build after loading."""
    torch.library.register_fake("fastattn::cpu_attention_fwd")(_fwd_fake)
    torch.library.register_fake("fastattn::cpu_attention_bwd")(_bwd_fake)
    torch.library.register_fake("fastattn::cpu_attention_dropout_mask")(_dropout_mask_fake)
    attention_kvcache.register_python_ops()
    attention_varlen.register_python_ops()
