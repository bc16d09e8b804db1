"""Smoke tests of the benchmark harness (``fastattn bench``) on CPU.

They check what the numbers are built from: the FLOP/byte formulas, the timer, the memory
probe, the correctness gate (a wrong provider is reported failed and never timed), error
classification, speedups, the budget, the outputs (JSON, CSV, markdown, plots) and the GPU
validation script's dry run. Sizes are the suites' "smoke" preset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fastattn.bench import attention, decode, ffn, model, norm
from fastattn.bench.cli import main
from fastattn.bench.common import INTERPRETER_REASON
from fastattn.bench.harness import (
    FAILED,
    FASTATTN,
    NAIVE,
    OK,
    OOM,
    PEER,
    SKIPPED,
    UNSUPPORTED,
    Provider,
    Row,
    TimerSettings,
    Unsupported,
    Workload,
    add_speedups,
    compare,
    peak_memory,
    relative_error,
    time_cpu,
    time_cpu_interleaved,
)
from fastattn.bench.runner import RunContext, run_suite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_formula_attention_flops(causal):
    b, h, lq, lk, d = 3, 5, 7, 11, 13
    forward = 4 * b * h * lq * lk * d / (2 if causal else 1)
    assert attention.attention_flops(b, h, lq, lk, d, causal, "forward") == forward
    assert attention.attention_flops(b, h, lq, lk, d, causal, "backward") == 2.5 * forward
    assert attention.attention_flops(b, h, lq, lk, d, causal, "forward+backward") == 3.5 * forward


def test_formula_ffn_flops_and_swiglu_width():
    assert ffn.ffn_flops(10, 4, 6, 6, 4, "forward") == 2 * 10 * 4 * 6 * 2
    assert ffn.ffn_flops(10, 4, 6, 6, 4, "forward+backward") == 3 * 2 * 10 * 4 * 6 * 2
    case = ffn.FeedForwardCase(10, 4, 6, "swiglu", torch.float32)
    assert case.d_hidden == 12
    assert ffn.work(case, "forward") == 2 * 10 * 4 * 12 + 2 * 10 * 6 * 4


def test_formula_norm_bytes():
    m, n, e = 8, 16, 2
    act, params, stats = m * n * e, 2 * n * e, 2 * m * 4
    assert norm.norm_bytes(m, n, "layer", e, "forward") == 4 * act + params + stats
    assert norm.norm_bytes(m, n, "layer", e, "backward") == 5 * act + n * e + params + stats
    rms_fwd = 4 * act + n * e + m * 4
    assert norm.norm_bytes(m, n, "rms", e, "forward") == rms_fwd
    assert model.model_tokens(3, 5, 7) == 36


def test_formula_decode_bytes():
    assert decode.cache_seqlens(4, 64) == [63, 55, 47, 39]  # from full after the step down to about half
    positions = 64 + 56 + 48 + 40  # each sequence's keys after the new token is appended
    assert decode.decode_bytes(4, 64, 2, 16, 2) == 2 * positions * 2 * 16 * 2  # K and V, Hkv=2, D=16, bf16


# --------------------------------------------------------------------------------------------
# Timer, memory, comparison
# --------------------------------------------------------------------------------------------
def test_cpu_timer_measures_the_call():
    timing = time_cpu(lambda: time.sleep(0.004), TimerSettings(cpu_min_time_s=0.0, cpu_min_reps=5, cpu_max_reps=5))
    assert timing.reps == 5
    assert 4.0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms


def test_interleaved_timer_rotates_settles_and_isolates_failures():
    order, calls = [], {"fast": 0, "slow": 0, "breaks": 0}

    def make(name, seconds, fail_after=None):
        def fn():
            calls[name] += 1
            order.append(name)
            if fail_after is not None and calls[name] > fail_after:
                raise RuntimeError("device lost")
            time.sleep(seconds)

        return fn

    settings = TimerSettings(cpu_min_time_s=0.0, cpu_min_reps=4, cpu_max_reps=40, cpu_settle_s=0.0)
    timings = time_cpu_interleaved(
        {"fast": make("fast", 0.002), "slow": make("slow", 0.004), "breaks": make("breaks", 0.001, fail_after=3)},
        settings,
    )
    assert isinstance(timings["breaks"], RuntimeError) and "device lost" in str(timings["breaks"])
    fast, slow = timings["fast"], timings["slow"]
    assert fast.reps == slow.reps == 4  # one timed call per round after one untimed call
    assert calls["fast"] == calls["slow"] == 8
    assert 2.0 <= fast.median_ms < slow.median_ms and 4.0 <= slow.median_ms
    # an untimed and a timed call each; each round starts one provider later; "breaks" raises
    # in round 1 and leaves the rotation
    rounds = [["fast", "slow", "breaks"], ["slow", "breaks", "fast"], ["fast", "slow"], ["slow", "fast"]]
    assert order == [name for names in rounds for name in names for _ in range(2)]


def test_cpu_peak_memory_sees_a_temporary():
    n = 1 << 20  # a 4 MiB float32 temporary, freed before the call returns

    def fn() -> None:
        torch.ones(n).add_(1.0).sum()

    peak, reason = peak_memory(fn, CPU)
    assert reason is None
    assert peak >= 4.0


def test_compare_flags_mismatch_and_non_finite():
    ref = torch.randn(32, dtype=torch.float64)
    ok_err, ok_msg = compare(["out"], [ref.float()], [ref], lambda t: t, 1e-3)
    assert ok_msg is None and ok_err < 1e-6
    err, msg = compare(["out"], [(ref * 1.1).float()], [ref], lambda t: t, 1e-3)
    assert "mismatch: out" in msg and err == pytest.approx(0.1, rel=1e-3)
    bad = ref.float().clone()
    bad[3] = float("nan")
    assert relative_error(bad, ref) == math.inf
    assert compare(["out"], [bad], [ref], lambda t: t, 1e-3)[1] is not None


# --------------------------------------------------------------------------------------------
# The correctness gate and error classification, through run_suite
# --------------------------------------------------------------------------------------------
def _attention_naive(case, problem):
    q, k, v = problem.inputs
    return Workload(lambda: attention.naive_attention(q, k, v, attention._causal_mask(case, q.device), case.head_dim**-0.5), (q, k, v))


def _wrong_backward(case, problem):
    q, k, v = problem.inputs

    def fn():
        out = attention.naive_attention(q, k, v, None, case.head_dim**-0.5)
        return out + (out - out.detach()) * 0.5  # right values, gradients 1.5x too large

    return Workload(fn, (q, k, v))


def _raise(error):
    def build(case, problem):
        raise error

    return build


def _run(providers, cases=None):
    suite = attention.SUITE
    cases = cases or suite.cases("smoke", CPU)[:1]
    ctx = RunContext(device=CPU, device_name="test cpu", timer=TimerSettings(cpu_min_time_s=0.0, cpu_min_reps=3, cpu_max_reps=3))
    rows = run_suite(suite, cases, providers, ctx)
    return {(r.provider, r.mode): r for r in rows}


def test_gate_times_right_providers_and_rejects_wrong_ones():
    wrong_forward = lambda case, problem: Workload(  # noqa: E731
        lambda: _attention_naive(case, problem).fn() * 1.01, problem.inputs
    )
    rows = _run(
        [
            Provider("naive", NAIVE, _attention_naive),
            Provider("wrong-fwd", PEER, wrong_forward),
            Provider("wrong-bwd", PEER, _wrong_backward),
        ]
    )
    for mode in ("forward", "backward", "forward+backward"):
        good = rows["naive", mode]
        assert good.status == OK and good.median_ms > 0 and good.throughput > 0 and good.device == "test cpu"
        assert good.check_error < 1e-5
        bad = rows["wrong-fwd", mode]
        assert bad.status == FAILED and bad.reason.startswith("mismatch: out") and bad.median_ms is None
    assert rows["wrong-bwd", "forward"].status == OK
    for mode in ("backward", "forward+backward"):
        row = rows["wrong-bwd", mode]
        assert row.status == FAILED and "mismatch: dq" in row.reason and row.median_ms is None


def test_errors_are_rows_with_reasons():
    rows = _run(
        [
            Provider("raises", PEER, _raise(ValueError("boom"))),
            Provider("oom", PEER, _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))),
            Provider("refuses", PEER, _raise(Unsupported("head_dim 16 not supported"))),
            Provider("declines", PEER, _attention_naive, supports=lambda case: "no causal"),
            Provider("no-bwd", PEER, _attention_naive, skip_modes={"backward": "cannot replay"}),
        ]
    )
    assert rows["raises", "forward"].status == FAILED and "ValueError: boom" in rows["raises", "forward"].reason
    assert rows["oom", "backward"].status == OOM and "out of memory" in rows["oom", "backward"].reason
    assert rows["refuses", "forward+backward"].status == UNSUPPORTED
    assert rows["declines", "forward"].status == UNSUPPORTED and rows["declines", "forward"].reason == "no causal"
    assert rows["no-bwd", "backward"].status == UNSUPPORTED and rows["no-bwd", "backward"].reason == "cannot replay"
    assert rows["no-bwd", "forward+backward"].status == OK


def test_a_provider_failing_while_timed_keeps_no_number():
    """A failure after the untimed calls (here: from the 4th call on, inside the timer) leaves
    a failed row with its reason and no memory or time figure from the calls before it."""

    def flaky(case, problem):
        inner, calls = _attention_naive(case, problem), []

        def fn():
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("device lost")
            return inner.fn()

        return Workload(fn, inner.wrt)

    row = _run([Provider("flaky", PEER, flaky)])["flaky", "forward"]
    assert row.status == FAILED and "device lost" in row.reason
    assert row.peak_mem_mib is None and row.median_ms is None and row.throughput is None


def test_speedups_against_naive_and_best_peer():
    def row(provider, family, ms):
        return Row("attention", "c", "v", "seqlen", 1, {}, "float32", "forward", provider, family, OK, median_ms=ms)

    rows = [row("naive", NAIVE, 8.0), row("peer", PEER, 4.0), row("ours", FASTATTN, 2.0)]
    rows.append(Row("attention", "c", "v", "seqlen", 1, {}, "float32", "forward", "broken", PEER, FAILED))
    add_speedups(rows)
    assert rows[2].speedup_vs_naive == 4.0
    assert rows[2].speedup_vs_best_peer == 2.0 and rows[2].best_peer == "peer"
    assert rows[1].speedup_vs_naive == 2.0 and rows[1].speedup_vs_best_peer is None
    assert rows[3].speedup_vs_naive is None


# --------------------------------------------------------------------------------------------
# The command: outputs, unavailable providers, budget, report-only
# --------------------------------------------------------------------------------------------
def test_command_writes_every_output(tmp_path, capsys):
    out = str(tmp_path / "bench")
    argv = ["attention", "norm", "--preset", "smoke", "--device", "cpu", "--out", out, "--no-progress"]
    argv += ["--providers", "naive,fastattn", "--skip-providers", "compile"]
    assert main(argv) == 0
    data = json.load(open(os.path.join(out, "results.json")))
    assert data["interrupted"] is None
    assert data["environment"]["device"] and data["environment"]["torch"] == torch.__version__
    rows = data["rows"]
    ops = {r["op"] for r in rows}
    assert ops == {"attention", "norm"}
    assert {r["provider"] for r in rows} == {"naive", "fastattn-cpu", "fastattn-reference"}
    assert all(r["status"] == OK and r["median_ms"] > 0 and r["device"] == data["environment"]["device"] for r in rows)
    assert all(r["peak_mem_mib"] is not None for r in rows)
    fastattn_rows = [r for r in rows if r["family"] == FASTATTN]
    assert all(r["speedup_vs_naive"] > 0 for r in fastattn_rows)
    unavailable = {(u["op"], u["provider"]): u["reason"] for u in data["unavailable_providers"]}
    assert unavailable["attention", "fastattn-triton"] == INTERPRETER_REASON  # never timed on CPU
    assert "fastattn-cuda" in {p for _, p in unavailable}
    assert unavailable["attention", "naive+compile"] == "left out by --skip-providers compile"
    assert unavailable["attention", "torch-sdpa-flash"] == "not selected by --providers naive,fastattn"
    for name in ("results.csv", "table.md", "attention.png", "norm.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    table = open(os.path.join(out, "table.md")).read()
    assert "## Summary" in table and "fastattn-triton" in table and "x naive" in table
    assert len(open(os.path.join(out, "results.csv")).read().splitlines()) == len(rows) + 1
    printed = capsys.readouterr().out
    assert "not run: attention fastattn-triton" in printed

    # redraw from results.json alone
    os.remove(os.path.join(out, "table.md"))
    assert main(["--report-only", "--out", out, "--no-plots"]) == 0
    assert "## Summary" in open(os.path.join(out, "table.md")).read()


def test_command_budget_skips_and_bad_arguments(tmp_path):
    out = str(tmp_path / "b")
    assert main(["ffn", "--preset", "smoke", "--device", "cpu", "--out", out, "--budget", "0", "--providers", "naive", "--no-progress", "--no-plots"]) == 0
    rows = json.load(open(os.path.join(out, "results.json")))["rows"]
    assert rows and all(r["status"] == SKIPPED and r["reason"] == "time budget spent" for r in rows)
    assert main(["nonsense", "--out", out]) == 2
    if not torch.cuda.is_available():
        assert main(["ffn", "--device", "cuda", "--out", out]) == 2
    assert main(["ffn", "--device", "gpu0", "--out", out]) == 2  # not a torch device name
    assert main(["ffn", "--device", "meta", "--out", out]) == 2
    assert main(["ffn", "--threads", "0", "--out", out]) == 2
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        f.write('{"rows": [{"op": "attention"}]')  # cut short: not JSON
    assert main(["--report-only", "--out", out]) == 2
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": [{"op": "attention"}]}, f)  # JSON, but not fastattn-bench rows
    assert main(["--report-only", "--out", out]) == 2


def test_model_suite_reports_missing_models(monkeypatch):
    monkeypatch.setattr(model, "_models", lambda: (None, "fastattn.models is not importable (test)"))
    for provider in model.providers("quick"):
        assert "fastattn.models is not importable (test)" in provider.unavailable_reason(CPU)


def test_model_suite_runs_fused_and_naive():
    suite = model.SUITE
    providers = [p for p in suite.providers("smoke") if p.name in ("naive", "fastattn-reference")]
    ctx = RunContext(device=CPU, device_name="cpu", timer=TimerSettings(cpu_min_time_s=0.0, cpu_min_reps=3, cpu_max_reps=3))
    case = suite.cases("smoke", CPU)[0]
    rows = run_suite(suite, [dataclasses.replace(case, modes=("forward+backward",))], providers, ctx)
    assert {r.provider: r.status for r in rows} == {"naive": OK, "fastattn-reference": OK}, [r.reason for r in rows]
    assert all(r.check_error < 1e-4 and r.throughput > 0 for r in rows)


def test_decode_suite_checks_lengths_before_timing():
    """Contiguous and paged caches: fastattn, naive and SDPA pass the float64 check and report
    bandwidth, memory and the device; a provider that reads past each sequence's length fails."""
    suite = decode.SUITE

    def length_blind(case, problem):
        def fn():
            keys, values, valid = decode._append_and_gather(case, problem)
            return decode.naive_decode(problem.inputs[0], keys, values, torch.ones_like(valid))

        return Workload(fn, ())

    providers = [p for p in suite.providers("smoke") if p.name in ("naive", "torch-sdpa", "fastattn-reference")]
    providers.append(Provider("length-blind", PEER, length_blind))
    all_cases = suite.cases("smoke", CPU)
    cases = [next(c for c in all_cases if not c.paged), next(c for c in all_cases if c.paged)]
    ctx = RunContext(device=CPU, device_name="test cpu", timer=TimerSettings(cpu_min_time_s=0.0, cpu_min_reps=3, cpu_max_reps=3))
    rows = run_suite(suite, cases, providers, ctx)
    assert {(r.case, r.mode) for r in rows} == {(c.label, "forward") for c in cases}
    for r in rows:
        if r.provider == "length-blind":
            assert r.status == FAILED and r.reason.startswith("mismatch: out") and r.median_ms is None, r
        else:
            assert r.status == OK and r.check_error < 1e-5, r
            assert r.metric == "GB/s" and r.throughput > 0 and r.peak_mem_mib is not None and r.device == "test cpu"


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_ffn_gemms_only_bound_is_checked_against_its_own_reference(activation):
    """The cuBLAS bound computes a different function than the FFN: it passes the gate against
    its own float64 reference, and a bound that computed something else would fail it."""
    suite = ffn.SUITE
    bound = next(p for p in suite.providers("smoke") if p.name == "torch-gemms-only")
    off_by_bias = dataclasses.replace(
        bound, name="bound+bias",
        build=lambda case, problem: Workload(lambda: bound.build(case, problem).fn() + problem.inputs[4], problem.differentiable),
    )
    ctx = RunContext(device=CPU, device_name="cpu", timer=TimerSettings(cpu_min_time_s=0.0, cpu_min_reps=3, cpu_max_reps=3))
    case = dataclasses.replace(suite.cases("smoke", CPU)[0], activation=activation, dtype=torch.float32)
    rows = run_suite(suite, [case], [bound, off_by_bias], ctx)
    by_name = {(r.provider, r.mode): r for r in rows}
    for mode in case.modes:
        ok = by_name[("torch-gemms-only", mode)]
        assert ok.status == OK and ok.check_error < 1e-5 and ok.throughput > 0, ok
        bad = by_name[("bound+bias", mode)]
        assert bad.status == FAILED and bad.median_ms is None and "mismatch: y" in bad.reason, bad


