"""Ahead-of-time compilation of every shipped Triton attention configuration for sm_80 and
sm_90, without a GPU (fastattn.triton.aot). The compiles run in child processes without
TRITON_INTERPRET (interpreted kernels cannot be compiled), one per architecture, in parallel.

Every config is compiled for each kind of launch it serves (``KernelConfig.masked``): causal
without masks (the performance path) and/or causal with key_padding_mask, an additive
attn_mask and dropout (the heaviest masked launch). Checked for every compile: it fits the
target's shared memory and registers, it does not spill, and its dots use the expected
instructions: fp32 inputs use IEEE dots, which must not touch tensor cores; fp16/bf16 use
mma.sync on sm_80 and wgmma on sm_90 (every sm_90 tile has at least 64 rows per program, one
warpgroup's wgmma height).
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
    return [features for features, masked in (("causal", False), ("all-features", True)) if cfg.serves(masked)]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_shipped_config_compiles(reports, arch):
    names = [r["name"] for r in reports[arch]]
    assert names == [spec[0] for spec in tattn.aot_specs(arch)]
    family = tattn.SHIPPED_CONFIGS[tattn.arch_family((arch // 10, arch % 10))]
    expected = {tattn.aot_name(kernel, cfg, features)
                for kernel, configs in family.items() for cfg in configs for features in _variants(cfg)}
    assert {name for name in names if not name.startswith("bwd_preprocess")} == expected
    for r in reports[arch]:
        name = r["name"]
        assert r["arch"] == arch and r["shared_bytes"] <= aot.max_shared(arch), r
        assert r["registers"] * r["num_warps"] * 32 <= 65536, r
        assert r["spill_bytes"] == 0, f"register spills: {r}"
        if name.startswith("bwd_preprocess"):
            continue
        if " fp32 " in name:
            assert not r["uses_mma"] and not r["uses_wgmma"], f"IEEE fp32 dots must not use tensor cores: {r}"
        elif arch == 90:
            assert r["uses_wgmma"], r
        else:
            assert r["uses_mma"] and not r["uses_wgmma"], r


@pytest.mark.parametrize("arch", ARCHS)
def test_autotuner_choices_are_compiled_and_fit(arch):
    """Whatever the pruner keeps is a shipped config for that BLOCK_D (so an AOT spec compiles
    it at its largest BLOCK_D) and its shared-memory estimate fits the real limit."""
    family = tattn.arch_family((arch // 10, arch % 10))
    for kernel, configs in tattn.SHIPPED_CONFIGS[family].items():
        for head_dim in (8, 16, 40, 64, 80, 96, 128, 160, 256):
            block_d = tattn.block_d_for(head_dim)
            for elem in (2, 4):
                for dropout, mask, kpm in itertools.product((False, True), repeat=3):
                    chosen = tattn.select_configs(kernel, family, block_d, elem, aot.max_shared(arch),
                                                  dropout, mask, kpm)
                    assert chosen, (kernel, head_dim, elem, dropout, mask, kpm)
                    for cfg in chosen:
                        assert cfg in configs and block_d in cfg.block_ds and cfg.fp32 == (elem == 4)
                        assert cfg.serves(dropout or mask, kpm)
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
