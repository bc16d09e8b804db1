"""Builds the CUDA backend: just-in-time extension loading and the offline kernel check.

- :func:`load_extension` compiles ``csrc/*.cpp`` + ``kernels/**/*.cu`` into one library with
  ``torch.utils.cpp_extension.load`` (ninja), for the architectures of the visible GPUs
  (``TORCH_CUDA_ARCH_LIST`` overrides), cached under ``~/.cache/fastattn`` (``FASTATTN_CACHE_DIR``
  overrides) behind a file lock, then loads it so ``torch.ops.fastattn.*`` exist. It returns
  the reason on failure instead of raising: the cuda backend reports it and another serves.
- :func:`check_cuda` compiles every ``kernels/**/*.cu`` alone with nvcc for sm_80 and sm_90a
  (no GPU needed) and reports per kernel and arch the registers, static shared memory, spill
  bytes and whether the SASS holds tensor-core instructions (``fastattn build --check-cuda``).
- :func:`load_cpu_extension` compiles ``csrc/cpu/*.cpp`` (g++ only: no nvcc, no CUDA torch) into
  ``fastattn_cpu``, the ``cpu`` backend's kernels, with the host's vector ISA (AVX-512, AVX2 or
  none, from ``/proc/cpuinfo``) and OpenMP; cached the same way, in a folder of its own.
- :func:`build` is the entry point of ``fastattn build``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch


def _native_root() -> Path:
    """Where csrc/ and kernels/ live: the checkout (editable install), or the copy that
    setup.py ships inside the package as fastattn/_native (regular install)."""
    packaged = Path(__file__).resolve().parent / "_native"
    return packaged if (packaged / "csrc").is_dir() else Path(__file__).resolve().parent.parent


REPO_ROOT = _native_root()
CSRC_DIR = REPO_ROOT / "csrc"
KERNELS_DIR = REPO_ROOT / "kernels"
EXTENSION_NAME = "fastattn_C"
CACHE_ENV = "FASTATTN_CACHE_DIR"
ARCH_ENV = "TORCH_CUDA_ARCH_LIST"
#: sm_90 is compiled as sm_90a (the arch-specific target): wgmma and setmaxnreg exist only
#: there, and sm_90a code runs only on sm_90 devices, which is exactly what a 9.0 GPU is.
DEFAULT_CHECK_ARCHS = (80, "90a")
#: Where CUTLASS/CuTe headers are looked for first (else the nvidia-cutlass wheel's copy).
CUTLASS_ENV = "CUTLASS_PATH"

#: nvcc flags shared by the extension build and the offline check (the check adds the
#: ``-D__CUDA_NO_HALF_*`` defines torch's extension build adds on its own).
NVCC_FLAGS = ("-O3", "--use_fast_math", "--expt-relaxed-constexpr", "--expt-extended-lambda")
CXX_FLAGS = ("-O3",)
#: Op modules of the cuda backend that may define ``register_python_ops()`` (fake tensors and
#: autograd for their torch.ops), called once the library is loaded.
OP_MODULES = ("attention", "norm", "ffn")

_TENSOR_CORE_SASS = re.compile(r"\b(HMMA|HGMMA|IMMA|IGMMA|QGMMA|OMMA|UTCHMMA|UTCQMMA)\b")


# --------------------------------------------------------------------------------------------
# Sources, toolchain, architectures, cache
# --------------------------------------------------------------------------------------------
def cpp_sources() -> list[Path]:
    return sorted(CSRC_DIR.glob("*.cpp"))


def kernel_sources() -> list[Path]:
    """Every CUDA translation unit under kernels/ (each is compiled on its own)."""
    return sorted(KERNELS_DIR.rglob("*.cu"))


def _header_sources() -> list[Path]:
    return sorted([*CSRC_DIR.glob("*.h"), *KERNELS_DIR.rglob("*.h"), *KERNELS_DIR.rglob("*.cuh")])


def find_nvcc() -> Optional[str]:
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def cuda_toolkit_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(include dirs, library dirs) of the toolkit behind nvcc, as nvcc itself reports them.
    Needed when nvcc is a wrapper script outside the toolkit (CUDA_HOME guessed from its path
    would then point at the wrong folder)."""
    nvcc = find_nvcc()
    if nvcc is None:
        return (), ()
    with tempfile.TemporaryDirectory(prefix="fastattn_nvcc_") as tmp:
        probe = Path(tmp) / "probe.cu"
        probe.write_text("")
        proc = subprocess.run([nvcc, "--dryrun", "-c", str(probe), "-o", str(Path(tmp) / "probe.o")],
                              capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    includes, libraries = [], []
    for line in text.splitlines():
        if line.startswith("#$ INCLUDES="):
            includes += [os.path.normpath(p) for p in re.findall(r'"-I([^"]+)"', line)]
        elif line.startswith("#$ LIBRARIES="):
            libraries += [os.path.normpath(p) for p in re.findall(r'"-L([^"]+)"', line) if not p.endswith("stubs")]
    return tuple(includes), tuple(libraries)


def find_cuobjdump() -> Optional[str]:
    """cuobjdump: the CUDA toolkit's, else the copy shipped in triton's wheel."""
    nvcc = find_nvcc()
    if nvcc is not None and (Path(nvcc).parent / "cuobjdump").exists():
        return str(Path(nvcc).parent / "cuobjdump")
    found = shutil.which("cuobjdump")
    if found is not None:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "backends" / "nvidia" / "bin" / "cuobjdump"
            if candidate.exists():
                return str(candidate)
    return None


def _arch_string(arch: Union[int, str]) -> str:
    """80 -> "8.0", "90a" -> "9.0a", "8.6" -> "8.6" (TORCH_CUDA_ARCH_LIST spelling)."""
    text = str(arch).strip()
    if "." in text:
        return text
    match = re.fullmatch(r"(\d+)(\d)([a-z]?)", text)
    if match is None:
        raise ValueError(f"not a CUDA architecture: {arch!r} (expected e.g. 80, 90 or '90a')")
    return f"{match.group(1)}.{match.group(2)}{match.group(3)}"


def _sm_name(arch: Union[int, str]) -> str:
    """80 -> "80", "9.0a" -> "90a"."""
    return _arch_string(arch).replace(".", "").replace("+PTX", "")


def extension_archs(archs: Optional[Sequence[Union[int, str]]] = None) -> Optional[str]:
    """The TORCH_CUDA_ARCH_LIST value the extension is built for: ``archs`` if given, else the
    environment variable, else the visible GPUs; None when none of these names one."""
    if archs:
        return ";".join(_arch_string(a) for a in archs)
    env = os.environ.get(ARCH_ENV, "").strip()
    if env and env != "native":
        return env
    if not torch.cuda.is_available():
        return None
    found = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "") for major, minor in found)