# --------------------------------------------------------------------------------------------
# gpu_validate.sh: the dry run exercises the stages, limits, bundling and the summary on CPU
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.skipif(os.environ.get("FASTATTN_IN_GPU_VALIDATE") == "1", reason="running inside gpu_validate.sh itself")
def test_gpu_validate_dry_run(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DRY_RUN="1", PYTHON=sys.executable, PYTHONPATH=REPO)
    done = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_validate.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert {"summary.md", "results.json", "logs.tar.gz"} <= set(files)
    summary = (out / "summary.md").read_text()
    for stage in ("install", "build", "tests", "bench"):
        assert f"| {stage} | ok |" in summary, summary
    assert done.stdout.strip().splitlines()[-1].startswith("| bench | ok |")  # the stage table is printed last
    assert "rows: 6 ok" in summary and "| B1 H2 L32 D16 non-causal | forward | naive | ok |" in summary

    # a failing stage is reported and the others still run
    env["PYTHON"] = "false"
    failed = subprocess.run(
        ["bash", os.path.join(REPO, "benchmarks", "gpu_validate.sh")],
        env=dict(env, OUT=str(tmp_path / "out2")), capture_output=True, text=True, timeout=600,
    )
    assert failed.returncode == 1
    summary = (tmp_path / "out2" / "summary.md").read_text()
    for stage in ("install", "build", "tests", "bench"):
        assert f"| {stage} | failed" in summary, summary
