"""Ahead-of-time compilation of Triton kernels for GPU targets, on a machine without a GPU.

Used to check every shipped kernel configuration for sm_80 and sm_90 before any hardware is
lent: it compiles, its shared memory fits, it does not spill registers, and (for the matmul
kernels) the PTX uses the tensor-core instructions expected on that architecture.

Two entry points:

- :func:`compile_for_target` compiles one kernel for one target and returns an
  :class:`AotResult` (PTX, cubin, shared memory, registers, local-memory spill bytes, whether
  the PTX holds ``mma``/``wgmma``). Registers and spills (local memory + stack frame) are
  read from the cubin with the ``cuobjdump --dump-resource-usage`` shipped in triton's wheel.
- :func:`check_shipped_configs` / :func:`run_in_subprocess` check every configuration an op
  module ships (protocol below) and return one JSON-able dict per configuration.

Protocol for an op module (``fastattn.triton.norm``, ``.attention``, ``.ffn``): define

    def aot_specs(arch: int) -> Iterable[AotSpec]

yielding one :class:`AotSpec` (or a plain tuple in the same field order) per shipped
configuration: ``(name, kernel, signature, constexprs, num_warps, num_stages[,
divisible_by_16])``, where ``kernel`` is the ``@triton.jit`` function (an ``@autotune`` /
``@heuristics`` wrapper is unwrapped), ``signature`` maps each runtime argument name to its
Triton type (``"*fp16"``, ``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"i64"``, ``"fp32"``, ...) and
``constexprs`` maps each ``tl.constexpr`` argument name to its value. Every kernel argument
must appear in exactly one of the two; an integer argument a launch passes as 1 belongs in
``constexprs`` (triton specializes it into a constant). ``divisible_by_16`` optionally names
the integer arguments (strides, sizes) that the run-time launcher would specialize as
multiples of 16 (pointers always are). ``aot_specs`` must not launch anything nor query a GPU.

Kernels decorated while ``TRITON_INTERPRET=1`` is set are interpreter objects that cannot be
compiled, so tests (which run under the interpreter) call :func:`run_in_subprocess`, which
runs ``python -m fastattn.triton.aot <module> --arch <arch> --json <file>`` with
``TRITON_INTERPRET`` removed from the environment and reads the JSON list it writes.

Triton versions: since 3.3 ``ASTSource`` takes ``constexprs=`` (argument name -> value) with
the constexpr arguments typed ``"constexpr"`` in the signature, and alignment hints as
``attrs={(index,): [["tt.divisibility", 16]]}``; that form is used (checked with triton 3.6
and 3.9). Older releases (``constants=`` and ``AttrsDescriptor``) are refused with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, NamedTuple, Optional, Sequence, Union

#: Largest dynamic shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_MMA_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?mma\.", re.MULTILINE)
_WGMMA_RE = re.compile(r"^\s*(?:@!?%\w+\s+)?wgmma\.", re.MULTILINE)
_RESOURCE_RE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def max_shared(arch: int) -> int:
    """Shared memory bytes one block can use on ``sm_<arch>``."""
    if arch not in MAX_SHARED_BYTES:
        raise ValueError(f"no shared memory limit recorded for sm_{arch} (known: {sorted(MAX_SHARED_BYTES)})")
    return MAX_SHARED_BYTES[arch]


class AotSpec(NamedTuple):
    """One shipped configuration of one kernel (see the module docstring)."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    #: integer arguments the run-time specialization would mark 16-divisible.
    divisible_by_16: Optional[tuple] = None


@dataclasses.dataclass(frozen=True)
class AotResult:
    """What one compilation produced. ``spill_bytes`` is the per-thread local memory of the
    cubin, stack frame included (ptxas places spills in the stack frame): Triton kernels hold
    no local arrays and make no calls, so any of it is register spilling."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    ptx: str = dataclasses.field(repr=False)
    cubin: bytes = dataclasses.field(repr=False)
    shared_bytes: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    uses_mma: bool
    uses_wgmma: bool

    @property
    def max_shared(self) -> int:
        return max_shared(self.arch)

    @property
    def fits_shared(self) -> bool:
        return self.shared_bytes <= self.max_shared

    @property
    def ok(self) -> bool:
        """Compiles, fits shared memory, no spills."""
        return self.fits_shared and self.spill_bytes == 0

    def summary(self) -> dict:
        """JSON-able view without the PTX and cubin."""
        return {
            "name": self.name,
            "arch": self.arch,
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "shared_bytes": self.shared_bytes,
            "max_shared": self.max_shared,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "stack_bytes": self.stack_bytes,
            "uses_mma": self.uses_mma,
            "uses_wgmma": self.uses_wgmma,
            "ok": self.ok,
        }


def _triton_version():
    import triton
    from packaging.version import Version

    return Version(triton.__version__)


def _unwrap(kernel):
    """The JITFunction under ``@triton.autotune`` / ``@triton.heuristics`` wrappers."""
    from triton.runtime.jit import JITFunction

    seen = kernel
    while not isinstance(seen, JITFunction):
        inner = getattr(seen, "fn", None)
        if inner is None or inner is seen:
            from fastattn.backends import triton_interpret_enabled

            hint = ""
            if triton_interpret_enabled():
                hint = " (TRITON_INTERPRET is set: compile in a subprocess, see run_in_subprocess)"
            raise TypeError(f"{kernel!r} is not a @triton.jit kernel{hint}")
        seen = inner
    return seen


def _full_signature(fn, signature: dict, constexprs: dict) -> dict:
    """All arguments in declaration order, constexpr ones typed ``"constexpr"``."""
    names = list(fn.arg_names)
    unknown = sorted((set(signature) | set(constexprs)) - set(names))
    if unknown:
        raise ValueError(f"{fn.__name__}: unknown arguments {unknown}")
    both = sorted(set(signature) & set(constexprs))
    if both:
        raise ValueError(f"{fn.__name__}: arguments both in signature and constexprs: {both}")
    missing = [n for n in names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: arguments missing from signature/constexprs: {missing}")
    return {n: ("constexpr" if n in constexprs else signature[n]) for n in names}


def _make_source(fn, signature: dict, constexprs: dict, divisible_by_16: Iterable[str]):
    import triton
    from packaging.version import Version

    if _triton_version() < Version("3.3"):
        raise RuntimeError(
            f"AOT compilation needs triton >= 3.3 (ASTSource(constexprs=...)), found {triton.__version__}"
        )
    full = _full_signature(fn, signature, constexprs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    return triton.compiler.ASTSource(fn=fn, signature=full, constexprs=dict(constexprs), attrs=attrs)


def cuobjdump_path() -> str:
    """The cuobjdump shipped in triton's wheel, else the one on PATH."""
    import triton

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(shipped):
        return shipped
    found = shutil.which("cuobjdump")
    if found is None:
        raise FileNotFoundError("cuobjdump is neither in triton's wheel nor on PATH")
    return found


