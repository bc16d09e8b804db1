"""CUDA feed-forward (fastattn.cuda.ffn, csrc/ffn.cpp, kernels/ffn/).

Without a GPU: the kernels compile with nvcc for sm_80 and sm_90 (a representative subset of
the instantiations; ``fastattn build --check-cuda`` compiles all), without register spills and
with tensor-core (HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) instructions in the SASS; one
CUTLASS sm_90a translation unit compiles without spills and with wgmma (HGMMA) in the SASS, and
the CUTLASS files and the dispatcher still compile without the CUTLASS headers; the host glue
compiles against the installed torch headers; the Python-side dropout formula
matches Philox4x32-10's known answers; the backend declares what it cannot serve.

With a GPU (requires_cuda): y and every gradient against the float64 reference for each
activation, dtype, bias and odd shapes, tolerance of tests/helpers.py (kernel error <= 2 x
plain PyTorch's error in the same dtype + atol); dropout with the kernel's own mask (read back
through ffn_bwd and checked against the documented Philox formula); recompute; the unaligned
(scalar-load) path; determinism; the public function; torch.library.opcheck. On an sm_90 GPU
with CUTLASS compiled in, the aligned cases run the CUTLASS kernels and the odd shapes the
hand-written fallback; test_cutlass_and_hand_written_paths runs both on the same inputs
(FASTATTN_FFN_CUTLASS=0 forces the hand-written kernel) and asserts, through the
fastattn::ffn_cutlass_serves query, which engine serves each run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from conftest import requires_cuda
from fastattn.options import FeedForwardInputs, FeedForwardOptions, RngState
from fastattn.reference import ffn as reference
from ffn_cases import ACTIVATIONS, GRAD_NAMES, baseline, inputs64, make_inputs
from helpers import assert_close_to_reference

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
FFN_KERNELS = KERNELS / "ffn"
ARCHS = ("80", "90a")
DTYPES = [torch.float16, torch.bfloat16]

# One instantiation per layout (NT, NN, TN), the dual (swiglu) forward tile, both epilogue
# families and both dtypes; plus the non-GEMM files.
COMPILED_SUBSET = (
    "instantiations/ffn_gemm_fp16_fwd_gelu_tanh.cu",
    "instantiations/ffn_gemm_bf16_fwd_swiglu.cu",
    "instantiations/ffn_gemm_bf16_bwd_silu.cu",
    "instantiations/ffn_gemm_fp16_bwd_swiglu.cu",
    "instantiations/ffn_gemm_fp16_bias_tn.cu",
    "ffn_colsum.cu",
    "ffn_dispatch.cu",
)

# 8 warps of 256 threads: <= 128 registers lets two CTAs share an SM (64 KiB shared each).
GEMM_MAX_REGISTERS = 128


# ---------------------------------------------------------------------------------------------
# Compile checks (nvcc, no GPU)
# ---------------------------------------------------------------------------------------------
def _nvcc() -> Optional[str]:
    from fastattn import _build

    return _build.find_nvcc()


def _sass_by_arch(obj: Path, cuobjdump: str) -> dict[str, str]:
    out = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    sections: dict[str, str] = {}
    arch = None
    for line in out.stdout.splitlines():
        found = re.search(r"arch = sm_(\d+a?)", line)
        if found:
            arch = found.group(1)
            sections.setdefault(arch, "")
        elif arch is not None:
            sections[arch] += line + "\n"
    return sections


@pytest.fixture(scope="session")
def compiled_ffn(tmp_path_factory):
    """The extension's nvcc flags (fastattn._build), one call per file producing cubins for
    both archs, one nvcc at a time: relative name -> (ptxas reports, object file)."""
    from fastattn import _build

    if _nvcc() is None:
        pytest.skip("nvcc is not on PATH")
    out_dir = tmp_path_factory.mktemp("ffn_nvcc")
    results = {}
    for rel in COMPILED_SUBSET:
        obj = out_dir / (Path(rel).stem + ".o")
        cmd = _build.nvcc_check_command(FFN_KERNELS / rel, obj, ARCHS)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"nvcc failed on {rel}:\n{(proc.stdout + proc.stderr)[-4000:]}"
        results[rel] = (_build.parse_ptxas(proc.stdout + proc.stderr, rel), obj)
    return results


def test_instantiations_match_generator():
    spec = importlib.util.spec_from_file_location("ffn_generate_kernels", FFN_KERNELS / "generate_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = module.instantiations()
    on_disk = {p.name: p.read_text() for p in (FFN_KERNELS / "instantiations").glob("*.cu")}
    assert on_disk == expected, "run python kernels/ffn/generate_kernels.py"
    # Every (dtype, kind, activation) the dispatcher can reach has a file; the CUTLASS files hold
    # the plain layouts and, per activation but swiglu, the forward and backward epilogues.
    hand_written = [name for name in expected if name.startswith("ffn_gemm_")]
    cutlass = [name for name in expected if name.startswith("ffn_sm90_")]
    assert len(hand_written) == 2 * (3 + 2 * len(ACTIVATIONS))
    assert len(cutlass) == 2 * (1 + len(ACTIVATIONS) - 1) and not any("swiglu" in n for n in cutlass)
    assert len(expected) == len(hand_written) + len(cutlass)


def test_kernels_compile_without_spills(compiled_ffn):
    for rel, (reports, _) in compiled_ffn.items():
        if rel == "ffn_dispatch.cu":
            assert not reports, f"the dispatcher holds kernels: {sorted(reports)}"
            continue
        archs = {arch for _, arch in reports}
        assert archs == set(ARCHS), f"{rel}: compiled for {sorted(archs)}"
        for (kernel, arch), r in reports.items():
            assert not r.spills, f"{rel} {kernel} sm_{arch} spills: {r}"
            if "_ffn_gemm_kernel" in kernel:
                assert 0 < r.registers <= GEMM_MAX_REGISTERS, f"{rel} sm_{arch}: {r.registers} registers"


def test_gemm_sass_uses_tensor_cores(compiled_ffn):
    from fastattn import _build

    cuobjdump = _build.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (triton's wheel ships one)")
    for rel, (_, obj) in compiled_ffn.items():
        if "ffn_gemm_" not in rel:
            continue
        sass = _sass_by_arch(obj, cuobjdump)
        assert set(sass) == set(ARCHS), f"{rel}: SASS for {sorted(sass)}"
        for arch, text in sass.items():
            # 2 k-steps of 16 per BK = 32, 4 x 4 (or 4 x 2 x 2 for swiglu) m16n8k16 tiles each.
            assert len(re.findall(r"\bHMMA\.16816\.F32", text)) >= 32, f"{rel} sm_{arch}: no HMMA.16816"
            assert "LDSM" in text, f"{rel} sm_{arch}: no ldmatrix"
            assert "LDGSTS" in text, f"{rel} sm_{arch}: no cp.async"
            if "bf16" in rel:
                assert "HMMA.16816.F32.BF16" in text, f"{rel} sm_{arch}: bf16 mma missing"
            # --use_fast_math would turn tanhf into the 2^-11-accurate MUFU.TANH.
            assert "MUFU.TANH" not in text, f"{rel} sm_{arch}: approximate tanh"


# The one CUTLASS file compiled here (about 2 minutes of one core): the gelu forward epilogue
# (aux store of z) and the backward DAG (aux load of z, aux store of a_d); `fastattn build
# --check-cuda` compiles all ten.
CUTLASS_FILE = "instantiations/ffn_sm90_bf16_gelu.cu"


def _without_cutlass(cmd: list[str]) -> list[str]:
    from fastattn import _build

    return [c for c in cmd if c not in _build.cutlass_nvcc_flags()]


def test_cutlass_sm90_file_compiles_with_wgmma(tmp_path):
    from fastattn import _build

    if _nvcc() is None:
        pytest.skip("nvcc is not on PATH")
    if _build.cutlass_include_dir() is None:
        pytest.skip("CUTLASS headers not found (pip install --no-deps nvidia-cutlass, or CUTLASS_PATH)")
    obj = tmp_path / "sm90.o"
    # sm_90a only: the sm_80 image of these files is CUTLASS's error stub, never run (the
    # dispatcher checks for the sm_90a image); `fastattn build --check-cuda` builds both.
    cmd = _build.nvcc_check_command(FFN_KERNELS / CUTLASS_FILE, obj, ("90a",))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed on {CUTLASS_FILE}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    reports = _build.parse_ptxas(proc.stdout + proc.stderr, CUTLASS_FILE)
    assert len(reports) == 2 and {arch for _, arch in reports} == {"90a"}, sorted(reports)  # fwd, bwd
    for (kernel, arch), r in reports.items():
        assert not r.spills, f"{kernel} sm_{arch} spills: {r}"
    cuobjdump = _build.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (triton's wheel ships one)")
    sass = _sass_by_arch(obj, cuobjdump)
    # 128 x 256 tile, two consumer warpgroups of 64 x 256: wgmma m64n256k16 on bf16.
    assert "HGMMA.64x256x16.F32.BF16" in sass["90a"], "no wgmma in the sm_90a SASS"
    assert "UTMALDG" in sass["90a"] and "UTMASTG" in sass["90a"], "no TMA loads/stores in the sm_90a SASS"
    assert "MUFU.TANH" not in sass["90a"]


@pytest.mark.parametrize("rel", [CUTLASS_FILE, "ffn_dispatch.cu"])
def test_compiles_without_cutlass(tmp_path, rel):
    """Without the headers the CUTLASS files are empty and the dispatcher has no CUTLASS path."""
    from fastattn import _build

    if _nvcc() is None:
        pytest.skip("nvcc is not on PATH")
    obj = tmp_path / "plain.o"
    cmd = _without_cutlass(_build.nvcc_check_command(FFN_KERNELS / rel, obj, ("80",)))
    assert "-DFASTATTN_HAVE_CUTLASS" not in cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"nvcc failed on {rel} without CUTLASS:\n{(proc.stdout + proc.stderr)[-4000:]}"
    assert not _build.parse_ptxas(proc.stdout + proc.stderr, rel), f"{rel} holds kernels without CUTLASS"


def test_host_code_compiles(tmp_path):
    """csrc/ffn.cpp against the installed torch headers (syntax only: nothing links here)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    nvcc = _nvcc()
    if compiler is None or nvcc is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit headers (nvcc)")
    from torch.utils.cpp_extension import include_paths

    # Ask nvcc (possibly a wrapper script) where its toolkit headers are.
    probe = tmp_path / "probe.cu"
    probe.write_text("")
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", str(probe), "-o", str(tmp_path / "probe.o")],
                            capture_output=True, text=True, timeout=120)
    found = re.search(r'INCLUDES="-I([^"\s]+)"', dryrun.stdout + dryrun.stderr)
    cuda_include = Path(found.group(1)) if found else Path(os.path.realpath(nvcc)).parent.parent / "include"
    if not (cuda_include / "cuda_runtime_api.h").exists():
        pytest.skip(f"CUDA toolkit headers not found (looked in {cuda_include})")
    # CPU wheels of torch omit the generated c10/cuda/impl/cuda_cmake_macros.h.
    shim = tmp_path / "shim"
    (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
    (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [compiler, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror=return-type"]
    cmd += [f"-isystem{p}" for p in include_paths()]
    cmd += [f"-isystem{shim}", f"-isystem{cuda_include}", f"-I{KERNELS}", f"-I{ROOT / 'csrc'}"]
    cmd.append(str(ROOT / "csrc" / "ffn.cpp"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ffn.cpp" not in proc.stderr, f"warnings in csrc/ffn.cpp:\n{proc.stderr[-4000:]}"


# ---------------------------------------------------------------------------------------------
# Dropout formula (kernels/common/philox.cuh), in numpy
# ---------------------------------------------------------------------------------------------
_U32 = np.uint64(0xFFFFFFFF)


def _philox4x32_10(counter, key):
    """Philox4x32-10 on uint64 arrays holding 32-bit words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for _ in range(10):
        prod_a = np.uint64(0xD2511F53) * c0
        prod_b = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            ((prod_b >> np.uint64(32)) ^ c1 ^ k0) & _U32,
            prod_b & _U32,
            ((prod_a >> np.uint64(32)) ^ c3 ^ k1) & _U32,
            prod_a & _U32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & _U32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _U32
    return c0, c1, c2, c3


def _threshold(p: float) -> int:
    scaled = float(np.float32(p)) * 4294967296.0  # the kernels convert p to float first
    if scaled <= 0.0:
        return 0
    if scaled >= 4294967295.0:
        return 0xFFFFFFFF
    return int(scaled + 0.5)


def philox_keep_mask(m: int, f: int, p: float, seed: int, offset: int) -> torch.Tensor:
    """bool (m, f): element (row, col) kept iff bits[e % 4] of Philox(counter = (e // 4, offset),
    key = seed) >= threshold(p), e = row * f + col."""
    e = np.arange(m * f, dtype=np.uint64)
    group = e >> np.uint64(2)
    words = _philox4x32_10(
        (group & _U32, group >> np.uint64(32), np.full_like(e, offset & 0xFFFFFFFF), np.full_like(e, offset >> 32)),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    lane = (e & np.uint64(3)).astype(np.int64)
    bits = np.choose(lane, words)
    return torch.from_numpy((bits >= np.uint64(_threshold(p))).reshape(m, f))


def test_philox_known_answers():
    # Random123's kat_vectors for philox4x32_10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in cases:
        got = tuple(int(w) for w in _philox4x32_10(counter, key))
        assert got == expected, [hex(w) for w in got]


def test_philox_mask_rate_and_purity():
    mask = philox_keep_mask(64, 50, 0.3, seed=1234, offset=77)
    assert 0.6 < mask.float().mean().item() < 0.8
    # A pure function of (row, col) for a given F: fewer rows give the leading rows.
    assert torch.equal(philox_keep_mask(10, 50, 0.3, seed=1234, offset=77), mask[:10])
    assert not torch.equal(philox_keep_mask(64, 50, 0.3, seed=1234, offset=78), mask)
    assert philox_keep_mask(8, 8, 0.0, seed=1, offset=2).all()


# ---------------------------------------------------------------------------------------------
# Declared capabilities (no GPU)
# ---------------------------------------------------------------------------------------------
def _meta_inputs(m, d_model, d_hidden, d_ff, d_out, dtype=torch.float16) -> FeedForwardInputs:
    meta = dict(device="meta", dtype=dtype)
    return FeedForwardInputs(
        x=torch.empty(m, d_model, **meta),
        w1=torch.empty(d_hidden, d_model, **meta),
        b1=None,
        w2=torch.empty(d_out, d_ff, **meta),
        b2=None,
    )


def test_capabilities_and_reasons():
    from fastattn.cuda import ffn as cffn

    options = FeedForwardOptions(activation="gelu")
    fp32 = cffn.CAPABILITIES.not_supported_reasons(_meta_inputs(4, 8, 8, 8, 8, torch.float32), options)
    assert fp32 and "float32" in fp32[0]
    for dtype in DTYPES:
        inputs = _meta_inputs(4, 8, 8, 8, 8, dtype)
        assert cffn.CAPABILITIES.not_supported_reasons(inputs, options) == []
        assert cffn.not_supported_reasons(inputs, options) == []
    for act in ACTIVATIONS:
        assert cffn.CAPABILITIES.not_supported_reasons(
            _meta_inputs(4, 8, 8, 8, 8), FeedForwardOptions(activation=act, dropout_p=0.5, recompute=True)
        ) == []
    wide = cffn.not_supported_reasons(_meta_inputs(4, 8, 8, 8, 2**31), options)
    assert len(wide) == 1 and "d_out" in wide[0]
    assert cffn.not_supported_reasons(_meta_inputs(4, 8, 8, 8, 2**31 - 257), options) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_explicit_cuda_backend_says_why_without_gpu():
    import fastattn
    from fastattn.backends import BackendNotSupportedError

    x, w1, w2 = torch.randn(3, 8), torch.randn(8, 8), torch.randn(4, 8)
    with pytest.raises(BackendNotSupportedError, match="cuda"):
        fastattn.feed_forward(x, w1, None, w2, None, activation="relu", backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU correctness
# ---------------------------------------------------------------------------------------------
def _kernel_keep_mask(m: int, f: int, dtype, p: float, rng: RngState) -> torch.Tensor:
    """The CUDA kernels' own (m, f) keep mask, read back through ffn_bwd: with z = 1, relu
    (act = act' = 1) and dy = I (d_out = m), dw2 = dy^T @ a_d = keep / (1 - p)."""
    from fastattn.cuda import ffn as cffn

    ops = cffn._ops()
    dev = "cuda"
    x = torch.randn(m, 8, device=dev, dtype=dtype)
    w1 = torch.randn(f, 8, device=dev, dtype=dtype)
    w2 = torch.randn(m, f, device=dev, dtype=dtype)
    dy = torch.eye(m, device=dev, dtype=dtype)
    z = torch.ones(m, f, device=dev, dtype=dtype)
    _, _, _, dw2, _ = ops.ffn_bwd(dy, z, x, w1, None, w2, None, "relu", p, rng.seed, rng.offset)
    kept = dw2 != 0
    assert torch.allclose(dw2[kept].float(), torch.full_like(dw2[kept].float(), 1.0 / (1.0 - p)), rtol=1e-2)
    return kept


def _check(inputs, options, rng, keep, *, dy=None, atol_scale=1.0):
    """Kernel forward + backward vs the float64 reference, baseline = plain PyTorch."""
    from fastattn.cuda import ffn as cffn

    y, z = cffn.forward(inputs, options, rng)
    assert y.dtype == inputs.dtype and y.shape == (inputs.rows, inputs.w2.shape[0])
    if options.recompute:
        assert z is None
    else:
        assert z.shape == (inputs.rows, inputs.w1.shape[0]) and z.dtype == inputs.dtype
    if dy is None:
        dy = torch.randn_like(y)
    in64 = inputs64(inputs)
    y64, z64 = reference.forward(in64, options, rng, dropout_mask=keep)
    y_base, z_base, grads_base = baseline(inputs, options.activation, options.dropout_p, keep, dy)
    assert_close_to_reference(y, y64, y_base, "y", atol_scale)
    if z is not None:
        assert_close_to_reference(z, z64, z_base, "z", atol_scale)

    grads = cffn.backward(dy, z, inputs, options, rng)
    grads64 = reference.backward(dy.double(), None, in64, options, rng, dropout_mask=keep)
    for name in GRAD_NAMES:
        got, ref = getattr(grads, name), getattr(grads64, name)
        if ref is None:
            assert got is None, name
            continue
        assert got.dtype == inputs.dtype, name
        assert_close_to_reference(got, ref, grads_base[name], name, atol_scale)
    return y, z, grads


# (M, d_model, d_ff, d_out): single element-ish; odd M; several M/N tiles with ragged edges;
# sizes that are not multiples of 8 (scalar-load path); K spanning more tiles than stages.
SHAPES = [
    (1, 8, 8, 8),
    (37, 24, 40, 16),
    (130, 136, 200, 72),
    (67, 30, 21, 13),
    (257, 520, 136, 264),
]


@requires_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_backward(activation, dtype, shape):
    inputs = make_inputs(*shape, dtype, "cuda", activation=activation, bias=shape[0] != 37)
    options = FeedForwardOptions(activation=activation)
    _check(inputs, options, None, None)


@requires_cuda
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_many_tiles(activation):
    """9 x 5 (swiglu: 9 x 10) output tiles: the grouped tile order ends in a partial group of
    tile rows, and K = 256 runs 8 k-tiles through the 4-stage ring."""
    inputs = make_inputs(1100, 256, 640, 384, torch.bfloat16, "cuda", activation=activation)
    _check(inputs, FeedForwardOptions(activation=activation), None, None)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(45, 40, 72, 24), (96, 64, 21, 16)], ids=lambda s: "x".join(map(str, s)))
def test_dropout(activation, dtype, shape):
    p = 0.3
    rng = RngState(seed=int(torch.randint(0, 2**31 - 1, ())), offset=int(torch.randint(0, 2**31 - 1, ())))
    inputs = make_inputs(*shape, dtype, "cuda", activation=activation)
    m, f = shape[0], shape[2]
    keep = _kernel_keep_mask(m, f, dtype, p, rng)
    assert torch.equal(keep.cpu(), philox_keep_mask(m, f, p, rng.seed, rng.offset)), "mask != documented formula"
    assert 0.55 < keep.float().mean().item() < 0.85
    options = FeedForwardOptions(activation=activation, dropout_p=p)
    y, _, _ = _check(inputs, options, rng, keep)
    # Same rng, same mask: a second call reproduces y bitwise; another offset changes it.
    from fastattn.cuda import ffn as cffn

    assert torch.equal(cffn.forward(inputs, options, rng)[0], y)
    other = RngState(seed=rng.seed, offset=rng.offset + 1)
    assert not torch.equal(cffn.forward(inputs, options, other)[0], y)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_recompute_matches_saved_z(activation, dtype):
    from fastattn.cuda import ffn as cffn

    p = 0.2 if activation in ("gelu", "swiglu") else 0.0
    rng = RngState(seed=11, offset=5) if p else None
    inputs = make_inputs(70, 48, 56, 40, dtype, "cuda", activation=activation)
    keep = _kernel_keep_mask(70, 56, dtype, p, rng) if p else None
    saved = FeedForwardOptions(activation=activation, dropout_p=p)
    recompute = FeedForwardOptions(activation=activation, dropout_p=p, recompute=True)
    _check(inputs, recompute, rng, keep)
    y, z = cffn.forward(inputs, saved, rng)
    grads_s = cffn.backward(torch.ones_like(y), z, inputs, saved, rng)
    grads_r = cffn.backward(torch.ones_like(y), None, inputs, recompute, rng)
    # The recompute GEMM accumulates in the same order as the forward one: z is bitwise equal.
    for name in GRAD_NAMES:
        assert torch.equal(getattr(grads_s, name), getattr(grads_r, name)), name


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_unaligned_operands_take_scalar_path(activation, dtype, monkeypatch):
    """Row strides that are not multiples of 8 and bases off 16-byte alignment use predicated
    2-byte loads; they must give bitwise the results of the cp.async path (both hand-written:
    on sm_90 the aligned operands would otherwise run the CUTLASS kernel)."""
    from fastattn.cuda import ffn as cffn

    monkeypatch.setenv("FASTATTN_FFN_CUTLASS", "0")
    assert not cffn.cutlass_serves() and not cffn.cutlass_serves(activation=activation)
    inputs = make_inputs(50, 40, 48, 24, dtype, "cuda", activation=activation)
    options = FeedForwardOptions(activation=activation)

    def shifted(t):  # same values, base 2 bytes past a 16-byte boundary, row stride + 1
        buf = torch.zeros(t.shape[0] * (t.shape[1] + 1) + 1, device=t.device, dtype=t.dtype)
        view = buf[1:].as_strided(t.shape, (t.shape[1] + 1, 1))
        view.copy_(t)
        return view

    odd = FeedForwardInputs(shifted(inputs.x), shifted(inputs.w1), inputs.b1, shifted(inputs.w2), inputs.b2)
    assert odd.x.data_ptr() % 16 != 0 and odd.x.stride(0) % 8 != 0
    y, z = cffn.forward(inputs, options, None)
    y_odd, z_odd = cffn.forward(odd, options, None)
    assert torch.equal(y, y_odd) and torch.equal(z, z_odd)
    dy = torch.randn_like(y)
    g = cffn.backward(dy, z, inputs, options, None)
    g_odd = cffn.backward(dy, z_odd, odd, options, None)
    for name in GRAD_NAMES:
        assert torch.equal(getattr(g, name), getattr(g_odd, name)), name


def _cutlass_expected() -> bool:
    """CUTLASS must serve the current device: an sm_90 GPU, the extension built for sm_90a
    (fastattn._build's default on a 9.0 GPU) with the CUTLASS headers found."""
    from fastattn import _build

    return (
        torch.cuda.get_device_capability() == (9, 0)
        and _build.cutlass_include_dir() is not None
        and "9.0a" in (_build.extension_archs() or "")
    )


@requires_cuda
def test_cutlass_serves_query(monkeypatch):
    """fastattn::ffn_cutlass_serves through cffn.cutlass_serves: the device forms, the
    epilogue rule (swiglu and dropout stay hand-written), the environment switch, bad input."""
    from fastattn.cuda import ffn as cffn

    expected = _cutlass_expected()
    index = torch.cuda.current_device()
    for device in (None, index, f"cuda:{index}", torch.device("cuda")):
        assert cffn.cutlass_serves(device) is expected, device
    for activation in ("relu", "gelu", "gelu_tanh", "silu"):
        assert cffn.cutlass_serves(activation=activation) is expected, activation
        assert cffn.cutlass_serves(activation=activation, dropout=True) is False, activation
    assert cffn.cutlass_serves(activation="swiglu") is False
    monkeypatch.setenv("FASTATTN_FFN_CUTLASS", "0")
    assert cffn.cutlass_serves() is False and cffn.cutlass_serves(activation="relu") is False
    monkeypatch.setenv("FASTATTN_FFN_CUTLASS", "1")
    assert cffn.cutlass_serves() is expected
    with pytest.raises(RuntimeError, match="activation must be"):
        cffn.cutlass_serves(activation="tanh")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cffn.cutlass_serves(torch.cuda.device_count())
    with pytest.raises(ValueError, match="needs a CUDA device"):
        cffn.cutlass_serves("cpu")


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cutlass_and_hand_written_paths(activation, dtype, monkeypatch):
    """Aligned operands (the CUTLASS kernels on sm_90 when compiled in; swiglu's first GEMMs and
    every other GPU: hand-written) and the same inputs with FASTATTN_FFN_CUTLASS=0 (hand-written
    everywhere): both against the float64 reference, with a saved and a recomputed z, and a
    misaligned copy of the operands, which must fall back, against the reference too. The
    engine of each run is asserted through cutlass_serves."""
    from fastattn.cuda import ffn as cffn

    expected = _cutlass_expected()
    inputs = make_inputs(300, 256, 512, 136, dtype, "cuda", activation=activation)
    for recompute in (False, True):
        options = FeedForwardOptions(activation=activation, recompute=recompute)
        assert cffn.cutlass_serves() is expected
        assert cffn.cutlass_serves(activation=activation) is (expected and activation != "swiglu")
        _check(inputs, options, None, None)
        with monkeypatch.context() as env:
            env.setenv("FASTATTN_FFN_CUTLASS", "0")
            assert not cffn.cutlass_serves() and not cffn.cutlass_serves(activation=activation)
            _check(inputs, options, None, None)
    # Bases 2 bytes past a 16-byte boundary: TMA cannot load them, the dispatcher falls back.
    def shifted(t):
        buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    odd = FeedForwardInputs(shifted(inputs.x), shifted(inputs.w1), inputs.b1, shifted(inputs.w2), inputs.b2)
    assert odd.x.data_ptr() % 16 != 0
    _check(odd, FeedForwardOptions(activation=activation), None, None)


@requires_cuda
def test_backward_is_deterministic():
    from fastattn.cuda import ffn as cffn

    inputs = make_inputs(600, 64, 96, 48, torch.bfloat16, "cuda", activation="silu")
    options = FeedForwardOptions(activation="silu")
    y, z = cffn.forward(inputs, options, None)
    dy = torch.randn_like(y)
    first = cffn.backward(dy, z, inputs, options, None)
    for _ in range(3):
        again = cffn.backward(dy, z, inputs, options, None)
        for name in GRAD_NAMES:
            assert torch.equal(getattr(first, name), getattr(again, name)), name


@requires_cuda
@pytest.mark.parametrize("recompute", [False, True])
def test_public_function_autograd(recompute):
    import fastattn

    dtype = torch.float16
    x = torch.randn(2, 9, 32, device="cuda", dtype=dtype, requires_grad=True)
    w1 = (torch.randn(96, 32, device="cuda") / 32**0.5).to(dtype).requires_grad_()
    b1 = torch.randn(96, device="cuda", dtype=dtype, requires_grad=True)
    w2 = (torch.randn(24, 48, device="cuda") / 48**0.5).to(dtype).requires_grad_()
    b2 = torch.randn(24, device="cuda", dtype=dtype, requires_grad=True)
    y = fastattn.feed_forward(x, w1, b1, w2, b2, activation="swiglu", recompute=recompute, backend="cuda")
    assert y.shape == (2, 9, 24)
    dy = torch.randn_like(y)
    y.backward(dy)
    inputs = FeedForwardInputs(x.detach().reshape(-1, 32), w1.detach(), b1.detach(), w2.detach(), b2.detach())
    options = FeedForwardOptions(activation="swiglu")
    y64, _ = reference.forward(inputs64(inputs), options, None)
    y_base, _, grads_base = baseline(inputs, "swiglu", 0.0, None, dy.reshape(-1, 24))
    assert_close_to_reference(y.detach().reshape(-1, 24), y64, y_base, "y")
    grads64 = reference.backward(dy.reshape(-1, 24).double(), None, inputs64(inputs), options, None)
    for name, leaf in zip(GRAD_NAMES, (x, w1, b1, w2, b2)):
        grad = leaf.grad.reshape(-1, 32) if name == "dx" else leaf.grad
        assert_close_to_reference(grad, getattr(grads64, name), grads_base[name], name)


@requires_cuda
@pytest.mark.parametrize("activation, save_z", [("gelu_tanh", True), ("swiglu", False)])
def test_opcheck(activation, save_z):
    from fastattn.cuda import ffn as cffn

    ops = cffn._ops()
    inputs = make_inputs(33, 24, 40, 16, torch.bfloat16, "cuda", activation=activation)
    leaves = [t.clone().requires_grad_() for t in (inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2)]
    torch.library.opcheck(ops.ffn_fwd.default, (*leaves, activation, 0.25, 3, 7, save_z))
    y, z = ops.ffn_fwd(*(t.detach() for t in leaves), activation, 0.25, 3, 7, True)
    dy = torch.randn_like(y)
    z_arg = z if save_z else None
    torch.library.opcheck(
        ops.ffn_bwd.default, (dy, z_arg, inputs.x, inputs.w1, None, inputs.w2, inputs.b2, activation, 0.25, 3, 7)
    )
