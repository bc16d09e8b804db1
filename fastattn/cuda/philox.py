"""PyTorch mirror of kernels/common/philox.cuh: the dropout keep mask the CUDA kernels draw.

Element ``e`` (linear index into the logical tensor) under ``RngState(seed, offset)``:
``bits = Philox4x32-10(key=(seed lo, seed hi), counter=(lo32(e // 4), hi32(e // 4), lo32(offset),
hi32(offset)))[e % 4]`` and ``keep = bits >= dropout_threshold(p)``. Used by the tests (and any
backend wanting the CUDA backend's exact mask); uint32 arithmetic is done in int64 tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def dropout_threshold(p: float) -> int:
    """round(p * 2^32), saturated to the uint32 range (philox.cuh: dropout_threshold)."""
    scaled = float(p) * 4294967296.0
    if scaled <= 0.0:
        return 0
    if scaled >= 4294967295.0:
        return _MASK32
    return int(scaled + 0.5)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product of constant a and uint32 tensor b,
    without overflowing int64: a is split into 16-bit halves."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo  # < 2^48
    p_hi = b * a_hi  # < 2^48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def philox4x32_10(counter: Sequence[torch.Tensor], key: tuple[int, int]) -> list[torch.Tensor]:
    """The four uint32 outputs (as int64 tensors) of Philox4x32-10 for int64 counter words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi_a, lo_a = _mulhilo(_MUL_A, c0)
        hi_b, lo_b = _mulhilo(_MUL_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return [c0, c1, c2, c3]


def dropout_bits(seed: int, offset: int, index: torch.Tensor) -> torch.Tensor:
    """uint32 random bits (int64 tensor) of the elements with linear indices ``index``."""
    index = index.to(torch.int64)
    group = index >> 2
    zeros = torch.zeros_like(group)
    counter = (group & _MASK32, group >> 32, zeros + (offset & _MASK32), zeros + (offset >> 32))
    lanes = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32))
    lane = index & 3
    return torch.where(lane == 0, lanes[0], torch.where(lane == 1, lanes[1], torch.where(lane == 2, lanes[2], lanes[3])))


def dropout_keep_mask(seed: int, offset: int, shape: Sequence[int], p: float, device=None) -> torch.Tensor:
    """bool keep mask of a contiguous tensor of ``shape`` (True = kept)."""
    numel = 1
    for size in shape:
        numel *= int(size)
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return (dropout_bits(seed, offset, index) >= dropout_threshold(p)).reshape(tuple(shape))
