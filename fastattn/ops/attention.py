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

``flash_attention_varlen`` takes the same path with cu_seqlens in AttentionInputs; KV-cache
decoding (inference only, no autograd) is in fastattn/ops/kvcache.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from torch.autograd.function import once_differentiable

from fastattn.ops import _checks as checks
from fastattn.ops import _custom_op
from fastattn.ops._amp import autocast_dtype, cast_for_autocast
from fastattn.options import AttentionInputs, AttentionOptions


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _validate_qkv(q, k, v, layout: str, kv_layout: str) -> None:
    """q (*lead, L, H, D), k/v (*lead, Lk, Hkv, D) with H % Hkv == 0: types, float dtype, one
    dtype and device, shapes. layout / kv_layout name the dims in messages."""
    ndim = layout.count(",") + 1  # layout names every dim
    if not _common_qkv(q, k, v, ndim):
        _check_qkv(q, k, v, ndim, layout, kv_layout)


def _common_qkv(q, k, v, ndim: int) -> bool:
    """What :func:`_check_qkv` accepts, in its usual form, tested in one pass."""
    if q is None or k is None or v is None or not checks.dense_float_tensors(q, k, v):
        return False
    if not (q.dtype == k.dtype == v.dtype and q.dim() == k.dim() == ndim and k.shape == v.shape):
        return False
    if q.numel() == 0 or k.numel() == 0:
        return False
    return q.shape[:-3] == k.shape[:-3] and q.shape[-1] == k.shape[-1] and q.shape[-2] % k.shape[-2] == 0


def _check_qkv(q, k, v, ndim: int, layout: str, kv_layout: str) -> None:
    """Raises TypeError / ValueError naming the first bad argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.check_tensor(name, t)
        checks.check_ndim(name, t, ndim, layout)
        checks.check_float_dtype(name, t)
        checks.check_nonempty(name, t)
    checks.check_same_dtype("k", k, "q", q)
    checks.check_same_dtype("v", v, "q", q)
    checks.check_same_device("k", k, "q", q)
    checks.check_same_device("v", v, "q", q)
    h, d = q.shape[-2:]
    expected = (*q.shape[:-3], k.shape[-3], k.shape[-2], d)
    checks.check_shape("k", k, expected, kv_layout)
    checks.check_shape("v", v, expected, kv_layout)
    if h % k.shape[-2] != 0:
        raise ValueError(f"q's nheads ({h}) must be a multiple of k/v's nheads_kv ({k.shape[-2]})")


def _validate_flash(q, k, v, key_padding_mask, alibi_slopes=None) -> AttentionInputs:
    _validate_qkv(q, k, v, "(batch, seqlen, nheads, headdim)", "(batch, seqlen_k, nheads_kv, headdim)")
    b, lk = k.shape[:2]
    if key_padding_mask is not None and not (
        isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.layout == torch.strided
        and not key_padding_mask.is_nested and key_padding_mask.dtype == torch.bool
        and key_padding_mask.shape == (b, lk) and key_padding_mask.device == q.device
    ):
        _check_key_padding_mask(key_padding_mask, b, lk, q)
    return AttentionInputs(
        q=checks.last_dim_contiguous(q),
        k=checks.last_dim_contiguous(k),
        v=checks.last_dim_contiguous(v),
        key_padding_mask=key_padding_mask,
        alibi_slopes=_validate_alibi(alibi_slopes, b, q.shape[2], q),
    )


def _check_key_padding_mask(key_padding_mask, b: int, lk: int, q) -> None:
    checks.check_tensor("key_padding_mask", key_padding_mask, optional=True)
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real token), got {key_padding_mask.dtype}")
        checks.check_shape("key_padding_mask", key_padding_mask, (b, lk), "(batch, seqlen_k)")
        checks.check_same_device("key_padding_mask", key_padding_mask, "q", q)


def _validate_options(softmax_scale, dropout_p, head_dim: int, **flags) -> tuple[float, float]:
    for name, value in flags.items():
        checks.check_bool(name, value)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else checks.check_positive("softmax_scale", softmax_scale)
    return scale, checks.check_probability("dropout_p", dropout_p)


def _flash_options(head_dim: int, softmax_scale, dropout_p, window_size, softcap, *, causal, **flags) -> AttentionOptions:
    """The validated options of the flash-layout functions (bottom-right alignment)."""
    scale, dropout_p = _validate_options(softmax_scale, dropout_p, head_dim, causal=causal, **flags)
    window_left, window_right = _validate_window(window_size, causal)
    return AttentionOptions(
        softmax_scale=scale,
        causal=causal,
        causal_alignment="bottom_right",
        dropout_p=dropout_p,
        deterministic=flags.get("deterministic", False),
        window_left=window_left,
        window_right=window_right,
        softcap=_validate_softcap(softcap),
    )


def _validate_window(window_size, causal: bool) -> tuple[int, int]:
    """(left, right) with -1 = unbounded; causal sets right to 0 (flash-attn's rule)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
    left, right = window_size
    for name, value in (("window_size[0]", left), ("window_size[1]", right)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int (-1 = unbounded), got {type(value).__name__}")
        if value < -1:
            raise ValueError(f"{name} must be >= -1 (-1 = unbounded), got {value}")
    return left, 0 if causal else right


def _validate_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float (0 = off), got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap}")
    return float(softcap)


def _validate_alibi(alibi_slopes, batch: int, nheads: int, q: torch.Tensor) -> Optional[torch.Tensor]:
    checks.check_tensor("alibi_slopes", alibi_slopes, optional=True)
    if alibi_slopes is None:
        return None
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must have dtype torch.float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                         f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}")
    checks.check_same_device("alibi_slopes", alibi_slopes, "q", q)
    if alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes must not require grad: fastattn computes no gradient for the slopes")
    return alibi_slopes.contiguous()


