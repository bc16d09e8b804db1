"""Activation functions and their derivatives in plain PyTorch.

Shared by the reference backend, the naive model and the tests, so every place computes
``act(z)`` and ``act'(z)`` with the same formulas. For ``swiglu`` the pre-activation z holds
``[gate, up]`` on its last dimension and the derivative is returned for both halves.
"""

from __future__ import annotations

import math

import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_forward(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(z); for swiglu z is (..., 2F) and the result (..., F)."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z * _INV_SQRT_2))
    if activation == "gelu_tanh":
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))
    if activation == "silu":
        return z * torch.sigmoid(z)
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return gate * torch.sigmoid(gate) * up
    raise ValueError(f"activation must be one of relu, gelu, gelu_tanh, silu, swiglu; got {activation!r}")


def activation_backward(da: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """dz given da = dL/d act(z); same shape as z."""
    if activation == "relu":
        return da * (z > 0).to(da.dtype)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return da * (cdf + z * pdf)
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
        return da * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dinner)
    if activation == "silu":
        s = torch.sigmoid(z)
        return da * (s * (1.0 + z * (1.0 - s)))
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        s = torch.sigmoid(gate)
        silu = gate * s
        dgate = da * up * (s * (1.0 + gate * (1.0 - s)))
        return torch.cat([dgate, da * silu], dim=-1)
    raise ValueError(f"activation must be one of relu, gelu, gelu_tanh, silu, swiglu; got {activation!r}")
