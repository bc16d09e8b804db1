"""The ``cuda`` backend: hand-written CUDA C++ kernels bound as ``torch.ops.fastattn.*``.

The extension (csrc/ + kernels/) is built just-in-time by :mod:`fastattn._build` on first use.
"""

from __future__ import annotations

import shutil

import torch

#: Flipped to True once the GPU test suite has passed on hardware (benchmarks/results/).
#: Until then the backend is only used when asked for (backend="cuda").
VERIFIED_ON_HARDWARE = False


def availability_reasons() -> list[str]:
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA device")
    if shutil.which("nvcc") is None:
        reasons.append("nvcc is not on PATH (needed for the just-in-time build)")
    return reasons
