"""CUDA build system: kernels/ compile for sm_80 and sm_90 without spills (tensor cores in the
attention and FFN SASS), csrc/ host code compiles against the installed torch headers, the
schemas parse, the Philox header matches its Python mirror, ``fastattn build --check-cuda``
fails on compile errors and spills, and the backend reports why it is unavailable.

nvcc runs one file at a time. Without FASTATTN_CHECK_ALL_KERNELS=1 the compile check covers
every file outside ``instantiations/`` folders plus one forward and one backward bf16
instantiation per op (``fastattn build --check-cuda`` compiles them all).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastattn import _build
from fastattn.cuda import philox
from conftest import requires_cuda

requires_nvcc = pytest.mark.skipif(_build.find_nvcc() is None, reason="needs nvcc (PATH or CUDA_HOME)")
ARCHS = ("80", "90a")
TENSOR_CORE_OPS = ("attention", "ffn")
# The wgmma forward: real code only for sm_90a (a trap stub on sm_80), checked by its own test.
SM90_ATTENTION_FILE = _build.KERNELS_DIR / "attention" / "instantiations" / "flash_fwd_hdim128_bf16_sm90.cu"


def _representative_kernel_files() -> list[Path]:
    files = _build.kernel_sources()
    if os.environ.get("FASTATTN_CHECK_ALL_KERNELS", "0") not in ("", "0"):
        return files
    chosen = [f for f in files if "instantiations" not in f.relative_to(_build.KERNELS_DIR).parts]
    by_op: dict[str, list[Path]] = {}
    for f in files:
        if "instantiations" in f.relative_to(_build.KERNELS_DIR).parts:
            by_op.setdefault(f.relative_to(_build.KERNELS_DIR).parts[0], []).append(f)
    for op_files in by_op.values():
        for direction in ("fwd", "bwd"):
            picks = [f for f in op_files if direction in f.stem.split("_") and "bf16" in f.stem]
            if picks:
                chosen.append(picks[0])
    chosen.append(SM90_ATTENTION_FILE)
    return sorted(set(chosen))


CHECKED_FILES = _representative_kernel_files()


def _rel(path: Path) -> str:
    return str(path.relative_to(_build.REPO_ROOT))


@pytest.fixture(scope="session")
def kernel_reports() -> dict[str, _build.FileReport]:
    """One nvcc call per checked file (both archs), shared by the tests below."""
    if _build.find_nvcc() is None:
        pytest.skip("needs nvcc (PATH or CUDA_HOME)")
    # One nvcc at a time on small (CI) machines, more where there are cores to spare.
    jobs = max(1, (os.cpu_count() or 2) // 2)
    return {r.file: r for r in _build.check_cuda(ARCHS, files=CHECKED_FILES, jobs=jobs)}


# --------------------------------------------------------------------------------------------
# Kernel compile checks
# --------------------------------------------------------------------------------------------
@requires_nvcc
@pytest.mark.parametrize("source", CHECKED_FILES, ids=_rel)
def test_kernel_file_compiles_for_sm80_and_sm90(kernel_reports, source):
    report = kernel_reports[_rel(source)]
    assert report.ok, f"{report.file} does not compile:\n{report.log[-4000:]}"
    archs = {k.arch for k in report.kernels}
    if report.kernels:  # dispatch-only files hold no kernels
        assert archs == set(ARCHS), f"{report.file}: kernels built for {sorted(archs)}"


@requires_nvcc
@pytest.mark.parametrize("source", CHECKED_FILES, ids=_rel)
def test_kernel_file_has_no_spills(kernel_reports, source):
    report = kernel_reports[_rel(source)]
    assert report.ok
    spilling = [f"{k.kernel} sm_{k.arch}: {k.spill_store_bytes}/{k.spill_load_bytes} B" for k in report.kernels if k.spills]
    assert not spilling, f"{report.file} spills: " + "; ".join(spilling)


@requires_nvcc
def test_norm_kernels_are_all_built(kernel_reports):
    """The shipped norm shapes: 5 register-resident + 2 looped kernels per dtype and direction."""
    names = [k.kernel for r in kernel_reports.values() if r.file.startswith("kernels/norm/") for k in r.kernels]
    for direction in ("fwd", "bwd"):
        for ctype in ("__half", "__nv_bfloat16", "float"):
            reg = {n for n in names if n.startswith(f"_norm_{direction}_reg_kernel<{ctype},")}
            loop = {n for n in names if n.startswith(f"_norm_{direction}_loop_kernel<{ctype},")}
            assert len(reg) == 5 and len(loop) == 2, (direction, ctype, reg, loop)
    assert any(n.startswith("_norm_bwd_reduce_kernel") for n in names)


TC_FILES = [f for f in CHECKED_FILES if f.relative_to(_build.KERNELS_DIR).parts[0] in TENSOR_CORE_OPS
            and "instantiations" in f.parts]


def _hopper_only(source: Path) -> bool:
    """wgmma / CUTLASS sm_90 files: their sm_80 image is a stub that is never launched."""
    return source.stem.endswith("_sm90") or source.stem.startswith("ffn_sm90_")


@requires_nvcc
@pytest.mark.skipif(_build.find_cuobjdump() is None, reason="needs cuobjdump (CUDA toolkit or triton's wheel)")
@pytest.mark.parametrize("source", TC_FILES, ids=_rel)
def test_attention_and_ffn_sass_uses_tensor_cores(kernel_reports, source):
    report = kernel_reports[_rel(source)]
    assert report.ok
    for arch in ARCHS:
        if arch == "80" and _hopper_only(source):
            continue
        kernels = [k for k in report.kernels if k.arch == arch]
        assert any(k.tensor_cores for k in kernels), f"{report.file} sm_{arch}: no HMMA/HGMMA in {kernels}"


# --------------------------------------------------------------------------------------------
# The check itself: parsers, failure on compile errors and spills, exit codes
# --------------------------------------------------------------------------------------------
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 1056 bytes smem, 360 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers
"""

