"""Shared norm test helpers for tests/test_triton_norm.py and tests/test_cuda_norm.py: the
input builder, the float64 cast and the plain-PyTorch baseline (the reference-error yardstick
of tests/helpers.py)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastattn.options import NormInputs, NormOptions, residual_out_dtype


# Feature sets: (residual, weight, bias, dropout_p, prenorm, residual_in_fp32)
FEATURES = {
    "plain": (False, True, True, 0.0, False, False),
    "residual": (True, True, True, 0.0, False, False),
    "residual_prenorm_fp32": (True, True, True, 0.0, True, True),
    "dropout_residual_prenorm": (True, True, False, 0.2, True, False),
    "dropout_only_fp32": (False, False, False, 0.3, False, True),
    "no_affine_prenorm": (True, False, False, 0.0, True, False),
}


def make_inputs(m, n, dtype, device, *, residual=True, residual_dtype=None, weight=True, bias=True,
                param_dtype=None, kind="layer"):
    x = torch.randn(m, n, dtype=dtype, device=device)
    res = torch.randn(m, n, dtype=residual_dtype or dtype, device=device) if residual else None
    pdt = param_dtype or dtype
    # weight around 1 and a visible bias, as in trained layers
    w = (1.0 + 0.5 * torch.randn(n, device=device)).to(pdt) if weight else None
    b = (0.5 * torch.randn(n, device=device)).to(pdt) if (bias and kind == "layer") else None
    return NormInputs(x=x, residual=res, weight=w, bias=b)


def to64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()


def baseline(inputs: NormInputs, options: NormOptions, keep: Optional[torch.Tensor], dy, dh,
             eps: Optional[float] = None):
    """Plain PyTorch in the inputs' own dtypes: h = dropout(x) + residual in h's dtype, the
    norm in h's dtype, autograd for the gradients. eps: options.eps unless given."""
    eps = options.eps if eps is None else eps
    x = inputs.x.detach().clone().requires_grad_()
    res = None if inputs.residual is None else inputs.residual.detach().clone().requires_grad_()
    w = None if inputs.weight is None else inputs.weight.detach().clone().requires_grad_()
    b = None if inputs.bias is None else inputs.bias.detach().clone().requires_grad_()
    hdt = residual_out_dtype(inputs, options)
    h = x
    if options.dropout_p > 0:
        h = h * keep.to(x.dtype) / (1.0 - options.dropout_p)
    h = h.to(hdt)
    if res is not None:
        h = h + res.to(hdt)
    if options.kind == "layer":
        y = F.layer_norm(h, (h.shape[-1],), None if w is None else w.to(hdt), None if b is None else b.to(hdt), eps)
    else:
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            y = y * w.to(hdt)
    y = y.to(x.dtype)
    leaves = [t for t in (x, res, w, b) if t is not None]
    outs, cotangents = [y], [dy]
    if dh is not None:
        outs.append(h)
        cotangents.append(dh.to(h.dtype))
    grads = iter(torch.autograd.grad(outs, leaves, cotangents))
    named = {name: None if t is None else next(grads) for name, t in (("dx", x), ("dresidual", res),
                                                                        ("dweight", w), ("dbias", b))}
    return y.detach(), h.detach(), named
