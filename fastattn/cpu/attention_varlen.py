"""CPU attention over packed variable-length batches (csrc/cpu/attention_varlen.cpp):
``torch.ops.fastattn.cpu_attention_varlen_fwd`` / ``_bwd``.

Sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q (total_q, H, D) and
``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k / v (total_k, Hkv, D); each runs the dense kernels
of :mod:`fastattn.cpu.attention` on (1, L, H, D) views (no padding, no input copies) with its
own bottom-right diagonal. Dropout: sequence b draws its mask at ``offset + b``.
"""

from __future__ import annotations

import functools

import torch

from fastattn.cpu import ensure_loaded
from fastattn.options import AttentionInputs, AttentionOptions


def _scalars(inputs: AttentionInputs, options: AttentionOptions, dropout: tuple[float, int, int]) -> tuple:
    """The schema's tail after the tensors; dropout = (p, seed, offset)."""
    return (
        inputs.alibi_slopes,  # (H,) or (B, H) fp32 or None
        options.softmax_scale,
        float(options.softcap),
        options.causal,
        int(options.window_left),
        int(options.window_right),
        *dropout,
    )


def forward(inputs: AttentionInputs, options: AttentionOptions, dropout: tuple[float, int, int]):
    """out (total_q, H, D) in q's dtype, lse (H, total_q) fp32."""
    ensure_loaded()
    return torch.ops.fastattn.cpu_attention_varlen_fwd(
        inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k, *_scalars(inputs, options, dropout)
    )


def backward(dout, out, lse, inputs: AttentionInputs, options: AttentionOptions, dropout: tuple[float, int, int]):
    """dq (total_q, H, D), dk and dv (total_k, Hkv, D) in the inputs' dtype."""
    ensure_loaded()
    return torch.ops.fastattn.cpu_attention_varlen_bwd(
        dout, inputs.q, inputs.k, inputs.v, out, lse, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
        *_scalars(inputs, options, dropout),
    )


def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *scalars):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *scalars):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake kernels of the varlen ops; called by fastattn.cpu.attention."""
    torch.library.register_fake("fastattn::cpu_attention_varlen_fwd")(_fwd_fake)
    torch.library.register_fake("fastattn::cpu_attention_varlen_bwd")(_bwd_fake)
