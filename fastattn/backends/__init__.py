"""Backend registry and selection.

A backend is a package ``fastattn.<name>`` holding one module per op (``attention``, ``norm``,
``ffn``). Each op module declares ``CAPABILITIES`` and implements ``forward``/``backward``
with the signatures documented in ``fastattn/ops/<op>.py`` (attention modules declaring
``kvcache`` also implement ``kvcache_forward``, see ``fastattn/ops/kvcache.py``); it may add per-call reasons with a
``not_supported_reasons(inputs, options)`` function. The machine-level checks (is triton
importable, is there a GPU, did the CUDA extension build) live in the :class:`Backend` objects
below. Selection order for ``backend=None``: cuda (once verified on hardware), triton,
cpu (CPU tensors), reference; an explicit choice (argument, :func:`use_backend`,
``FASTATTN_BACKEND``) that cannot serve raises :class:`BackendNotSupportedError` listing why.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import operator
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

OPS = ("attention", "norm", "ffn")
ENV_VAR = "FASTATTN_BACKEND"

_context_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fastattn_backend", default=None
)


class BackendNotSupportedError(ValueError):
    """No backend (or not the requested one) can serve this call; the message says why."""


def triton_interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _signature(inputs) -> tuple:
    """What the checks of a call may read of its inputs dataclass: each field's dtype, device
    and shape for a tensor, else its value (the type included: KV-cache inputs differ)."""
    cls = type(inputs)
    return (cls, *[
        (value.dtype, value.device, value.shape) if isinstance(value, torch.Tensor) else value
        for value in _fields_of(cls)(inputs)
    ])


@functools.lru_cache(maxsize=None)
def _fields_of(cls: type) -> operator.attrgetter:
    """A getter of all of ``cls``'s dataclass fields, as a tuple, in declaration order."""
    return operator.attrgetter(*(field.name for field in dataclasses.fields(cls)))


