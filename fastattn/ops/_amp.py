"""Autocast: fused ops behave like the torch ops they replace under ``torch.autocast``.

Attention and the FFN GEMMs run in the autocast dtype (as torch's SDPA and Linear do); norms
keep their input dtype (their statistics are fp32 anyway). Inside the autograd layer autocast
is switched off, so backends see exactly the dtypes they were validated for.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def cast_for_autocast(tensor: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """Casting point: fp32/fp16/bf16 tensors go to the autocast dtype; fp64 and non-float
    tensors pass unchanged, as torch's autocast does; so does anything that is not a tensor
    (validation, which runs after the cast, names it)."""
    if not isinstance(tensor, torch.Tensor) or dtype is None or tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return tensor
    return tensor.to(dtype)


def _autocast_device_type(device: torch.device) -> str:
    return device.type if device.type in ("cpu", "cuda") else "cpu"


def call_without_autocast(device: torch.device, fn, *args):
    """``fn(*args)`` with autocast off for ``device``; when autocast is off already (the common
    case) a direct call, without entering a context (a few microseconds per op call)."""
    device_type = _autocast_device_type(device)
    if not torch.is_autocast_enabled(device_type):
        return fn(*args)
    with torch.autocast(device_type=device_type, enabled=False):
        return fn(*args)


def autocast_off(device: torch.device) -> Union[torch.autocast, contextlib.nullcontext]:
    """A context that switches autocast off for ``device`` (a no-op context when it is off:
    entering ``torch.autocast`` costs a few microseconds per call)."""
    device_type = _autocast_device_type(device)
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