@functools.lru_cache(maxsize=None)
def cutlass_include_dir() -> Optional[Path]:
    """The CUTLASS/CuTe include folder: ``$CUTLASS_PATH/include``, else the headers shipped in
    the nvidia-cutlass wheel (``pip install --no-deps nvidia-cutlass``; located without
    importing it), else None. Kernels that need CUTLASS compile only when it is found
    (``FASTATTN_HAVE_CUTLASS``); the hand-written kernels serve otherwise."""
    candidates = []
    if os.environ.get(CUTLASS_ENV):
        candidates.append(Path(os.environ[CUTLASS_ENV]) / "include")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "source" / "include" for loc in spec.submodule_search_locations]
    for candidate in candidates:
        if (candidate / "cutlass" / "cutlass.h").is_file() and (candidate / "cute" / "tensor.hpp").is_file():
            return candidate
    return None


def cutlass_nvcc_flags() -> list[str]:
    """``-DFASTATTN_HAVE_CUTLASS -I<include>`` when CUTLASS is found, else nothing."""
    include = cutlass_include_dir()
    return [] if include is None else ["-DFASTATTN_HAVE_CUTLASS", f"-I{include}"]


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastattn").expanduser()


def build_directory(arch_list: str) -> Path:
    """One directory per torch / CUDA / Python / arch combination, so they never mix."""
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}_cu{torch.version.cuda}_"
                 f"py{sys.version_info.major}{sys.version_info.minor}_sm{arch_list}")
    return cache_root() / tag


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (released by the OS if the holder dies)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _is_stale(library: Path) -> bool:
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(p.stat().st_mtime > built for p in [*cpp_sources(), *kernel_sources(), *_header_sources()])


