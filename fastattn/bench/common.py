"""Helpers shared by the per-op suites: fastattn and torch.compile providers, presets, inputs."""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch

from fastattn.bench.harness import COMPILE, FASTATTN, Provider, Workload

PRESETS = ("smoke", "quick", "full")

INTERPRETER_REASON = (
    "on CPU the triton backend runs only in the Triton interpreter (TRITON_INTERPRET=1), "
    "a correctness tool far slower than real kernels: not timed"
)


def default_dtype(device: torch.device, dtype: Optional[torch.dtype]) -> torch.dtype:
    """bf16 on a GPU (what training runs use), fp32 on CPU (where half GEMMs are emulated)."""
    if dtype is not None:
        return dtype
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    return preset


def randn(*shape: int, device: torch.device, dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0, grad: bool = True):
    """Fresh normal values (never zeros, which hide unwritten outputs), as a leaf tensor."""
    t = torch.randn(*shape, device=device, dtype=torch.float32) * scale + shift
    return t.to(dtype).requires_grad_(grad)


def to_reference(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A float64 leaf copy for the reference computation."""
    if t is None:
        return None
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def reference_grads(outs: tuple, wrt: list, grad_out: tuple) -> tuple:
    grads = torch.autograd.grad(outs, wrt, [g.to(torch.float64) for g in grad_out], allow_unused=True)
    return tuple(None if g is None else g.detach() for g in grads)


# --------------------------------------------------------------------------------------------
# fastattn backends as providers
# --------------------------------------------------------------------------------------------
def _backend_availability(name: str, ops: tuple[str, ...], device: torch.device) -> Optional[str]:
    import fastattn
    from fastattn.backends import get_backend

    if name == "triton" and device.type == "cpu":
        return INTERPRETER_REASON
    status = next(s for s in fastattn.backends() if s.name == name)
    if not status.available:
        return "; ".join(status.reasons) or "unavailable"
    device_reasons = get_backend(name).device_reasons(device, explicit=True)
    if device_reasons:
        return "; ".join(device_reasons)
    missing = [op for op in ops if op not in status.ops]
    if missing:
        return f"{', '.join(missing)} not implemented by this backend"
    return None


def fastattn_providers(ops: Union[str, tuple[str, ...]], build: Callable[..., Workload]) -> list[Provider]:
    """One provider per fastattn backend, forced with ``backend=name``; available where the
    backend implements every op in ``ops``."""
    import fastattn

    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    return [
        Provider(
            name=f"fastattn-{status.name}",
            family=FASTATTN,
            build=functools.partial(build, backend=status.name),
            availability=functools.partial(_backend_availability, status.name, ops),
        )
        for status in fastattn.backends()
    ]


# --------------------------------------------------------------------------------------------
# torch.compile of the naive code
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """One torch.compile object per naive function for the whole run, so later sizes reuse its
    graphs (torch marks the changing sizes dynamic after the first recompile)."""
    return torch.compile(fn)


#: Why torch.compile providers have no backward-only timing.
COMPILED_BACKWARD_REASON = (
    "a compiled backward frees its saved tensors (AOTAutograd donated buffers), so it cannot be "
    "replayed alone with retain_graph; see forward+backward"
)


def compile_provider(name: str, build: Callable[..., Workload]) -> Provider:
    return Provider(name=name, family=COMPILE, build=build, skip_modes={"backward": COMPILED_BACKWARD_REASON})
