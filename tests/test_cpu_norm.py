"""CPU residual + LayerNorm / RMSNorm (fastattn.cpu.norm, csrc/cpu/norm.cpp) against the float64
reference.

Runs on every machine with a C++ compiler (the extension is built once and cached). Tolerance:
tests/helpers.py (kernel error vs the float64 reference <= 2 x plain PyTorch's error in the same
dtype + atol). Dropout: the reference is given the kernels' keep mask (fastattn.cpu.norm.
dropout_mask, a PyTorch mirror of the Philox bits), which is also checked against the kernels
(dropped elements) and against the Triton backend's mask (same RngState, same mask).
"""

from __future__ import annotations

import re
from typing import Optional

import pytest
import torch

import fastattn
from fastattn.backends import BackendNotSupportedError, select
from fastattn.cpu import norm as cnorm
from fastattn.options import NormInputs, NormOptions, RngState
from norm_cases import FEATURES, check_backend, make_inputs

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
EPS = 1e-5


@pytest.fixture(scope="module", autouse=True)
def cpu_extension():
    """Builds (first run) or loads the CPU extension; a build failure fails every test here."""
    fastattn.cpu.ensure_loaded()


def _rng() -> RngState:
    return RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())


def _check(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]):
    """Forward and every gradient of the cpu backend against reference and baseline."""
    return check_backend(cnorm, inputs, options, rng, eps=EPS)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_features(dtype, feature, kind):
    residual, weight, bias, p, prenorm, fp32 = FEATURES[feature]
    inputs = make_inputs(37, 300, dtype, "cpu", residual=residual, weight=weight, bias=bias, kind=kind)
    options = NormOptions(kind=kind, eps=EPS, dropout_p=p, prenorm=prenorm, residual_in_fp32=fp32)
    _check(inputs, options, _rng() if p > 0 else None)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("hidden", [1, 40, 80, 96, 1000])
@pytest.mark.parametrize("rows", [1, 7, 113, 203])
def test_shapes(rows, hidden, kind):
    """Vector tails (hidden % 16 != 0), single rows and columns, more rows than row blocks."""
    inputs = make_inputs(rows, hidden, torch.bfloat16, "cpu", kind=kind)
    options = NormOptions(kind=kind, eps=EPS, dropout_p=0.1, prenorm=True)
    _check(inputs, options, _rng())


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_wide_fp32_rows_without_dropout(kind):
    inputs = make_inputs(5, 20000, torch.float32, "cpu", kind=kind)
    _check(inputs, NormOptions(kind=kind, eps=EPS, prenorm=True), None)


@pytest.mark.parametrize("n", [5, 1000])
def test_mixed_dtypes_and_strides(n):
    """fp16 x with an fp32 residual (h in fp32 without residual_in_fp32), fp32 parameters,
    x and residual as row-strided views."""
    m = 6
    big_x = torch.randn(m, n + 7, dtype=torch.float16)
    big_r = torch.randn(m, n + 3, dtype=torch.float32)
    w = 1.0 + 0.5 * torch.randn(n)
    b = 0.5 * torch.randn(n)
    inputs = NormInputs(x=big_x[:, :n], residual=big_r[:, 3:], weight=w, bias=b)
    assert inputs.x.stride(0) == n + 7
    out, _ = _check(inputs, NormOptions(kind="layer", eps=EPS, prenorm=True), None)
    assert out.h.dtype == torch.float32


def test_h_aliases_x_without_residual():
    inputs = make_inputs(4, 64, torch.bfloat16, "cpu", residual=False)
    out = cnorm.forward(inputs, NormOptions(), None)
    assert out.h.data_ptr() == inputs.x.data_ptr()
    out32 = cnorm.forward(inputs, NormOptions(residual_in_fp32=True), None)
    assert out32.h.dtype == torch.float32
    torch.testing.assert_close(out32.h, inputs.x.float(), rtol=0, atol=0)


