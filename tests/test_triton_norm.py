"""Triton residual + LayerNorm / RMSNorm (fastattn.triton.norm) against the float64 reference.

Runs the kernels on the GPU when there is one, else on CPU tensors through the Triton
interpreter (tests/conftest.py). Tolerance: tests/helpers.py (kernel error vs the float64
reference <= 2 x plain PyTorch's error in the same dtype + atol). Dropout: the reference is
given the kernel's own keep mask (fastattn.triton.norm.dropout_mask).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from fastattn.backends import triton_interpret_enabled
from fastattn.options import NormInputs, NormOptions, RngState
from fastattn.triton import norm as tnorm
from helpers import assert_close_to_reference
from norm_cases import FEATURES, check_backend, make_inputs

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS = 1e-5


def _assert_close(actual, reference64, baseline, name, atol_scale=1.0):
    """tests/helpers.py's rule. The Triton interpreter (3.9) truncates fp32 -> bf16 instead of
    rounding to nearest as the GPU does: up to one bf16 ulp instead of half, so under the
    interpreter the bf16 atol is 4x (0.064, one ulp at magnitude 8-16). GPU runs are strict."""
    if actual.dtype == torch.bfloat16 and triton_interpret_enabled():
        atol_scale *= 4.0
    assert_close_to_reference(actual, reference64, baseline, name, atol_scale=atol_scale)


def _make(m, n, dtype, device, **kw):
    return make_inputs(m, n, dtype, device, **kw)


def _check(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]):
    """Forward and every gradient of the Triton backend against reference and baseline."""
    return check_backend(tnorm, inputs, options, rng, eps=EPS, assert_close=_assert_close)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_features(device, dtype, feature, kind):
    residual, weight, bias, p, prenorm, fp32 = FEATURES[feature]
    inputs = _make(37, 300, dtype, device, residual=residual, weight=weight, bias=bias, kind=kind)
    options = NormOptions(kind=kind, eps=EPS, dropout_p=p, prenorm=prenorm, residual_in_fp32=fp32)
    rng = RngState(seed=int(torch.randint(0, 2**31 - 1, ())), offset=int(torch.randint(0, 2**31 - 1, ())))
    _check(inputs, options, rng if p > 0 else None)


# (M, N, dropout_p) around every path: N = 1, non-powers of two, the widest one-pass sizes
# (backward 4096, forward 8192 with dropout, 16384 without), looped forward with dropout
# (10000), looped backward (>= 8192), both looped (20000); M up to 333 (no dropout there:
# the interpreter is slow, test_features covers dropout).
SHAPES = [(1, 1, 0.1), (7, 3, 0.1), (333, 1000, 0.0), (7, 3000, 0.1), (3, 4096, 0.1), (5, 8192, 0.1),
          (3, 10000, 0.1), (2, 16384, 0.0), (3, 20000, 0.1)]


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-p{s[2]}")
def test_shapes(device, shape, kind):
    m, n, p = shape
    inputs = _make(m, n, torch.bfloat16, device, kind=kind)
    options = NormOptions(kind=kind, eps=EPS, dropout_p=p, prenorm=True)
    _check(inputs, options, RngState(seed=1234, offset=n))


@pytest.mark.parametrize("n", [5, 20000])
def test_mixed_dtypes_and_strides(device, n):
    """fp16 x with an fp32 residual (h in fp32 without residual_in_fp32), fp32 parameters,
    x and residual as row-strided views."""
    m = 6
    big_x = torch.randn(m, n + 7, dtype=torch.float16, device=device)
    big_r = torch.randn(m, n + 3, dtype=torch.float32, device=device)
    w = (1.0 + 0.5 * torch.randn(n, device=device))
    b = 0.5 * torch.randn(n, device=device)
    inputs = NormInputs(x=big_x[:, :n], residual=big_r[:, 3:], weight=w, bias=b)
    assert inputs.x.stride(0) == n + 7
    options = NormOptions(kind="layer", eps=EPS, prenorm=True)
    out, _ = _check(inputs, options, None)
    assert out.h.dtype == torch.float32


def test_h_aliases_x_without_residual(device):
    inputs = _make(4, 64, torch.bfloat16, device, residual=False)
    out = tnorm.forward(inputs, NormOptions(), None)
    assert out.h.data_ptr() == inputs.x.data_ptr()
    out32 = tnorm.forward(inputs, NormOptions(residual_in_fp32=True), None)
    assert out32.h.dtype == torch.float32
    torch.testing.assert_close(out32.h, inputs.x.float(), rtol=0, atol=0)


def test_empty_rows(device):
    inputs = _make(0, 16, torch.float32, device)
    options = NormOptions(prenorm=True)
    out = tnorm.forward(inputs, options, None)
    assert out.y.shape == (0, 16) and out.rstd.shape == (0,)
    grads = tnorm.backward(out.y, out.h, out.h, out.mean, out.rstd, inputs, options, None)
    assert grads.dx.shape == (0, 16)
    assert torch.equal(grads.dweight, torch.zeros_like(inputs.weight))
    assert torch.equal(grads.dbias, torch.zeros_like(inputs.bias))


@pytest.mark.parametrize("m,n", [(45, 300), (9, 20000)])
def test_deterministic_parameter_grads(device, m, n):
    """dweight/dbias come from per-program partials summed in a fixed order: bitwise equal."""
    inputs = _make(m, n, torch.bfloat16, device, param_dtype=torch.float32)
    options = NormOptions(kind="layer", dropout_p=0.1)
    rng = RngState(seed=7, offset=11)
    out = tnorm.forward(inputs, options, rng)
    dy = torch.randn_like(out.y)
    first = tnorm.backward(dy, None, out.h, out.mean, out.rstd, inputs, options, rng)
    second = tnorm.backward(dy, None, out.h, out.mean, out.rstd, inputs, options, rng)
    for name in ("dx", "dresidual", "dweight", "dbias"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert first.dweight.abs().sum() > 0


def test_dropout_mask_is_a_function_of_seed_offset_row_col(device):
    x = torch.randn(40, 700, device=device)
    options = NormOptions(dropout_p=0.25)
    rng = RngState(seed=123, offset=456)
    keep = tnorm.dropout_mask(NormInputs(x=x), options, rng)
    # Same (row, col) in a smaller tensor: same decision (independent of the shape).
    small = tnorm.dropout_mask(NormInputs(x=x[:13, :301]), options, rng)
    assert torch.equal(small, keep[:13, :301])
    frac = keep.float().mean().item()
    assert abs(frac - 0.75) < 0.01, frac
    # Neighbouring rows and columns are not copies of each other.
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    for other in (RngState(seed=124, offset=456), RngState(seed=123, offset=457)):
        changed = (tnorm.dropout_mask(NormInputs(x=x), options, other) != keep).float().mean().item()
        assert changed > 0.2, (other, changed)


def test_dropout_forward_uses_the_mask(device):
    """h = x * keep / (1 - p) without residual: dropped elements are exactly 0, kept ones
    scaled; the backward regenerates the same mask (dx is 0 exactly where dropped)."""
    inputs = _make(9, 257, torch.float32, device, residual=False)
    options = NormOptions(dropout_p=0.4, prenorm=True)
    rng = RngState(seed=99, offset=3)
    out = tnorm.forward(inputs, options, rng)
    keep = tnorm.dropout_mask(inputs, options, rng)
    expected = torch.where(keep, inputs.x / 0.6, torch.zeros_like(inputs.x))
    torch.testing.assert_close(out.h, expected, rtol=1e-6, atol=1e-6)
    grads = tnorm.backward(torch.randn_like(out.y), None, out.h, out.mean, out.rstd, inputs, options, rng)
    assert torch.equal(grads.dx == 0, ~keep)


@pytest.mark.parametrize("prenorm", [False, True])
def test_public_function_autograd(device, prenorm):
    """fastattn.add_layer_norm / rms_norm with backend="triton" through the shared autograd
    layer, against the reference backend in float64."""
    import fastattn

    shape = (2, 5, 96)
    x = torch.randn(shape, dtype=torch.bfloat16, device=device)
    res = torch.randn(shape, dtype=torch.bfloat16, device=device)
    w = torch.randn(96, dtype=torch.bfloat16, device=device)
    b = torch.randn(96, dtype=torch.bfloat16, device=device)
    for fn, params in ((fastattn.add_layer_norm, (w, b)), (fastattn.rms_norm, (w,))):
        leaves = [t.clone().requires_grad_() for t in (x, res, *params)]
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        out = fn(*leaves, prenorm=prenorm, residual_in_fp32=True, backend="triton")
        out64 = fn(*leaves64, prenorm=prenorm, residual_in_fp32=True, backend="reference")
        outs = out if prenorm else (out,)
        outs64 = out64 if prenorm else (out64,)
        cotangents = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, cotangents)
        torch.autograd.backward(outs64, [c.double() for c in cotangents])
        for o, o64 in zip(outs, outs64):
            torch.testing.assert_close(o.double(), o64, rtol=2e-2, atol=2e-2)
        for t, t64 in zip(leaves, leaves64):
            # bf16 gradients of O(1) values summed over 10 rows: a few bf16 ulps.
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=2e-2, atol=5e-2)
