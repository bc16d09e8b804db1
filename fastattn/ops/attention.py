"""Scaled-dot-product attention: validation, the shared autograd layer, public functions.

Data path: public function -> validate -> AttentionOptions -> (with dropout) the seed from
``fastattn::dropout_seed`` -> custom op ``fastattn::flash_attn_forward(q, k, v,
key_padding_mask, attn_mask, options, backend, rng)``, whose body runs backends.select and the
backend ``attention`` module's ``forward``; its registered autograd calls
``fastattn::flash_attn_backward`` -> the same backend's ``backward``.

The two custom ops are the one autograd layer of every backend, and what torch.compile and
torch.export see (one opaque node each, no graph break): ``register_fake`` gives their output
shapes, ``register_autograd`` joins them. Options travel as a canonical string, the backend
request as a name ("" = automatic, resolved inside the op at run time so ``use_backend`` works
in compiled code), and the chosen backend and dropout seed come back as a small int64 "call
state" tensor saved for backward (see fastattn/ops/_custom_op.py). These are not the C++
``fastattn::attention_fwd`` / ``attention_bwd`` kernels of csrc/, which the cuda backend calls.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from fastattn.ops import _checks as checks
from fastattn.ops import _custom_op
from fastattn.ops._amp import autocast_dtype, cast_for_autocast
from fastattn.options import AttentionInputs, AttentionOptions


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _validate_flash(q, k, v, key_padding_mask) -> AttentionInputs:
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.check_tensor(name, t)
        checks.check_ndim(name, t, 4, "(batch, seqlen, nheads, headdim)")
        checks.check_float_dtype(name, t)
        checks.check_nonempty(name, t)
    checks.check_same_dtype("k", k, "q", q)
    checks.check_same_dtype("v", v, "q", q)
    checks.check_same_device("k", k, "q", q)
    checks.check_same_device("v", v, "q", q)
    b, _, h, d = q.shape
    _, lk, hkv, _ = k.shape
    checks.check_shape("k", k, (b, lk, hkv, d), "(batch, seqlen_k, nheads_kv, headdim)")
    checks.check_shape("v", v, (b, lk, hkv, d), "(batch, seqlen_k, nheads_kv, headdim)")
    if h % hkv != 0:
        raise ValueError(f"q's nheads ({h}) must be a multiple of k/v's nheads_kv ({hkv})")
    checks.check_tensor("key_padding_mask", key_padding_mask, optional=True)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real token), got {key_padding_mask.dtype}")
        checks.check_shape("key_padding_mask", key_padding_mask, (b, lk), "(batch, seqlen_k)")
        checks.check_same_device("key_padding_mask", key_padding_mask, "q", q)
    return AttentionInputs(
        q=checks.last_dim_contiguous(q),
        k=checks.last_dim_contiguous(k),
        v=checks.last_dim_contiguous(v),
        key_padding_mask=key_padding_mask,
    )


def _validate_options(softmax_scale, dropout_p, head_dim: int, **flags) -> tuple[float, float]:
    for name, value in flags.items():
        checks.check_bool(name, value)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else checks.check_positive("softmax_scale", softmax_scale)
    return scale, checks.check_probability("dropout_p", dropout_p)


# --------------------------------------------------------------------------------------------
# The one autograd layer, shared by every backend: two custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastattn::flash_attn_forward", mutates_args=())
def _attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    options: str,
    backend: str,
    rng: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors as in :class:`AttentionInputs`; ``options``: encoded AttentionOptions;
    ``backend``: requested name or "" (automatic); ``rng``: (2,) int64 dropout seed and offset
    (``fastattn::dropout_seed``) or None. Returns out (B, Lq, H, D) in q's dtype,
    lse (B, H, Lq) fp32 and the call state (3,) int64 CPU (backend, dropout seed, offset)."""
    inputs = AttentionInputs(q, k, v, key_padding_mask, attn_mask)
    (out, lse), _, state = _custom_op.run_forward("attention", inputs, AttentionOptions, options, backend, rng)
    out, lse = _custom_op.finalize((out, lse), (q, k, v, key_padding_mask, attn_mask))
    return out, lse, state


@_attention_forward.register_fake
def _attention_forward_fake(q, k, v, key_padding_mask, attn_mask, options, backend, rng):
    b, lq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, lq), dtype=torch.float32), _custom_op.call_state_fake()