SASS_LOG = """\
Fatbin elf code:
arch = sm_80
\tcode for sm_80
\t\tFunction : _Z3fooPf
        /*0070*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
\t\tFunction : _Z3barv
        /*0000*/                   FFMA R1, R2, R3, R4 ;
\tcode for sm_90
\t\tFunction : _Z3fooPf
        /*0070*/                   HGMMA.64x128x16.F32.BF16 gdesc[UR4], RZ, !UPT ;
"""


def test_ptxas_parser_reads_registers_smem_and_spills():
    reports = _build.parse_ptxas(PTXAS_LOG, "k.cu")
    assert set(reports) == {("_Z3fooPf", "80"), ("_Z3fooPf", "90")}
    sm80, sm90 = reports[("_Z3fooPf", "80")], reports[("_Z3fooPf", "90")]
    assert (sm80.registers, sm80.shared_bytes, sm80.stack_bytes) == (32, 1056, 16)
    assert (sm80.spill_store_bytes, sm80.spill_load_bytes, sm80.spills) == (8, 4, True)
    assert (sm90.registers, sm90.shared_bytes, sm90.spills) == (40, 0, False)


def test_sass_parser_finds_tensor_core_instructions():
    found = _build.parse_sass(SASS_LOG)
    assert found == {("_Z3fooPf", "80"): True, ("_Z3barv", "80"): False, ("_Z3fooPf", "90"): True}


SPILLING_KERNEL = """\
// 64 live values under a 32-register cap (launch bounds 1024 x 2 blocks): ptxas must spill.
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* in, float* out, int n) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = in[threadIdx.x * 64 + i] * in[i * n];
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) acc += v[i] * v[63 - i] + v[(i * 7) % 64];
  out[threadIdx.x] = acc;
}
"""


@requires_nvcc
def test_check_reports_spills_and_compile_errors(tmp_path):
    spill = tmp_path / "spill.cu"
    spill.write_text(SPILLING_KERNEL)
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void broken_kernel() { this is not C++; }\n")
    reports = _build.check_cuda(("80",), files=[spill, broken])
    by_name = {Path(r.file).name: r for r in reports}
    assert by_name["spill.cu"].ok and any(k.spills for k in by_name["spill.cu"].kernels)
    assert not by_name["broken.cu"].ok and "error" in by_name["broken.cu"].log
    failures = _build.check_failures(reports)
    assert any("spill_kernel" in f and "spills" in f for f in failures)
    assert any("broken.cu: does not compile" in f for f in failures)
    table = _build.format_check_report(reports)
    assert "COMPILE ERROR" in table and "spill_kernel" in table


def _fake_report(spill: int = 0, ok: bool = True) -> _build.FileReport:
    kernel = _build.KernelReport("kernels/x.cu", "k<float>", "80", registers=32, spill_store_bytes=spill)
    return _build.FileReport("kernels/x.cu", ok, 0.1, [kernel] if ok else [], "" if ok else "error: x")


