"""Ahead-of-time compilation of every shipped Triton attention configuration for sm_80 and
sm_90, without a GPU (fastattn.triton.aot). The compiles run in child processes without
TRITON_INTERPRET (interpreted kernels cannot be compiled), one per architecture, in parallel.

Every config is compiled for each kind of launch it serves (``KernelConfig.masked``): causal
without masks (the performance path) and causal with a left window edge and cu_seqlens, and/or
everything at once (key_padding_mask, additive attn_mask, dropout, window, softcap, ALiBi,
cu_seqlens: the heaviest masked launch). The KV-cache kernel is compiled for every shipped
row block, paged and contiguous, with every flag on. Checked for every compile: it fits the
target's shared memory and registers, it does not spill, and its dots use the expected
instructions: fp32 inputs use IEEE dots, which must not touch tensor cores; fp16/bf16 use
mma.sync on sm_80 and wgmma on sm_90 (every sm_90 attention tile has at least 64 rows per
program, one warpgroup's wgmma height). The KV-cache kernel packs Lq x group rows, often fewer
than 64: its 16- and 32-row blocks use mma.sync on sm_90 too (wgmma needs 64 rows), its
64-row blocks wgmma.
"""

from __future__ import annotations

import concurrent.futures
import itertools

import pytest

from fastattn.triton import aot
from fastattn.triton import attention as tattn

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def reports() -> dict[int, list[dict]]:
    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        futures = {arch: pool.submit(aot.run_in_subprocess, "fastattn.triton.attention", arch) for arch in ARCHS}
        return {arch: future.result() for arch, future in futures.items()}


def _variants(cfg):
    """The AOT variants of a config: the kinds of launch it serves."""
    kinds = (("causal", False, False), ("window-varlen", False, True), ("all-features", True, True))
    return [features for features, masked, window in kinds if cfg.serves(masked, window=window)]


def _decode_expected(arch):
    family = tattn.arch_family((arch // 10, arch % 10))
    return {tattn.decode_aot_name(tattn.decode_config(family, block_m, block_d, fp32), fp32, block_d, layout)
            for fp32 in (False, True) for block_d in tattn.DECODE_AOT_BLOCK_DS
            for block_m in tattn.decode_block_ms(family, block_d, fp32) for layout in ("paged", "contiguous")}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_shipped_config_compiles(reports, arch):
    names = [r["name"] for r in reports[arch]]
    assert names == [spec[0] for spec in tattn.aot_specs(arch)]
    family = tattn.SHIPPED_CONFIGS[tattn.arch_family((arch // 10, arch % 10))]
    expected = {tattn.aot_name(kernel, cfg, features)
                for kernel, configs in family.items() for cfg in configs for features in _variants(cfg)}
    assert {name for name in names if not name.startswith(("bwd_preprocess", "decode"))} == expected
    assert {name for name in names if name.startswith("decode ")} == _decode_expected(arch)
    assert "decode_combine bf16 D256" in names
    for r in reports[arch]:
        name = r["name"]
        assert r["arch"] == arch and r["shared_bytes"] <= aot.max_shared(arch), r
        assert r["registers"] * r["num_warps"] * 32 <= 65536, r
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        if name.startswith(("bwd_preprocess", "decode_combine")):
            continue  # no dots
        if " fp32 " in name:
            assert not r["uses_mma"] and not r["uses_wgmma"], f"IEEE fp32 dots must not use tensor cores: {r}"
        elif arch == 90 and not (name.startswith("decode ") and " M64 " not in name):
            assert r["uses_wgmma"], r
        else:
            assert r["uses_mma"] and not r["uses_wgmma"], r


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kvcache_launch_has_a_compiled_config(arch):
    """Whatever decode_config picks (any packed row count, head dim, dtype class) was
    compiled by an AOT spec at a BLOCK_D at least as large, with the same block shape."""
    family = tattn.arch_family((arch // 10, arch % 10))
    compiled = _decode_expected(arch)
    for fp32 in (False, True):
        for head_dim in (8, 40, 64, 80, 128, 160, 256):
            block_d = tattn.block_d_for(head_dim)
            aot_d = min(d for d in tattn.DECODE_AOT_BLOCK_DS if d >= block_d)
            for rows in (1, 2, 3, 8, 16, 17, 40, 64, 128, 512):
                cfg = tattn.decode_config(family, rows, block_d, fp32)
                assert cfg == tattn.decode_config(family, rows, aot_d, fp32)
                assert tattn.decode_aot_name(cfg, fp32, aot_d, "paged") in compiled, (fp32, head_dim, rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_autotuner_choices_are_compiled_and_fit(arch):
    """Whatever the pruner keeps is a shipped config for that BLOCK_D (so an AOT spec compiles
    it at its largest BLOCK_D) and its shared-memory estimate fits the real limit."""
    family = tattn.arch_family((arch // 10, arch % 10))
    for kernel, configs in tattn.SHIPPED_CONFIGS[family].items():
        for head_dim in (8, 16, 40, 64, 80, 96, 128, 160, 256):
            block_d = tattn.block_d_for(head_dim)
            for elem in (2, 4):
                for dropout, mask, kpm, window in itertools.product((False, True), repeat=4):
                    chosen = tattn.select_configs(kernel, family, block_d, elem, aot.max_shared(arch),
                                                  dropout, mask, kpm, window)
                    assert chosen, (kernel, head_dim, elem, dropout, mask, kpm, window)
                    for cfg in chosen:
                        assert cfg in configs and block_d in cfg.block_ds and cfg.fp32 == (elem == 4)
                        assert cfg.serves(dropout or mask, kpm, window)
                        assert cfg.shared_bytes_estimate(kernel, block_d, elem) <= aot.max_shared(arch)


def test_shared_estimate_tracks_the_compiled_kernels(reports):
    """The pruner's estimate is within 8 KiB of (and never far below) what ptxas allocated."""
    for arch in ARCHS:
        family = tattn.SHIPPED_CONFIGS[tattn.arch_family((arch // 10, arch % 10))]
        by_name = {r["name"]: r for r in reports[arch]}
        for kernel, configs in family.items():
            for cfg in configs:
                estimate = cfg.shared_bytes_estimate(kernel, max(cfg.block_ds), 4 if cfg.fp32 else 2)
                for features in _variants(cfg):
                    name = tattn.aot_name(kernel, cfg, features)
                    actual = by_name[name]["shared_bytes"]
                    assert actual - 8192 <= estimate, (name, estimate, actual)
