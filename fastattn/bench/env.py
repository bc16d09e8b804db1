"""The environment recorded with every benchmark result: device name, versions, git commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Optional

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports, with core count."""
    name = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name} ({os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


def _git(*args: str) -> tuple[Optional[str], str]:
    try:
        done = subprocess.run(["git", "-C", _REPO, *args], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"git not runnable: {err}"
    if done.returncode != 0:
        return None, " ".join(done.stderr.split()) or f"git exited with {done.returncode}"
    return done.stdout.strip(), ""


def git_commit() -> str:
    """HEAD of the checkout fastattn runs from, '+dirty' with uncommitted changes, or why not."""
    commit, error = _git("rev-parse", "HEAD")
    if commit is None:
        return f"unknown ({error})"
    status, _ = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if status else "")


def load_average() -> str:
    """1-minute load average against the core count: CPU timings on a busy machine are slow."""
    if not hasattr(os, "getloadavg"):
        return "unknown (no os.getloadavg)"
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def environment(device: torch.device) -> dict[str, str]:
    from fastattn._info import environment as versions

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device_name(device),
        "git commit": git_commit(),
        "torch threads": str(torch.get_num_threads()),
        "load average at start": load_average(),
    }
    env.update(versions())
    return env