class Backend:
    """One implementation family. Subclasses override the machine-level checks."""

    name: str = ""
    package: str = ""
    description: str = ""
    #: considered by ``backend=None``; an unverified backend is only used when asked for.
    auto: bool = True

    def availability_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (empty: it can)."""
        return []

    def device_reasons(self, device: torch.device, explicit: bool) -> list[str]:
        return []

    def op_module(self, op: str) -> Optional[ModuleType]:
        return _import_op_module(self.package, op)

    def not_supported_reasons(self, op: str, inputs, options, *, explicit: bool = False) -> list[str]:
        reasons = self.availability_reasons()
        if reasons:
            return reasons
        reasons = self.device_reasons(inputs.device, explicit)
        module = self.op_module(op)
        if module is None:
            return reasons + [f"{op} is not implemented by this backend"]
        reasons = reasons + module.CAPABILITIES.not_supported_reasons(inputs, options)
        extra = getattr(module, "not_supported_reasons", None)
        if extra is not None:
            reasons += extra(inputs, options)
        return reasons

    def forward(self, op: str, *args):
        return self.op_module(op).forward(*args)

    def backward(self, op: str, *args):
        return self.op_module(op).backward(*args)

    def eager_plan(self, op: str, inputs, options):
        """The plain eager call prepared for inputs like these by the op module's optional
        ``eager_plan(inputs, options)``: a callable that records its own backward when autograd
        needs one (the cpu backend's C++ autograd nodes), used instead of the op's Python
        ``autograd.Function``; None when the module has none or does not take such calls."""
        make = getattr(self.op_module(op), "eager_plan", None)
        return None if make is None else make(inputs, options)

    def kvcache_append(self):
        """The attention module's optional ``kvcache_append(inputs: KVCacheInputs, k, v)``,
        which writes a decoding step's keys / values into the caches in place, or None (then
        fastattn/ops/kvcache.py appends with two ``index_put_``)."""
        return getattr(self.op_module("attention"), "kvcache_append", None)

    def kvcache_forward(self, inputs, options):
        """One decoding step over a KV cache: the attention module's ``kvcache_forward(inputs:
        KVCacheInputs, options) -> (out (B, Lq, H, D), lse (B, H, Lq) fp32)``; served only by
        backends whose capabilities declare ``kvcache``."""
        return self.op_module("attention").kvcache_forward(inputs, options)

    def __repr__(self) -> str:
        return f"<fastattn backend {self.name!r}>"


@functools.lru_cache(maxsize=None)
def _import_op_module(package: str, op: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(f"{package}.{op}")
    except ModuleNotFoundError as err:
        if err.name == f"{package}.{op}":
            return None
        raise


class CpuBackend(Backend):
    name = "cpu"
    package = "fastattn.cpu"
    description = "C++ kernels for CPU tensors (OpenMP, AVX-512/AVX2), JIT-built with g++ and ninja"

    def availability_reasons(self) -> list[str]:
        from fastattn import cpu

        return cpu.availability_reasons()

    def device_reasons(self, device: torch.device, explicit: bool) -> list[str]:
        return [] if device.type == "cpu" else [f"tensors on {device.type} (needs cpu)"]


class ReferenceBackend(Backend):
    name = "reference"
    package = "fastattn.reference"
    description = "plain PyTorch, explicit formulas; the correctness oracle, any device"


class TritonBackend(Backend):
    name = "triton"
    package = "fastattn.triton"
    description = "fused Triton kernels (CUDA GPUs; CPU tensors under TRITON_INTERPRET=1)"

    @functools.lru_cache(maxsize=None)
    def _import_reasons(self) -> tuple[str, ...]:
        try:
            import triton  # noqa: F401
        except ImportError as err:
            return (f"triton is not importable: {err}",)
        return ()

    def availability_reasons(self) -> list[str]:
        reasons = list(self._import_reasons())
        if not reasons and not (torch.cuda.is_available() or triton_interpret_enabled()):
            reasons.append("no CUDA device and TRITON_INTERPRET is not set")
        return reasons

    def device_reasons(self, device: torch.device, explicit: bool) -> list[str]:
        if device.type == "cuda":
            return []
        if device.type == "cpu" and triton_interpret_enabled():
            # The interpreter is a verification tool, far slower than the reference backend.
            return [] if explicit else ["CPU tensors run through the Triton interpreter only when asked for"]
        return [f"tensors on {device.type} (needs cuda, or cpu with TRITON_INTERPRET=1)"]


class CudaBackend(Backend):
    name = "cuda"
    package = "fastattn.cuda"
    description = "hand-written CUDA C++ kernels, JIT-built with ninja (torch.ops.fastattn)"

    @property
    def auto(self) -> bool:  # type: ignore[override]
        from fastattn import cuda

        return cuda.VERIFIED_ON_HARDWARE

    def availability_reasons(self) -> list[str]:
        from fastattn import cuda

        return cuda.availability_reasons()

    def device_reasons(self, device: torch.device, explicit: bool) -> list[str]:
        return [] if device.type == "cuda" else [f"tensors on {device.type} (needs cuda)"]


#: Priority order for ``backend=None``.
_BACKENDS: dict[str, Backend] = {b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend(), ReferenceBackend())}


def get_backend(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type(name).__name__}")
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)} or None, got {name!r}") from None


def registered_names() -> tuple[str, ...]:
    """Every backend's name in priority order (fixed for the process: the custom ops store a
    backend as its index here, fastattn/ops/_custom_op.py)."""
    return tuple(_BACKENDS)


def requested_backend(backend: Optional[str] = None) -> Optional[str]:
    """The explicit choice in force: argument, then use_backend(), then FASTATTN_BACKEND (an
    empty variable counts as unset; an empty argument is a bad name, not automatic choice)."""
    if backend is not None:
        return backend
    return _context_backend.get() or os.environ.get(ENV_VAR) or None


def select(op: str, inputs, options, backend: Optional[str] = None) -> Backend:
    """The backend that serves this call, or BackendNotSupportedError saying why none can.

    Choices are memoized on what the checks read (the op, the requested name, the inputs'
    dtypes, devices and shapes, the options, TRITON_INTERPRET): a training loop repeats a few
    signatures, and checking every backend costs as much as a small kernel. Failures are not
    memoized. :func:`forget_selections` clears the memo (for code that changes a backend's
    capabilities at run time, as tests do)."""
    name = requested_backend(backend)
    key = (op, name, triton_interpret_enabled(), _signature(inputs), options)
    chosen = _SELECTIONS.get(key)
    if chosen is None:
        chosen = _select(op, inputs, options, name)
        if len(_SELECTIONS) >= _MEMO_SIZE:
            _SELECTIONS.clear()
        _SELECTIONS[key] = chosen
    return chosen


#: select's memo: key -> Backend; cleared when full.
_SELECTIONS: dict = {}
_MEMO_SIZE = 1024


def find_plan(key: Optional[tuple]):
    """The eager plan remembered under ``key`` (fastattn/ops/_custom_op.py plan_key: a public
    call's arguments, validated and served before; hashable), or None."""
    return None if key is None else _PLANS.get(key)


def remember_plan(key: Optional[tuple], plan) -> None:
    if key is None:
        return
    if len(_PLANS) >= _MEMO_SIZE:
        _PLANS.clear()
    _PLANS[key] = plan


#: Eager plans: a public call's key -> the chosen backend's prepared call; cleared when full.
_PLANS: dict = {}


def forget_selections() -> None:
    """Clears :func:`select`'s memo and the eager plans made from its choices."""
    _SELECTIONS.clear()
    _PLANS.clear()


def _select(op: str, inputs, options, name: Optional[str]) -> Backend:
    if name is not None:
        chosen = get_backend(name)
        reasons = chosen.not_supported_reasons(op, inputs, options, explicit=True)
        if reasons:
            raise BackendNotSupportedError(
                f"backend {name!r} cannot run {op} for these inputs: " + "; ".join(reasons)
            )
        return chosen
    rejected = []  # (name, reasons), worded only when no backend serves
    for candidate in _BACKENDS.values():
        if not candidate.auto:
            rejected.append((candidate.name, ["only used when asked for (not verified on hardware)"]))
            continue
        reasons = candidate.not_supported_reasons(op, inputs, options)
        if not reasons:
            return candidate
        rejected.append((candidate.name, reasons))
    lines = [f"{name}: " + "; ".join(reasons) for name, reasons in rejected]
    raise BackendNotSupportedError(f"no backend can run {op} for these inputs:\n  " + "\n  ".join(lines))


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for the calls inside the block.

    Arguments:
        name: "triton", "cuda", "cpu", "reference", or None (automatic choice inside the block). An
            unknown name raises ValueError at once; a backend that cannot serve a call inside
            the block raises BackendNotSupportedError at that call, with the reasons.
    """
    if name is not None:
        get_backend(name)
    token = _context_backend.set(name)
    try:
        yield
    finally:
        _context_backend.reset(token)


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    auto: bool
    description: str
    reasons: tuple[str, ...]
    ops: tuple[str, ...]


def backends() -> list[BackendStatus]:
    """Each backend's availability on this machine, with the reasons when it is not."""
    statuses = []
    for b in _BACKENDS.values():
        reasons = tuple(b.availability_reasons())
        ops = tuple(op for op in OPS if not reasons and b.op_module(op) is not None)
        statuses.append(BackendStatus(b.name, not reasons, b.auto, b.description, reasons, ops))
    return statuses
