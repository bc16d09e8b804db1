"""Norm modules: drop-ins for ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` and the fused
residual-add variants (``AddLayerNorm``; ``RMSNorm`` takes the same optional residual).

The residual variants follow flash-attn's ``DropoutAddLayerNorm``: ``h = dropout(x) +
residual``, ``y = norm(h)``; with ``prenorm=True`` the forward returns ``(y, h)`` so a pre-norm
block carries h as its residual stream without a separate add.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

import fastattn
from fastattn.ops import _checks as checks

Tensors = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def _flatten_normalized(x: torch.Tensor, normalized_shape: tuple[int, ...], name: str) -> torch.Tensor:
    """(..., *normalized_shape) -> (..., prod(normalized_shape)): a norm over several trailing
    dims is the same norm over their flattening."""
    n = len(normalized_shape)
    if tuple(x.shape[x.dim() - n:]) != tuple(normalized_shape) or x.dim() < n:
        raise ValueError(
            f"{name} expects input of shape (*, {', '.join(map(str, normalized_shape))}), got {tuple(x.shape)}"
        )
    return x if n == 1 else x.flatten(-n)


def _set_residual_options(module: nn.Module, dropout_p, prenorm, residual_in_fp32) -> None:
    """The fused residual-add options, checked when the module is built (as nn.Dropout's p)."""
    module.dropout_p = checks.check_probability("dropout_p", dropout_p)
    checks.check_bool("prenorm", prenorm)
    checks.check_bool("residual_in_fp32", residual_in_fp32)
    module.prenorm, module.residual_in_fp32 = prenorm, residual_in_fp32


def _flat(param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if param is None else param.reshape(-1)


class LayerNorm(nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` (same constructor plus ``backend``, same
    parameters and state_dict) running ``fastattn.add_layer_norm``.

    Arguments:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as in torch.
        backend: "triton", "cuda", "reference" or None (automatic).

    forward(input): (*, *normalized_shape), float16 / bfloat16 / float32 / float64 -> same
    shape, input's dtype (statistics in float32).
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.LayerNorm, backend: Optional[str] = None) -> "LayerNorm":
        """Turn ``module`` into this class in place (same object, same Parameters)."""
        module.__class__ = cls
        module.backend = backend
        return module

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.numel() == 0:  # an empty batch: nothing to fuse, torch's own result
            return super().forward(input)
        x = _flatten_normalized(input, self.normalized_shape, type(self).__name__)
        y = fastattn.add_layer_norm(x, None, _flat(self.weight), _flat(self.bias), eps=self.eps, backend=self.backend)
        return y.reshape(input.shape)


class AddLayerNorm(LayerNorm):
    """``y = LayerNorm(dropout(x) + residual)`` in one fused op; ``(y, h)`` with ``prenorm``.

    Parameters ``weight``/``bias`` as in :class:`torch.nn.LayerNorm` (so its state_dict loads).

    Arguments:
        hidden_size, eps, elementwise_affine, bias, device, dtype: as in torch.nn.LayerNorm.
        dropout_p: on x, in training only.
        prenorm: forward also returns h, the new residual stream.
        residual_in_fp32: keep h in float32.
        backend: "triton", "cuda", "reference" or None (automatic).

    forward(x, residual=None): x (..., hidden_size) float16 / bfloat16 / float32 / float64;
    residual like x (any float dtype) or None (then ``h = dropout(x)``). Returns y in x's
    dtype, or (y, h) with ``prenorm`` (h in residual's dtype, or float32).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(hidden_size, eps, elementwise_affine, bias, device, dtype, backend=backend)
        _set_residual_options(self, dropout_p, prenorm, residual_in_fp32)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Tensors:
        return fastattn.add_layer_norm(
            x, residual, _flat(self.weight), _flat(self.bias), eps=self.eps,
            dropout_p=self.dropout_p if self.training else 0.0, prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}, prenorm={self.prenorm}"


class RMSNorm(nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` running ``fastattn.rms_norm``, with the fused
    residual add as an option: forward(x, residual=None) computes ``h = dropout(x) +
    residual``, ``y = RMSNorm(h)`` and returns y, or ``(y, h)`` with ``prenorm``.

    Arguments:
        normalized_shape, elementwise_affine, device, dtype: as in torch.
        eps: None means ``torch.finfo(x.dtype).eps``, as in torch.
        dropout_p, prenorm, residual_in_fp32, backend: as in :class:`AddLayerNorm`.

    forward(x, residual=None): x (*, *normalized_shape) float16 / bfloat16 / float32 /
    float64, residual like x or None; returns y (x's shape and dtype), or (y, h) with prenorm.
    """

    def __init__(
        self,
        normalized_shape,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        dropout_p: float = 0.0,
        prenorm: bool = False,
        residual_in_fp32: bool = False,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        _set_residual_options(self, dropout_p, prenorm, residual_in_fp32)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.RMSNorm, backend: Optional[str] = None) -> "RMSNorm":
        """Turn ``module`` into this class in place (same object, same Parameters)."""
        module.__class__ = cls
        _set_residual_options(module, 0.0, False, False)
        module.backend = backend
        return module

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> Tensors:
        if x.numel() == 0 and residual is None and not self.prenorm:  # as torch.nn.RMSNorm
            return super().forward(x)
        name = type(self).__name__
        flat = _flatten_normalized(x, self.normalized_shape, name)
        if residual is not None:
            residual = _flatten_normalized(residual, self.normalized_shape, name)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = fastattn.rms_norm(
            flat, residual, _flat(self.weight), eps=eps,
            dropout_p=self.dropout_p if self.training else 0.0, prenorm=self.prenorm,
            residual_in_fp32=self.residual_in_fp32, backend=self.backend,
        )
        if self.prenorm:
            return out[0].reshape(x.shape), out[1].reshape(x.shape)
        return out.reshape(x.shape)


__all__ = ["AddLayerNorm", "LayerNorm", "RMSNorm"]