def test_empty_rows():
    inputs = make_inputs(0, 16, torch.float32, "cpu")
    options = NormOptions(prenorm=True)
    out = cnorm.forward(inputs, options, None)
    assert out.y.shape == (0, 16) and out.rstd.shape == (0,)
    grads = cnorm.backward(out.y, out.h, out.h, out.mean, out.rstd, inputs, options, None)
    assert grads.dx.shape == (0, 16)
    assert torch.equal(grads.dweight, torch.zeros_like(inputs.weight))
    assert torch.equal(grads.dbias, torch.zeros_like(inputs.bias))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_outputs_written_around_the_caches_equal_cached_stores(kind):
    """Outputs of 32 MiB and more are written with non-temporal stores (csrc/cpu/norm.cpp
    kStreamBytes). Rows are independent, so the first rows of such a call equal those of a call
    too small to stream (checked against the reference above), bit for bit."""
    inputs = make_inputs(8192, 1024, torch.float32, "cpu", kind=kind)  # 32 MiB per (M, N) tensor
    options = NormOptions(kind=kind, eps=EPS, prenorm=True)
    dy = torch.randn_like(inputs.x)
    rows = 1024
    results = []
    for m in (8192, rows):
        case = NormInputs(inputs.x[:m], inputs.residual[:m], inputs.weight, inputs.bias)
        out = cnorm.forward(case, options, None)
        grads = cnorm.backward(dy[:m], dy[:m], out.h, out.mean, out.rstd, case, options, None)
        results.append([t[:rows] for t in (out.y, out.h, out.rstd, grads.dx)])
    for streamed, cached in zip(*results):
        assert torch.equal(streamed, cached)


def test_large_outputs_from_reused_buffers_never_alias_live_ones():
    """Outputs of 128 KiB and more come from csrc/cpu/buffer_pool.h, which hands freed buffers
    out again: live outputs stay distinct and intact, results do not depend on reuse, and the
    tensors behave like torch's own (resize_)."""
    inputs = make_inputs(256, 1024, torch.float32, "cpu")  # 1 MiB per (M, N) tensor
    options = NormOptions(prenorm=True)
    first = cnorm.forward(inputs, options, None)
    expected = [t.clone() for t in (first.y, first.h, first.rstd)]
    dy = torch.randn_like(first.y)
    grads = cnorm.backward(dy, dy, first.h, first.mean, first.rstd, inputs, options, None)
    expected_grads = grads.dx.clone()
    for _ in range(3):
        del grads
        again = cnorm.forward(inputs, options, None)
        grads = cnorm.backward(dy, dy, again.h, again.mean, again.rstd, inputs, options, None)
        live = [first.y, first.h, again.y, again.h, grads.dx]
        assert len({t.data_ptr() for t in live}) == len(live)
        for got, want in zip((again.y, again.h, again.rstd), expected):
            assert torch.equal(got, want)
        assert torch.equal(grads.dx, expected_grads)
    assert torch.equal(first.y, expected[0]) and torch.equal(first.h, expected[1])
    grown = again.y.resize_(512, 1024)
    assert torch.equal(grown[:256], expected[0])
    fastattn.cpu.release_memory()  # idle blocks freed; live outputs keep theirs
    assert torch.equal(first.y, expected[0]) and torch.equal(grown[:256], expected[0])
    assert torch.equal(cnorm.forward(inputs, options, None).y, expected[0])


def test_pooled_outputs_count_in_the_profilers_memory_statistics():
    """The benchmarks' peak memory (fastattn.bench.harness.peak_memory) sees pooled outputs."""
    from fastattn.bench.harness import peak_memory

    inputs = make_inputs(256, 1024, torch.float32, "cpu")  # y and h: 1 MiB each
    peak_mib, reason = peak_memory(lambda: cnorm.forward(inputs, NormOptions(prenorm=True), None), torch.device("cpu"))
    assert peak_mib is not None, reason  # the pinned torch's profiler reports allocations
    assert peak_mib >= 2.0


