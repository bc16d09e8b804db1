"""FFN cases shared by the Triton, CUDA and CPU suites: input builders, the plain-PyTorch
baseline whose error sets each kernel's tolerance (tests/helpers.py) and the check of a
backend's primitives."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastattn.bench.ffn import torch_activation
from fastattn.options import FeedForwardInputs, FeedForwardOptions, RngState
from fastattn.reference import ffn as reference
from helpers import assert_close_to_reference

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu"]
GRAD_NAMES = ("dx", "dw1", "db1", "dw2", "db2")


def make_inputs(m, d_model, d_ff, d_out, dtype, device, *, activation, bias=True, x_scale=1.0) -> FeedForwardInputs:
    """x (m, d_model); w1 (d_hidden, d_model) with d_hidden = 2 d_ff for swiglu; w2 (d_out, d_ff)."""
    d_hidden = 2 * d_ff if activation == "swiglu" else d_ff
    x = (x_scale * torch.randn(m, d_model, device=device)).to(dtype)
    # Fan-in scaling keeps z and y around unit size, as in trained layers.
    w1 = (torch.randn(d_hidden, d_model, device=device) / d_model**0.5).to(dtype)
    w2 = (torch.randn(d_out, d_ff, device=device) / d_ff**0.5).to(dtype)
    b1 = (0.5 * torch.randn(d_hidden, device=device)).to(dtype) if bias else None
    b2 = (0.5 * torch.randn(d_out, device=device)).to(dtype) if bias else None
    return FeedForwardInputs(x=x, w1=w1, b1=b1, w2=w2, b2=b2)


def inputs64(inputs: FeedForwardInputs) -> FeedForwardInputs:
    """The same inputs in float64, for the reference."""
    return FeedForwardInputs(*(None if t is None else t.double() for t in (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)))


def baseline(inputs: FeedForwardInputs, activation: str, dropout_p: float, keep: Optional[torch.Tensor], dy: torch.Tensor):
    """Plain PyTorch Linear -> act -> dropout(keep) -> Linear in the inputs' dtype, with
    autograd: (y, z, {grad name: gradient or None})."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in
              (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)]
    x, w1, b1, w2, b2 = leaves
    z = F.linear(x, w1, b1)
    a = torch_activation(z, activation)
    if keep is not None:
        a = a * keep.to(a.dtype) / (1.0 - dropout_p)
    y = F.linear(a, w2, b2)
    y.backward(dy)
    grads = {name: None if leaf is None else leaf.grad for name, leaf in zip(GRAD_NAMES, leaves)}
    return y.detach(), z.detach(), grads


def run_and_check(backend, inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]):
    """``backend``'s forward + backward (an op module with forward, backward and dropout_mask)
    against the float64 reference with the baseline's tolerance; returns its y, z, grads."""
    y, z = backend.forward(inputs, options, rng)
    assert y.dtype == inputs.dtype and y.shape == (inputs.rows, inputs.w2.shape[0])
    if options.recompute:
        assert z is None
    else:
        assert z is not None and z.dtype == inputs.dtype and z.shape == (inputs.rows, inputs.w1.shape[0])
    keep = backend.dropout_mask(inputs, options, rng)
    assert (keep is None) == (options.dropout_p == 0.0)
    dy = torch.randn_like(y)
    grads = backend.backward(dy, z, inputs, options, rng)

    in64 = inputs64(inputs)
    y_ref, z_ref = reference.forward(in64, options, rng, dropout_mask=keep)
    g_ref = reference.backward(dy.double(), None, in64, options, rng, dropout_mask=keep)
    y_base, z_base, g_base = baseline(inputs, options.activation, options.dropout_p, keep, dy)

    assert_close_to_reference(y, y_ref, y_base, "y")
    if z is not None:
        assert_close_to_reference(z, z_ref, z_base, "z")
    for name in GRAD_NAMES:
        actual, expected = getattr(grads, name), getattr(g_ref, name)
        if g_base[name] is None:
            assert actual is None, f"{name} should be None without a bias"
            continue
        assert actual.dtype == g_base[name].dtype, f"{name}: dtype {actual.dtype}"
        assert_close_to_reference(actual, expected, g_base[name], name)
    return y, z, grads
