"""The ``cpu`` backend: C++ kernels for CPU tensors (csrc/cpu/), bound as ``torch.ops.fastattn.cpu_*``.

Built just-in-time by :func:`fastattn._build.load_cpu_extension` with g++ and OpenMP for the
host's vector ISA (no nvcc, no CUDA torch needed), cached; importing this package builds
nothing. Threads follow ``torch.get_num_threads()`` (ATen's ``at::parallel_for``).
"""

from __future__ import annotations

#: Set once the extension is loaded: ensure_loaded runs on every kernel call.
_loaded = False


def availability_reasons() -> list[str]:
    """Why the cpu backend cannot run here (empty: it can). The extension is built/loaded once
    per process on the first check that finds a toolchain; a build failure is the reason."""
    if _loaded:
        return []
    from fastattn import _build

    if _build.cpu_extension_path() is not None:
        return []
    reasons = _build.cpu_toolchain_reasons()
    if reasons:
        return reasons
    failure = _build.load_cpu_extension()
    return [failure] if failure is not None else []


def ensure_loaded() -> None:
    """Loads the CPU extension (building it if needed) or raises RuntimeError with the reason."""
    global _loaded
    if _loaded:
        return
    from fastattn import _build

    failure = _build.load_cpu_extension()
    if failure is not None:
        raise RuntimeError(f"the fastattn CPU extension is unavailable: {failure}")
    _loaded = True


def release_memory() -> None:
    """Returns the memory the cpu backend keeps between calls to the system: the FFN's
    workspaces and the idle blocks of the norms' output pool (like ``torch.cuda.empty_cache``;
    memory of live tensors is kept). Nothing to do when the extension was never loaded."""
    if not _loaded:
        return
    import torch

    torch.ops.fastattn.cpu_ffn_release_workspace()
    torch.ops.fastattn.cpu_release_buffers()
