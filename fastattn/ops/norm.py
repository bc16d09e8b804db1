"""Residual + LayerNorm / RMSNorm: validation, the shared autograd layer, public functions.

``h = dropout(x) + residual``; ``y = norm(h) * weight + bias``. Rows are flattened to (M, N)
views; the backend returns y and h, and saves fp32 mean/rstd for the backward.

The autograd layer is the custom op pair ``fastattn::add_norm_forward`` /
``fastattn::add_norm_backward`` (as in fastattn/ops/attention.py; not the C++ ``norm_fwd`` /
``norm_bwd`` kernels). An op output may not alias an input, so when h would equal x (no
residual, no dropout, no dtype change) the forward op returns a placeholder for h and x itself
serves as h: it is saved for backward and returned with ``prenorm``, and its gradient reaches
x directly. Absent outputs (RMSNorm's mean, the gradients of absent tensors) are (0,)
placeholders, as a schema cannot return None.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.autograd.function import once_differentiable

from fastattn.ops import _checks as checks
from fastattn.ops import _custom_op
from fastattn.options import NormInputs, NormOptions, residual_out_dtype

Tensors = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _validate(x, residual, weight, bias) -> NormInputs:
    if not _common_case(x, residual, weight, bias):
        _check(x, residual, weight, bias)
    n = x.shape[-1]
    return NormInputs(
        x=checks.last_dim_contiguous(x.reshape(-1, n)),
        residual=None if residual is None else checks.last_dim_contiguous(residual.reshape(-1, n)),
        weight=weight,
        bias=bias,
    )


def _common_case(x, residual, weight, bias) -> bool:
    """What :func:`_check` accepts, in its usual form, tested in one pass."""
    if x is None or not checks.dense_float_tensors(x, residual, weight, bias) or x.dim() < 1 or x.numel() == 0:
        return False
    n = x.shape[-1]
    return (
        (residual is None or residual.shape == x.shape)
        and (weight is None or weight.shape == (n,))
        and (bias is None or bias.shape == (n,))
    )


def _check(x, residual, weight, bias) -> None:
    """Raises TypeError / ValueError naming the first bad argument."""
    checks.check_tensor("x", x)
    checks.check_float_dtype("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., hidden), got a 0-d tensor")
    checks.check_nonempty("x", x)
    n = x.shape[-1]
    checks.check_tensor("residual", residual, optional=True)
    if residual is not None:
        checks.check_float_dtype("residual", residual)
        checks.check_shape("residual", residual, x.shape, "x's shape")
        checks.check_same_device("residual", residual, "x", x)
    for name, param in (("weight", weight), ("bias", bias)):
        checks.check_tensor(name, param, optional=True)
        if param is not None:
            checks.check_float_dtype(name, param)
            checks.check_shape(name, param, (n,), "(hidden,)")
            checks.check_same_device(name, param, "x", x)


# --------------------------------------------------------------------------------------------
# The one autograd layer, shared by every backend: two custom ops
# --------------------------------------------------------------------------------------------
def _h_is_x(x: torch.Tensor, residual: Optional[torch.Tensor], options: NormOptions) -> bool:
    """Without a residual, dropout or a dtype change, h equals x: the forward op returns a
    placeholder for h and x itself serves as h (no copy, no extra saved tensor)."""
    return (
        residual is None
        and options.dropout_p == 0
        and residual_out_dtype(NormInputs(x, residual), options) == x.dtype
    )


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm_forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    options: str,
    backend: str,
    rng: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tensors as in :class:`NormInputs`; ``options``: encoded NormOptions; ``backend``:
    requested name or "" (automatic); ``rng``: dropout seed and offset or None (as in
    attention's forward op). Returns y (M, N) in x's dtype; h (M, N) in
    ``residual_out_dtype`` (a (0,) placeholder when h is x); mean (M,) (placeholder for
    RMSNorm) and rstd (M,), fp32 (fp64 for fp64 x); the call state (3,) int64 CPU."""
    inputs = NormInputs(x, residual, weight, bias)
    result, opts, state = _custom_op.run_forward("norm", inputs, NormOptions, options, backend, rng)
    h = _custom_op.absent(x) if _h_is_x(x, residual, opts) else result.h
    mean = _custom_op.absent(x, torch.float32) if result.mean is None else result.mean
    return result.y, h, mean, result.rstd, state


def _norm_forward_fake(x, residual, weight, bias, options, backend, rng):
    opts = _custom_op.decode_options(NormOptions, options)
    m, n = x.shape
    stats = _stats_dtype(x)
    h_is_x = _h_is_x(x, residual, opts)
    h = x.new_empty((0,) if h_is_x else (m, n), dtype=residual_out_dtype(NormInputs(x, residual), opts))
    mean = x.new_empty((m,), dtype=stats) if opts.kind == "layer" else x.new_empty((0,), dtype=torch.float32)
    return x.new_empty((m, n)), h, mean, x.new_empty((m,), dtype=stats), _custom_op.call_state_fake()


