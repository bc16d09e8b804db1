"""Reference attention: explicit formulas, the full (Lq x Lk) score matrix, any device.

forward:  T = scale * Q K^T, soft-capped T = c * tanh(T / c) when softcap c > 0;
          S = T + alibi + float mask, masked to -inf (causal, window, padding, bool mask);
          lse = logsumexp(S); P = exp(S - lse) (0 on rows that see no key);
          O = (P * Z) V with Z = keep / (1 - p).
backward: dV = (P * Z)^T dO; dP = (dO V^T) * Z; D = rowsum(dO * O);
          dS = P * (dP - D), times (1 - (T / c)^2) under softcap;
          dQ = scale dS K; dK = scale dS^T Q (summed over each kv group).
Variable-length batches run the same formulas on each sequence's views (no padding).
KV-cache decoding gathers each sequence's valid cache prefix and runs the variable-length path.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastattn.backends.capabilities import FLOAT_DTYPES, AttentionCapabilities
from fastattn.options import AttentionInputs, AttentionOptions, KVCacheInputs, RngState

CAPABILITIES = AttentionCapabilities(
    dtypes=FLOAT_DTYPES, window=True, softcap=True, alibi=True, varlen=True, kvcache=True, paged_kvcache=True
)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _relative_positions(inputs: AttentionInputs, options: AttentionOptions) -> torch.Tensor:
    """(Lq, Lk) int64: j - (i + shift), the key's offset from the query's aligned diagonal."""
    lq, lk, device = inputs.seqlen_q, inputs.seqlen_k, inputs.device
    shift = lk - lq if options.causal_alignment == "bottom_right" else 0
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j - (i + shift)


def allowed_mask(inputs: AttentionInputs, options: AttentionOptions) -> Optional[torch.Tensor]:
    """bool (B, H, Lq, Lk) or broadcastable: True where query i may attend key j; None = all."""
    allowed = None
    if options.causal or options.has_window:
        rel = _relative_positions(inputs, options)  # (Lq, Lk)
        ok = torch.ones_like(rel, dtype=torch.bool)
        right = 0 if options.causal else options.window_right
        if right >= 0:
            ok &= rel <= right
        if options.window_left >= 0:
            ok &= rel >= -options.window_left
        allowed = ok[None, None]  # (1, 1, Lq, Lk)
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


def alibi_bias(inputs: AttentionInputs, options: AttentionOptions, dtype) -> Optional[torch.Tensor]:
    """(B or 1, H, Lq, Lk) ``-slope * |j - (i + shift)|``, or None without alibi_slopes."""
    if inputs.alibi_slopes is None:
        return None
    slopes = inputs.alibi_slopes.to(dtype)
    slopes = slopes[None] if slopes.dim() == 1 else slopes  # (B or 1, H)
    distance = _relative_positions(inputs, options).abs().to(dtype)  # (Lq, Lk)
    return -slopes[:, :, None, None] * distance


def _probabilities(inputs: AttentionInputs, options: AttentionOptions):
    """P (B, H, Lq, Lk), lse (B, H, Lq) in the compute dtype, q, k, v upcast, and the soft-cap
    derivative factor ``1 - tanh^2`` (B, H, Lq, Lk) or None."""
    cdt = _compute_dtype(inputs.dtype)
    group = inputs.nheads // inputs.nheads_kv
    q = inputs.q.to(cdt).transpose(1, 2)  # (B, H, Lq, D)
    k = inputs.k.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    v = inputs.v.to(cdt).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * options.softmax_scale  # (B, H, Lq, Lk)
    softcap_grad = None
    if options.softcap > 0:
        capped = torch.tanh(scores / options.softcap)
        softcap_grad = 1.0 - capped * capped
        scores = capped * options.softcap
    bias = alibi_bias(inputs, options, cdt)
    if bias is not None:
        scores = scores + bias
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != torch.bool:
        scores = scores + inputs.attn_mask.to(cdt)
    allowed = allowed_mask(inputs, options)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, Lq); -inf on rows that see no key
    dead = torch.isneginf(lse)[..., None]
    probs = torch.exp(scores - torch.where(dead, 0.0, lse[..., None]))
    probs = probs.masked_fill(dead, 0.0)
    return probs, lse, q, k, v, softcap_grad


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
    """Returns out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) float32 (varlen: out
    (total_q, H, D), lse (H, total_q)).
    dropout_mask: optional bool (B, H, Lq, Lk) keep mask overriding the reference's own (lets
    tests reproduce another backend's mask; dense batches only)."""
    if inputs.is_varlen:
        return _varlen_forward(inputs, options, rng)
    probs, lse, _, _, v, _ = _probabilities(inputs, options)
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
    """Returns dq (B, Lq, H, D), dk and dv (B, Lk, Hkv, D) in the inputs' dtype (varlen:
    (total_q, H, D) and (total_k, Hkv, D))."""
    if inputs.is_varlen:
        return _varlen_backward(dout, out, lse, inputs, options, rng)
    probs, _, q, k, v, softcap_grad = _probabilities(inputs, options)
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
    if softcap_grad is not None:
        ds = ds * softcap_grad
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


