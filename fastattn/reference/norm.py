"""Reference residual + LayerNorm / RMSNorm: explicit formulas, any device.

forward:  h = x * Z + residual (Z = keep / (1 - p)); LayerNorm: mean = E[h],
          rstd = 1 / sqrt(Var[h] + eps), xhat = (h - mean) * rstd; RMSNorm: rstd =
          1 / sqrt(E[h^2] + eps), xhat = h * rstd; y = xhat * weight + bias.
backward: g = dy * weight; LayerNorm: dh = rstd * (g - mean(g) - xhat * mean(g * xhat));
          RMSNorm: dh = rstd * (g - xhat * mean(g * xhat)); dh += dh_prenorm;
          dresidual = dh; dx = dh * Z; dweight = sum(dy * xhat); dbias = sum(dy).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastattn.backends.capabilities import FLOAT_DTYPES, NormCapabilities
from fastattn.options import (
    NormForwardResult,
    NormGrads,
    NormInputs,
    NormOptions,
    RngState,
    residual_out_dtype,
)

CAPABILITIES = NormCapabilities(dtypes=FLOAT_DTYPES)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_keep(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (M, N) keep mask drawn from rng (reference's own stream), or None."""
    if options.dropout_p == 0.0 or rng is None:
        return None
    gen = torch.Generator(device=inputs.device)
    gen.manual_seed(rng.seed * 1_000_003 + rng.offset)
    return torch.rand(inputs.x.shape, generator=gen, device=inputs.device) >= options.dropout_p


def _dropout_scale(keep, options: NormOptions, dtype):
    return None if keep is None else keep.to(dtype) / (1.0 - options.dropout_p)


def _xhat(h: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor) -> torch.Tensor:
    centered = h if mean is None else h - mean[:, None]
    return centered * rstd[:, None]


def forward(
    inputs: NormInputs,
    options: NormOptions,
    rng: Optional[RngState],
    *,
    dropout_mask: Optional[torch.Tensor] = None,
) -> NormForwardResult:
    """dropout_mask: optional bool (M, N) keep mask overriding the reference's own."""
    cdt = _compute_dtype(inputs.dtype)
    keep = dropout_mask if dropout_mask is not None else dropout_keep(inputs, options, rng)
    z = _dropout_scale(keep, options, cdt)
    h = inputs.x.to(cdt) if z is None else inputs.x.to(cdt) * z  # (M, N)
    if inputs.residual is not None:
        h = h + inputs.residual.to(cdt)
    h_out = h.to(residual_out_dtype(inputs, options))  # casting point: the stored residual
    if options.kind == "layer":
        mean = h.mean(-1)  # (M,)
        var = ((h - mean[:, None]) ** 2).mean(-1)
    else:
        mean = None
        var = (h * h).mean(-1)
    rstd = torch.rsqrt(var + options.eps)  # (M,)
    y = _xhat(h, mean, rstd)
    if inputs.weight is not None:
        y = y * inputs.weight.to(cdt)
    if inputs.bias is not None:
        y = y + inputs.bias.to(cdt)
    stat = torch.float64 if cdt == torch.float64 else torch.float32
    return NormForwardResult(
        y=y.to(inputs.dtype),
        h=h_out,
        mean=None if mean is None else mean.to(stat),
        rstd=rstd.to(stat),
    )


def backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    h: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    inputs: NormInputs,
    options: NormOptions,
    rng: Optional[RngState],
    *,
    dropout_mask: Optional[torch.Tensor] = None,
) -> NormGrads:
    cdt = _compute_dtype(inputs.dtype)
    hc = h.to(cdt)
    mean_c = None if mean is None else mean.to(cdt)
    rstd_c = rstd.to(cdt)
    xhat = _xhat(hc, mean_c, rstd_c)  # (M, N)
    dyc = dy.to(cdt)
    g = dyc if inputs.weight is None else dyc * inputs.weight.to(cdt)
    c2 = (g * xhat).mean(-1, keepdim=True)
    if options.kind == "layer":
        grad_h = rstd_c[:, None] * (g - g.mean(-1, keepdim=True) - xhat * c2)
    else:
        grad_h = rstd_c[:, None] * (g - xhat * c2)
    if dh is not None:
        grad_h = grad_h + dh.to(cdt)
    keep = dropout_mask if dropout_mask is not None else dropout_keep(inputs, options, rng)
    z = _dropout_scale(keep, options, cdt)
    dx = grad_h if z is None else grad_h * z
    return NormGrads(
        dx=dx.to(inputs.dtype),
        dresidual=None if inputs.residual is None else grad_h.to(inputs.residual.dtype),
        dweight=None if inputs.weight is None else (dyc * xhat).sum(0).to(inputs.weight.dtype),
        dbias=None if inputs.bias is None else dyc.sum(0).to(inputs.bias.dtype),
    )