def _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> AttentionInputs:
    """Packed q (total_q, H, D), k/v (total_k, Hkv, D) and their int32 (batch+1,) offsets. Reads
    both cu_seqlens to the host once (one sync) to check their values."""
    _validate_qkv(q, k, v, "(total_q, nheads, headdim)", "(total_k, nheads_kv, headdim)")
    total_q, total_k = q.shape[0], k.shape[0]
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        checks.check_tensor(name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must be 1-D (batch + 1,) with batch >= 1, got shape {tuple(cu.shape)}")
        checks.check_same_device(name, cu, "q", q)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape (batch + 1,) = {tuple(cu_seqlens_q.shape)}, "
                         f"got {tuple(cu_seqlens_k.shape)}")
    offsets_q, offsets_k = torch.stack((cu_seqlens_q, cu_seqlens_k)).tolist()  # the one host sync
    for name, offsets, total, max_name, max_seqlen in (
        ("cu_seqlens_q", offsets_q, total_q, "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", offsets_k, total_k, "max_seqlen_k", max_seqlen_k),
    ):
        _check_offsets(name, offsets, total)
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(f"{max_name} must be an int, got {type(max_seqlen).__name__}")
        longest = max(b - a for a, b in zip(offsets, offsets[1:]))
        if max_seqlen < longest:
            raise ValueError(f"{max_name} ({max_seqlen}) must be >= the longest sequence in {name} ({longest})")
    return AttentionInputs(
        q=checks.last_dim_contiguous(q),
        k=checks.last_dim_contiguous(k),
        v=checks.last_dim_contiguous(v),
        cu_seqlens_q=cu_seqlens_q.contiguous(),
        cu_seqlens_k=cu_seqlens_k.contiguous(),
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
    )


def _check_offsets(name: str, offsets: list[int], total: int) -> None:
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    for b, (start, end) in enumerate(zip(offsets, offsets[1:])):
        if end < start:
            raise ValueError(f"{name} must be non-decreasing (sorted offsets), but {name}[{b + 1}] = {end} "
                             f"< {name}[{b}] = {start}")
    if offsets[-1] != total:
        raise ValueError(f"{name}[-1] ({offsets[-1]}) must equal the number of packed rows ({total})")


