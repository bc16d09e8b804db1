"""Ahead-of-time compile of every shipped Triton FFN configuration for sm_80 and sm_90.

No GPU needed: fastattn.triton.aot compiles ``fastattn.triton.ffn.aot_specs(arch)`` in a child
process without TRITON_INTERPRET. Each configuration must compile, fit in shared memory, spill
no registers, and use the tensor-core instruction of its architecture (wgmma on sm_90, mma on
sm_80) unless it is the fp32 "ieee" path, which by definition runs on the FMA units, or the
bias-gradient column sum, which has no GEMM.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from fastattn.triton import aot
from fastattn.triton import ffn as tffn

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def reports() -> dict:
    # Both architectures at once: each child compiles on its own core.
    with ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
        futures = {arch: pool.submit(aot.run_in_subprocess, "fastattn.triton.ffn", arch) for arch in ARCHS}
        return {arch: {r["name"]: r for r in fut.result()} for arch, fut in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_shipped_config_compiles_cleanly(arch, reports):
    expected = [spec[0] for spec in tffn.aot_specs(arch)]
    assert len(set(expected)) == len(expected), "duplicate AOT spec names"
    assert sorted(reports[arch]) == sorted(expected)
    problems = []
    for name, r in reports[arch].items():
        # cuobjdump reports register spills as STACK (LOCAL stays 0), so check both.
        if not r["ok"] or r["stack_bytes"] != 0:
            problems.append(f"{name}: shared {r['shared_bytes']}/{r['max_shared']}, "
                            f"spill {r['spill_bytes']}, stack {r['stack_bytes']}, regs {r['registers']}")
        tensor_cores = r["uses_wgmma"] if arch == 90 else r["uses_mma"]
        if name.startswith("db "):
            continue  # the bias-gradient column sum has no GEMM
        if "/ieee" in name:
            if r["uses_wgmma"] or r["uses_mma"]:
                problems.append(f"{name}: ieee fp32 must not use tensor cores")
        elif not tensor_cores:
            problems.append(f"{name}: no {'wgmma' if arch == 90 else 'mma'} instruction")
    assert not problems, "\n".join(problems)


_FAMILY_OF_CALL = {"fwd[gelu]": "fwd", "fwd[swiglu]": "fwd_gated", "dz[gelu]": "dz",
                   "dz[swiglu]": "dz_gated", "fwd2": "matmul", "dx": "matmul", "dw": "matmul"}


@pytest.mark.slow
def test_every_table_entry_is_checked(reports):
    """Each entry of the autotune table was compiled, for each kernel call that uses it."""
    compiled = set()
    for arch in ARCHS:
        for name in reports[arch]:
            if name.startswith("db "):
                continue
            call, dtype, tile = name.split(" ", 2)
            compiled.add((arch, 4 if dtype.startswith("fp32") else 2, _FAMILY_OF_CALL[call], tile))
    for (arch, itemsize, family) in tffn._CONFIG_TABLE:
        for config in tffn.shipped_configs(arch, itemsize, family):
            kw = config.kwargs
            tile = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
            assert (arch, itemsize, family, tile) in compiled, f"sm_{arch} {itemsize}-byte {family} {tile}"