@torch.library.custom_op("fastattn::flash_attn_backward", mutates_args=())
def _attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    state: torch.Tensor,
    options: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (B, Lq, H, D); the forward's inputs and outputs. Returns dq (B, Lq, H, D) and
    dk, dv (B, Lk, Hkv, D) in the inputs' dtypes."""
    inputs = AttentionInputs(q, k, v, key_padding_mask, attn_mask)
    opts = _custom_op.decode_options(AttentionOptions, options)
    grads = _custom_op.run_backward("attention", state, inputs, opts, dout.contiguous(), out, lse)
    return _custom_op.finalize(grads, (dout, q, k, v, key_padding_mask, attn_mask, out, lse))


@_attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, key_padding_mask, attn_mask, out, lse, state, options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_mask, options, _backend, _rng = inputs
    out, lse, state = output
    ctx.save_for_backward(q, k, v, key_padding_mask, attn_mask, out, lse, state)
    ctx.options = options
    ctx.mark_non_differentiable(lse, state)
    ctx.set_materialize_grads(False)


def _attention_backward_rule(ctx, dout, _dlse, _dstate):
    q, k, v, key_padding_mask, attn_mask, out, lse, state = ctx.saved_tensors
    if dout is None:  # out took no part in the loss
        return None, None, None, None, None, None, None, None
    dq, dk, dv = _attention_backward(dout, q, k, v, key_padding_mask, attn_mask, out, lse, state, ctx.options)
    return dq, dk, dv, None, None, None, None, None


_attention_forward.register_autograd(_attention_backward_rule, setup_context=_attention_setup_context)


def _run(inputs: AttentionInputs, options: AttentionOptions, backend: Optional[str]):
    amp = autocast_dtype(inputs.device)
    if amp is not None and inputs.dtype != amp:
        mask = inputs.attn_mask
        inputs = AttentionInputs(
            *(cast_for_autocast(t, amp) for t in (inputs.q, inputs.k, inputs.v)),
            key_padding_mask=inputs.key_padding_mask,
            attn_mask=mask if mask is None or mask.dtype in (torch.bool, torch.float32) else mask.to(amp),
        )
    out, lse, _state = _attention_forward(
        inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, inputs.attn_mask,
        _custom_op.encode_options(options), _custom_op.backend_request(backend),
        _custom_op.draw_rng(options.dropout_p),
    )
    return out, lse


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Fused multi-head attention in the flash layout, ``softmax(scale * q k^T) v``.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16 / bfloat16 / float32 (float64 on the
            reference backend). Any strides with a contiguous last dim (views of a packed qkv
            tensor need no copy).
        k, v: (batch, seqlen_k, nheads_kv, headdim), q's dtype and device;
            ``nheads % nheads_kv == 0`` (grouped-query / multi-query attention).
        causal: query i sees key j iff ``j <= i + seqlen_k - seqlen_q`` (bottom-right aligned,
            as flash-attn >= 2.1).
        softmax_scale: a positive finite float; defaults to ``1 / sqrt(headdim)``.
        key_padding_mask: (batch, seqlen_k) bool, True = real token, False = ignored.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval).
        return_lse: also return the logsumexp.
        deterministic: bitwise-reproducible backward (where the backend offers a faster
            non-deterministic one).
        backend: "triton", "cuda", "reference" or None (automatic; see ``fastattn.backends()``).

    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype; and with ``return_lse`` also
        lse: (batch, nheads, seqlen_q) float32, natural log. A query row that sees no key gets
        output 0 and lse -inf (never NaN), and passes no gradient.
    """
    inputs = _validate_flash(q, k, v, key_padding_mask)
    scale, dropout_p = _validate_options(
        softmax_scale, dropout_p, inputs.head_dim,
        causal=causal, return_lse=return_lse, deterministic=deterministic,
    )
    options = AttentionOptions(
        softmax_scale=scale,
        causal=causal,
        causal_alignment="bottom_right",
        dropout_p=dropout_p,
        deterministic=deterministic,
    )
    out, lse = _run(inputs, options, backend)
    return (out, lse) if return_lse else out


def _sdpa_to_flash(t: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) / (N, L, E) / (L, E) -> (B, L, H, E) view (a reshape only for >4-D)."""
    if t.dim() == 2:
        return t[None, :, None, :]
    if t.dim() == 3:
        return t[:, :, None, :]
    if t.dim() > 4:
        t = t.reshape(-1, *t.shape[-3:])
    return t.transpose(1, 2)


def _sdpa_mask(attn_mask: torch.Tensor, query: torch.Tensor, lk: int, batch: int, heads: int) -> torch.Tensor:
    """Broadcast a mask for (..., L, S) to (B, H, L, S) with stride-0 broadcast dims."""
    full = (*query.shape[:-2], query.shape[-2], lk)
    try:
        expanded = attn_mask.expand(full)
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} must broadcast to (..., L, S) = {full}"
        ) from None
    if expanded.dim() == 2:
        return expanded[None, None]
    if expanded.dim() == 3:
        return expanded[:, None]
    return expanded.reshape(batch, heads, full[-2], lk)