def _norm_backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    h: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    state: torch.Tensor,
    x_dtype: torch.dtype,
    residual_dtype: Optional[torch.dtype],
    options: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy (M, N); dh (M, N) or None (h unused, or h is x); h (M, N) the forward's h (or x);
    the dtypes of x and residual (None: no residual). Returns dx, dresidual (M, N) and
    dweight, dbias (N,), placeholders for the absent ones."""
    opts = _custom_op.decode_options(NormOptions, options)
    inputs = NormInputs(
        _custom_op.stand_in(h.shape, x_dtype, h.device),
        _custom_op.stand_in(h.shape, residual_dtype, h.device),
        weight,
        bias,
    )
    grads = _custom_op.run_backward(
        "norm", state, inputs, opts, dy.contiguous(), None if dh is None else dh.contiguous(),
        h, mean if opts.kind == "layer" else None, rstd,
    )
    return tuple(
        _custom_op.absent(dy) if g is None else g for g in (grads.dx, grads.dresidual, grads.dweight, grads.dbias)
    )


def _norm_backward_fake(dy, dh, h, weight, bias, mean, rstd, state, x_dtype, residual_dtype, options):
    n = h.shape[-1]
    return (
        dy.new_empty(h.shape, dtype=x_dtype),
        dy.new_empty((0,)) if residual_dtype is None else dy.new_empty(h.shape, dtype=residual_dtype),
        dy.new_empty((0,)) if weight is None else weight.new_empty((n,)),
        dy.new_empty((0,)) if bias is None else bias.new_empty((n,)),
    )


def _norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, options, _backend, _rng = inputs
    _y, h, mean, rstd, state = output
    ctx.h_is_x = _h_is_x(x, residual, _custom_op.decode_options(NormOptions, options))
    ctx.save_for_backward(x if ctx.h_is_x else h, weight, bias, mean, rstd, state)
    ctx.options, ctx.x_dtype = options, x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(mean, rstd, state, *((h,) if ctx.h_is_x else ()))
    ctx.set_materialize_grads(False)


def _norm_backward_rule(ctx, backward, dy, dh, _dmean, _drstd, _dstate):
    h, weight, bias, mean, rstd, state = ctx.saved_tensors
    if dy is None and dh is None:
        return None, None, None, None, None, None, None
    if dy is None:  # only h took part in the loss (prenorm)
        dy = torch.zeros(h.shape, dtype=ctx.x_dtype, device=h.device)
    dx, dresidual, dweight, dbias = backward(
        dy, dh, h, weight, bias, mean, rstd, state, ctx.x_dtype, ctx.residual_dtype, ctx.options
    )
    return (
        dx,
        None if ctx.residual_dtype is None else dresidual,
        None if weight is None else dweight,
        None if bias is None else dbias,
        None,
        None,
        None,
    )


_NORM = _custom_op.OpPair(
    "fastattn::add_norm_forward", _norm_forward, "fastattn::add_norm_backward", _norm_backward,
    forward_fake=_norm_forward_fake, backward_fake=_norm_backward_fake,
    setup_context=_norm_setup_context, backward_rule=_norm_backward_rule,
)


class _NormEager(torch.autograd.Function):
    """Plain eager calls: the forward op's body and backward rule without the schema plumbing
    (see fastattn/ops/_custom_op.py). ``apply(inputs, options, chosen, rng, x, residual,
    weight, bias)`` with x and residual (..., N) as the caller passed them (flattened inside,
    where autograd records no view) and ``chosen`` the selected backend; returns y (..., N) and
    h (..., N), or None when h is x. The backward is not differentiable (like the backward op)."""

    @staticmethod
    def forward(ctx, inputs: NormInputs, options: NormOptions, chosen, rng, x, residual, weight, bias):
        result = _custom_op.run_on(chosen, "norm", inputs, options, rng)
        y, h = _shaped(result, inputs, options, x.shape)
        ctx.save_for_backward(inputs.x if h is None else result.h, weight, bias, result.mean, result.rstd)
        ctx.chosen, ctx.options, ctx.rng, ctx.shape = chosen, options, rng, x.shape
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        if dy is None and dh is None:
            return (None,) * 8
        n = h.shape[-1]
        dy = torch.zeros(h.shape, dtype=ctx.x_dtype, device=h.device) if dy is None else dy.reshape(-1, n)
        inputs = NormInputs(
            _custom_op.stand_in(h.shape, ctx.x_dtype, h.device),
            _custom_op.stand_in(h.shape, ctx.residual_dtype, h.device),
            weight,
            bias,
        )
        grads = _custom_op.backward_on(
            ctx.chosen, "norm", inputs, ctx.options, ctx.rng, dy.contiguous(),
            None if dh is None else dh.reshape(-1, n).contiguous(), h, mean, rstd,
        )
        dresidual = None if ctx.residual_dtype is None else grads.dresidual.reshape(ctx.shape)
        return (None, None, None, None, grads.dx.reshape(ctx.shape), dresidual,
                None if weight is None else grads.dweight, None if bias is None else grads.dbias)


def _shaped(result, inputs: NormInputs, options: NormOptions, shape):
    """A backend's (M, N) result as y and h shaped like x (h None when it is x)."""
    h = None if _h_is_x(inputs.x, inputs.residual, options) else result.h.reshape(shape)
    return result.y.reshape(shape), h