def resource_usage(cubin: bytes) -> dict:
    """``{"REG", "STACK", "SHARED", "LOCAL"}`` of the (single) kernel in ``cubin``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", path], check=True, capture_output=True, text=True
        ).stdout
    function_part = out.split("Function", 1)[-1]
    usage = {k: int(v) for k, v in _RESOURCE_RE.findall(function_part)}
    if "REG" not in usage:
        raise RuntimeError(f"could not read resource usage from cuobjdump output:\n{out}")
    return usage


def compile_for_target(
    kernel,
    signature: dict,
    constexprs: dict,
    *,
    arch: int,
    num_warps: int,
    num_stages: int,
    divisible_by_16: Optional[Iterable[str]] = None,
    name: Optional[str] = None,
) -> AotResult:
    """Compile ``kernel`` for ``GPUTarget("cuda", arch, 32)``.

    signature: runtime argument name -> Triton type; constexprs: constexpr name -> value.
    divisible_by_16: integer arguments (strides, sizes) the launcher's specialization would
    mark as multiples of 16; pointer arguments always are (torch allocations are aligned).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _unwrap(kernel)
    hints = [n for n, t in signature.items() if str(t).startswith("*")] + list(divisible_by_16 or ())
    src = _make_source(fn, signature, constexprs, hints)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    ptx = compiled.asm["ptx"]
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    # Triton's shared memory is dynamic (metadata.shared); static shared should be 0.
    shared = int(compiled.metadata.shared) + usage.get("SHARED", 0)
    return AotResult(
        name=name or fn.__name__,
        arch=arch,
        num_warps=num_warps,
        num_stages=num_stages,
        ptx=ptx,
        cubin=cubin,
        shared_bytes=shared,
        registers=usage["REG"],
        spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        stack_bytes=usage.get("STACK", 0),
        uses_mma=bool(_MMA_RE.search(ptx)),
        uses_wgmma=bool(_WGMMA_RE.search(ptx)),
    )


def check_shipped_configs(module_name: str, arch: int) -> list[dict]:
    """Compile every configuration ``module_name.aot_specs(arch)`` yields, in this process
    (which must not have TRITON_INTERPRET set). One summary dict per configuration."""
    module = importlib.import_module(module_name)
    reports = []
    for spec in module.aot_specs(arch):
        spec = AotSpec(*spec)
        result = compile_for_target(
            spec.kernel,
            spec.signature,
            spec.constexprs,
            arch=arch,
            num_warps=spec.num_warps,
            num_stages=spec.num_stages,
            divisible_by_16=spec.divisible_by_16,
            name=spec.name,
        )
        reports.append(result.summary())
    return reports


def run_in_subprocess(module_name: str, arch: Union[int, Sequence[int]], timeout: float = 900.0) -> list[dict]:
    """:func:`check_shipped_configs` for each arch in a child Python without TRITON_INTERPRET,
    so kernels are real JITFunctions there even when this process runs under the interpreter."""
    archs = [arch] if isinstance(arch, int) else list(arch)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        # A file, not stdout: the compiler may print to stdout.
        report_path = os.path.join(tmp, "report.json")
        proc = subprocess.run(
            [sys.executable, "-m", "fastattn.triton.aot", module_name, "--json", report_path]
            + [f"--arch={a}" for a in archs],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"AOT check of {module_name} for {archs} failed (exit {proc.returncode}):\n{proc.stderr[-8000:]}"
            )
        with open(report_path) as f:
            return json.load(f)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="AOT-compile the shipped configs of a Triton op module")
    parser.add_argument("module", help="e.g. fastattn.triton.norm (must define aot_specs(arch))")
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 or 90 (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="write the report there instead of stdout")
    args = parser.parse_args(argv)
    from fastattn.backends import triton_interpret_enabled

    if triton_interpret_enabled():
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    reports = []
    for arch in args.arch or [80, 90]:
        reports += check_shipped_configs(args.module, arch)
    text = json.dumps(reports, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
