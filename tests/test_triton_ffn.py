"""Triton feed-forward (fastattn.triton.ffn) against the float64 reference.

Runs the kernels on the GPU when there is one, else on CPU tensors through the Triton
interpreter (tests/conftest.py). Tolerance: tests/helpers.py (kernel error vs the float64
reference <= 2 x the error of plain PyTorch Linear -> act -> Linear in the same dtype + atol).
Dropout: the reference and the baseline are given the kernel's own keep mask
(fastattn.triton.ffn.dropout_mask).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch

from conftest import requires_cuda
from fastattn.options import FeedForwardInputs, FeedForwardOptions, RngState
from fastattn.reference import ffn as reference
from fastattn.triton import ffn as tffn
from ffn_cases import ACTIVATIONS, GRAD_NAMES, inputs64, make_inputs, run_and_check

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _run_and_check(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]):
    """Triton forward + backward vs the float64 reference; returns the Triton results."""
    return run_and_check(tffn, inputs, options, rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_and_dtypes(activation, dtype, device):
    # Just above the interpreter's 64-wide tiles: two tiles along M and F.
    inputs = make_inputs(67, 40, 70, 33, dtype, device, activation=activation)
    options = FeedForwardOptions(activation=activation, dropout_p=0.2)
    rng = RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())
    _run_and_check(inputs, options, rng)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved_z", "recompute"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_dropout_recompute(activation, bias, dropout_p, recompute, device):
    inputs = make_inputs(45, 24, 70, 17, torch.float16, device, activation=activation, bias=bias)
    options = FeedForwardOptions(activation=activation, dropout_p=dropout_p, recompute=recompute)
    rng = RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist()) if dropout_p > 0 else None
    _run_and_check(inputs, options, rng)


# (M, d_model, d_ff, d_out, activation): the interpreter's cost grows with the tile count,
# so the two large cases put 1000 on one side only.
ODD_SHAPES = [
    (1, 3, 40, 3, "gelu"),
    (7, 40, 3, 1000, "swiglu"),
    (333, 40, 1000, 40, "gelu_tanh"),
    (333, 1000, 40, 7, "silu"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + "-" + s[4])
def test_odd_shapes(shape, dtype, device):
    m, d_model, d_ff, d_out, activation = shape
    inputs = make_inputs(m, d_model, d_ff, d_out, dtype, device, activation=activation)
    options = FeedForwardOptions(activation=activation, dropout_p=0.1)
    _run_and_check(inputs, options, RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist()))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_recompute_gives_identical_gradients(activation, device):
    """Recomputing z with the forward kernel must reproduce the saved z bit for bit."""
    inputs = make_inputs(19, 24, 40, 9, torch.bfloat16, device, activation=activation)
    rng = RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())
    saved = FeedForwardOptions(activation=activation, dropout_p=0.25)
    recompute = FeedForwardOptions(activation=activation, dropout_p=0.25, recompute=True)
    y1, z = tffn.forward(inputs, saved, rng)
    y2, none = tffn.forward(inputs, recompute, rng)
    assert none is None
    assert torch.equal(y1, y2)
    dy = torch.randn_like(y1)
    g1 = tffn.backward(dy, z, inputs, saved, rng)
    g2 = tffn.backward(dy, None, inputs, recompute, rng)
    for name in GRAD_NAMES:
        assert torch.equal(getattr(g1, name), getattr(g2, name)), name


def test_backward_is_deterministic(device):
    inputs = make_inputs(45, 24, 40, 20, torch.float16, device, activation="silu")
    options = FeedForwardOptions(activation="silu", dropout_p=0.5)
    rng = RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())
    y, z = tffn.forward(inputs, options, rng)
    dy = torch.randn_like(y)
    g1 = tffn.backward(dy, z, inputs, options, rng)
    g2 = tffn.backward(dy, z, inputs, options, rng)
    for name in GRAD_NAMES:
        assert torch.equal(getattr(g1, name), getattr(g2, name)), name


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_strided_operands(activation, device):
    """Transposed weight views and a row-strided x are read in place (no copies)."""
    base = make_inputs(13, 24, 36, 10, torch.float32, device, activation=activation)
    d_hidden = base.w1.shape[0]
    w1_t = base.w1.t().contiguous().t()  # same values, strides (1, d_hidden)
    w2_t = base.w2.t().contiguous().t()
    wide = torch.randn(13, 40, device=device)
    wide[:, 5:29] = base.x
    x = wide[:, 5:29]  # row stride 40
    assert w1_t.stride() == (1, d_hidden) and x.stride() == (40, 1)
    inputs = FeedForwardInputs(x=x, w1=w1_t, b1=base.b1, w2=w2_t, b2=base.b2)
    options = FeedForwardOptions(activation=activation)
    _run_and_check(inputs, options, None)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter's numpy exp
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "swiglu"])
def test_extreme_preactivations_stay_finite(activation, device):
    """|z| up to ~100: sigmoid/tanh saturate instead of producing inf/inf."""
    inputs = make_inputs(9, 16, 24, 8, torch.float32, device, activation=activation, x_scale=40.0)
    _run_and_check(inputs, FeedForwardOptions(activation=activation), None)


def test_tf32_option_is_accepted(device):
    inputs = make_inputs(9, 20, 24, 8, torch.float32, device, activation="gelu")
    options = FeedForwardOptions(activation="gelu", allow_tf32=True)
    y, _ = tffn.forward(inputs, options, None)
    y_ref, _ = reference.forward(inputs64(inputs), options, None)
    # tf32 keeps 10 mantissa bits: compare at that precision.
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)


def test_dropout_mask(device):
    inputs = make_inputs(67, 8, 300, 8, torch.float16, device, activation="gelu")
    options = FeedForwardOptions(activation="gelu", dropout_p=0.3)
    rng = RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())
    keep = tffn.dropout_mask(inputs, options, rng)
    assert keep.dtype == torch.bool and keep.shape == (67, 300)
    # 20100 Bernoulli(0.7) draws: standard deviation of the mean 0.0032.
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    assert torch.equal(keep, tffn.dropout_mask(inputs, options, rng))
    other_seed = tffn.dropout_mask(inputs, options, RngState(rng.seed ^ 1, rng.offset))
    other_offset = tffn.dropout_mask(inputs, options, RngState(rng.seed, rng.offset + 1))
    assert (keep != other_seed).float().mean() > 0.2
    assert (keep != other_offset).float().mean() > 0.2
    # A pure function of (seed, offset, row, col): fewer rows give the leading rows.
    head = FeedForwardInputs(inputs.x[:5], inputs.w1, inputs.b1, inputs.w2, inputs.b2)
    assert torch.equal(tffn.dropout_mask(head, options, rng), keep[:5])
    assert tffn.dropout_mask(inputs, FeedForwardOptions(activation="gelu"), None) is None


def test_dropout_is_applied_with_the_mask(device):
    """A row whose hidden units are all dropped outputs exactly b2 and passes no gradient to x."""
    # silu: a kept unit contributes (act and act' are nonzero), unlike relu with z < 0.
    inputs = make_inputs(29, 16, 4, 12, torch.float32, device, activation="silu")
    options = FeedForwardOptions(activation="silu", dropout_p=0.9)
    rng = RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist())
    keep = tffn.dropout_mask(inputs, options, rng)
    dropped = ~keep.any(dim=1)
    # P(a row keeps a unit) = 1 - 0.9^4 = 0.34: all 29 rows keeping one has probability 3e-14.
    assert dropped.any() and not dropped.all()
    y, z = tffn.forward(inputs, options, rng)
    assert torch.equal(y[dropped], inputs.b2.expand(int(dropped.sum()), -1))
    assert (y[~dropped] != inputs.b2).any()
    g = tffn.backward(torch.randn_like(y), z, inputs, options, rng)
    assert (g.dx[dropped] == 0).all() and (g.dx[~dropped] != 0).any()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_public_function_uses_these_kernels(activation, device):
    import fastattn

    inputs = make_inputs(11, 24, 20, 16, torch.float32, device, activation=activation)
    leaves = {}
    outs = {}
    for backend in ("triton", "reference"):
        ts = [t.detach().clone().requires_grad_() for t in (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)]
        leaves[backend] = ts
        outs[backend] = fastattn.feed_forward(*ts, activation=activation, backend=backend)
    dy = torch.randn_like(outs["triton"])
    for backend in outs:
        outs[backend].backward(dy)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)
    for name, t_leaf, r_leaf in zip(GRAD_NAMES, leaves["triton"], leaves["reference"]):
        torch.testing.assert_close(t_leaf.grad, r_leaf.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_no_extra_reasons_on_this_device(device):
    inputs = make_inputs(3, 8, 8, 8, torch.float16, device, activation="gelu")
    assert tffn.not_supported_reasons(inputs, FeedForwardOptions()) == []
    assert tffn.CAPABILITIES.not_supported_reasons(inputs, FeedForwardOptions(activation="swiglu", dropout_p=0.1)) == []


# (dtype, activation, (M, d_model, d_ff, d_out)): each case autotunes and compiles its kernels
# (about a dozen compilations), so the GPU cases are few. Model-like sizes (multiples of 16:
# pipelined loads) and one odd case (masked, unvectorized loads).
GPU_CASES = [
    (torch.bfloat16, "gelu", (2048, 1024, 4096, 1024)),
    (torch.bfloat16, "swiglu", (2048, 1024, 2816, 1024)),
    (torch.float16, "gelu_tanh", (1024, 768, 3072, 768)),
    (torch.float32, "silu", (1024, 512, 2048, 512)),
    (torch.bfloat16, "relu", (1000, 1000, 2730, 777)),
]


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}-" + "x".join(map(str, c[2])))
def test_gpu_model_shapes(case):
    dtype, activation, shape = case
    inputs = make_inputs(*shape, dtype, "cuda", activation=activation)
    options = FeedForwardOptions(activation=activation, dropout_p=0.1)
    _run_and_check(inputs, options, RngState(*torch.randint(0, 2**31 - 1, (2,)).tolist()))