@pytest.mark.parametrize("reports,code", [
    ([_fake_report()], 0),
    ([_fake_report(), _fake_report(spill=4)], 1),
    ([_fake_report(ok=False)], 1),
    ([], 1),
])
def test_build_check_cuda_exit_code(monkeypatch, capsys, reports, code):
    monkeypatch.setattr(_build, "find_nvcc", lambda: "/usr/bin/nvcc")
    seen = {}

    def fake_check(archs, jobs=1):
        seen["archs"] = archs
        return reports

    monkeypatch.setattr(_build, "_run_check", fake_check)
    assert _build.build(check_cuda=True, archs=None, verbose=False) == code
    assert seen["archs"] == _build.DEFAULT_CHECK_ARCHS == (80, "90a")
    out = capsys.readouterr().out
    assert "regs" in out and "spill" in out
    if code:
        assert "FAIL" in out


def test_build_check_cuda_without_nvcc(monkeypatch, capsys):
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    assert _build.build(check_cuda=True, archs=None, verbose=False) == 1
    assert "nvcc not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Host code, schemas, Philox
# --------------------------------------------------------------------------------------------
def _torch_include_flags() -> list[str]:
    from torch.utils import cpp_extension

    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    torch_include = Path(cpp_extension.include_paths()[0])
    # CPU wheels ship the c10/cuda headers without their generated cmake macros header.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags




@requires_nvcc
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("source", _build.cpp_sources(), ids=_rel)
def test_host_code_compiles_against_torch_headers(source):
    std = "-std=c++20" if "c++20" in Path(torch.utils.cpp_extension.__file__).read_text() else "-std=c++17"
    cmd = ["g++", std, "-fsyntax-only", "-DTORCH_EXTENSION_NAME=fastattn_C", *_torch_include_flags(),
           *[f"-I{d}" for d in _build.cuda_toolkit_dirs()[0]], f"-I{_build.KERNELS_DIR}", f"-I{_build.CSRC_DIR}", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _schemas() -> dict[str, str]:
    text = (_build.CSRC_DIR / "ops.cpp").read_text()
    schemas = {}
    for call in re.finditer(r"m\.def\(\s*((?:\"(?:[^\"\\]|\\.)*\"\s*)+)\)", text):
        schema = "".join(re.findall(r"\"((?:[^\"\\]|\\.)*)\"", call.group(1)))
        schemas[schema.split("(", 1)[0]] = schema
    return schemas


def test_every_schema_parses():
    schemas = _schemas()
    assert {"attention_fwd", "attention_bwd", "norm_fwd", "norm_bwd"} <= set(schemas)
    for name, schema in schemas.items():
        parsed = torch._C.parse_schema(f"fastattn::{schema}")
        assert parsed.name == f"fastattn::{name}"


def test_attention_schemas_are_the_agreed_ones():
    schemas = _schemas()
    assert schemas["attention_fwd"] == (
        "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? attn_mask, "
        "float softmax_scale, bool causal, bool causal_top_left, float dropout_p, int seed, int offset, "
        "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None) "
        "-> (Tensor out, Tensor lse)")
    assert schemas["attention_bwd"] == (
        "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, Tensor? attn_mask, float softmax_scale, bool causal, "
        "bool causal_top_left, float dropout_p, int seed, int offset, bool deterministic, "
        "int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None) "
        "-> (Tensor dq, Tensor dk, Tensor dv)")


PHILOX_PROBE = """\
#include <cstdio>
#include "common/philox.cuh"
int main() {
  unsigned long long seed, offset, e;
  double p;
  while (std::scanf("%llu %llu %llu %lf", &seed, &offset, &e, &p) == 4) {
    const uint4 bits = fastattn::dropout_bits4(seed, offset, e >> 2);
    const unsigned lane = fastattn::uint4_lane(bits, static_cast<int>(e & 3));
    const unsigned threshold = fastattn::dropout_threshold(p);
    std::printf("%u %u %d\\n", lane, threshold, fastattn::dropout_keep(seed, offset, e, threshold) ? 1 : 0);
  }
  return 0;
}
"""


@requires_nvcc
def test_philox_header_matches_python_mirror(tmp_path):
    """kernels/common/philox.cuh (compiled for the host) and fastattn.cuda.philox agree bit for
    bit, including the Random123 known-answer vector and the threshold rounding."""
    src = tmp_path / "probe.cu"
    src.write_text(PHILOX_PROBE)
    exe = tmp_path / "probe"
    subprocess.run([_build.find_nvcc(), "-std=c++17", f"-I{_build.KERNELS_DIR}", str(src), "-o", str(exe)],
                   check=True, capture_output=True, timeout=600)
    gen = torch.Generator().manual_seed(5)
    cases = [(0, 0, 0, 0.0), (2**31 - 2, 2**31 - 2, 2**40 + 3, 0.5), (7, 9, 2**33 - 1, 0.999999)]
    for _ in range(200):
        seed, offset = (int(v) for v in torch.randint(0, 2**31 - 1, (2,), generator=gen))
        e = int(torch.randint(0, 2**45, (), generator=gen))
        cases.append((seed, offset, e, float(torch.rand((), generator=gen, dtype=torch.float64))))
    stdin = "".join(f"{s} {o} {e} {p!r}\n" for s, o, e, p in cases)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.split("\n")
    for (seed, offset, e, p), line in zip(cases, out):
        lane, threshold, keep = (int(v) for v in line.split())
        bits = int(philox.dropout_bits(seed, offset, torch.tensor([e]))[0])
        assert bits == lane, (seed, offset, e)
        assert threshold == philox.dropout_threshold(p), p
        assert keep == int(bits >= threshold)
    # Random123 known-answer test for Philox4x32-10 (counter = key = 0).
    zero = torch.zeros(1, dtype=torch.int64)
    assert [int(v) for v in philox.philox4x32_10([zero] * 4, (0, 0))] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# --------------------------------------------------------------------------------------------
# Availability and the just-in-time build
# --------------------------------------------------------------------------------------------
def test_arch_strings(monkeypatch):
    assert _build._arch_string(80) == "8.0" and _build._arch_string("90a") == "9.0a"
    assert _build.extension_archs([80, 90]) == "8.0;9.0"
    monkeypatch.setenv(_build.ARCH_ENV, "8.6;9.0")
    assert _build.extension_archs() == "8.6;9.0"
    with pytest.raises(ValueError, match="architecture"):
        _build._arch_string("sm_eighty")


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path))
    directory = _build.build_directory("9.0")
    assert directory.parent == tmp_path and "9.0" in directory.name and torch.__version__.split("+")[0] in directory.name