def _validate_sdpa(query, key, value, attn_mask, enable_gqa: bool) -> AttentionInputs:
    for name, t in (("query", query), ("key", key), ("value", value)):
        checks.check_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must be at least 2-D (..., L, E), got shape {tuple(t.shape)}")
        checks.check_float_dtype(name, t)
        checks.check_nonempty(name, t)
    checks.check_same_dtype("key", key, "query", query)
    checks.check_same_dtype("value", value, "query", query)
    checks.check_same_device("key", key, "query", query)
    checks.check_same_device("value", value, "query", query)
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"query, key and value must have the same number of dims, got {query.dim()}, {key.dim()}, {value.dim()}"
        )
    if key.shape != value.shape:
        raise ValueError(
            f"value must have key's shape (..., S, E) = {tuple(key.shape)} (fastattn kernels use one head dim), "
            f"got {tuple(value.shape)}"
        )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key's last dim ({key.shape[-1]}) must equal query's E ({query.shape[-1]})")
    lead_q, lead_k = query.shape[:-2], key.shape[:-2]
    if query.dim() >= 4:
        if lead_q[:-1] != lead_k[:-1]:
            raise ValueError(f"query and key batch dims must match, got {tuple(lead_q[:-1])} and {tuple(lead_k[:-1])}")
        hq, hk = lead_q[-1], lead_k[-1]
        if hq != hk and not enable_gqa:
            raise ValueError(f"query has {hq} heads and key {hk}: pass enable_gqa=True for grouped-query attention")
        if hq % hk != 0:
            raise ValueError(f"query's heads ({hq}) must be a multiple of key's heads ({hk})")
    elif lead_q != lead_k:
        raise ValueError(f"query and key batch dims must match, got {tuple(lead_q)} and {tuple(lead_k)}")
    q, k, v = (_sdpa_to_flash(t) for t in (query, key, value))
    checks.check_tensor("attn_mask", attn_mask, optional=True)
    mask = None
    if attn_mask is not None:
        checks.check_same_device("attn_mask", attn_mask, "query", query)
        if attn_mask.dtype != torch.bool:
            if not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
            if attn_mask.requires_grad:
                raise ValueError("attn_mask must not require grad: fastattn computes no gradient for the mask")
            if attn_mask.dtype not in (q.dtype, torch.float32):
                attn_mask = attn_mask.to(q.dtype)
        mask = _sdpa_mask(attn_mask, query, key.shape[-2], q.shape[0], q.shape[2])
    return AttentionInputs(
        q=checks.last_dim_contiguous(q),
        k=checks.last_dim_contiguous(k),
        v=checks.last_dim_contiguous(v),
        attn_mask=mask,
    )


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Arguments:
        query: (..., L, E); 4-D inputs are (N, H, L, E). float16 / bfloat16 / float32.
        key, value: (..., S, E), query's batch dims; with ``enable_gqa`` the head dim may
            divide query's. value's E must equal query's (fastattn kernels use one head dim).
        attn_mask: broadcastable to (..., L, S); bool (True = takes part) or float (added to
            the scaled scores). Receives no gradient.
        dropout_p: applied whenever > 0, as torch does (pass 0.0 in eval).
        is_causal: top-left aligned causal mask (query i sees key j <= i); not with attn_mask.
        scale: a positive finite float (torch also accepts 0 or a negative scale; fastattn
            raises ValueError); defaults to ``1 / sqrt(E)``.
        enable_gqa: allow fewer key/value heads than query heads.
        backend: "triton", "cuda", "reference" or None (automatic).

    Returns:
        (..., L, E) in query's dtype. Unlike torch, a fully-masked query row gives 0, not NaN.
    """
    inputs = _validate_sdpa(query, key, value, attn_mask, enable_gqa)
    softmax_scale, dropout_p = _validate_options(
        scale, dropout_p, inputs.head_dim, is_causal=is_causal, enable_gqa=enable_gqa
    )
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch SDPA)")
    options = AttentionOptions(
        softmax_scale=softmax_scale,
        causal=is_causal,
        causal_alignment="top_left",
        dropout_p=dropout_p,
    )
    out, _ = _run(inputs, options, backend)  # (B, L, H, E)
    if query.dim() == 2:
        return out[0, :, 0, :]
    if query.dim() == 3:
        return out[:, :, 0, :]
    return out.transpose(1, 2).reshape(query.shape)