# --------------------------------------------------------------------------------------------
# The one autograd layer, shared by every backend: two custom ops
# --------------------------------------------------------------------------------------------
def _attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    options: str,
    backend: str,
    rng: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors and max_seqlens as in :class:`AttentionInputs`; ``options``: encoded
    AttentionOptions; ``backend``: requested name or "" (automatic); ``rng``: (2,) int64 dropout
    seed and offset (``fastattn::dropout_seed``) or None. Returns out (B, Lq, H, D) in q's
    dtype (varlen: (total_q, H, D)), lse (B, H, Lq) fp32 (varlen: (H, total_q)) and the call
    state (3,) int64 CPU (backend, dropout seed, offset)."""
    tensors = (q, k, v, key_padding_mask, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    inputs = AttentionInputs(*tensors, max_seqlen_q, max_seqlen_k)
    (out, lse), _, state = _custom_op.run_forward("attention", inputs, AttentionOptions, options, backend, rng)
    return out, lse, state


def _attention_forward_fake(q, k, v, key_padding_mask, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k, options, backend, rng):
    if cu_seqlens_q is not None:  # varlen: q (total_q, H, D), lse (H, total_q)
        lse_shape = (q.shape[1], q.shape[0])
    else:
        b, lq, h, _ = q.shape
        lse_shape = (b, h, lq)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32), _custom_op.call_state_fake()


def _attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor],
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    state: torch.Tensor,
    options: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout like out; the forward's inputs and outputs. Returns dq like q and dk, dv like k, v
    in the inputs' dtypes."""
    tensors = (q, k, v, key_padding_mask, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    inputs = AttentionInputs(*tensors, max_seqlen_q, max_seqlen_k)
    opts = _custom_op.decode_options(AttentionOptions, options)
    grads = _custom_op.run_backward("attention", state, inputs, opts, dout.contiguous(), out, lse)
    return grads


def _attention_backward_fake(dout, q, k, v, key_padding_mask, attn_mask, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, out, lse, state, options):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


#: Positions of the forward op's arguments: 8 tensors, 2 max_seqlens, options, backend, rng.
_NUM_FORWARD_ARGS = 13


def _attention_setup_context(ctx, inputs, output):
    *tensors, max_seqlen_q, max_seqlen_k, options, _backend, _rng = inputs
    out, lse, state = output
    ctx.save_for_backward(*tensors, out, lse, state)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = options
    ctx.mark_non_differentiable(lse, state)
    ctx.set_materialize_grads(False)


def _attention_backward_rule(ctx, backward, dout, _dlse, _dstate):
    *tensors, out, lse, state = ctx.saved_tensors
    if dout is None:  # out took no part in the loss
        return (None,) * _NUM_FORWARD_ARGS
    dq, dk, dv = backward(dout, *tensors, *ctx.max_seqlens, out, lse, state, ctx.options)
    return (dq, dk, dv) + (None,) * (_NUM_FORWARD_ARGS - 3)


_ATTENTION = _custom_op.OpPair(
    "fastattn::flash_attn_forward", _attention_forward, "fastattn::flash_attn_backward", _attention_backward,
    forward_fake=_attention_forward_fake, backward_fake=_attention_backward_fake,
    setup_context=_attention_setup_context, backward_rule=_attention_backward_rule,
)


class _AttentionEager(torch.autograd.Function):
    """Plain eager calls: the forward op's body and backward rule without the schema plumbing
    (see fastattn/ops/_custom_op.py). ``apply(inputs, options, chosen, rng, q, k, v)``:
    ``chosen`` the selected backend; q, k, v are the inputs' own, passed again so that autograd
    records them. Like the backward op, the backward is not differentiable."""

    @staticmethod
    def forward(ctx, inputs: AttentionInputs, options: AttentionOptions, chosen, rng, q, k, v):
        out, lse = _custom_op.run_on(chosen, "attention", inputs, options, rng)
        ctx.save_for_backward(*inputs.tensors(), out, lse)
        ctx.chosen, ctx.options, ctx.rng = chosen, options, rng
        ctx.max_seqlens = (inputs.max_seqlen_q, inputs.max_seqlen_k)
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        if dout is None:  # out took no part in the loss
            return (None,) * 7
        *tensors, out, lse = ctx.saved_tensors
        inputs = AttentionInputs(*tensors, *ctx.max_seqlens)
        dq, dk, dv = _custom_op.backward_on(
            ctx.chosen, "attention", inputs, ctx.options, ctx.rng, dout.contiguous(), out, lse
        )
        return None, None, None, None, dq, dk, dv


def _run(inputs: AttentionInputs, options: AttentionOptions, backend: Optional[str], key: Optional[tuple] = None):
    """``key``: the caller's :func:`_custom_op.plan_key`, when an eager plan may take its own
    arguments (q, k, v, key_padding_mask, alibi_slopes as passed, autocast off) on later calls."""
    amp = autocast_dtype(inputs.device)
    if amp is not None and inputs.dtype != amp:
        mask = inputs.attn_mask
        inputs = dataclasses.replace(
            inputs,
            q=cast_for_autocast(inputs.q, amp),
            k=cast_for_autocast(inputs.k, amp),
            v=cast_for_autocast(inputs.v, amp),
            attn_mask=mask if mask is None or mask.dtype in (torch.bool, torch.float32) else mask.to(amp),
        )
    tensors = inputs.tensors()
    request = _custom_op.backend_request(backend)
    if _custom_op.is_plain_eager(tensors):
        rng = _custom_op.eager_rng(options.dropout_p)
        outputs, chosen = _custom_op.eager_forward(
            "attention", inputs, options, request, rng, key, *_plan_args(inputs))
        if outputs is not None:
            return outputs
        if _custom_op.needs_grad(inputs.q, inputs.k, inputs.v):
            return _AttentionEager.apply(inputs, options, chosen, rng, inputs.q, inputs.k, inputs.v)
        return _custom_op.run_on(chosen, "attention", inputs, options, rng)
    out, lse, _state = _ATTENTION.forward_op(
        *tensors, inputs.max_seqlen_q, inputs.max_seqlen_k,
        _custom_op.encode_options(options), request, _custom_op.draw_rng(options.dropout_p),
    )
    return out, lse


def _plan_args(inputs: AttentionInputs) -> tuple:
    """The tensors an eager plan takes: q, k, v, key_padding_mask, attn_mask, alibi_slopes."""
    return inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, inputs.attn_mask, inputs.alibi_slopes


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
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
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
        window_size: (left, right) sliding window, -1 = unbounded: query i sees keys
            ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]``; with causal,
            right is 0 (flash-attn's rule).
        softcap: > 0 caps the scaled scores: ``softcap * tanh(scale * q.k / softcap)``.
        alibi_slopes: (nheads,) or (batch, nheads) float32: adds
            ``-slope * |i + seqlen_k - seqlen_q - j|`` to the (capped) scores.
        return_lse: also return the logsumexp.
        deterministic: bitwise-reproducible backward (where the backend offers a faster
            non-deterministic one).
        backend: "triton", "cuda", "cpu", "reference" or None (automatic; see
            ``fastattn.backends()``).

    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype; and with ``return_lse`` also
        lse: (batch, nheads, seqlen_q) float32, natural log. A query row that sees no key gets
        output 0 and lse -inf (never NaN), and passes no gradient.
    """
    tensors = (q, k, v, key_padding_mask, alibi_slopes)
    amp = autocast_dtype(q.device) if isinstance(q, torch.Tensor) else None
    key = None if amp is not None else _custom_op.plan_key(  # autocast casts q, k, v first
        "flash_attention",
        (causal, softmax_scale, dropout_p, window_size, softcap, return_lse, deterministic, backend), tensors,
    )
    plan = _custom_op.find_plan(key)
    if plan is not None and _custom_op.is_plain_eager(tensors):  # validated and selected before
        out, lse = plan(q, k, v, key_padding_mask, None, alibi_slopes, _custom_op.eager_rng(dropout_p))
        return (out, lse) if return_lse else out
    inputs = _validate_flash(q, k, v, key_padding_mask, alibi_slopes)
    options = _flash_options(
        inputs.head_dim, softmax_scale, dropout_p, window_size, softcap,
        causal=causal, return_lse=return_lse, deterministic=deterministic,
    )
    own = inputs.q is q and inputs.k is k and inputs.v is v and inputs.alibi_slopes is alibi_slopes
    out, lse = _run(inputs, options, backend, key if own else None)
    return (out, lse) if return_lse else out


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention over a packed batch of variable-length sequences (flash-attn's
    ``flash_attn_varlen_func``): sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q
    and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v; sequences never see each other and
    nothing is padded.

    Arguments:
        q: (total_q, nheads, headdim), float16 / bfloat16 / float32 (float64 on the reference
            backend), last dim contiguous.
        k, v: (total_k, nheads_kv, headdim), q's dtype and device; ``nheads % nheads_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: (batch + 1,) int32 on q's device: 0, then the running
            total of the sequence lengths (non-decreasing; empty sequences allowed), ending
            at total_q / total_k. Read once on the host for validation.
        max_seqlen_q, max_seqlen_k: ints >= the longest query / key sequence.
        causal: per sequence, query i sees key j iff ``j <= i + seqlen_k - seqlen_q``
            (bottom-right aligned).
        softmax_scale: a positive finite float; defaults to ``1 / sqrt(headdim)``.
        dropout_p: dropout on the attention probabilities (pass 0.0 in eval).
        window_size: (left, right), -1 = unbounded, per sequence as in ``flash_attention``;
            with causal, right is 0.
        softcap: > 0 caps the scaled scores: ``softcap * tanh(scale * q.k / softcap)``.
        alibi_slopes: (nheads,) or (batch, nheads) float32: adds
            ``-slope * |i + seqlen_k - seqlen_q - j|`` per sequence.
        return_lse: also return the logsumexp.
        deterministic: bitwise-reproducible backward.
        backend: "triton", "cuda", "cpu", "reference" or None (automatic).

    Returns:
        out: (total_q, nheads, headdim), q's dtype; and with ``return_lse`` also
        lse: (nheads, total_q) float32 (flash-attn's varlen layout). A query row that sees no
        key (e.g. of a sequence with no keys) gets output 0 and lse -inf, and no gradient.
    """
    inputs = _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = _flash_options(
        inputs.head_dim, softmax_scale, dropout_p, window_size, softcap,
        causal=causal, return_lse=return_lse, deterministic=deterministic,
    )
    inputs = dataclasses.replace(inputs, alibi_slopes=_validate_alibi(alibi_slopes, inputs.batch, inputs.nheads, q))
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
