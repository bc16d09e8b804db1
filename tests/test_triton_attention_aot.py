"""Ahead-of-time compilation of every shipped Triton attention configuration for sm_80 and
sm_90, without a GPU (fastattn.triton.aot). The compiles run in child processes without
TRITON_INTERPRET (interpreted kernels cannot be compiled), one per architecture, in parallel.

Checked per configuration: it compiles, its shared memory fits the target, and for fp16/bf16
on the performance path (causal, no masks, no dropout) it neither spills registers nor misses
the tensor-core instruction of its architecture: wgmma on sm_90 when the dot has at least 64
rows per program (one warpgroup's wgmma height), mma.sync otherwise and on sm_80. fp32 inputs
use IEEE dots, which must not touch tensor cores. fp32 and all-features (masks + dropout)
variants may spill; their spill bytes are written down in docs/attention_perf.md.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from fastattn.triton import aot
from fastattn.triton import attention as tattn

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def reports() -> dict[int, list[dict]]:
    with concurrent.futures.ThreadPoolExecutor(len(ARCHS)) as pool:
        futures = {arch: pool.submit(aot.run_in_subprocess, "fastattn.triton.attention", arch) for arch in ARCHS}
        return {arch: future.result() for arch, future in futures.items()}


def _dot_rows(name: str) -> int:
    """Rows of the first dot of a spec: BLOCK_M for fwd/dq, BLOCK_N (keys) for dK/dV."""
    fields = dict((f[0], f[1:]) for f in name.split() if f[0] in "MN" and f[1:].isdigit())
    return int(fields["N" if name.startswith("dkdv") else "M"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_shipped_config_compiles(reports, arch):
    names = [r["name"] for r in reports[arch]]
    assert names == [spec[0] for spec in tattn.aot_specs(arch)]
    shipped = {name for name in names if " causal " in name and not name.startswith("bwd_preprocess")}
    family = tattn.SHIPPED_CONFIGS[tattn.arch_family((arch // 10, arch % 10))]
    assert len(shipped) == sum(len(configs) for configs in family.values())
    for r in reports[arch]:
        name = r["name"]
        assert r["arch"] == arch and r["shared_bytes"] <= aot.max_shared(arch), r
        assert r["registers"] * r["num_warps"] * 32 <= 65536, r
        if name.startswith("bwd_preprocess"):
            assert r["ok"], r
            continue
        if " fp32 " in name:
            assert not r["uses_mma"] and not r["uses_wgmma"], f"IEEE fp32 dots must not use tensor cores: {r}"
            continue
        if " causal " in name:
            assert r["spill_bytes"] == 0, f"register spills on the performance path: {r}"
        if arch == 90 and _dot_rows(name) >= 64:
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
                for dropout in (False, True):
                    chosen = tattn.select_configs(kernel, family, block_d, elem, aot.max_shared(arch), dropout)
                    assert chosen, (kernel, head_dim, elem, dropout)
                    for cfg in chosen:
                        assert cfg in configs and block_d in cfg.block_ds and cfg.fp32 == (elem == 4)
                        assert cfg.shared_bytes_estimate(kernel, block_d, elem) <= aot.max_shared(arch)


def test_shared_estimate_tracks_the_compiled_kernels(reports):
    """The pruner's estimate is within 8 KiB of (and never far below) what ptxas allocated."""
    for arch in ARCHS:
        family = tattn.SHIPPED_CONFIGS[tattn.arch_family((arch // 10, arch % 10))]
        by_name = {r["name"]: r for r in reports[arch]}
        for kernel, configs in family.items():
            for cfg in configs:
                block_d = max(cfg.block_ds)
                dtype = "fp32" if cfg.fp32 else "bf16"
                name = (f"{kernel} {dtype} D{block_d} causal M{cfg.block_m} N{cfg.block_n} "
                        f"w{cfg.num_warps} s{cfg.num_stages}")
                actual = by_name[name]["shared_bytes"]
                estimate = cfg.shared_bytes_estimate(kernel, block_d, 4 if cfg.fp32 else 2)
                assert actual - 8192 <= estimate, (name, estimate, actual)
