"""Shared tolerance rule: a kernel's error against the float64 reference may be at most
``ERROR_RATIO`` times the error of plain PyTorch in the same dtype, plus a per-dtype atol
(flash-attn's rule)."""

from __future__ import annotations

import torch

ERROR_RATIO = 2.0
ATOL = {
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
    torch.float32: 2e-5,
    torch.float64: 1e-10,
}


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    baseline: torch.Tensor,
    name: str = "output",
    atol_scale: float = 1.0,
) -> None:
    """actual: the kernel's result; reference64: float64 oracle; baseline: plain PyTorch in
    actual's dtype. Asserts err(actual) <= 2 * err(baseline) + atol[dtype] * atol_scale."""
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_error(actual, reference64)
    base = max_error(baseline, reference64)
    bound = ERROR_RATIO * base + ATOL[actual.dtype] * atol_scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (plain PyTorch error {base:.3e})"
