"""Declarative capabilities of one backend for one op (xformers ``fmha`` style).

Each backend's op module declares a ``CAPABILITIES`` instance; the reasons a call cannot be
served are derived from it here, in one place, so every backend words them the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from fastattn.options import (
    ACTIVATIONS,
    AttentionInputs,
    AttentionOptions,
    FeedForwardInputs,
    FeedForwardOptions,
    KVCacheInputs,
    NormInputs,
    NormOptions,
)

FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
GPU_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_reason(dtype: torch.dtype, supported: frozenset) -> list[str]:
    if dtype in supported:
        return []
    names = ", ".join(sorted(_dtype_name(d) for d in supported))
    return [f"dtype {_dtype_name(dtype)} is not supported (supported: {names})"]


@dataclasses.dataclass(frozen=True)
class AttentionCapabilities:
    dtypes: frozenset = GPU_DTYPES
    min_head_dim: int = 1
    max_head_dim: Optional[int] = None
    max_seqlen: Optional[int] = None
    causal: bool = True
    key_padding_mask: bool = True
    attn_mask: bool = True
    dropout: bool = True
    gqa: bool = True
    deterministic: bool = True
    # flash-attn 2 extras: off unless a backend declares them.
    window: bool = False
    softcap: bool = False
    alibi: bool = False
    varlen: bool = False
    kvcache: bool = False
    paged_kvcache: bool = False

    def not_supported_reasons(
        self, inputs: Union[AttentionInputs, KVCacheInputs], options: AttentionOptions
    ) -> list[str]:
        reasons = _dtype_reason(inputs.dtype, self.dtypes)
        if options.has_window and not self.window:
            reasons.append("sliding window (window_size) is not supported")
        if options.softcap > 0 and not self.softcap:
            reasons.append("softcap is not supported")
        if inputs.alibi_slopes is not None and not self.alibi:
            reasons.append("alibi_slopes is not supported")
        if getattr(inputs, "is_varlen", False) and not self.varlen:
            reasons.append("variable-length (cu_seqlens) batches are not supported")
        if isinstance(inputs, KVCacheInputs):
            if not self.kvcache:
                reasons.append("KV-cache decoding is not supported")
            elif inputs.is_paged and not self.paged_kvcache:
                reasons.append("a paged KV cache (block_table) is not supported")
        d = inputs.head_dim
        if d < self.min_head_dim or (self.max_head_dim is not None and d > self.max_head_dim):
            reasons.append(f"head_dim {d} is outside [{self.min_head_dim}, {self.max_head_dim}]")
        seqlen_k = inputs.max_seqlen_k if isinstance(inputs, KVCacheInputs) else inputs.seqlen_k
        if self.max_seqlen is not None and max(inputs.seqlen_q, seqlen_k) > self.max_seqlen:
            reasons.append(f"sequence length above {self.max_seqlen}")
        if options.causal and not self.causal:
            reasons.append("causal masking is not supported")
        if getattr(inputs, "key_padding_mask", None) is not None and not self.key_padding_mask:
            reasons.append("key_padding_mask is not supported")
        if getattr(inputs, "attn_mask", None) is not None and not self.attn_mask:
            reasons.append("attn_mask is not supported")
        if options.dropout_p > 0 and not self.dropout:
            reasons.append("dropout is not supported")
        if inputs.nheads != inputs.nheads_kv and not self.gqa:
            reasons.append("grouped-query attention (nheads != nheads_kv) is not supported")
        if options.deterministic and not self.deterministic:
            reasons.append("deterministic backward is not supported")
        return reasons


@dataclasses.dataclass(frozen=True)
class NormCapabilities:
    dtypes: frozenset = GPU_DTYPES
    max_hidden: Optional[int] = None
    kinds: frozenset = frozenset({"layer", "rms"})
    dropout: bool = True
    residual_in_fp32: bool = True

    def not_supported_reasons(self, inputs: NormInputs, options: NormOptions) -> list[str]:
        reasons = _dtype_reason(inputs.dtype, self.dtypes)
        if self.max_hidden is not None and inputs.hidden > self.max_hidden:
            reasons.append(f"hidden size {inputs.hidden} is above {self.max_hidden}")
        if options.kind not in self.kinds:
            reasons.append(f"{options.kind} norm is not supported")
        if options.dropout_p > 0 and not self.dropout:
            reasons.append("dropout is not supported")
        if options.residual_in_fp32 and not self.residual_in_fp32:
            reasons.append("residual_in_fp32 is not supported")
        return reasons


@dataclasses.dataclass(frozen=True)
class FeedForwardCapabilities:
    dtypes: frozenset = GPU_DTYPES
    activations: frozenset = frozenset(ACTIVATIONS)
    dropout: bool = True
    recompute: bool = True

    def not_supported_reasons(self, inputs: FeedForwardInputs, options: FeedForwardOptions) -> list[str]:
        reasons = _dtype_reason(inputs.dtype, self.dtypes)
        if options.activation not in self.activations:
            reasons.append(f"activation {options.activation!r} is not supported")
        if options.dropout_p > 0 and not self.dropout:
            reasons.append("dropout is not supported")
        if options.recompute and not self.recompute:
            reasons.append("recompute (activation checkpointing) is not supported")
        return reasons
