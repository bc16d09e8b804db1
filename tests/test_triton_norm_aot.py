"""Ahead-of-time compilation for sm_80 / sm_90 without a GPU (fastattn.triton.aot), on tiny
kernels (including one that must be reported as spilling) and on every configuration the norm
launchers ship. The compiles run in a child process without TRITON_INTERPRET."""

from __future__ import annotations

import textwrap
import types

import pytest

from fastattn.backends import triton_interpret_enabled
from fastattn.triton import aot
from fastattn.triton import norm as tnorm

TINY_MODULE = textwrap.dedent(
    '''
    import triton
    import triton.language as tl


    @triton.jit
    def scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * alpha, mask=i < n)


    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        offs = r[:, None] * BLOCK + r[None, :]
        tl.store(c_ptr + offs, tl.dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs)))


    @triton.jit
    def hold_row_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # The whole row stays live across the reduction: BLOCK / 32 values per thread of 1 warp.
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i)
        tl.store(y_ptr + i, x * tl.sum(x * x, axis=0))


    def aot_specs(arch):
        yield ("scale", scale_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "alpha": "fp32"},
               {"BLOCK": 1024}, 4, 1)
        yield ("dot", dot_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"}, {"BLOCK": 64}, 4, 1)
        yield ("spills", hold_row_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"}, {"BLOCK": 8192}, 1, 1)
    '''
)


@pytest.fixture
def tiny_module(tmp_path, monkeypatch):
    (tmp_path / "fastattn_aot_tiny.py").write_text(TINY_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "fastattn_aot_tiny"


def test_tiny_kernels(tiny_module):
    all_reports = aot.run_in_subprocess(tiny_module, [80, 90])
    assert [(r["arch"], r["name"]) for r in all_reports] == [
        (a, n) for a in (80, 90) for n in ("scale", "dot", "spills")
    ]
    for arch in (80, 90):
        _check_tiny({r["name"]: r for r in all_reports if r["arch"] == arch}, arch)


def _check_tiny(reports, arch):
    for report in reports.values():
        assert report["arch"] == arch and report["max_shared"] == aot.max_shared(arch)
        assert report["registers"] > 0
    scale, dot, spills = reports["scale"], reports["dot"], reports["spills"]
    assert scale["ok"] and scale["spill_bytes"] == 0
    assert not scale["uses_mma"] and not scale["uses_wgmma"]
    assert dot["ok"] and dot["shared_bytes"] > 0
    # sm_80 lowers tl.dot to mma.sync, sm_90 to wgmma.
    assert dot["uses_mma"] == (arch == 80) and dot["uses_wgmma"] == (arch == 90)
    assert spills["spill_bytes"] > 0 and not spills["ok"]


def test_failing_module_reports_the_error(tmp_path, monkeypatch):
    (tmp_path / "fastattn_aot_broken.py").write_text(
        TINY_MODULE.replace('{"BLOCK": 1024}, 4, 1)', '{"BLOCK": 1024, "nope": 1}, 4, 1)')
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="unknown arguments"):
        aot.run_in_subprocess("fastattn_aot_broken", 80)


def test_signature_checks():
    fn = types.SimpleNamespace(__name__="k", arg_names=["a", "n", "BLOCK"])
    assert aot._full_signature(fn, {"a": "*fp32", "n": "i32"}, {"BLOCK": 8}) == {
        "a": "*fp32", "n": "i32", "BLOCK": "constexpr"
    }
    with pytest.raises(ValueError, match="missing"):
        aot._full_signature(fn, {"a": "*fp32"}, {"BLOCK": 8})
    with pytest.raises(ValueError, match="both"):
        aot._full_signature(fn, {"a": "*fp32", "n": "i32", "BLOCK": "i32"}, {"BLOCK": 8})


def test_max_shared():
    assert aot.max_shared(80) == 166912 and aot.max_shared(90) == 232448
    with pytest.raises(ValueError):
        aot.max_shared(75)


def test_in_process_compile_of_interpreted_kernel_is_refused():
    if not triton_interpret_enabled():
        result = aot.compile_for_target(
            tnorm._dropout_mask_kernel,
            {"KEEP": "*i8", "M": "i32", "N": "i32", "dropout_p": "fp32", "seed": "i32", "offset": "i32"},
            {"BLOCK_M": 16, "BLOCK_N": 256},
            arch=90, num_warps=4, num_stages=1,
        )
        assert result.ok and result.ptx
        return
    with pytest.raises(TypeError, match="TRITON_INTERPRET"):
        aot.compile_for_target(tnorm._dropout_mask_kernel, {}, {}, arch=90, num_warps=4, num_stages=1)


def test_launcher_configs_are_all_shipped():
    """Every configuration the launchers can choose appears in aot_specs with its blocks."""
    specs = {}
    for name, _kernel, _sig, constexprs, warps, _stages, _div in tnorm.aot_specs(90):
        specs[name] = (constexprs.get("BLOCK_M", 1), constexprs["BLOCK_N"], warps, constexprs.get("HAS_DROPOUT"))
    assert sum("ints=1" in name for name in specs) == 6  # every kernel with its integers constant
    sizes = list(range(1, 70)) + [2**k + d for k in range(6, 17) for d in (-1, 0, 1)] + [1000, 3000, 12000]
    chosen = set()
    for n in sizes:
        for has_dropout in (False, True):
            for cfg in (tnorm._fwd_config(n, has_dropout), tnorm._bwd_config(n)):
                assert cfg.name in specs, (n, cfg)
                block_m, block_n, warps, spec_dropout = specs[cfg.name]
                assert (block_m, block_n, warps) == (cfg.block_m, cfg.block_n, cfg.num_warps), (n, cfg)
                # A config compiled without dropout must never be launched with it.
                assert spec_dropout or not has_dropout, (n, cfg)
                chosen.add(cfg.name)
    assert chosen == {n for n in specs if n not in ("sum_partials", "dropout_mask") and "ints=1" not in n}


def test_norm_shipped_configs():
    reports = aot.run_in_subprocess("fastattn.triton.norm", [80, 90])
    for arch in (80, 90):
        names = [r["name"] for r in reports if r["arch"] == arch]
        assert names == [spec[0] for spec in tnorm.aot_specs(arch)]
    bad = [r for r in reports if not r["ok"]]
    assert not bad, bad
    for r in reports:
        assert r["registers"] * r["num_warps"] * 32 <= 65536, r
        assert not r["uses_mma"] and not r["uses_wgmma"], r
