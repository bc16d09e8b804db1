"""The ``cuda`` backend: hand-written CUDA C++ kernels bound as ``torch.ops.fastattn.*``.

The extension (csrc/ + kernels/) is built just-in-time by :mod:`fastattn._build` on first use
(cached, so later processes only load it). Importing this package builds nothing.
"""

from __future__ import annotations

import torch

#: Flipped to True once the GPU test suite has passed on hardware (benchmarks/results/).
#: Until then the backend is only used when asked for (backend="cuda").
VERIFIED_ON_HARDWARE = False


def availability_reasons() -> list[str]:
    """Why the cuda backend cannot run here (empty: it can). Machine checks first; when they
    pass, the extension is built/loaded (once per process) and a build failure is the reason."""
    from fastattn import _build

    if _build.extension_path() is not None:
        return []
    reasons = _build.toolchain_reasons()
    if torch.version.cuda is not None and not torch.cuda.is_available():
        reasons.append("no CUDA device")
    if reasons:
        return reasons
    failure = _build.load_extension()
    return [failure] if failure is not None else []


def ensure_loaded() -> None:
    """Loads the extension (building it if needed) or raises RuntimeError with the reason.
    Op modules call it before using ``torch.ops.fastattn``."""
    from fastattn import _build

    failure = _build.load_extension()
    if failure is not None:
        raise RuntimeError(f"the fastattn CUDA extension is unavailable: {failure}")
