"""Small argument checks shared by the ops' ``validate`` functions.

Each raises TypeError (wrong type or dtype) or ValueError (wrong value, shape or device) with
a message that names the argument and what was expected.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch

from fastattn.backends.capabilities import FLOAT_DTYPES

_FLOAT_NAMES = "float16, bfloat16, float32 or float64"


def check_tensor(name: str, value, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else str(value.layout).replace("torch.", "")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {layout} tensor")


def dense_float_tensors(*tensors) -> bool:
    """True when every argument that is not None is a dense (strided) float tensor of
    FLOAT_DTYPES on the first one's device. Validation tests the common case in one pass like
    this and runs its named checks (which raise with the argument's name) only when it fails:
    a call's checks cost as much as a small kernel."""
    device = None
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_nested or t.dtype not in FLOAT_DTYPES:
            return False
        if device is None:
            device = t.device
        elif t.device != device:
            return False
    return True


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype {_FLOAT_NAMES}, got {tensor.dtype}")


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, layout: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(tensor.shape)}")


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(tensor.shape)}")


def check_same_dtype(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {tensor.dtype}")


def check_same_device(name: str, tensor: Optional[torch.Tensor], ref_name: str, ref: torch.Tensor) -> None:
    if tensor is not None and tensor.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}")


def check_nonempty(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not (math.isfinite(float(value)) and float(value) > 0.0):
        raise ValueError(f"{name} must be a positive finite float, got {value}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def last_dim_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """Kernels need unit stride on the last dim; other strides are kept (no copy for views)."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] == 1 else tensor.contiguous()
