"""``fastattn bench [attention|norm|ffn|model|decode|all] [--quick] [--device ...] [--out DIR]``."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import json
import os
import shlex
import signal
import sys
import time
from typing import Optional, Sequence

import torch

from fastattn.bench import report
from fastattn.bench.common import PRESETS
from fastattn.bench.env import environment, load_average
from fastattn.bench.harness import FAILED, FASTATTN, Row, TimerSettings, add_speedups
from fastattn.bench.runner import Interrupted, RunContext, Suite, run_suite
from fastattn.cli import resolve_device

SUITES = {
    "attention": "fastattn.bench.attention",
    "norm": "fastattn.bench.norm",
    "ffn": "fastattn.bench.ffn",
    "model": "fastattn.bench.model",
    "decode": "fastattn.bench.decode",
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TIMERS = {
    "smoke": TimerSettings(gpu_warmup_ms=5, gpu_rep_ms=20, cpu_min_time_s=0.01, cpu_min_reps=3, cpu_max_reps=20,
                           cpu_settle_s=0.0),
    "quick": TimerSettings(gpu_warmup_ms=10, gpu_rep_ms=50, cpu_min_time_s=0.1, cpu_min_reps=5, cpu_max_reps=100),
    "full": TimerSettings(gpu_warmup_ms=25, gpu_rep_ms=100, cpu_min_time_s=1.0, cpu_min_reps=5, cpu_max_reps=200),
}


def load_suite(op: str) -> Suite:
    return importlib.import_module(SUITES[op]).SUITE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattn bench",
        description="Benchmark fastattn's backends against naive PyTorch, torch SDPA backends, "
        "torch.compile and installed peers (flash-attn, Liger-Kernel, Apex). Every provider is "
        "checked against the float64 reference before it is timed. Writes results.json, "
        "results.csv, table.md and one PNG per op under --out.",
    )
    parser.add_argument("ops", nargs="*", default=["all"], metavar="OP", help="attention, norm, ffn, model, decode or all (default)")
    parser.add_argument("--quick", action="store_true", help="fewer, smaller sizes and shorter timing (same as --preset quick)")
    parser.add_argument("--preset", choices=PRESETS, default=None, help="sizes: smoke (tests), quick, full (default)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--out", default="fastattn-bench", help="output folder (default: ./fastattn-bench)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run; what does not fit is reported as skipped")
    parser.add_argument("--providers", default=None, help="comma-separated substrings: run only providers whose name contains one")
    parser.add_argument("--skip-providers", default=None, help="comma-separated substrings: leave out providers whose name contains one")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--report-only", action="store_true", help="redraw table.md, results.csv and plots from OUT/results.json")
    return parser


def _resolve_ops(ops: Sequence[str]) -> list[str]:
    chosen: list[str] = []
    for op in ops:
        if op == "all":
            chosen += list(SUITES)
        elif op in SUITES:
            chosen.append(op)
        else:
            raise ValueError(f"unknown benchmark {op!r}: choose from {', '.join(SUITES)} or all")
    return list(dict.fromkeys(chosen))


def _on_sigterm(signum, frame):
    raise Interrupted(f"stopped by signal {signum} (time limit)")


def _report_only(out: str, plots: bool) -> int:
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        print(f"fastattn bench: {path} does not exist", file=sys.stderr)
        return 2
    try:
        with open(path) as f:
            data = json.load(f)
        rows = report.rows_from(data)
        missing = [key for key in ("environment", "settings", "unavailable_providers") if key not in data]
        if missing:
            raise KeyError(", ".join(missing))
    except (ValueError, TypeError, KeyError) as err:  # JSONDecodeError is a ValueError
        print(f"fastattn bench: {path} is not a fastattn bench results file: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    for path in report.write_all(out, data, rows, plots=plots):
        print(f"wrote {path}")
    print(report.short_table(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks. Returns 0; 1 when a fastattn provider failed its correctness check or
    raised, or the run was interrupted (SIGTERM, Ctrl-C: what ran is still written); 2 for bad
    arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.report_only:
        return _report_only(args.out, not args.no_plots)
    try:
        ops = _resolve_ops(args.ops)
        device = resolve_device(args.device)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
    except ValueError as err:
        print(f"fastattn bench: {err}", file=sys.stderr)
        return 2
    preset = args.preset or ("quick" if args.quick else "full")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    env = environment(device)
    settings = {
        "command": "fastattn bench " + " ".join(shlex.quote(a) for a in argv),
        "ops": ops,
        "preset": preset,
        "device": str(device),
        "dtype": args.dtype or ("bfloat16" if device.type == "cuda" else "float32"),
        "seed": args.seed,
        "budget_s": args.budget,
        "timer": "triton.testing.do_bench (CUDA events, quantiles 0.2/0.5/0.8)" if device.type == "cuda" else "repeat-and-median (time.perf_counter)",
        "timer_settings": dataclasses.asdict(TIMERS[preset]),
    }
    wanted = [s.strip() for s in args.providers.split(",")] if args.providers else None
    unwanted = [s.strip() for s in args.skip_providers.split(",")] if args.skip_providers else []

    plan = []
    unavailable: list[dict] = []
    for op in ops:
        suite = load_suite(op)
        usable = []
        for provider in suite.providers(preset):
            if wanted and not any(w in provider.name for w in wanted):
                reason = f"not selected by --providers {args.providers}"
            elif any(w in provider.name for w in unwanted):
                reason = f"left out by --skip-providers {args.skip_providers}"
            else:
                reason = provider.unavailable_reason(device)
            if reason:
                unavailable.append({"op": op, "provider": provider.name, "reason": reason})
            else:
                usable.append(provider)
        plan.append((suite, suite.cases(preset, device, dtype), usable))

    os.makedirs(args.out, exist_ok=True)
    rows: list[Row] = []
    interrupted: Optional[str] = None
    json_path = os.path.join(args.out, "results.json")

    def checkpoint(new: list[Row]) -> None:
        rows.extend(new)
        report.write_json(json_path, report.payload(env, settings, unavailable, rows, "partial: run in progress"))

    from tqdm import tqdm

    total = sum(len(cases) * len(usable) for _, cases, usable in plan)
    progress = tqdm(total=total, desc="fastattn bench", unit="run", file=sys.stderr, mininterval=1.0, disable=args.no_progress)
    start = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        for index, (suite, cases, usable) in enumerate(plan):
            ctx = RunContext(device=device, device_name=env["device"], timer=TIMERS[preset], progress=progress)
            if args.budget is not None:
                # each suite gets its weight's share of the time left (time a suite leaves
                # unused goes to the later ones)
                left = args.budget - (time.monotonic() - start)
                weights = [s.budget_weight for s, _, _ in plan[index:]]
                ctx.deadline = time.monotonic() + left * weights[0] / sum(weights)
            run_suite(suite, cases, usable, ctx, on_rows=checkpoint)
    except (Interrupted, KeyboardInterrupt) as err:
        interrupted = str(err) or type(err).__name__
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()

    add_speedups(rows)
    env["load average at end"] = load_average()
    data = report.payload(env, settings, unavailable, rows, interrupted)
    for path in report.write_all(args.out, data, rows, plots=not args.no_plots):
        print(f"wrote {path}")
    for u in unavailable:
        print(f"not run: {u['op']} {u['provider']}: {u['reason']}")
    print(report.short_table(rows))
    if interrupted:
        print(f"interrupted: {interrupted}")
    counts = collections.Counter(r.status for r in rows)
    print("rows: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + f" ({len(unavailable)} providers not run)")
    failed = [r for r in rows if r.family == FASTATTN and r.status == FAILED]
    for r in failed:
        print(f"FAILED: {r.op} {r.case} {r.mode} {r.provider}: {r.reason}", file=sys.stderr)
    return 1 if failed or interrupted else 0