# --------------------------------------------------------------------------------------------
# Variable-length batches: the dense formulas on each sequence's views
# --------------------------------------------------------------------------------------------
def _sequence_bounds(inputs: AttentionInputs) -> list[tuple[int, int, int, int]]:
    """(q_start, q_end, k_start, k_end) of each sequence."""
    cq = inputs.cu_seqlens_q.tolist()
    ck = inputs.cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _sequence_inputs(inputs: AttentionInputs, b: int, bounds) -> AttentionInputs:
    qs, qe, ks, ke = bounds
    slopes = inputs.alibi_slopes
    if slopes is not None and slopes.dim() == 2:
        slopes = slopes[b]
    return AttentionInputs(
        inputs.q[None, qs:qe], inputs.k[None, ks:ke], inputs.v[None, ks:ke], alibi_slopes=slopes
    )


def _varlen_forward(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]):
    """out (total_q, H, D), lse (H, total_q) fp32."""
    out = torch.zeros_like(inputs.q)
    lse = torch.full((inputs.nheads, inputs.q.shape[0]), float("-inf"), dtype=torch.float32, device=inputs.device)
    for b, bounds in enumerate(_sequence_bounds(inputs)):
        qs, qe, ks, ke = bounds
        if qe == qs:
            continue
        if ke == ks:
            continue  # no key: output 0, lse -inf
        seq_rng = None if rng is None else RngState(rng.seed, rng.offset + b)
        o, l = forward(_sequence_inputs(inputs, b, bounds), options, seq_rng)
        out[qs:qe] = o[0]
        lse[:, qs:qe] = l[0]
    return out, lse


def _varlen_backward(dout, out, lse, inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]):
    dq = torch.zeros_like(inputs.q)
    dk = torch.zeros_like(inputs.k)
    dv = torch.zeros_like(inputs.v)
    for b, bounds in enumerate(_sequence_bounds(inputs)):
        qs, qe, ks, ke = bounds
        if qe == qs or ke == ks:
            continue
        seq_rng = None if rng is None else RngState(rng.seed, rng.offset + b)
        g = backward(dout[None, qs:qe], out[None, qs:qe], lse[None, :, qs:qe],
                     _sequence_inputs(inputs, b, bounds), options, seq_rng)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# KV-cache decoding: each sequence's valid prefix gathered, then the variable-length path
# --------------------------------------------------------------------------------------------
def kvcache_as_varlen(inputs: KVCacheInputs) -> AttentionInputs:
    """The packed batch equal to one decoding step: q (B * Lq, H, D) and the first
    ``cache_seqlens[b]`` cache positions of each sequence gathered (copied) into k, v
    (sum(cache_seqlens), Hkv, D); varlen's per-sequence bottom-right alignment is the cache's."""
    b, lq, device = inputs.batch, inputs.seqlen_q, inputs.device
    lengths = inputs.cache_seqlens.long()  # (B,)
    cu_k = torch.cat((lengths.new_zeros(1), lengths.cumsum(0)))  # (B + 1,)
    total, longest = torch.stack((cu_k[-1], lengths.max())).tolist()
    seq = torch.repeat_interleave(torch.arange(b, device=device), lengths, output_size=total)  # (total,)
    pos = torch.arange(total, device=device) - cu_k[seq]  # position inside its sequence
    if inputs.is_paged:
        block_size = inputs.k_cache.shape[1]
        rows = inputs.block_table.long()[seq, pos // block_size]
        cols = pos % block_size
    else:
        rows = seq if inputs.cache_batch_idx is None else inputs.cache_batch_idx.long()[seq]
        cols = pos
    return AttentionInputs(
        q=inputs.q.reshape(b * lq, inputs.nheads, inputs.head_dim),
        k=inputs.k_cache[rows, cols],
        v=inputs.v_cache[rows, cols],
        alibi_slopes=inputs.alibi_slopes,
        cu_seqlens_q=torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=device),
        cu_seqlens_k=cu_k.to(torch.int32),
        max_seqlen_q=lq,
        max_seqlen_k=longest,
    )


def kvcache_forward(inputs: KVCacheInputs, options: AttentionOptions):
    """Returns out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) float32 (the cache already
    holds the new tokens; see fastattn/ops/kvcache.py)."""
    b, lq, h = inputs.batch, inputs.seqlen_q, inputs.nheads
    out, lse = _varlen_forward(kvcache_as_varlen(inputs), options, None)  # (B*Lq, H, D), (H, B*Lq)
    return out.view(b, lq, h, inputs.head_dim), lse.view(h, b, lq).transpose(0, 1).contiguous()