# --------------------------------------------------------------------------------------------
# Just-in-time extension
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _toolchain_reasons() -> tuple[str, ...]:
    from torch.utils import cpp_extension

    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build (the extension links against torch's CUDA libraries)")
    if find_nvcc() is None:
        reasons.append("nvcc is not on PATH and CUDA_HOME is not set (needed for the just-in-time build)")
    if not cpp_extension.is_ninja_available():
        reasons.append("ninja is not installed (pip install ninja)")
    if not cpp_sources() or not kernel_sources():
        reasons.append(f"CUDA sources not found under {REPO_ROOT} (csrc/, kernels/)")
    return tuple(reasons)


def toolchain_reasons() -> list[str]:
    """Why the extension cannot be built here at all (empty: it can be attempted). Checked
    once per process (it runs ninja --version)."""
    return list(_toolchain_reasons())


@dataclasses.dataclass
class _LoadState:
    library: Optional[str] = None
    reason: Optional[str] = None


_state = _LoadState()
_state_lock = threading.Lock()


def load_extension(verbose: bool = False, archs: Optional[Sequence[Union[int, str]]] = None) -> Optional[str]:
    """Build (if needed) and load the extension once per process. Returns None when
    ``torch.ops.fastattn`` is ready, else the reason it is not (also on later calls)."""
    with _state_lock:
        if _state.library is None and _state.reason is None:
            _state.library, _state.reason = _build_and_load(verbose, archs)
            if _state.library is not None:
                _register_python_ops()
        return _state.reason


def extension_path() -> Optional[str]:
    """The loaded library's path (None until load_extension succeeded)."""
    return _state.library


def _build_and_load(verbose: bool, archs) -> tuple[Optional[str], Optional[str]]:
    reasons = toolchain_reasons()
    if reasons:
        return None, "; ".join(reasons)
    arch_list = extension_archs(archs)
    if arch_list is None:
        return None, f"no CUDA device to build for (pass archs or set {ARCH_ENV})"
    from torch.utils import cpp_extension

    directory = build_directory(arch_list)
    directory.mkdir(parents=True, exist_ok=True)
    include_dirs, library_dirs = cuda_toolkit_dirs()
    library = directory / f"{EXTENSION_NAME}.so"
    with _file_lock(directory / "fastattn.lock"), _env(ARCH_ENV, arch_list):
        if _is_stale(library):
            print(
                f"fastattn: building the CUDA extension for {arch_list} in {directory} "
                "(first use or changed sources; this takes a few minutes)...",
                file=sys.stderr,
                flush=True,
            )
        started = time.monotonic()
        try:
            path = cpp_extension.load(
                name=EXTENSION_NAME,
                sources=[str(p) for p in [*cpp_sources(), *kernel_sources()]],
                extra_cflags=list(CXX_FLAGS),
                extra_cuda_cflags=[*NVCC_FLAGS, *cutlass_nvcc_flags()],
                extra_include_paths=[str(KERNELS_DIR), str(CSRC_DIR), *include_dirs],
                extra_ldflags=[f"-L{d}" for d in library_dirs],
                build_directory=str(directory),
                verbose=verbose,
                with_cuda=True,
                is_python_module=False,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            # Kept, not swallowed: the message (compiler output included) becomes the cuda
            # backend's availability reason and is written next to the build.
            (directory / "build_error.log").write_text(str(err))
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return None, f"building the CUDA extension failed: {first_line} (full log: {directory / 'build_error.log'})"
    if verbose:
        print(f"fastattn: extension ready in {time.monotonic() - started:.1f} s: {path}", file=sys.stderr)
    return str(path), None


def _register_python_ops() -> None:
    """Fake tensors and autograd of each op, defined by its module in fastattn.cuda."""
    for op in OP_MODULES:
        try:
            module = importlib.import_module(f"fastattn.cuda.{op}")
        except ModuleNotFoundError as err:
            if err.name == f"fastattn.cuda.{op}":
                continue  # that op has no CUDA implementation
            raise
        register = getattr(module, "register_python_ops", None)
        if register is not None:
            register()


# --------------------------------------------------------------------------------------------
# CPU extension (the ``cpu`` backend): g++ and OpenMP only
# --------------------------------------------------------------------------------------------
CPU_DIR = CSRC_DIR / "cpu"
CPU_EXTENSION_NAME = "fastattn_cpu"
#: Op modules of the cpu backend that may define ``register_python_ops()``.
CPU_OP_MODULES = ("attention", "norm", "ffn")
#: Vector ISAs in order of preference: (name, /proc/cpuinfo flags needed, compiler flags, the
#: ATen define that selects ``at::vec::Vectorized``'s implementation).
_CPU_ISAS = (
    ("avx512", ("avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"),
     ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"), "AVX512"),
    ("avx2", ("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"), "AVX2"),
)
CPU_ISA_ENV = "FASTATTN_CPU_ISA"


def cpu_sources() -> list[Path]:
    return sorted(CPU_DIR.glob("*.cpp"))


def _cpu_header_sources() -> list[Path]:
    return sorted(CPU_DIR.glob("*.h"))


@functools.lru_cache(maxsize=None)
def _cpuinfo_flags() -> frozenset:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_isa() -> str:
    """The vector ISA the CPU extension is compiled for: ``FASTATTN_CPU_ISA`` (avx512, avx2 or
    scalar) if set, else the best one this processor has (scalar when none is known)."""
    forced = os.environ.get(CPU_ISA_ENV, "").strip().lower()
    names = [name for name, _, _, _ in _CPU_ISAS] + ["scalar"]
    if forced:
        if forced not in names:
            raise ValueError(f"{CPU_ISA_ENV} must be one of {names}, got {forced!r}")
        return forced
    flags = _cpuinfo_flags()
    for name, needed, _, _ in _CPU_ISAS:
        if all(flag in flags for flag in needed):
            return name
    return "scalar"


def cpu_compile_flags(isa: Optional[str] = None) -> list[str]:
    """g++ flags of the CPU extension for ``isa`` (default: :func:`cpu_isa`)."""
    isa = cpu_isa() if isa is None else isa
    flags = ["-O3", "-std=c++17", "-fopenmp", "-DFASTATTN_CPU_ISA_" + isa.upper()]
    for name, _, compile_flags, aten_define in _CPU_ISAS:
        if name == isa:
            flags += [*compile_flags, f"-DCPU_CAPABILITY={aten_define}", f"-DCPU_CAPABILITY_{aten_define}"]
    return flags


@functools.lru_cache(maxsize=None)
def _cpu_toolchain_reasons() -> tuple[str, ...]:
    from torch.utils import cpp_extension

    reasons = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        reasons.append(f"no C++ compiler: {compiler!r} is not on PATH (install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        reasons.append("ninja is not installed (pip install ninja)")
    if not cpu_sources():
        reasons.append(f"CPU sources not found under {CPU_DIR}")
    return tuple(reasons)


def cpu_toolchain_reasons() -> list[str]:
    """Why the CPU extension cannot be built here at all (empty: it can be attempted)."""
    return list(_cpu_toolchain_reasons())


def cpu_build_directory(isa: str) -> Path:
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"cpu_torch{torch.__version__}_py{sys.version_info.major}"
                 f"{sys.version_info.minor}_{isa}")
    return cache_root() / tag


_cpu_state = _LoadState()


def load_cpu_extension(verbose: bool = False) -> Optional[str]:
    """Build (if needed) and load the CPU extension once per process. Returns None when its
    ``torch.ops.fastattn.cpu_*`` ops are ready, else the reason they are not."""
    with _state_lock:
        if _cpu_state.library is None and _cpu_state.reason is None:
            _cpu_state.library, _cpu_state.reason = _build_and_load_cpu(verbose)
            if _cpu_state.library is not None:
                _register_cpu_python_ops()
        return _cpu_state.reason


def cpu_extension_path() -> Optional[str]:
    """The loaded CPU library's path (None until load_cpu_extension succeeded)."""
    return _cpu_state.library


def _build_and_load_cpu(verbose: bool) -> tuple[Optional[str], Optional[str]]:
    reasons = cpu_toolchain_reasons()
    if reasons:
        return None, "; ".join(reasons)
    from torch.utils import cpp_extension

    isa = cpu_isa()
    directory = cpu_build_directory(isa)
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"{CPU_EXTENSION_NAME}.so"
    with _file_lock(directory / "fastattn.lock"):
        stale = not library.exists() or any(
            p.stat().st_mtime > library.stat().st_mtime for p in [*cpu_sources(), *_cpu_header_sources()])
        if stale:
            print(f"fastattn: building the CPU extension ({isa}) in {directory} (first use or changed "
                  "sources; about a minute)...", file=sys.stderr, flush=True)
        try:
            path = cpp_extension.load(
                name=CPU_EXTENSION_NAME,
                sources=[str(p) for p in cpu_sources()],
                extra_cflags=cpu_compile_flags(isa),
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(CSRC_DIR)],
                build_directory=str(directory),
                verbose=verbose,
                with_cuda=False,
                is_python_module=False,
            )
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            (directory / "build_error.log").write_text(str(err))
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return None, f"building the CPU extension failed: {first_line} (full log: {directory / 'build_error.log'})"
    return str(path), None


def _register_cpu_python_ops() -> None:
    """Fake tensors (and autograd where defined) of each op, from its module in fastattn.cpu."""
    for op in CPU_OP_MODULES:
        try:
            module = importlib.import_module(f"fastattn.cpu.{op}")
        except ModuleNotFoundError as err:
            if err.name == f"fastattn.cpu.{op}":
                continue
            raise
        register = getattr(module, "register_python_ops", None)
        if register is not None:
            register()


# --------------------------------------------------------------------------------------------
# Offline check: nvcc per kernel file, ptxas resource usage, SASS tensor-core instructions
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class KernelReport:
    """Resources of one kernel for one architecture, as ptxas and cuobjdump report them."""

    file: str
    kernel: str  # demangled, without namespace and parameter list
    arch: str  # "80", "90", "90a"
    registers: int = 0
    shared_bytes: int = 0  # static shared memory; dynamic shared memory is set at launch
    stack_bytes: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    tensor_cores: Optional[bool] = None  # None: SASS not inspected (no cuobjdump)

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


@dataclasses.dataclass
class FileReport:
    file: str  # relative to the repository
    ok: bool
    seconds: float
    kernels: list[KernelReport]
    log: str = ""  # nvcc output when the compile failed


def nvcc_check_command(source: Path, output: Path, archs: Sequence[Union[int, str]]) -> list[str]:
    from torch.utils import cpp_extension

    nvcc = find_nvcc() or "nvcc"
    gencode = []
    for arch in archs:
        sm = _sm_name(arch)
        gencode += ["-gencode", f"arch=compute_{sm},code=sm_{sm}"]
    return [
        nvcc, "-c", str(source), "-o", str(output), "-std=c++17", *NVCC_FLAGS,
        *cpp_extension.COMMON_NVCC_FLAGS, f"-I{KERNELS_DIR}", *cutlass_nvcc_flags(), "-Xptxas", "-v", *gencode,
    ]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(?:sm|compute)_(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str, file: str) -> dict[tuple[str, str], KernelReport]:
    """ptxas -v output -> {(mangled name, arch): report} for the entry functions (kernels)."""
    reports: dict[tuple[str, str], KernelReport] = {}
    current: Optional[KernelReport] = None
    props_for: Optional[str] = None
    for line in log.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = KernelReport(file=file, kernel=entry.group(1), arch=entry.group(2))
            reports[(entry.group(1), entry.group(2))] = current
            props_for = None
            continue
        props = _PROPS.search(line)
        if props:
            props_for = props.group(1)
            continue
        stack = _STACK.search(line)
        if stack and current is not None and props_for == current.kernel:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(int, stack.groups())
            continue
        used = _USED.search(line)
        if used and current is not None:
            current.registers = int(used.group(1))
            smem = _SMEM.search(line)
            current.shared_bytes = int(smem.group(1)) if smem else 0
    return reports


def parse_sass(sass: str) -> dict[tuple[str, str], bool]:
    """cuobjdump -sass output -> {(mangled name, arch): has tensor-core instructions}."""
    found: dict[tuple[str, str], bool] = {}
    arch, function = None, None
    for line in sass.splitlines():
        stripped = line.strip()
        if stripped.startswith("code for sm_"):
            arch, function = stripped[len("code for sm_"):], None
        elif stripped.startswith("Function :"):
            function = stripped[len("Function :"):].strip()
            found[(function, arch)] = False
        elif function is not None and _TENSOR_CORE_SASS.search(stripped):
            found[(function, arch)] = True
    return found


def _demangle(names: Sequence[str]) -> dict[str, str]:
    """Mangled -> short readable names (c++filt when available)."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    readable = {}
    for name, pretty in zip(names, out.splitlines()):
        pretty = re.sub(r"^void ", "", pretty)
        pretty = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", pretty)  # drop the parameter list
        readable[name] = pretty.replace("fastattn::", "")
    return readable


def check_cuda_file(source: Path, archs: Sequence[Union[int, str]] = DEFAULT_CHECK_ARCHS) -> FileReport:
    """Compile one kernels/ file for every arch and collect its kernels' resources."""
    rel = str(source.relative_to(REPO_ROOT)) if source.is_relative_to(REPO_ROOT) else str(source)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastattn_check_") as tmp:
        obj = Path(tmp) / "kernel.o"
        proc = subprocess.run(nvcc_check_command(source, obj, archs), capture_output=True, text=True)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            return FileReport(rel, False, time.monotonic() - started, [], log)
        reports = parse_ptxas(log, rel)
        cuobjdump = find_cuobjdump()
        if cuobjdump is not None:
            sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
            for key, has_tc in parse_sass(sass).items():
                if key in reports:
                    reports[key].tensor_cores = has_tc
    names = _demangle(sorted({k.kernel for k in reports.values()}))
    kernels = []
    for report in reports.values():
        report.kernel = names.get(report.kernel, report.kernel)
        kernels.append(report)
    kernels.sort(key=lambda k: (k.kernel, k.arch))
    return FileReport(rel, True, time.monotonic() - started, kernels, log)


def check_cuda(
    archs: Sequence[Union[int, str]] = DEFAULT_CHECK_ARCHS,
    files: Optional[Sequence[Path]] = None,
    jobs: int = 1,
) -> list[FileReport]:
    """Compile every kernels/**/*.cu (or ``files``) for ``archs``; ``jobs`` nvcc at a time."""
    sources = list(files) if files is not None else kernel_sources()
    if jobs <= 1:
        return [check_cuda_file(s, archs) for s in sources]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda s: check_cuda_file(s, archs), sources))


