"""Feed-forward: validation, the shared autograd layer, public function.

``z = x @ w1.T + b1``; ``a = act(z)`` (swiglu: ``silu(gate) * up`` with w1 = [gate; up]);
``y = dropout(a) @ w2.T + b2``. Rows are flattened to (M, d_model).

The autograd layer is the custom op pair ``fastattn::ffn_forward`` / ``fastattn::ffn_backward``
(as in fastattn/ops/attention.py; not the C++ ``ffn_fwd`` / ``ffn_bwd`` kernels). z is saved
for backward, or with ``recompute`` a (0,) placeholder stands for it and backward recomputes it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from fastattn.ops import _checks as checks
from fastattn.ops import _custom_op
from fastattn.ops._amp import autocast_dtype, cast_for_autocast
from fastattn.options import ACTIVATIONS, FeedForwardInputs, FeedForwardOptions


def _validate(x, w1, b1, w2, b2, activation: str) -> FeedForwardInputs:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
    for name, t, optional in (("x", x, False), ("w1", w1, False), ("b1", b1, True), ("w2", w2, False), ("b2", b2, True)):
        checks.check_tensor(name, t, optional=optional)
        if t is not None:
            checks.check_float_dtype(name, t)
            checks.check_nonempty(name, t)
            checks.check_same_device(name, t, "x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., d_model), got a 0-d tensor")
    d_model = x.shape[-1]
    checks.check_ndim("w1", w1, 2, "(d_hidden, d_model)")
    checks.check_ndim("w2", w2, 2, "(d_out, d_ff)")
    for name, w in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if w is not None:
            checks.check_same_dtype(name, w, "x", x)
    if w1.shape[1] != d_model:
        raise ValueError(f"w1 must have shape (d_hidden, d_model={d_model}), got {tuple(w1.shape)}")
    d_hidden = w1.shape[0]
    d_ff = w2.shape[1]
    expected_hidden = 2 * d_ff if activation == "swiglu" else d_ff
    if d_hidden != expected_hidden:
        what = "2 * d_ff (rows [gate; up]) for swiglu" if activation == "swiglu" else "d_ff"
        raise ValueError(
            f"w1 has {d_hidden} rows but w2 (d_out, d_ff={d_ff}) needs {expected_hidden} = {what}"
        )
    if b1 is not None:
        checks.check_shape("b1", b1, (d_hidden,), "(d_hidden,)")
    if b2 is not None:
        checks.check_shape("b2", b2, (w2.shape[0],), "(d_out,)")
    return FeedForwardInputs(
        x=checks.last_dim_contiguous(x.reshape(-1, d_model)),
        w1=checks.last_dim_contiguous(w1),
        b1=b1,
        w2=checks.last_dim_contiguous(w2),
        b2=b2,
    )


# --------------------------------------------------------------------------------------------
# The one autograd layer, shared by every backend: two custom ops
# --------------------------------------------------------------------------------------------
def _ffn_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    options: str,
    backend: str,
    rng: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors as in :class:`FeedForwardInputs`; ``options``: encoded FeedForwardOptions;
    ``backend``: requested name or "" (automatic); ``rng``: dropout seed and offset or None
    (as in attention's forward op). Returns y (M, d_out) and z (M, d_hidden)
    in x's dtype (z: a (0,) placeholder with ``recompute``); the call state (3,) int64 CPU."""
    inputs = FeedForwardInputs(x, w1, b1, w2, b2)
    (y, z), _, state = _custom_op.run_forward("ffn", inputs, FeedForwardOptions, options, backend, rng)
    return y, _custom_op.absent(x) if z is None else z, state


def _ffn_forward_fake(x, w1, b1, w2, b2, options, backend, rng):
    recompute = _custom_op.decode_options(FeedForwardOptions, options).recompute
    m = x.shape[0]
    z = x.new_empty((0,) if recompute else (m, w1.shape[0]))
    return x.new_empty((m, w2.shape[0])), z, _custom_op.call_state_fake()


