"""Residual + LayerNorm / RMSNorm: validation, the shared autograd layer, public functions.

``h = dropout(x) + residual``; ``y = norm(h) * weight + bias``. Rows are flattened to (M, N)
views; the backend returns y and h, and saves fp32 mean/rstd for the backward.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from fastattn.backends import select
from fastattn.ops import _checks as checks
from fastattn.ops._amp import autocast_off
from fastattn.options import NormInputs, NormOptions, RngState

Tensors = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _validate(x, residual, weight, bias) -> NormInputs:
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
    return NormInputs(
        x=checks.last_dim_contiguous(x.reshape(-1, n)),
        residual=None if residual is None else checks.last_dim_contiguous(residual.reshape(-1, n)),
        weight=weight,
        bias=bias,
    )


def _stand_in(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A zero-stride tensor of t's shape and dtype: backward primitives read only the shape
    and dtype of x and residual (their data is not saved)."""
    if t is None:
        return None
    return torch.empty(1, dtype=t.dtype, device=t.device).expand(t.shape)


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, options: NormOptions, backend):
        inputs = NormInputs(x, residual, weight, bias)
        rng = RngState.draw() if options.dropout_p > 0 else None
        with autocast_off(x.device):
            result = backend.forward("norm", inputs, options, rng)
        h = result.h
        if options.prenorm and h.data_ptr() == x.data_ptr():
            h = h.clone()  # an output must not alias an input of the Function
        ctx.save_for_backward(h, weight, bias, result.mean, result.rstd)
        ctx.options, ctx.backend, ctx.rng = options, backend, rng
        ctx.x_stand_in, ctx.residual_stand_in = _stand_in(x), _stand_in(residual)
        if options.prenorm:
            return result.y, h
        return result.y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh=None):
        h, weight, bias, mean, rstd = ctx.saved_tensors
        inputs = NormInputs(ctx.x_stand_in, ctx.residual_stand_in, weight, bias)
        with autocast_off(h.device):
            grads = ctx.backend.backward(
                "norm", dy.contiguous(), None if dh is None else dh.contiguous(),
                h, mean, rstd, inputs, ctx.options, ctx.rng,
            )
        return grads.dx, grads.dresidual, grads.dweight, grads.dbias, None, None


def _norm(x, residual, weight, bias, options: NormOptions, backend: Optional[str]) -> Tensors:
    inputs = _validate(x, residual, weight, bias)
    chosen = select("norm", inputs, options, backend)
    outputs = NormFunction.apply(inputs.x, inputs.residual, weight, bias, options, chosen)
    if options.prenorm:
        y, h = outputs
        return y.reshape(x.shape), h.reshape(x.shape)
    return outputs.reshape(x.shape)


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
    return _norm(x, residual, weight, bias, _options("layer", eps, dropout_p, prenorm, residual_in_fp32), backend)


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
    return _norm(x, residual, weight, None, _options("rms", eps, dropout_p, prenorm, residual_in_fp32), backend)
