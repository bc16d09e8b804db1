"""CUDA residual + LayerNorm / RMSNorm (fastattn.cuda.norm, csrc/norm.cpp, kernels/norm/).

Without a GPU (always run): the Python side of the ops (fake tensors, autograd registration,
the primitives' argument plumbing) against a CPU emulation of the kernels' contract, registered
under a test namespace with the schemas of csrc/ops.cpp; opcheck and gradcheck on it.
With a GPU (requires_cuda): forward and every gradient against the float64 reference for
every kernel shape (register-resident sizes, looped sizes, scalar fallback), option, dtype mix
and stride; the dropout mask against its Python mirror; determinism; opcheck and torch.compile
on the real ops. Tolerance: tests/helpers.py.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from typing import Optional

import pytest
import torch

from fastattn import _build
from fastattn.cuda import norm as cnorm
from fastattn.cuda.philox import dropout_keep_mask
from fastattn.options import NormForwardResult, NormGrads, NormInputs, NormOptions, RngState, residual_out_dtype
from fastattn.reference import norm as reference
from conftest import requires_cuda
from helpers import assert_close_to_reference
from norm_cases import FEATURES as NORM_FEATURES, baseline as _baseline, make_inputs, to64 as _to64

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS = 1e-5
TEST_NAMESPACE = "fastattn_normtest"


# --------------------------------------------------------------------------------------------
# CPU emulation of the ops' contract (the schemas are read from csrc/ops.cpp)
# --------------------------------------------------------------------------------------------
def _schema(name: str) -> str:
    text = (_build.CSRC_DIR / "ops.cpp").read_text()
    for call in re.finditer(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call.group(1)))
        if schema.startswith(name + "("):
            return schema
    raise LookupError(name)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _emulated_fwd(x, residual, weight, bias, eps, dropout_p, seed, offset, is_rms, store_h, h_dtype):
    cdt = _compute_dtype(x.dtype)
    h = x.to(cdt)
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, offset, x.shape, dropout_p, device=x.device)
        h = h * keep.to(cdt) / (1.0 - dropout_p)
    if residual is not None:
        h = h + residual.to(cdt)
    h_out = h.to(h_dtype)
    h = h_out.to(cdt)  # statistics of h as stored
    mean = None if is_rms else h.mean(-1)
    centered = h if is_rms else h - mean[:, None]
    rstd = torch.rsqrt(centered.pow(2).mean(-1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    empty = x.new_empty((0,), dtype=torch.float32)
    return (
        y.to(x.dtype),
        h_out.clone() if store_h else x.new_empty((0,), dtype=h_dtype),
        empty if is_rms else mean.float(),
        rstd.float(),
    )


def _emulated_bwd(dy, dh, h, mean, rstd, weight, bias, dropout_p, seed, offset, is_rms, residual_dtype):
    stand_in = lambda dtype: torch.empty(1, dtype=dtype).expand(h.shape)  # noqa: E731
    inputs = NormInputs(
        x=stand_in(dy.dtype), residual=None if residual_dtype is None else stand_in(residual_dtype),
        weight=weight, bias=bias,
    )
    options = NormOptions(kind="rms" if is_rms else "layer", dropout_p=dropout_p)
    keep = dropout_keep_mask(seed, offset, h.shape, dropout_p) if dropout_p > 0 else None
    grads = reference.backward(dy, dh, h, mean, rstd, inputs, options, RngState(seed, offset), dropout_mask=keep)
    # Fresh tensors, like the kernels (the reference may return dx and dresidual as one tensor).
    return (
        grads.dx.clone(),
        dy.new_empty((0,)) if grads.dresidual is None else grads.dresidual.clone(),
        dy.new_empty((0,)) if grads.dweight is None else grads.dweight.clone(),
        dy.new_empty((0,)) if grads.dbias is None else grads.dbias.clone(),
    )


@pytest.fixture(scope="module")
def emulated_ops():
    """torch.ops.fastattn_normtest.{norm_fwd, norm_bwd}: the schemas of csrc/ops.cpp, a CPU
    emulation, and fastattn.cuda.norm's fake and autograd registrations. With a GPU the real
    ops are checked instead (test_opcheck_real_ops)."""
    if torch.cuda.is_available():
        pytest.skip("the real ops are checked on this machine")
    lib = torch.library.Library(TEST_NAMESPACE, "DEF")
    lib.define(_schema("norm_fwd"))
    lib.define(_schema("norm_bwd"))
    lib.impl("norm_fwd", _emulated_fwd, "CPU")
    lib.impl("norm_bwd", _emulated_bwd, "CPU")
    cnorm.register_python_ops(TEST_NAMESPACE)
    yield getattr(torch.ops, TEST_NAMESPACE)
    lib._destroy()


FWD_CASES = {
    # (residual, weight, bias, is_rms, dropout_p, store_h, h_dtype)
    "layer_residual": (True, True, True, False, 0.0, True, torch.float32),
    "rms_dropout": (True, True, False, True, 0.3, True, torch.float32),
    "layer_no_affine_h_is_x": (False, False, False, False, 0.0, False, torch.float32),
    "rms_dropout_only": (False, True, False, True, 0.2, True, torch.float32),
}


def _fwd_args(case, dtype=torch.float32, m=5, n=24, requires_grad=True):
    residual, weight, bias, is_rms, p, store_h, h_dtype = FWD_CASES[case]
    leaf = lambda *shape: torch.randn(*shape, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    h_dtype = dtype if h_dtype == torch.float32 and dtype == torch.float64 else h_dtype
    return (leaf(m, n), leaf(m, n) if residual else None, leaf(n) if weight else None, leaf(n) if bias else None,
            EPS, p, 1234, 77, is_rms, store_h, h_dtype)


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_opcheck_norm_fwd_fake_and_autograd(emulated_ops, case):
    torch.library.opcheck(emulated_ops.norm_fwd, _fwd_args(case))


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_opcheck_norm_bwd_fake(emulated_ops, case):
    x, residual, weight, bias, eps, p, seed, offset, is_rms, store_h, h_dtype = _fwd_args(case, requires_grad=False)
    y, h, mean, rstd = emulated_ops.norm_fwd(x, residual, weight, bias, eps, p, seed, offset, is_rms, store_h, h_dtype)
    h_saved = h if store_h else x
    dh = torch.randn_like(h_saved) if store_h else None
    args = (torch.randn_like(y), dh, h_saved, None if is_rms else mean, rstd, weight, bias, p, seed, offset, is_rms,
            None if residual is None else residual.dtype)
    torch.library.opcheck(emulated_ops.norm_bwd, args)


@pytest.mark.parametrize("case", list(FWD_CASES))
def test_registered_autograd_matches_finite_differences(emulated_ops, case):
    """gradcheck of y and h through register_autograd (which calls norm_bwd) in float64:
    checks which gradient goes to which input, the prenorm dh path and the dropout mask reuse."""
    args = _fwd_args(case, dtype=torch.float64, m=3, n=10)
    tensors = [a for a in args[:4] if a is not None]
    store_h = args[9]

    def fn(*leaves):
        it = iter(leaves)
        full = [next(it) if a is not None else None for a in args[:4]]
        y, h, _mean, _rstd = emulated_ops.norm_fwd(*full, *args[4:])
        return (y, h) if store_h else (y,)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5)


def test_fake_tensor_shapes_and_dtypes(emulated_ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 40, dtype=torch.bfloat16)
        w = torch.empty(40, dtype=torch.float32)
        y, h, mean, rstd = emulated_ops.norm_fwd(x, None, w, None, EPS, 0.0, 0, 0, True, True, torch.float32)
        assert (y.shape, y.dtype, h.shape, h.dtype) == ((6, 40), torch.bfloat16, (6, 40), torch.float32)
        assert (mean.shape, rstd.shape, rstd.dtype) == ((0,), (6,), torch.float32)
        dx, dres, dw, db = emulated_ops.norm_bwd(y, None, h, None, rstd, w, None, 0.0, 0, 0, True, torch.float16)
        assert (dx.dtype, dres.shape, dres.dtype, dw.shape, dw.dtype, db.shape) == (
            torch.bfloat16, (6, 40), torch.float16, (40,), torch.float32, (0,))


def test_compile_traces_the_emulated_op(emulated_ops):
    """fullgraph torch.compile (aot_eager: fake tensors + registered autograd, no codegen)."""
    x = torch.randn(6, 48, requires_grad=True)
    res = torch.randn(6, 48, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(48, requires_grad=True)

    def block(x, res, w):
        y, h, _mean, rstd = emulated_ops.norm_fwd(x, res, w, None, EPS, 0.2, 5, 6, False, True, torch.float32)
        return (y * 2).sum() + h.sum() + rstd.detach().sum()

    eager = block(x, res, w)
    eager_grads = torch.autograd.grad(eager, (x, res, w))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, res, w)
    compiled_grads = torch.autograd.grad(compiled, (x, res, w))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.fixture
def primitives_on_emulation(emulated_ops, monkeypatch):
    """Runs fastattn.cuda.norm.forward/backward on the CPU emulation instead of the extension."""
    monkeypatch.setattr(torch.ops, "fastattn", emulated_ops, raising=False)
    monkeypatch.setattr(cnorm, "ensure_loaded", lambda: None)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("feature", ["plain", "residual_prenorm_fp32", "dropout_prenorm", "h_is_x"])
def test_primitives_plumbing(primitives_on_emulation, feature, kind):
    """forward/backward map NormInputs/NormOptions onto the op arguments and back (h aliasing
    x, None for absent gradients, dtypes) like the reference backend."""
    m, n = 7, 33
    residual = feature in ("residual_prenorm_fp32", "dropout_prenorm")
    x = torch.randn(m, n, dtype=torch.bfloat16)
    inputs = NormInputs(
        x=x, residual=torch.randn(m, n, dtype=torch.bfloat16) if residual else None,
        weight=torch.randn(n) if feature != "h_is_x" else None,
        bias=torch.randn(n) if kind == "layer" and feature == "plain" else None,
    )
    options = NormOptions(kind=kind, eps=EPS, dropout_p=0.25 if feature == "dropout_prenorm" else 0.0,
                          prenorm=feature != "plain", residual_in_fp32=feature == "residual_prenorm_fp32")
    rng = RngState(seed=11, offset=5) if options.dropout_p > 0 else None
    out = cnorm.forward(inputs, options, rng)
    assert out.h.dtype == residual_out_dtype(inputs, options)
    assert (out.h is x) == (feature in ("plain", "h_is_x"))
    assert (out.mean is None) == (kind == "rms")
    keep = cnorm.dropout_mask(inputs, options, rng)
    ref = reference.forward(inputs, options, rng, dropout_mask=keep)
    # bf16 y: the emulation (like the kernels) normalises h as stored, the reference exact h.
    torch.testing.assert_close(out.y.float(), ref.y.float(), rtol=1.6e-2, atol=1e-2)
    dy = torch.randn_like(out.y)
    dh = torch.randn(m, n, dtype=out.h.dtype) if options.prenorm else None
    grads = cnorm.backward(dy, dh, out.h, out.mean, out.rstd, inputs, options, rng)
    expected = reference.backward(dy, dh, out.h, out.mean, out.rstd, inputs, options, rng, dropout_mask=keep)
    for name in ("dx", "dresidual", "dweight", "dbias"):
        actual, want = getattr(grads, name), getattr(expected, name)
        assert (actual is None) == (want is None), name
        if want is not None:
            assert actual.dtype == want.dtype, name
            torch.testing.assert_close(actual, want, rtol=0, atol=0)


def test_dropout_needs_rng(primitives_on_emulation):
    with pytest.raises(ValueError, match="RngState"):
        cnorm.forward(NormInputs(x=torch.randn(2, 8)), NormOptions(dropout_p=0.1), None)


def test_capabilities_and_reasons():
    x = torch.randn(4, 16, dtype=torch.float16)
    inputs = NormInputs(x=x, residual=torch.randn(4, 16, dtype=torch.float64), weight=torch.randn(16, dtype=torch.float64))
    reasons = cnorm.not_supported_reasons(inputs, NormOptions())
    assert any("residual" in r for r in reasons) and any("weight" in r for r in reasons)
    assert cnorm.not_supported_reasons(NormInputs(x=x, residual=x.float()), NormOptions()) == []
    assert cnorm.CAPABILITIES.not_supported_reasons(NormInputs(x=torch.randn(2, 70000)), NormOptions())
    assert cnorm.CAPABILITIES.not_supported_reasons(NormInputs(x=x.double()), NormOptions())


# --------------------------------------------------------------------------------------------
# GPU: the real kernels against the float64 reference
# --------------------------------------------------------------------------------------------
def _make(m, n, dtype, *, device="cuda", **kw):
    return make_inputs(m, n, dtype, device, **kw)


def _check(inputs: NormInputs, options: NormOptions, rng: Optional[RngState], forward=None, backward=None):
    """Forward and every gradient of the CUDA backend (or of the given primitives) against
    reference and baseline."""
    forward = forward or cnorm.forward
    backward = backward or cnorm.backward
    m, n = inputs.x.shape
    out = forward(inputs, options, rng)
    keep = cnorm.dropout_mask(inputs, options, rng)
    inputs64 = NormInputs(*(_to64(t) for t in (inputs.x, inputs.residual, inputs.weight, inputs.bias)))
    ref = reference.forward(inputs64, options, rng, dropout_mask=keep)
    hdt = residual_out_dtype(inputs, options)
    assert out.y.dtype == inputs.x.dtype and out.h.dtype == hdt and out.y.is_contiguous()
    assert out.rstd.dtype == torch.float32 and out.rstd.shape == (m,)
    dy = torch.randn_like(out.y)
    dh = torch.randn(m, n, dtype=hdt, device=inputs.x.device) if options.prenorm else None
    y_base, h_base, grads_base = _baseline(inputs, options, keep, dy, dh)
    assert_close_to_reference(out.y, ref.y, y_base, "y")
    assert_close_to_reference(out.h, ref.h, h_base, "h")
    # The statistics describe h as stored (rounded to its dtype).
    h_stored = out.h.double()
    if options.kind == "layer":
        mean64 = h_stored.mean(-1)
        var64 = (h_stored - mean64[:, None]).pow(2).mean(-1)
        assert out.mean.dtype == torch.float32 and out.mean.shape == (m,)
        torch.testing.assert_close(out.mean.double(), mean64, rtol=1e-5, atol=1e-5)
    else:
        assert out.mean is None
        var64 = h_stored.pow(2).mean(-1)
    torch.testing.assert_close(out.rstd.double(), torch.rsqrt(var64 + options.eps), rtol=1e-5, atol=0.0)

    grads = backward(dy, dh, out.h, out.mean, out.rstd, inputs, options, rng)
    grads_ref = reference.backward(dy.double(), _to64(dh), ref.h, ref.mean, ref.rstd, inputs64, options, rng,
                                   dropout_mask=keep)
    for name in ("dx", "dresidual", "dweight", "dbias"):
        actual, expected = getattr(grads, name), getattr(grads_ref, name)
        if expected is None:
            assert actual is None, name
            continue
        source = {"dx": inputs.x, "dresidual": inputs.residual, "dweight": inputs.weight, "dbias": inputs.bias}[name]
        assert actual.dtype == source.dtype and actual.shape == source.shape, name
        # dweight/dbias sum m rows: the atol grows like sqrt(m) with independent roundings.
        scale = max(1.0, m**0.5) if name in ("dweight", "dbias") else 1.0
        assert_close_to_reference(actual, expected, grads_base[name], name, atol_scale=scale)
    return out, grads


# The shared feature sets plus: no residual with prenorm, so h is x itself, kept in fp32.
FEATURES = {**NORM_FEATURES, "h_is_x_fp32_out": (False, True, False, 0.0, True, True)}


@requires_cuda
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [300, 1536])
def test_features(dtype, feature, kind, n):
    residual, weight, bias, p, prenorm, fp32 = FEATURES[feature]
    inputs = _make(37, n, dtype, residual=residual, weight=weight, bias=bias, kind=kind)
    options = NormOptions(kind=kind, eps=EPS, dropout_p=p, prenorm=prenorm, residual_in_fp32=fp32)
    rng = RngState(seed=int(torch.randint(0, 2**31 - 1, ())), offset=int(torch.randint(0, 2**31 - 1, ())))
    _check(inputs, options, rng if p > 0 else None)


# Every kernel shape for 16-bit dtypes (8 elements per vector) and fp32 (4):
# forward register rows <= 256 / 1024 (one warp per row), <= 4096 / 8192 / 16384 (4 / 8 / 16
# warps), looped beyond; backward <= 256 / 512, <= 2048 / 4096 / 8192, looped beyond; hidden
# sizes not divisible by the vector width take the scalar looped kernels. Row counts large
# enough for the persistent backward grid to give several rows to each slot.
SHAPES = [(1, 1), (9, 7), (3000, 136), (2500, 504), (5000, 1000), (700, 2000), (300, 3000), (400, 4096),
          (200, 8192), (1200, 12000), (64, 16384), (50, 20000), (6, 65536), (33, 1001), (3, 50001)]


@requires_cuda
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_shapes(shape, dtype, kind):
    m, n = shape
    inputs = _make(m, n, dtype, kind=kind)
    options = NormOptions(kind=kind, eps=EPS, dropout_p=0.1, prenorm=True)
    _check(inputs, options, RngState(seed=1234, offset=n))


@requires_cuda
@pytest.mark.parametrize("n", [5, 1024, 20000])
@pytest.mark.parametrize("row_pad", [8, 7])
def test_mixed_dtypes_and_strides(n, row_pad):
    """fp16 x with an fp32 residual (h in fp32), fp32 weight, bf16 bias; x and residual as
    row-strided views (row_pad 7 breaks 16-byte alignment: the scalar kernels)."""
    m = 6
    big_x = torch.randn(m, n + row_pad, dtype=torch.float16, device="cuda")
    big_r = torch.randn(m, n + 2 * row_pad, dtype=torch.float32, device="cuda")
    w = 1.0 + 0.5 * torch.randn(n, device="cuda")
    b = (0.5 * torch.randn(n, device="cuda")).to(torch.bfloat16)
    inputs = NormInputs(x=big_x[:, :n], residual=big_r[:, row_pad:row_pad + n], weight=w, bias=b)
    options = NormOptions(kind="layer", eps=EPS, prenorm=True, dropout_p=0.1)
    out, _ = _check(inputs, options, RngState(seed=3, offset=4))
    assert out.h.dtype == torch.float32


@requires_cuda
@pytest.mark.parametrize("x_dtype,res_dtype,fp32", [
    (torch.bfloat16, torch.float16, False),  # h in fp16 (the residual's dtype)
    (torch.float32, torch.bfloat16, False),  # h in bf16 under fp32 x
    (torch.float16, torch.bfloat16, True),   # h in fp32
])
def test_residual_dtype_combinations(x_dtype, res_dtype, fp32):
    inputs = _make(50, 768, x_dtype, residual_dtype=res_dtype, param_dtype=torch.float32)
    options = NormOptions(kind="layer", eps=EPS, prenorm=True, residual_in_fp32=fp32)
    _check(inputs, options, None)


@requires_cuda
def test_misaligned_pointer_uses_scalar_path():
    m, n = 9, 512
    flat = torch.randn(m * n + 1, dtype=torch.bfloat16, device="cuda")
    x = flat[1:].view(m, n)  # 2-byte aligned only
    inputs = NormInputs(x=x, residual=torch.randn(m, n, dtype=torch.bfloat16, device="cuda"),
                        weight=torch.randn(n, dtype=torch.bfloat16, device="cuda"))
    _check(inputs, NormOptions(kind="rms", eps=EPS, prenorm=True, dropout_p=0.2), RngState(seed=8, offset=9))


@requires_cuda
def test_h_aliases_x_without_residual():
    inputs = _make(4, 64, torch.bfloat16, residual=False)
    out = cnorm.forward(inputs, NormOptions(), None)
    assert out.h.data_ptr() == inputs.x.data_ptr()
    out32 = cnorm.forward(inputs, NormOptions(residual_in_fp32=True), None)
    assert out32.h.dtype == torch.float32
    torch.testing.assert_close(out32.h, inputs.x.float(), rtol=0, atol=0)


@requires_cuda
def test_empty_rows():
    inputs = _make(0, 16, torch.float32)
    options = NormOptions(prenorm=True)
    out = cnorm.forward(inputs, options, None)
    assert out.y.shape == (0, 16) and out.rstd.shape == (0,)
    grads = cnorm.backward(out.y, out.h, out.h, out.mean, out.rstd, inputs, options, None)
    assert grads.dx.shape == (0, 16)
    assert torch.equal(grads.dweight, torch.zeros_like(inputs.weight))
    assert torch.equal(grads.dbias, torch.zeros_like(inputs.bias))


@requires_cuda
@pytest.mark.parametrize("m,n", [(4000, 300), (3000, 2048), (700, 20000), (50, 1001)])
def test_deterministic_parameter_grads(m, n):
    """dweight/dbias from per-slot partial rows summed in a fixed order: bitwise equal."""
    inputs = _make(m, n, torch.bfloat16, param_dtype=torch.float32)
    options = NormOptions(kind="layer", dropout_p=0.1)
    rng = RngState(seed=7, offset=11)
    out = cnorm.forward(inputs, options, rng)
    dy = torch.randn_like(out.y)
    first = cnorm.backward(dy, None, out.h, out.mean, out.rstd, inputs, options, rng)
    for _ in range(3):
        again = cnorm.backward(dy, None, out.h, out.mean, out.rstd, inputs, options, rng)
        for name in ("dx", "dresidual", "dweight", "dbias"):
            assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert first.dweight.abs().sum() > 0


@requires_cuda
@pytest.mark.parametrize("n", [257, 1000, 20000])
def test_dropout_forward_uses_the_documented_mask(n):
    """h = x * keep / (1 - p) with keep from fastattn.cuda.philox (the mirror of philox.cuh):
    dropped elements exactly 0; the backward regenerates the same mask (dx = 0 where dropped)."""
    inputs = _make(9, n, torch.float32, residual=False)
    options = NormOptions(dropout_p=0.4, prenorm=True)
    rng = RngState(seed=99, offset=3)
    out = cnorm.forward(inputs, options, rng)
    keep = dropout_keep_mask(rng.seed, rng.offset, inputs.x.shape, 0.4, device="cuda")
    expected = torch.where(keep, inputs.x * (1.0 / 0.6), torch.zeros_like(inputs.x))
    torch.testing.assert_close(out.h, expected, rtol=1e-6, atol=0)
    grads = cnorm.backward(torch.randn_like(out.y), None, out.h, out.mean, out.rstd, inputs, options, rng)
    assert torch.equal(grads.dx == 0, ~keep)
    assert abs(keep.float().mean().item() - 0.6) < 0.02


@requires_cuda
@pytest.mark.parametrize("prenorm", [False, True])
def test_public_function_autograd(prenorm):
    """fastattn.add_layer_norm / rms_norm with backend="cuda" through the shared autograd
    layer, against the reference backend in float64."""
    import fastattn

    shape = (2, 5, 96)
    x = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    res = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(96, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(96, dtype=torch.bfloat16, device="cuda")
    for fn, params in ((fastattn.add_layer_norm, (w, b)), (fastattn.rms_norm, (w,))):
        leaves = [t.clone().requires_grad_() for t in (x, res, *params)]
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        out = fn(*leaves, prenorm=prenorm, residual_in_fp32=True, backend="cuda")
        out64 = fn(*leaves64, prenorm=prenorm, residual_in_fp32=True, backend="reference")
        outs = out if prenorm else (out,)
        outs64 = out64 if prenorm else (out64,)
        cotangents = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, cotangents)
        torch.autograd.backward(outs64, [c.double() for c in cotangents])
        for o, o64 in zip(outs, outs64):
            torch.testing.assert_close(o.double(), o64, rtol=2e-2, atol=2e-2)
        for t, t64 in zip(leaves, leaves64):
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=2e-2, atol=5e-2)


@requires_cuda
@pytest.mark.parametrize("case", list(FWD_CASES))
def test_opcheck_real_ops(case):
    cnorm.ensure_loaded()
    args = list(_fwd_args(case, dtype=torch.bfloat16, m=20, n=264))
    args = [a.detach().cuda().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    if args[10] == torch.float32 and FWD_CASES[case][5] is False:
        args[10] = torch.bfloat16  # h is x: same dtype
    torch.library.opcheck(torch.ops.fastattn.norm_fwd, tuple(args))
    x, residual, weight, bias, eps, p, seed, offset, is_rms, store_h, h_dtype = args
    with torch.no_grad():
        y, h, mean, rstd = torch.ops.fastattn.norm_fwd(*args)
    h_saved = h if store_h else x.detach()
    bwd_args = (torch.randn_like(y), torch.randn_like(h_saved) if store_h else None, h_saved,
                None if is_rms else mean, rstd, None if weight is None else weight.detach(),
                None if bias is None else bias.detach(), p, seed, offset, is_rms,
                None if residual is None else residual.dtype)
    torch.library.opcheck(torch.ops.fastattn.norm_bwd, bwd_args)


@requires_cuda
def test_torch_compile_traces_the_ops():
    """fullgraph torch.compile through the fake implementations and registered autograd of the
    real ops."""
    cnorm.ensure_loaded()
    x = torch.randn(64, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    res = torch.randn(64, 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(512, dtype=torch.float32, device="cuda", requires_grad=True)

    def block(x, res, w):
        y, h, _mean, rstd = torch.ops.fastattn.norm_fwd(x, res, w, None, EPS, 0.1, 5, 6, True, True, torch.float32)
        return (y.float() * 2).sum() + h.sum() + rstd.detach().sum()

    eager = block(x, res, w)
    eager_grads = torch.autograd.grad(eager, (x, res, w))
    # aot_eager: the fake implementations and the registered autograd, without inductor's
    # codegen time.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, res, w)
    compiled_grads = torch.autograd.grad(compiled, (x, res, w))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# CPU: the kernel source itself, run by kernels/common/host_emulation.h (CPU fibers)
# --------------------------------------------------------------------------------------------
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """kernels/norm/emulation/norm_emu.cpp built with g++ and loaded with ctypes."""
    if torch.cuda.is_available():
        pytest.skip("the real kernels are tested on this machine")
    if shutil.which("g++") is None or _build.find_nvcc() is None:
        pytest.skip("needs g++ and the CUDA headers (found through nvcc)")
    lib_path = tmp_path_factory.mktemp("norm_emu") / "libnorm_emu.so"
    source = _build.KERNELS_DIR / "norm" / "emulation" / "norm_emu.cpp"
    includes = [f"-I{d}" for d in _build.cuda_toolkit_dirs()[0]]
    subprocess.run(["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-w", *includes, str(source),
                    "-o", str(lib_path)], check=True, capture_output=True, timeout=900)
    lib = ctypes.CDLL(str(lib_path))
    i64, i32, ptr, f32, f64, u64 = (ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_double,
                                    ctypes.c_uint64)
    lib.norm_emu_fwd.argtypes = [i64, i64, i32, ptr, i64, ptr, i64, i32, ptr, i32, ptr, i32, ptr, ptr, i32, ptr, ptr,
                                 f32, i32, f64, u64, u64]
    lib.norm_emu_bwd.argtypes = [i64, i64, i32, ptr, i64, ptr, i64, i32, ptr, i64, i32, ptr, ptr, ptr, i32, ptr, ptr,
                                 i32, ptr, ptr, i32, i32, f64, u64, u64, i32, ptr]
    return lib


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _code(t: Optional[torch.Tensor]) -> int:
    return 2 if t is None else _DTYPE_CODE[t.dtype]


class _Emulated:
    """forward/backward primitives running the kernels in the emulator (params filled like
    csrc/norm.cpp); `shapes` records (threads per block, rows per block) of each launch."""

    def __init__(self, lib, max_blocks: int):
        self.lib, self.max_blocks, self.shapes = lib, max_blocks, []

    def forward(self, inputs: NormInputs, options: NormOptions, rng):
        x, res, w, b = inputs.x, inputs.residual, inputs.weight, inputs.bias
        m, n = x.shape
        p, seed, offset = cnorm._dropout_args(options, rng)
        hdt = residual_out_dtype(inputs, options)
        store_h = cnorm._stores_h(inputs, options, hdt)
        y = torch.empty(m, n, dtype=x.dtype)
        h = torch.empty(m, n, dtype=hdt) if store_h else None
        mean = torch.empty(m) if options.kind == "layer" else None
        rstd = torch.empty(m)
        code = self.lib.norm_emu_fwd(m, n, _DTYPE_CODE[x.dtype], _ptr(x), x.stride(0), _ptr(res),
                                     0 if res is None else res.stride(0), _code(res), _ptr(w), _code(w), _ptr(b),
                                     _code(b), _ptr(y), _ptr(h), _DTYPE_CODE[hdt], _ptr(mean), _ptr(rstd),
                                     options.eps, options.kind == "rms", p, seed, offset)
        self.shapes.append(("fwd", code >> 8, code & 0xFF))
        return NormForwardResult(y=y, h=h if store_h else x, mean=mean, rstd=rstd)

    def backward(self, dy, dh, h, mean, rstd, inputs: NormInputs, options: NormOptions, rng):
        m, n = h.shape
        p, seed, offset = cnorm._dropout_args(options, rng)
        w, b, res = inputs.weight, inputs.bias, inputs.residual
        dx = torch.empty(m, n, dtype=dy.dtype)
        dres = None if res is None else torch.empty(m, n, dtype=res.dtype)
        dw = None if w is None else torch.empty(n, dtype=w.dtype)
        db = None if b is None else torch.empty(n, dtype=b.dtype)
        workspace = torch.empty(2 * self.max_blocks * 4 * n)  # >= 2 x partial rows x n
        code = self.lib.norm_emu_bwd(m, n, _DTYPE_CODE[dy.dtype], _ptr(dy), dy.stride(0), _ptr(dh),
                                     0 if dh is None else dh.stride(0), _code(dh), _ptr(h), h.stride(0),
                                     _DTYPE_CODE[h.dtype], _ptr(mean), _ptr(rstd), _ptr(w), _code(w), _ptr(dx),
                                     _ptr(dres), _code(dres), _ptr(dw), _ptr(db), _code(db),
                                     options.kind == "rms", p, seed, offset, self.max_blocks, _ptr(workspace))
        self.shapes.append(("bwd", code >> 8, code & 0xFF))
        return NormGrads(dx=dx, dresidual=dres, dweight=dw, dbias=db)


# (M, N) -> expected (threads, rows per block) of the forward and backward kernels: every
# register-resident shape, the looped kernels and the scalar fallback (N % vector width != 0).
EMULATED_SHAPES = {
    (5, 136): ((128, 4), (128, 4)),
    (6, 504): ((128, 4), (128, 4)),
    (9, 1000): ((128, 4), (128, 1)),
    (3, 3000): ((128, 1), (256, 1)),
    (2, 8192): ((256, 1), (512, 1)),
    (2, 12000): ((512, 1), (256, 1)),
    (2, 16392): ((256, 1), (256, 1)),
    (3, 1001): ((128, 1), (128, 1)),
}


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(EMULATED_SHAPES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_emulated_kernels_every_shape(emulator, shape, dtype, kind):
    """The CUDA kernel source on CPU threads against the float64 reference: dropout, residual,
    prenorm, affine; a persistent backward grid of 2 blocks so slots walk several rows."""
    m, n = shape
    emu = _Emulated(emulator, max_blocks=2)
    inputs = _make(m, n, dtype, kind=kind, device="cpu")
    options = NormOptions(kind=kind, eps=EPS, dropout_p=0.15, prenorm=True)
    _check(inputs, options, RngState(seed=321, offset=n), emu.forward, emu.backward)
    fwd, bwd = EMULATED_SHAPES[shape]
    assert emu.shapes == [("fwd", *fwd), ("bwd", *bwd)]


@pytest.mark.parametrize("feature", list(FEATURES))
def test_emulated_kernels_features(emulator, feature):
    residual, weight, bias, p, prenorm, fp32 = FEATURES[feature]
    emu = _Emulated(emulator, max_blocks=3)
    inputs = _make(13, 264, torch.float16, residual=residual, weight=weight, bias=bias, device="cpu")
    options = NormOptions(kind="layer", eps=EPS, dropout_p=p, prenorm=prenorm, residual_in_fp32=fp32)
    _check(inputs, options, RngState(seed=5, offset=6) if p > 0 else None, emu.forward, emu.backward)


@pytest.mark.parametrize("row_pad", [8, 3])
def test_emulated_kernels_mixed_dtypes_and_strides(emulator, row_pad):
    """fp16 x (row-strided view), fp32 residual, fp32 weight, bf16 bias -> h in fp32; a pad
    of 3 breaks 16-byte alignment (scalar kernels)."""
    m, n = 7, 520
    emu = _Emulated(emulator, max_blocks=2)
    big_x = torch.randn(m, n + row_pad, dtype=torch.float16)
    inputs = NormInputs(x=big_x[:, :n], residual=torch.randn(m, n + row_pad)[:, row_pad:],
                        weight=1.0 + 0.5 * torch.randn(n), bias=(0.5 * torch.randn(n)).to(torch.bfloat16))
    options = NormOptions(kind="layer", eps=EPS, prenorm=True, dropout_p=0.1)
    _check(inputs, options, RngState(seed=1, offset=2), emu.forward, emu.backward)
    scalar = row_pad % 8 != 0
    assert emu.shapes[0][1:] == ((128, 1) if scalar else (128, 4))


def test_emulated_parameter_grads_do_not_depend_on_the_grid(emulator):
    """Different persistent grids sum the rows in different groupings: same values up to fp32
    rounding; the same grid twice: bitwise equal."""
    inputs = _make(40, 1000, torch.bfloat16, param_dtype=torch.float32, device="cpu")
    options = NormOptions(kind="layer", eps=EPS)
    small, large = _Emulated(emulator, max_blocks=2), _Emulated(emulator, max_blocks=5)
    out = small.forward(inputs, options, None)
    dy = torch.randn_like(out.y)
    args = (dy, None, out.h, out.mean, out.rstd, inputs, options, None)
    first, again, other = small.backward(*args), small.backward(*args), large.backward(*args)
    assert torch.equal(first.dweight, again.dweight) and torch.equal(first.dbias, again.dbias)
    torch.testing.assert_close(first.dweight, other.dweight, rtol=1e-5, atol=1e-5)
    assert torch.equal(first.dx, other.dx)