def test_load_extension_reports_the_reason_once(monkeypatch):
    monkeypatch.setattr(_build, "_state", _build._LoadState())
    monkeypatch.setattr(_build, "_toolchain_reasons", lambda: ("nvcc is not on PATH",))
    assert _build.load_extension() == "nvcc is not on PATH"
    monkeypatch.setattr(_build, "_toolchain_reasons", lambda: ())
    assert _build.load_extension() == "nvcc is not on PATH"  # decided once per process
    assert _build.extension_path() is None


def test_build_failure_becomes_the_reason(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'fastattn_C': norm.cu(3): error: oops")

    monkeypatch.setattr(_build, "_state", _build._LoadState())
    monkeypatch.setattr(_build, "_toolchain_reasons", lambda: ())
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    reason = _build.load_extension(archs=[90])
    assert reason is not None and "building the CUDA extension failed" in reason and "oops" in reason
    log = next(tmp_path.rglob("build_error.log"))
    assert "oops" in log.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given on a machine without CUDA")
def test_cuda_backend_unavailable_says_why_and_others_serve():
    import fastattn
    from fastattn.backends import get_backend, select
    from fastattn.options import NormInputs, NormOptions

    reasons = get_backend("cuda").availability_reasons()
    assert reasons and any("CPU-only" in r or "nvcc" in r or "no CUDA device" in r for r in reasons)
    status = {s.name: s for s in fastattn.backends()}
    assert not status["cuda"].available and status["cuda"].reasons
    inputs = NormInputs(x=torch.randn(2, 8))
    assert select("norm", inputs, NormOptions()).name != "cuda"
    with pytest.raises(fastattn.BackendNotSupportedError, match="cuda"):
        select("norm", inputs, NormOptions(), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the build would succeed on a GPU machine")
def test_build_command_fails_with_reason_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(_build, "_state", _build._LoadState())
    assert _build.build(check_cuda=False, archs=None, verbose=False) == 1
    assert "fastattn build:" in capsys.readouterr().err


def test_importing_the_cuda_backend_builds_nothing():
    code = textwrap.dedent("""
        import torch
        import fastattn, fastattn.cuda, fastattn.cuda.norm, fastattn._build as b
        assert b.extension_path() is None and b._state.reason is None
        assert not torch.cuda.is_initialized()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_build.REPO_ROOT, timeout=300)


@requires_cuda
def test_extension_builds_and_registers_ops():
    assert _build.load_extension() is None
    assert _build.extension_path() is not None
    for name in ("norm_fwd", "norm_bwd", "attention_fwd", "attention_bwd"):
        assert hasattr(torch.ops.fastattn, name), name


@requires_nvcc
@pytest.mark.skipif(_build.find_cuobjdump() is None, reason="needs cuobjdump (CUDA toolkit or triton's wheel)")
def test_sm90_attention_forward_uses_wgmma(kernel_reports):
    report = kernel_reports[_rel(SM90_ATTENTION_FILE)]
    assert report.ok
    sm90 = [k for k in report.kernels if k.arch == "90a"]
    assert sm90 and all(k.tensor_cores and not k.spills for k in sm90), sm90