def check_failures(reports: Sequence[FileReport]) -> list[str]:
    """What makes ``fastattn build --check-cuda`` fail: compile errors and spills."""
    if not reports:
        return [f"no .cu files found under {KERNELS_DIR}"]
    failures = [f"{r.file}: does not compile" for r in reports if not r.ok]
    for r in reports:
        for k in r.kernels:
            if k.spills:
                failures.append(
                    f"{r.file}: {k.kernel} sm_{k.arch} spills "
                    f"({k.spill_store_bytes} B stored, {k.spill_load_bytes} B loaded)"
                )
    return failures


def format_check_report(reports: Sequence[FileReport]) -> str:
    header = ("file", "kernel", "arch", "regs", "smem B", "spill st/ld B", "stack B", "tensor cores")
    rows = []
    for r in reports:
        if not r.ok:
            rows.append((r.file, "COMPILE ERROR", "-", "-", "-", "-", "-", "-"))
            continue
        for k in r.kernels:
            tc = "n/a" if k.tensor_cores is None else ("yes" if k.tensor_cores else "no")
            rows.append((r.file, k.kernel, f"sm_{k.arch}", str(k.registers), str(k.shared_bytes),
                         f"{k.spill_store_bytes}/{k.spill_load_bytes}", str(k.stack_bytes), tc))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


