"""The ``fastattn`` command line: info, demo, build, bench.

Each subcommand lives with the code it runs; this file only dispatches, importing the
subcommand's module when it is chosen (so ``fastattn info`` never imports the benchmarks).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    import torch


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device`` of the commands: None (cuda when available, else cpu), cpu, cuda or cuda:N.
    Raises ValueError naming the option when the device is no such name or is not here."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cuda, cuda:N or cpu, got {name!r}") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device must be cuda, cuda:N or cpu, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _info(argv: Sequence[str]) -> int:
    from fastattn._info import main

    return main(argv)


def _demo(argv: Sequence[str]) -> int:
    from fastattn.models.demo import main

    return main(argv)


def _build(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastattn build",
        description="Build the CUDA extension ahead of time, or (--check-cuda) compile every CUDA "
        "kernel for sm_80 and sm_90a with nvcc and report registers, shared memory, spills and "
        "tensor-core instructions (works without a GPU).",
    )
    parser.add_argument("--check-cuda", action="store_true", help="compile-only check of kernels/ for each arch")
    parser.add_argument("--arch", type=int, nargs="+", default=None, help="compute capabilities, e.g. 80 90")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    from fastattn._build import build

    return build(check_cuda=args.check_cuda, archs=args.arch, verbose=args.verbose)


def _bench(argv: Sequence[str]) -> int:
    from fastattn.bench import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "info": (_info, "versions, devices, and each backend's availability with reasons"),
    "demo": (_demo, "train the reference Transformer on a synthetic translation task, fused vs naive"),
    "build": (_build, "build the CUDA extension now, or --check-cuda to compile-check the kernels"),
    "bench": (_bench, "benchmark fastattn against naive PyTorch and peers"),
}


def _usage() -> str:
    lines = ["usage: fastattn {" + ",".join(COMMANDS) + "} [options]", "", "commands:"]
    lines += [f"  {name:<7}{text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n`fastattn COMMAND --help` describes each command's options.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from fastattn import __version__

        print(__version__)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"fastattn: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(command[0](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