def test_parameter_grads_do_not_depend_on_the_thread_count():
    """Row blocks depend on the row count only, partials are summed in block order: bitwise
    equal gradients with 1 and 2 threads (and from run to run)."""
    inputs = make_inputs(301, 200, torch.bfloat16, "cpu", param_dtype=torch.float32)
    options = NormOptions(kind="layer", dropout_p=0.1)
    rng = RngState(seed=7, offset=11)
    out = cnorm.forward(inputs, options, rng)
    dy = torch.randn_like(out.y)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            results.append(cnorm.backward(dy, None, out.h, out.mean, out.rstd, inputs, options, rng))
    finally:
        torch.set_num_threads(threads)
    for name in ("dx", "dresidual", "dweight", "dbias"):
        assert torch.equal(getattr(results[0], name), getattr(results[1], name)), name
        assert torch.equal(getattr(results[1], name), getattr(results[2], name)), name
    assert results[0].dweight.abs().sum() > 0


def test_dropout_mask_is_the_triton_backends():
    """Same RngState, same mask as fastattn.triton.norm (run under the Triton interpreter)."""
    from fastattn.triton import norm as tnorm

    inputs = NormInputs(x=torch.randn(9, 70))
    options = NormOptions(dropout_p=0.3)
    rng = _rng()
    assert torch.equal(cnorm.dropout_mask(inputs, options, rng), tnorm.dropout_mask(inputs, options, rng))


def test_dropout_mask_statistics():
    x = torch.randn(40, 700)
    options = NormOptions(dropout_p=0.25)
    rng = RngState(seed=123, offset=456)
    keep = cnorm.dropout_mask(NormInputs(x=x), options, rng)
    small = cnorm.dropout_mask(NormInputs(x=x[:13, :301]), options, rng)
    assert torch.equal(small, keep[:13, :301])  # a function of (row, col), not of the shape
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    for other in (RngState(seed=124, offset=456), RngState(seed=123, offset=457)):
        changed = (cnorm.dropout_mask(NormInputs(x=x), options, other) != keep).float().mean().item()
        assert changed > 0.2, (other, changed)


def test_dropout_forward_and_backward_use_the_mask():
    """h = x * keep / (1 - p) without residual: dropped elements are exactly 0, kept ones
    scaled; the backward regenerates the same mask (dx is 0 exactly where dropped)."""
    inputs = make_inputs(9, 257, torch.float32, "cpu", residual=False)
    options = NormOptions(dropout_p=0.4, prenorm=True)
    rng = RngState(seed=99, offset=3)
    out = cnorm.forward(inputs, options, rng)
    keep = cnorm.dropout_mask(inputs, options, rng)
    expected = torch.where(keep, inputs.x * torch.tensor(1 / 0.6, dtype=torch.float32), torch.zeros_like(inputs.x))
    torch.testing.assert_close(out.h, expected, rtol=0, atol=0)
    grads = cnorm.backward(torch.randn_like(out.y), None, out.h, out.mean, out.rstd, inputs, options, rng)
    assert torch.equal(grads.dx == 0, ~keep)


@pytest.mark.parametrize("prenorm", [False, True])
def test_public_functions_select_cpu_and_match_the_reference(prenorm):
    """fastattn.add_layer_norm / rms_norm on CPU tensors choose this backend by default and
    agree with the reference backend in float64, through the shared autograd layer."""
    shape = (2, 5, 96)
    x = torch.randn(shape, dtype=torch.bfloat16)
    res = torch.randn(shape, dtype=torch.bfloat16)
    w = torch.randn(96, dtype=torch.bfloat16)
    b = torch.randn(96, dtype=torch.bfloat16)
    inputs = NormInputs(x.reshape(-1, 96), res.reshape(-1, 96), w, b)
    assert select("norm", inputs, NormOptions(prenorm=prenorm)).name == "cpu"
    for fn, params in ((fastattn.add_layer_norm, (w, b)), (fastattn.rms_norm, (w,))):
        leaves = [t.clone().requires_grad_() for t in (x, res, *params)]
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        out = fn(*leaves, prenorm=prenorm, residual_in_fp32=True, dropout_p=0.0)
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