_run_check = check_cuda


# --------------------------------------------------------------------------------------------
# `fastattn build`
# --------------------------------------------------------------------------------------------
def build(check_cuda: bool = False, archs: Optional[Sequence[Union[int, str]]] = None, verbose: bool = False) -> int:
    """``fastattn build [--check-cuda]``; returns the process exit code.

    check_cuda: compile every kernel file for ``archs`` (default sm_80, sm_90a) without a GPU,
    print the resource table, exit 1 when a file fails to compile or a kernel spills.
    Otherwise: build and load the CPU extension (the ``cpu`` backend) and the CUDA extension
    ahead of time (for ``archs``, else TORCH_CUDA_ARCH_LIST, else the visible GPUs), exit 1
    with the reasons when either cannot be built.
    """
    if check_cuda:
        if find_nvcc() is None:
            print("fastattn build --check-cuda: nvcc not found (PATH or CUDA_HOME)", file=sys.stderr)
            return 1
        arch_list = tuple(archs) if archs else DEFAULT_CHECK_ARCHS
        jobs = max(1, min(4, (os.cpu_count() or 2) // 2))
        started = time.monotonic()
        reports = _run_check(arch_list, jobs=jobs)
        print(format_check_report(reports))
        for r in reports:
            if not r.ok or verbose:
                print(f"\n--- nvcc output for {r.file} ---\n{r.log.strip()}")
        if find_cuobjdump() is None:
            print("\nnote: cuobjdump not found; tensor-core instructions were not inspected")
        failures = check_failures(reports)
        print(f"\n{len(reports)} files, {sum(len(r.kernels) for r in reports)} kernel builds, "
              f"{time.monotonic() - started:.0f} s")
        for failure in failures:
            print(f"FAIL {failure}")
        return 1 if failures else 0
    cpu_reason = load_cpu_extension(verbose=verbose)
    if cpu_reason is not None:
        print(f"fastattn build: {cpu_reason}", file=sys.stderr)
    else:
        print(f"fastattn: CPU extension loaded from {cpu_extension_path()}")
    reason = load_extension(verbose=verbose, archs=archs)
    if reason is not None:
        print(f"fastattn build: {reason}", file=sys.stderr)
        return 1
    print(f"fastattn: CUDA extension loaded from {extension_path()}")
    return 0 if cpu_reason is None else 1
