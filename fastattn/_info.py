"""``fastattn info``: versions, devices, and why each backend is or is not available."""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
from typing import Sequence

import torch


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not found"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    release = [line for line in out.splitlines() if "release" in line]
    return release[-1].strip() if release else nvcc


def _cpu_isa() -> str:
    """The vector ISA the cpu backend's extension is (or would be) compiled for."""
    from fastattn import _build

    return _build.cpu_isa()


def environment() -> dict[str, str]:
    """Versions and devices, as recorded next to every benchmark result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError as err:
        triton_version = f"not importable ({err})"
    from fastattn import __version__

    env = {
        "fastattn": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": str(torch.version.cuda),
        "triton": triton_version,
        "nvcc": _nvcc_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu ISA": _cpu_isa(),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            env[f"cuda:{i}"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        env["cuda devices"] = "none"
    return env


def main(argv: Sequence[str] = ()) -> int:
    argparse.ArgumentParser(prog="fastattn info", description=__doc__).parse_args(argv)
    from fastattn import backends

    for key, value in environment().items():
        print(f"{key:<14}{value}")
    print("\nbackends (priority order for backend=None):")
    for status in backends():
        state = "available" if status.available else "unavailable"
        auto = "" if status.auto else ", only when asked for"
        print(f"  {status.name:<10}{state}{auto}: {status.description}")
        for reason in status.reasons:
            print(f"  {'':<10}- {reason}")
        if status.ops:
            print(f"  {'':<10}ops: {', '.join(status.ops)}")
    return 0
