"""CPU feed-forward (fastattn.cpu.ffn, csrc/cpu/ffn.cpp) against the float64 reference.

Runs on every machine with a C++ compiler (the extension is built once and cached). Tolerance:
tests/helpers.py (kernel error vs the float64 reference <= 2 x the error of plain PyTorch
Linear -> act -> Linear in the same dtype + atol). Dropout: the reference and the baseline are
given the kernels' keep mask (fastattn.cpu.ffn.dropout_mask, a PyTorch mirror of the Philox
bits), which is also checked against the kernels and against the Triton backend's mask.
"""

from __future__ import annotations

import concurrent.futures
import re
from typing import Optional

import pytest
import torch

import fastattn
from fastattn.backends import BackendNotSupportedError, select
from fastattn.cpu import ffn as cffn
from fastattn.options import FeedForwardInputs, FeedForwardOptions, RngState
from ffn_cases import ACTIVATIONS, GRAD_NAMES, make_inputs, run_and_check

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(scope="module", autouse=True)
def cpu_extension():
    """Builds (first run) or loads the CPU extension; a build failure fails every test here."""
    fastattn.cpu.ensure_loaded()


def _rng() -> RngState:
    return RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())


def _run_and_check(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]):
    """cpu forward + backward vs the float64 reference; returns the cpu results."""
    return run_and_check(cffn, inputs, options, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_dtypes(activation, dtype):
    inputs = make_inputs(67, 40, 70, 33, dtype, "cpu", activation=activation)
    _run_and_check(inputs, FeedForwardOptions(activation=activation, dropout_p=0.2), _rng())


@pytest.mark.parametrize("recompute", [False, True], ids=["saved_z", "recompute"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bias_dropout_recompute(dtype, activation, bias, dropout_p, recompute):
    inputs = make_inputs(45, 24, 70, 17, dtype, "cpu", activation=activation, bias=bias)
    options = FeedForwardOptions(activation=activation, dropout_p=dropout_p, recompute=recompute)
    _run_and_check(inputs, options, _rng() if dropout_p > 0 else None)


# (M, d_model, d_ff, d_out, activation): rows 1, 7, 113, 203 against widths 40, 80, 96, 1000.
ODD_SHAPES = [
    (1, 40, 96, 80, "gelu"),
    (7, 96, 40, 1000, "swiglu"),
    (113, 80, 1000, 40, "gelu_tanh"),
    (203, 1000, 80, 96, "silu"),
    (113, 40, 96, 7, "relu"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + "-" + s[4])
def test_odd_shapes(shape, dtype):
    m, d_model, d_ff, d_out, activation = shape
    inputs = make_inputs(m, d_model, d_ff, d_out, dtype, "cpu", activation=activation)
    _run_and_check(inputs, FeedForwardOptions(activation=activation, dropout_p=0.1), _rng())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_recompute_gives_identical_results(activation, dtype):
    """Recomputing z in backward reproduces the saved z bit for bit: same y, same gradients."""
    inputs = make_inputs(19, 24, 40, 9, dtype, "cpu", activation=activation)
    rng = _rng()
    saved = FeedForwardOptions(activation=activation, dropout_p=0.25)
    recompute = FeedForwardOptions(activation=activation, dropout_p=0.25, recompute=True)
    y1, z = cffn.forward(inputs, saved, rng)
    y2, none = cffn.forward(inputs, recompute, rng)
    assert none is None
    assert torch.equal(y1, y2)
    dy = torch.randn_like(y1)
    g1 = cffn.backward(dy, z, inputs, saved, rng)
    g2 = cffn.backward(dy, None, inputs, recompute, rng)
    for name in GRAD_NAMES:
        assert torch.equal(getattr(g1, name), getattr(g2, name)), name


def test_bias_grads_do_not_depend_on_the_thread_count():
    inputs = make_inputs(301, 24, 40, 20, torch.float32, "cpu", activation="silu")
    options = FeedForwardOptions(activation="silu", dropout_p=0.5)
    rng = _rng()
    y, z = cffn.forward(inputs, options, rng)
    dy = torch.randn_like(y)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 2):
            torch.set_num_threads(count)
            results.append(cffn.backward(dy, z, inputs, options, rng))
    finally:
        torch.set_num_threads(threads)
    for name in ("db1", "db2"):
        assert torch.equal(getattr(results[0], name), getattr(results[1], name)), name
    for name in GRAD_NAMES:
        assert torch.equal(getattr(results[1], name), getattr(results[2], name)), name


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_strided_operands(activation):
    """Transposed weight views and a row-strided x."""
    base = make_inputs(13, 24, 36, 10, torch.float32, "cpu", activation=activation)
    d_hidden = base.w1.shape[0]
    w1_t = base.w1.t().contiguous().t()  # same values, strides (1, d_hidden)
    w2_t = base.w2.t().contiguous().t()
    wide = torch.randn(13, 40)
    wide[:, 5:29] = base.x
    x = wide[:, 5:29]  # row stride 40
    assert w1_t.stride() == (1, d_hidden) and x.stride() == (40, 1)
    inputs = FeedForwardInputs(x=x, w1=w1_t, b1=base.b1, w2=w2_t, b2=base.b2)
    _run_and_check(inputs, FeedForwardOptions(activation=activation), None)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "swiglu"])
def test_extreme_preactivations_stay_finite(activation):
    """|z| up to ~100: sigmoid/tanh saturate instead of producing inf/inf."""
    inputs = make_inputs(9, 16, 24, 8, torch.float32, "cpu", activation=activation, x_scale=40.0)
    _run_and_check(inputs, FeedForwardOptions(activation=activation), None)


def test_gelu_tails_are_exact_and_never_subnormal():
    """|z| >= 12.65 (u^2 >= 80): gelu(z) is z or 0 and gelu'(z) 1 or 0, exactly, as in float64
    (the erf tail is below 1e-35); the kernel zeroes exp(-u^2) there instead of forming
    subnormal products (each costs ~100x: a 2x slower FFN with large pre-activations)."""
    z = torch.tensor([-300.0, -40.0, -12.7, 12.7, 40.0, 300.0]).repeat(16, 1)  # (16, 6)
    x, w1 = z, torch.eye(6)  # x @ w1^T = z
    w2 = torch.eye(6)
    inputs = FeedForwardInputs(x=x, w1=w1, b1=None, w2=w2, b2=None)
    y, _ = cffn.forward(inputs, FeedForwardOptions(activation="gelu"), None)
    assert torch.equal(y, torch.where(z > 0, z, torch.zeros_like(z)))
    grads = cffn.backward(torch.ones_like(y), z.clone(), inputs, FeedForwardOptions(activation="gelu"), None)
    assert torch.equal(grads.dx, (z > 0).float())
    tiny = torch.finfo(torch.float32).tiny
    assert not ((y != 0) & (y.abs() < tiny)).any()


def test_dropout_mask_is_the_triton_backends():
    """Same RngState, same mask as fastattn.triton.ffn (run under the Triton interpreter)."""
    from fastattn.triton import ffn as tffn

    inputs = make_inputs(5, 8, 70, 8, torch.float32, "cpu", activation="gelu")
    options = FeedForwardOptions(activation="gelu", dropout_p=0.3)
    rng = _rng()
    assert torch.equal(cffn.dropout_mask(inputs, options, rng), tffn.dropout_mask(inputs, options, rng))


def test_dropout_mask_statistics():
    inputs = make_inputs(67, 8, 300, 8, torch.float16, "cpu", activation="gelu")
    options = FeedForwardOptions(activation="gelu", dropout_p=0.3)
    rng = _rng()
    keep = cffn.dropout_mask(inputs, options, rng)
    assert keep.dtype == torch.bool and keep.shape == (67, 300)
    # 20100 Bernoulli(0.7) draws: standard deviation of the mean 0.0032.
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    for other in (RngState(rng.seed ^ 1, rng.offset), RngState(rng.seed, rng.offset + 1)):
        assert (keep != cffn.dropout_mask(inputs, options, other)).float().mean() > 0.2
    head = FeedForwardInputs(inputs.x[:5], inputs.w1, inputs.b1, inputs.w2, inputs.b2)
    assert torch.equal(cffn.dropout_mask(head, options, rng), keep[:5])
    assert cffn.dropout_mask(inputs, FeedForwardOptions(activation="gelu"), None) is None


@pytest.mark.parametrize("recompute", [False, True])
def test_dropout_is_applied_with_the_mask(recompute):
    """A row whose hidden units are all dropped outputs exactly b2 and passes no gradient to x."""
    inputs = make_inputs(29, 16, 4, 12, torch.float32, "cpu", activation="silu")
    options = FeedForwardOptions(activation="silu", dropout_p=0.9, recompute=recompute)
    rng = RngState(seed=5, offset=17)
    keep = cffn.dropout_mask(inputs, options, rng)
    dropped = ~keep.any(dim=1)
    assert dropped.any() and not dropped.all()
    y, z = cffn.forward(inputs, options, rng)
    assert torch.equal(y[dropped], inputs.b2.expand(int(dropped.sum()), -1))
    assert (y[~dropped] != inputs.b2).any()
    g = cffn.backward(torch.randn_like(y), z, inputs, options, rng)
    assert (g.dx[dropped] == 0).all() and (g.dx[~dropped] != 0).any()


def _op_results(inputs: FeedForwardInputs, activation: str, dy: torch.Tensor):
    """y, z and the five gradients of the cpu ops (saved z, dropout 0.1)."""
    args = (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)
    y, z = torch.ops.fastattn.cpu_ffn_fwd(*args, activation, 0.1, 3, 7, True)
    return (y, z, *torch.ops.fastattn.cpu_ffn_bwd(dy, z, *args, activation, 0.1, 3, 7))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_workspace_reuse_and_release_do_not_change_results(activation):
    """The reused temporaries (grown, shrunk, released) give the same bits as a first call."""
    cases = [make_inputs(rows, 24, 40, 16, torch.float32, "cpu", activation=activation) for rows in (9, 70, 3)]
    dys = [torch.randn(inputs.rows, 16) for inputs in cases]
    cffn.release_workspace()
    first = [_op_results(inputs, activation, dy) for inputs, dy in zip(cases, dys)]
    for inputs, dy, expected in zip(reversed(cases), reversed(dys), reversed(first)):
        for actual, want in zip(_op_results(inputs, activation, dy), expected):
            assert torch.equal(actual, want)
    cffn.release_workspace()
    for actual, want in zip(_op_results(cases[1], activation, dys[1]), first[1]):
        assert torch.equal(actual, want)


def test_concurrent_calls_use_separate_workspaces():
    """Calls from several threads at once (each its own workspace) give the serial results."""
    cases = [make_inputs(rows, 64, 200, 16, torch.float32, "cpu", activation="gelu") for rows in (250, 301, 377, 390)]
    dys = [torch.randn(inputs.rows, 16) for inputs in cases]
    expected = [_op_results(inputs, "gelu", dy) for inputs, dy in zip(cases, dys)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(5):
            futures = [pool.submit(_op_results, inputs, "gelu", dy) for inputs, dy in zip(cases, dys)]
            for future, want in zip(futures, expected):
                assert all(torch.equal(a, b) for a, b in zip(future.result(), want))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_public_function_selects_cpu_and_matches_the_reference(activation):
    inputs = make_inputs(11, 24, 20, 16, torch.float32, "cpu", activation=activation)
    assert select("ffn", inputs, FeedForwardOptions(activation=activation)).name == "cpu"
    leaves, outs = {}, {}
    for backend in (None, "reference"):
        ts = [t.detach().clone().requires_grad_() for t in (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)]
        leaves[backend] = ts
        outs[backend] = fastattn.feed_forward(*ts, activation=activation, backend=backend)
    dy = torch.randn_like(outs[None])
    for backend in outs:
        outs[backend].backward(dy)
    torch.testing.assert_close(outs[None], outs["reference"], rtol=1e-4, atol=1e-4)
    for name, c_leaf, r_leaf in zip(GRAD_NAMES, leaves[None], leaves["reference"]):
        torch.testing.assert_close(c_leaf.grad, r_leaf.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_public_function_with_dropout_and_recompute_trains():
    inputs = make_inputs(6, 8, 12, 8, torch.float32, "cpu", activation="relu")
    ts = [t.clone().requires_grad_() for t in (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)]
    fastattn.feed_forward(*ts, activation="relu", dropout_p=0.3, recompute=True, backend="cpu").sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in ts)


def test_unsupported_dtype_is_a_reason_not_an_error():
    inputs = make_inputs(3, 8, 8, 8, torch.float64, "cpu", activation="gelu")
    with pytest.raises(BackendNotSupportedError, match="dtype float64 is not supported"):
        fastattn.feed_forward(inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2, backend="cpu")
    assert fastattn.feed_forward(inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2).dtype == torch.float64


def test_bad_inputs_are_named_before_any_kernel():
    x, w1, w2 = torch.randn(2, 5), torch.randn(7, 5), torch.randn(3, 7)
    with pytest.raises(ValueError, match=re.escape("b1 must have shape")):
        fastattn.feed_forward(x, w1, torch.randn(6), w2, None, backend="cpu")
    with pytest.raises(ValueError, match="2 \\* d_ff"):
        fastattn.feed_forward(x, w1, None, w2, None, activation="swiglu", backend="cpu")


OP_ERRORS = [
    ("activation", dict(activation="tanh"), "activation must be one of"),
    ("w1 columns", dict(w1=torch.randn(7, 4)), "w1 must have shape (d_hidden, 5)"),
    ("swiglu rows", dict(activation="swiglu"), "w2 needs 2 * d_ff"),
    ("b2 shape", dict(b2=torch.randn(4)), "b2 must be a CPU tensor of shape (3,)"),
    ("w2 dtype", dict(w2=torch.randn(3, 7, dtype=torch.bfloat16)), "w2 must have x's dtype"),
    ("dropout_p", dict(dropout_p=1.5), "dropout_p must be in [0, 1)"),
]


@pytest.mark.parametrize("case", OP_ERRORS, ids=[c[0] for c in OP_ERRORS])
def test_op_rejects_bad_arguments_by_name(case):
    _, override, fragment = case
    args = dict(x=torch.randn(2, 5), w1=torch.randn(7, 5), b1=torch.randn(7), w2=torch.randn(3, 7), b2=torch.randn(3),
                activation="gelu", dropout_p=0.0, seed=0, offset=0, save_z=True)
    args.update(override)
    with pytest.raises(RuntimeError, match=re.escape(fragment)):
        torch.ops.fastattn.cpu_ffn_fwd(**args)


@pytest.mark.parametrize("activation, save_z", [("gelu_tanh", True), ("swiglu", False)])
def test_opcheck(activation, save_z):
    inputs = make_inputs(33, 24, 40, 16, torch.bfloat16, "cpu", activation=activation)
    args = (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)
    torch.library.opcheck(torch.ops.fastattn.cpu_ffn_fwd.default, (*args, activation, 0.25, 3, 7, save_z))
    y, z = torch.ops.fastattn.cpu_ffn_fwd(*args, activation, 0.25, 3, 7, True)
    z_arg = z if save_z else None
    torch.library.opcheck(
        torch.ops.fastattn.cpu_ffn_bwd.default,
        (torch.randn_like(y), z_arg, inputs.x, inputs.w1, None, inputs.w2, inputs.b2, activation, 0.25, 3, 7),
    )
    # the eager path's C++ autograd node over the two (csrc/cpu/autograd.cpp), x with batch dims
    x, w1, b1, w2, b2 = (t.detach().requires_grad_() for t in args)
    torch.library.opcheck(torch.ops.fastattn.cpu_ffn_autograd.default,
                          (x.view(3, 11, -1), w1, b1, w2, b2, activation, 0.25, 3, 7, save_z))
