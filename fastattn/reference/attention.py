"""Reference attention: explicit formulas, the full (Lq x Lk) score matrix, any device.

forward:  S = scale * Q K^T + bias, masked to -inf; lse = logsumexp(S); P = exp(S - lse)
          (0 on rows that see no key); O = (P * Z) V with Z = keep / (1 - p).
backward: dV = (P * Z)^T dO; dP = (dO V^T) * Z; D = rowsum(dO * O);
          dS = P * (dP - D); dQ = scale dS K; dK = scale dS^T Q (summed over each kv group).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastattn.backends.capabilities import FLOAT_DTYPES, AttentionCapabilities
from fastattn.options import AttentionInputs, AttentionOptions, RngState

CAPABILITIES = AttentionCapabilities(dtypes=FLOAT_DTYPES)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def allowed_mask(inputs: AttentionInputs, options: AttentionOptions) -> Optional[torch.Tensor]:
    """bool (B, H, Lq, Lk) or broadcastable: True where query i may attend key j; None = all."""
    allowed = None
    lq, lk, device = inputs.seqlen_q, inputs.seqlen_k, inputs.device
    if options.causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        shift = lk - lq if options.causal_alignment == "bottom_right" else 0
        allowed = (j <= i + shift)[None, None]  # (1, 1, Lq, Lk)
    if inputs.key_padding_mask is not None:
        kpm = inputs.key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        allowed = kpm if allowed is None else allowed & kpm
    if inputs.attn_mask is not None and inputs.attn_mask.dtype == torch.bool:
        allowed = inputs.attn_mask if allowed is None else allowed & inputs.attn_mask
    return allowed


def dropout_keep(
    inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]
) -> Optional[torch.Tensor]:
    """bool (B, H, Lq, Lk) keep mask drawn from rng (reference's own stream), or None."""
    if options.dropout_p == 0.0 or rng is None:
        return None
    gen = torch.Generator(device=inputs.device)
    gen.manual_seed(rng.seed * 1_000_003 + rng.offset)
    shape = (inputs.batch, inputs.nheads, inputs.seqlen_q, inputs.seqlen_k)
    return torch.rand(shape, generator=gen, device=inputs.device) >= options.dropout_p


def _probabilities(inputs: AttentionInputs, options: AttentionOptions):
    """P (B, H, Lq, Lk) and lse (B, H, Lq) in the compute dtype, plus q, k, v upcast."""
    cdt = _compute_dtype(inputs.dtype)
    group = inputs.nheads // inputs.nheads_kv
    q = inputs.q.to(cdt).transpose(1, 2)  # (B, H, Lq, D)
    k = inputs.k.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    v = inputs.v.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * options.softmax_scale  # (B, H, Lq, Lk)
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != torch.bool:
        scores = scores + inputs.attn_mask.to(cdt)
    allowed = allowed_mask(inputs, options)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq); -inf on rows that see no key
    dead = torch.isneginf(lse)[..., None]
    probs = torch.exp(scores - torch.where(dead, 0.0, lse[..., None]))
    probs = probs.masked_fill(dead, 0.0)
    return probs, lse, q, k, v


def _dropout_scale(keep: Optional[torch.Tensor], options: AttentionOptions, dtype) -> Optional[torch.Tensor]:
    if keep is None:
        return None
    return keep.to(dtype) / (1.0 - options.dropout_p)


def forward(
    inputs: AttentionInputs,
    options: AttentionOptions,
    rng: Optional[RngState],
    *,
    dropout_mask: Optional[torch.Tensor] = None,
):
    """Returns out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) float32.
    dropout_mask: optional bool (B, H, Lq, Lk) keep mask overriding the reference's own (lets
    tests reproduce another backend's mask)."""
    probs, lse, _, _, v = _probabilities(inputs, options)
    keep = dropout_mask if dropout_mask is not None else dropout_keep(inputs, options, rng)
    z = _dropout_scale(keep, options, probs.dtype)
    out = torch.matmul(probs if z is None else probs * z, v)  # (B, H, Lq, D)
    return out.transpose(1, 2).to(inputs.dtype), lse.float()


def backward(
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    inputs: AttentionInputs,
    options: AttentionOptions,
    rng: Optional[RngState],
    *,
    dropout_mask: Optional[torch.Tensor] = None,
):
    """Returns dq (B, Lq, H, D), dk and dv (B, Lk, Hkv, D) in the inputs' dtype."""
    probs, _, q, k, v = _probabilities(inputs, options)
    cdt = probs.dtype
    do = dout.to(cdt).transpose(1, 2)  # (B, H, Lq, D)
    o = out.to(cdt).transpose(1, 2)  # (B, H, Lq, D)
    keep = dropout_mask if dropout_mask is not None else dropout_keep(inputs, options, rng)
    z = _dropout_scale(keep, options, cdt)
    dv = torch.matmul((probs if z is None else probs * z).transpose(-1, -2), do)  # (B, H, Lk, D)
    dp = torch.matmul(do, v.transpose(-1, -2))  # (B, H, Lq, Lk)
    if z is not None:
        dp = dp * z
    delta = (do * o).sum(-1, keepdim=True)  # (B, H, Lq, 1)
    ds = probs * (dp - delta)
    dq = torch.matmul(ds, k) * options.softmax_scale  # (B, H, Lq, D)
    dk = torch.matmul(ds.transpose(-1, -2), q) * options.softmax_scale  # (B, H, Lk, D)
    b, hkv, group = inputs.batch, inputs.nheads_kv, inputs.nheads // inputs.nheads_kv
    lk, d = inputs.seqlen_k, inputs.head_dim
    dk = dk.view(b, hkv, group, lk, d).sum(2)  # (B, Hkv, Lk, D)
    dv = dv.view(b, hkv, group, lk, d).sum(2)
    return (
        dq.transpose(1, 2).to(inputs.dtype),
        dk.transpose(1, 2).to(inputs.k.dtype),
        dv.transpose(1, 2).to(inputs.v.dtype),
    )