def _norm(x, residual, weight, bias, kind: str, eps, dropout_p, prenorm, residual_in_fp32, backend) -> Tensors:
    tensors = (x, residual, weight, bias)
    key = _custom_op.plan_key("norm", (kind, eps, dropout_p, prenorm, residual_in_fp32, backend), tensors)
    plan = _custom_op.find_plan(key)
    if plan is not None and _custom_op.is_plain_eager(tensors):  # validated and selected before
        y, h = plan(x, residual, weight, bias, _custom_op.eager_rng(dropout_p))
        return (y, x if h is None else h) if prenorm else y
    options = _options(kind, eps, dropout_p, prenorm, residual_in_fp32)
    inputs = _validate(x, residual, weight, bias)
    request = _custom_op.backend_request(backend)
    if _custom_op.is_plain_eager(tensors):
        rng = _custom_op.eager_rng(options.dropout_p)
        outputs, chosen = _custom_op.eager_forward("norm", inputs, options, request, rng, key, *tensors)
        if outputs is not None:
            y, h = outputs
        elif _custom_op.needs_grad(x, residual, weight, bias):
            y, h = _NormEager.apply(inputs, options, chosen, rng, x, residual, weight, bias)
        else:
            y, h = _shaped(_custom_op.run_on(chosen, "norm", inputs, options, rng), inputs, options, x.shape)
        return (y, x if h is None else h) if options.prenorm else y
    y, h, _mean, _rstd, _state = _NORM.forward_op(
        inputs.x, inputs.residual, weight, bias,
        _custom_op.encode_options(options), request, _custom_op.draw_rng(options.dropout_p),
    )
    y = y.reshape(x.shape)
    if not options.prenorm:
        return y
    return y, (x if _h_is_x(inputs.x, inputs.residual, options) else h.reshape(x.shape))


def _options(kind, eps, dropout_p, prenorm, residual_in_fp32) -> NormOptions:
    checks.check_bool("prenorm", prenorm)
    checks.check_bool("residual_in_fp32", residual_in_fp32)
    return NormOptions(
        kind=kind,
        eps=checks.check_positive("eps", eps),
        dropout_p=checks.check_probability("dropout_p", dropout_p),
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
    )


def add_layer_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: Optional[str] = None,
) -> Tensors:
    """Fused ``h = dropout(x) + residual; y = layer_norm(h) * weight + bias``.

    Arguments:
        x: (..., hidden), float16 / bfloat16 / float32 (float64 on the reference backend).
        residual: (..., hidden) like x (any float dtype), or None (then ``h = dropout(x)``).
        weight, bias: (hidden,) or None (no scale / no shift).
        eps: added to the variance.
        dropout_p: dropout on x before the residual add (pass 0.0 in eval).
        prenorm: also return h, the new residual stream (pre-norm Transformer blocks).
        residual_in_fp32: keep h in float32 (when residual is None or low precision).
        backend: "triton", "cuda", "reference" or None (automatic).

    Returns:
        y: (..., hidden) in x's dtype; with ``prenorm`` also h: (..., hidden) in residual's
        dtype (float32 with ``residual_in_fp32``; x's dtype without a residual). Mean and rstd
        are computed and saved in float32.
    """
    return _norm(x, residual, weight, bias, "layer", eps, dropout_p, prenorm, residual_in_fp32, backend)


def rms_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-6,
    dropout_p: float = 0.0,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    backend: Optional[str] = None,
) -> Tensors:
    """Fused ``h = dropout(x) + residual; y = h / sqrt(mean(h^2) + eps) * weight``.

    Arguments:
        x: (..., hidden), float16 / bfloat16 / float32 (float64 on the reference backend).
        residual: (..., hidden) like x, or None.
        weight: (hidden,) or None.
        eps, dropout_p, prenorm, residual_in_fp32, backend: as in :func:`add_layer_norm`.

    Returns:
        y, or (y, h) with ``prenorm``; shapes and dtypes as in :func:`add_layer_norm`.
    """
    return _norm(x, residual, weight, None, "rms", eps, dropout_p, prenorm, residual_in_fp32, backend)