def test_public_function_with_dropout_trains():
    x = torch.randn(3, 33, requires_grad=True)
    res = torch.randn(3, 33, requires_grad=True)
    y, h = fastattn.add_layer_norm(x, res, dropout_p=0.5, prenorm=True, backend="cpu")
    (y.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad == 0).any() and (x.grad != 0).any()


def test_unsupported_dtypes_are_reasons_not_errors():
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="dtype float64 is not supported"):
        fastattn.add_layer_norm(x, backend="cpu")
    res64 = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="residual dtype float64"):
        fastattn.add_layer_norm(torch.randn(3, 8), res64, backend="cpu")
    # Automatic choice falls back to the reference backend.
    assert fastattn.add_layer_norm(x).dtype == torch.float64


def test_bad_inputs_are_named_before_any_kernel():
    with pytest.raises(ValueError, match=re.escape("residual must have shape")):
        fastattn.add_layer_norm(torch.randn(3, 8), torch.randn(3, 9), backend="cpu")
    with pytest.raises(ValueError, match="weight must have shape"):
        fastattn.rms_norm(torch.randn(3, 8), None, torch.randn(7), backend="cpu")


OP_ERRORS = [
    ("x 1-D", lambda x, r: dict(x=x[0]), "x must be 2-D"),
    ("residual shape", lambda x, r: dict(residual=r[:, :3]), "residual must have shape"),
    ("weight shape", lambda x, r: dict(weight=torch.ones(3)), "weight must have shape"),
    ("float64 x", lambda x, r: dict(x=x.double()), "x must be float32, bfloat16 or float16"),
    ("dropout_p", lambda x, r: dict(dropout_p=1.0), "dropout_p must be in [0, 1)"),
    ("strided last dim", lambda x, r: dict(x=x.t().contiguous().t()), "x must have a contiguous last dimension"),
    ("h alias", lambda x, r: dict(store_h=False), "h can only be x itself"),
]


@pytest.mark.parametrize("case", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_op_rejects_bad_arguments_by_name(case):
    _, override, fragment = case
    x, r = torch.randn(4, 6), torch.randn(4, 6)
    args = dict(x=x, residual=r, weight=None, bias=None, eps=1e-5, dropout_p=0.0, seed=0, offset=0, is_rms=False,
                store_h=True, h_dtype=torch.float32)
    args.update(override(x, r))
    with pytest.raises(RuntimeError, match=re.escape(fragment)):
        torch.ops.fastattn.cpu_norm_fwd(**args)


@pytest.mark.parametrize("is_rms", [False, True])
def test_opcheck(is_rms):
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    res = torch.randn(5, 40, dtype=torch.float32)
    w = torch.randn(40, dtype=torch.bfloat16)
    b = None if is_rms else torch.randn(40, dtype=torch.float32)
    fwd_args = (x, res, w, b, 1e-5, 0.25, 3, 7, is_rms, True, torch.float32)
    torch.library.opcheck(torch.ops.fastattn.cpu_norm_fwd.default, fwd_args)
    y, h, mean, rstd = torch.ops.fastattn.cpu_norm_fwd(*fwd_args)
    bwd_args = (torch.randn_like(y), torch.randn_like(h), h, None if is_rms else mean, rstd, w, b, 0.25, 3, 7, is_rms,
                torch.float32)
    torch.library.opcheck(torch.ops.fastattn.cpu_norm_bwd.default, bwd_args)
    # the eager path's C++ autograd node over the two (csrc/cpu/autograd.cpp), x with batch dims
    leaves = [t.detach().requires_grad_() for t in (x.view(1, 5, 40), res.view(1, 5, 40), w)]
    leaves.append(None if b is None else b.detach().requires_grad_())
    torch.library.opcheck(torch.ops.fastattn.cpu_norm_autograd.default, (*leaves, *fwd_args[4:]))
