"""PyTorch mirror of the dropout bits of the cpu backend's norm and FFN kernels
(csrc/cpu/row_kernels.h), which are the Triton backend's: one RngState gives the same mask on
the triton and cpu backends. Used by the tests and by :func:`fastattn.cpu.norm.dropout_mask` /
:func:`fastattn.cpu.ffn.dropout_mask`; uint32 arithmetic in int64 tensors.

- norm (fastattn/triton/norm.py): element (row, col) of the (M, N) input is kept iff
  ``uniform(philox(key=seed, counter=(col, row, offset, 0))[0]) >= p``.
- FFN (fastattn/triton/ffn.py): unit (row, col) of the (M, F) activation is kept iff
  ``uniform(philox(key=seed, counter=(lo32(o), hi32(o), 0, 0))[col % 4]) >= p`` with
  ``o = offset + row * ceil(F / 4) + col // 4``.

``uniform`` is ``tl.uint_to_uniform_float``: the word as int32, negatives mirrored (``~x``),
times 2^-31 in fp32; p is compared in fp32.
"""

from __future__ import annotations

import torch

from fastattn.cuda.philox import philox4x32_10

_MASK32 = 0xFFFFFFFF
_UNIFORM_SCALE = 4.6566127342e-10


def _key(seed: int) -> tuple[int, int]:
    return seed & _MASK32, (seed >> 32) & _MASK32


def uniform(bits: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in [0, 1) of uint32 words held in an int64 tensor."""
    mirrored = torch.where(bits >= 2**31, _MASK32 - bits, bits)
    return mirrored.to(torch.float32) * _UNIFORM_SCALE


def norm_keep_mask(seed: int, offset: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """bool (rows, cols) keep mask of the norm kernels."""
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None].expand(rows, cols)
    col = torch.arange(cols, dtype=torch.int64, device=device)[None, :].expand(rows, cols)
    zeros = torch.zeros_like(row)
    words = philox4x32_10((col, row, zeros + (offset & _MASK32), zeros), _key(seed))
    return uniform(words[0]) >= p


def ffn_keep_mask(seed: int, offset: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """bool (rows, cols) keep mask of the FFN kernels' (M, F) activation."""
    groups = (cols + 3) // 4
    row = torch.arange(rows, dtype=torch.int64, device=device)[:, None]
    group = torch.arange(groups, dtype=torch.int64, device=device)[None, :]
    o = offset + row * groups + group  # (rows, groups)
    zeros = torch.zeros_like(o)
    words = philox4x32_10((o & _MASK32, o >> 32, zeros, zeros), _key(seed))
    keep = torch.stack([uniform(w) >= p for w in words], dim=-1)  # (rows, groups, 4): col 4g + lane
    return keep.reshape(rows, 4 * groups)[:, :cols]
