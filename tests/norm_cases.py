"""Shared norm test helpers for tests/test_triton_norm.py, tests/test_cuda_norm.py and
tests/test_cpu_norm.py: the input builder, the float64 cast, the plain-PyTorch baseline (the
reference-error yardstick of tests/helpers.py) and the check of a backend's primitives."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastattn.options import NormInputs, NormOptions, RngState, residual_out_dtype
from fastattn.reference import norm as reference
from helpers import assert_close_to_reference


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


def check_backend(backend, inputs: NormInputs, options: NormOptions, rng: Optional[RngState], *, eps: float,
                  assert_close=assert_close_to_reference):
    """Forward and every gradient of ``backend`` (an op module with forward, backward and
    dropout_mask) against the float64 reference, with the baseline's tolerance; eps is the
    options' (checked on the statistics). Returns the backend's forward result and gradients."""
    m, n = inputs.x.shape
    out = backend.forward(inputs, options, rng)
    keep = backend.dropout_mask(inputs, options, rng)
    inputs64 = NormInputs(*(to64(t) for t in (inputs.x, inputs.residual, inputs.weight, inputs.bias)))
    ref = reference.forward(inputs64, options, rng, dropout_mask=keep)

    hdt = residual_out_dtype(inputs, options)
    assert out.y.dtype == inputs.x.dtype and out.h.dtype == hdt
    assert out.rstd.dtype == torch.float32 and out.rstd.shape == (m,)
    dy = torch.randn_like(out.y)
    dh = torch.randn(m, n, dtype=hdt, device=inputs.x.device) if options.prenorm else None
    y_base, h_base, grads_base = baseline(inputs, options, keep, dy, dh, eps=eps)

    assert_close(out.y, ref.y, y_base, "y")
    assert_close(out.h, ref.h, h_base, "h")
    # The statistics describe h as stored (rounded to its dtype): float64 statistics of out.h.
    h_stored = out.h.double()
    if options.kind == "layer":
        mean64 = h_stored.mean(-1)
        var64 = (h_stored - mean64[:, None]).pow(2).mean(-1)
        assert out.mean.dtype == torch.float32
        torch.testing.assert_close(out.mean.double(), mean64, rtol=1e-5, atol=1e-6)
    else:
        assert out.mean is None
        var64 = h_stored.pow(2).mean(-1)
    torch.testing.assert_close(out.rstd.double(), torch.rsqrt(var64 + eps), rtol=1e-5, atol=0.0)

    grads = backend.backward(dy, dh, out.h, out.mean, out.rstd, inputs, options, rng)
    # The oracle's backward runs on its own float64 h and statistics.
    grads_ref = reference.backward(dy.double(), to64(dh), ref.h, ref.mean, ref.rstd, inputs64, options, rng,
                                   dropout_mask=keep)
    sources = {"dx": inputs.x, "dresidual": inputs.residual, "dweight": inputs.weight, "dbias": inputs.bias}
    for name, source in sources.items():
        actual, expected = getattr(grads, name), getattr(grads_ref, name)
        if expected is None:
            assert actual is None, name
            continue
        assert actual.dtype == source.dtype, name
        # dweight/dbias sum m rows: the atol grows like sqrt(m) with independent roundings.
        scale = max(1.0, m**0.5) if name in ("dweight", "dbias") else 1.0
        assert_close(actual, expected, grads_base[name], name, atol_scale=scale)
    return out, grads
