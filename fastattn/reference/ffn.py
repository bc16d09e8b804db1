"""Reference feed-forward: explicit formulas, any device.

forward:  z = x W1^T + b1; a = act(z); y = (a * Z) W2^T + b2 (Z = keep / (1 - p)).
backward: dW2 = dy^T (a * Z); db2 = sum(dy); dz = act'(z) * ((dy W2) * Z);
          dW1 = dz^T x; db1 = sum(dz); dx = dz W1.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastattn.activations import activation_backward, activation_forward
from fastattn.backends.capabilities import FLOAT_DTYPES, FeedForwardCapabilities
from fastattn.options import FeedForwardGrads, FeedForwardInputs, FeedForwardOptions, RngState

CAPABILITIES = FeedForwardCapabilities(dtypes=FLOAT_DTYPES)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def hidden_size(inputs: FeedForwardInputs) -> int:
    """F: the width of act(z) and of w2's input."""
    return inputs.w2.shape[1]


def dropout_keep(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]):
    """bool (M, F) keep mask drawn from rng (reference's own stream), or None."""
    if options.dropout_p == 0.0 or rng is None:
        return None
    gen = torch.Generator(device=inputs.device)
    gen.manual_seed(rng.seed * 1_000_003 + rng.offset)
    shape = (inputs.rows, hidden_size(inputs))
    return torch.rand(shape, generator=gen, device=inputs.device) >= options.dropout_p


def _pre_activation(inputs: FeedForwardInputs, cdt: torch.dtype) -> torch.Tensor:
    z = inputs.x.to(cdt) @ inputs.w1.to(cdt).T  # (M, d_hidden)
    return z if inputs.b1 is None else z + inputs.b1.to(cdt)


def forward(
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
    *,
    dropout_mask: Optional[torch.Tensor] = None,
):
    """Returns y (M, d_out) in x's dtype and z (M, d_hidden) in x's dtype (None if recompute).
    dropout_mask: optional bool (M, F) keep mask overriding the reference's own."""
    cdt = _compute_dtype(inputs.dtype)
    z = _pre_activation(inputs, cdt)
    a = activation_forward(z, options.activation)  # (M, F)
    keep = dropout_mask if dropout_mask is not None else dropout_keep(inputs, options, rng)
    if keep is not None:
        a = a * keep.to(cdt) / (1.0 - options.dropout_p)
    y = a @ inputs.w2.to(cdt).T  # (M, d_out)
    if inputs.b2 is not None:
        y = y + inputs.b2.to(cdt)
    saved = None if options.recompute else z.to(inputs.dtype)
    return y.to(inputs.dtype), saved


def backward(
    dy: torch.Tensor,
    z: Optional[torch.Tensor],
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
    *,
    dropout_mask: Optional[torch.Tensor] = None,
) -> FeedForwardGrads:
    cdt = _compute_dtype(inputs.dtype)
    z = _pre_activation(inputs, cdt) if z is None else z.to(cdt)
    a = activation_forward(z, options.activation)  # (M, F)
    keep = dropout_mask if dropout_mask is not None else dropout_keep(inputs, options, rng)
    scale = None if keep is None else keep.to(cdt) / (1.0 - options.dropout_p)
    a_dropped = a if scale is None else a * scale
    dyc = dy.to(cdt)
    dw2 = dyc.T @ a_dropped  # (d_out, F)
    da = dyc @ inputs.w2.to(cdt)  # (M, F)
    if scale is not None:
        da = da * scale
    dz = activation_backward(da, z, options.activation)  # (M, d_hidden)
    dw1 = dz.T @ inputs.x.to(cdt)  # (d_hidden, d_model)
    dx = dz @ inputs.w1.to(cdt)  # (M, d_model)
    return FeedForwardGrads(
        dx=dx.to(inputs.dtype),
        dw1=dw1.to(inputs.w1.dtype),
        db1=None if inputs.b1 is None else dz.sum(0).to(inputs.b1.dtype),
        dw2=dw2.to(inputs.w2.dtype),
        db2=None if inputs.b2 is None else dyc.sum(0).to(inputs.b2.dtype),
    )