def _ffn_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    z: torch.Tensor,
    state: torch.Tensor,
    options: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (M, d_out); the forward's inputs and z. Returns dx, dw1, db1, dw2, db2 shaped and
    typed like their inputs (db1 / db2: placeholders without a bias)."""
    inputs = FeedForwardInputs(x, w1, b1, w2, b2)
    opts = _custom_op.decode_options(FeedForwardOptions, options)
    g = _custom_op.run_backward("ffn", state, inputs, opts, dy.contiguous(), None if opts.recompute else z)
    return tuple(_custom_op.absent(x) if t is None else t for t in (g.dx, g.dw1, g.db1, g.dw2, g.db2))


def _ffn_backward_fake(dy, x, w1, b1, w2, b2, z, state, options):
    return tuple(
        x.new_empty((0,)) if t is None else t.new_empty(t.shape) for t in (x, w1, b1, w2, b2)
    )


def _ffn_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, options, _backend, _rng = inputs
    _y, z, state = output
    ctx.save_for_backward(x, w1, b1, w2, b2, z, state)
    ctx.options = options
    ctx.mark_non_differentiable(z, state)
    ctx.set_materialize_grads(False)


def _ffn_backward_rule(ctx, backward, dy, _dz, _dstate):
    x, w1, b1, w2, b2, z, state = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None, None, None, None
    dx, dw1, db1, dw2, db2 = backward(dy, x, w1, b1, w2, b2, z, state, ctx.options)
    return dx, dw1, None if b1 is None else db1, dw2, None if b2 is None else db2, None, None, None


_FFN = _custom_op.OpPair(
    "fastattn::ffn_forward", _ffn_forward, "fastattn::ffn_backward", _ffn_backward,
    forward_fake=_ffn_forward_fake, backward_fake=_ffn_backward_fake,
    setup_context=_ffn_setup_context, backward_rule=_ffn_backward_rule,
)


class _FeedForwardEager(torch.autograd.Function):
    """Plain eager calls: the forward op's body and backward rule without the schema plumbing
    (see fastattn/ops/_custom_op.py). ``apply(inputs, options, chosen, rng, x, w1, b1, w2,
    b2)`` with ``chosen`` the selected backend and x (..., d_model) as the caller passed it
    (flattened inside, where autograd records no view); returns y (..., d_out). The backward is
    not differentiable."""

    @staticmethod
    def forward(ctx, inputs: FeedForwardInputs, options: FeedForwardOptions, chosen, rng, x, w1, b1, w2, b2):
        y, z = _custom_op.run_on(chosen, "ffn", inputs, options, rng)
        ctx.save_for_backward(inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2, z)
        ctx.chosen, ctx.options, ctx.rng, ctx.shape = chosen, options, rng, x.shape
        ctx.set_materialize_grads(False)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 9
        x, w1, b1, w2, b2, z = ctx.saved_tensors
        g = _custom_op.backward_on(
            ctx.chosen, "ffn", FeedForwardInputs(x, w1, b1, w2, b2), ctx.options, ctx.rng,
            dy.reshape(-1, dy.shape[-1]).contiguous(), z,
        )
        return (None, None, None, None, g.dx.reshape(ctx.shape), g.dw1, None if b1 is None else g.db1, g.dw2,
                None if b2 is None else g.db2)


def feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    *,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    recompute: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Fused ``y = dropout(act(x @ w1.T + b1)) @ w2.T + b2``.

    Arguments:
        x: (..., d_model), float16 / bfloat16 / float32 (float64 on the reference backend).
        w1: (d_hidden, d_model), x's dtype; d_hidden = d_ff, or 2 * d_ff for swiglu (rows
            [gate; up], hidden = silu(gate) * up).
        b1: (d_hidden,) or None.
        w2: (d_out, d_ff), x's dtype.
        b2: (d_out,) or None.
        activation: "relu", "gelu" (erf), "gelu_tanh", "silu" or "swiglu".
        dropout_p: dropout on the activation (pass 0.0 in eval).
        recompute: do not save the pre-activation (M x d_hidden elements); recompute it in
            backward with the first GEMM (activation checkpointing).
        backend: "triton", "cuda", "reference" or None (automatic).

    Returns:
        y: (..., d_out) in x's dtype. float32 GEMMs use tf32 only when
        ``torch.backends.cuda.matmul.allow_tf32`` is set, as in torch.
    """
    amp = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    tensors = (x, w1, b1, w2, b2)
    allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
    key = None if amp is not None else _custom_op.plan_key(
        "ffn", (activation, dropout_p, recompute, allow_tf32, backend), tensors)
    plan = _custom_op.find_plan(key)
    if plan is not None and _custom_op.is_plain_eager(tensors):  # validated and selected before
        return plan(x, w1, b1, w2, b2, _custom_op.eager_rng(dropout_p))
    if amp is not None:
        x, w1, b1, w2, b2 = (cast_for_autocast(t, amp) for t in tensors)
    inputs = _validate(x, w1, b1, w2, b2, activation)
    checks.check_bool("recompute", recompute)
    options = FeedForwardOptions(
        activation=activation,
        dropout_p=checks.check_probability("dropout_p", dropout_p),
        recompute=recompute,
        allow_tf32=allow_tf32,
    )
    request = _custom_op.backend_request(backend)
    if _custom_op.is_plain_eager((x, w1, b1, w2, b2)):
        rng = _custom_op.eager_rng(options.dropout_p)
        own = inputs.w1 is w1 and inputs.w2 is w2
        y, chosen = _custom_op.eager_forward(
            "ffn", inputs, options, request, rng, key if own else None, x, inputs.w1, b1, inputs.w2, b2)
        if y is not None:
            return y
        if _custom_op.needs_grad(x, w1, b1, w2, b2):
            return _FeedForwardEager.apply(inputs, options, chosen, rng, x, w1, b1, w2, b2)
        y, _z = _custom_op.run_on(chosen, "ffn", inputs, options, rng)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    y, _z, _state = _FFN.forward_op(
        inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2,
        _custom_op.encode_options(options), request, _custom_op.draw_rng(options.dropout_p),
    )
    return y.reshape(*x.shape[:-1], w2.shape[0])
