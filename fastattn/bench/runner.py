"""Run one suite: every case against every provider, in every mode, into result rows."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from fastattn.bench.harness import (
    BACKWARD_MODES,
    FAILED,
    OK,
    REL_TOLERANCE,
    SKIPPED,
    UNSUPPORTED,
    Problem,
    Provider,
    Row,
    TimerSettings,
    Timing,
    Workload,
    as_tuple,
    classify,
    compare,
    free_memory,
    mode_callable,
    peak_memory,
    time_cpu,
    time_cpu_interleaved,
    time_gpu,
)

#: Divisor turning a suite's work per second into its metric's unit.
METRIC_UNITS = {"TFLOP/s": 1e12, "GB/s": 1e9, "tokens/s": 1.0}


@dataclasses.dataclass(frozen=True)
class Suite:
    """One benchmark module.

    cases(preset, device, dtype) -> cases; each case has ``label``, ``variant`` (the flags that
    make separate plot lines, e.g. "causal"), ``x`` (the swept size), ``params`` (dict),
    ``dtype`` and ``modes``.
    providers(preset) -> every provider, installed or not (availability is checked per machine).
    make_problem(case, device) -> Problem with the float64 reference.
    work(case, mode) -> FLOPs, bytes or tokens of one call, per the suite's metric.
    """

    op: str
    sweep: str
    metric: str
    cases: Callable[[str, torch.device, Optional[torch.dtype]], list]
    providers: Callable[[str], list[Provider]]
    make_problem: Callable[[Any, torch.device], Problem]
    work: Callable[[Any, str], float]
    tolerance_scale: float = 1.0
    #: share of a --budget this suite gets, relative to the other suites run
    budget_weight: float = 1.0


class Interrupted(BaseException):
    """Raised by the SIGTERM handler; a BaseException so provider error capture lets it through."""


@dataclasses.dataclass
class RunContext:
    device: torch.device
    device_name: str
    timer: TimerSettings
    deadline: float = float("inf")
    progress: Any = None  # a tqdm bar, or None

    def time(self, fn: Callable[[], None]) -> Timing:
        return time_gpu(fn, self.timer) if self.device.type == "cuda" else time_cpu(fn, self.timer)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _rows_for(suite: Suite, case: Any, provider: Provider, ctx: RunContext) -> dict[str, Row]:
    return {
        mode: Row(
            op=suite.op,
            case=case.label,
            variant=case.variant,
            sweep=suite.sweep,
            x=case.x,
            params=dict(case.params),
            dtype=_dtype_name(case.dtype),
            mode=mode,
            provider=provider.name,
            family=provider.family,
            status=OK,
            metric=suite.metric,
            device=ctx.device_name,
        )
        for mode in case.modes
    }


def _mark(rows: dict[str, Row], modes: Sequence[str], status: str, reason: str) -> None:
    for mode in modes:
        rows[mode].status, rows[mode].reason = status, reason


def _clear_measurements(row: Row) -> None:
    row.median_ms = row.p20_ms = row.p80_ms = row.reps = row.throughput = row.peak_mem_mib = None
    row.memory_note = ""


def _fail(row: Row, error: BaseException, caught: Sequence[warnings.WarningMessage]) -> None:
    """A failure while measuring: the reason, without the figures of the calls before it."""
    _clear_measurements(row)
    row.status, row.reason = classify(error, caught)


@dataclasses.dataclass(frozen=True)
class Check:
    out_error: float
    out_mismatch: Optional[str]
    grad_error: Optional[float] = None  # worst over outputs and gradients
    grad_mismatch: Optional[str] = None


def verify(problem: Problem, workload: Workload, grads: bool, tolerance: float) -> Check:
    """Run the workload's forward (and backward when ``grads``) once and compare with the
    float64 reference; the gradients are not checked when the forward already mismatches."""
    outs = as_tuple(workload.fn())
    err, mismatch = compare(problem.out_names, outs, problem.expected_out, problem.select, tolerance)
    if mismatch or not grads:
        return Check(err, mismatch)
    computed = torch.autograd.grad(outs, list(workload.wrt), problem.grad_out, allow_unused=True)
    gerr, gmismatch = compare(problem.grad_names, computed, problem.expected_grads, problem.select, tolerance)
    return Check(err, None, max(err, gerr), gmismatch)


def check_provider(suite: Suite, case: Any, problem: Problem, provider: Provider, ctx: RunContext):
    """Build one provider on one case and check it against the float64 reference once. Returns
    its rows (those that cannot be timed marked with the reason), the workload (None when no
    mode passed) and the problem it was checked against (its own, for a bound like
    torch-gemms-only)."""
    rows = _rows_for(suite, case, provider, ctx)
    reason = provider.unsupported_reason(case)
    if reason:
        _mark(rows, case.modes, UNSUPPORTED, reason)
        return rows, None, problem
    for mode, why in provider.skip_modes.items():
        if mode in rows:
            _mark(rows, [mode], UNSUPPORTED, why)
    tolerance = REL_TOLERANCE[case.dtype] * suite.tolerance_scale
    backward_modes = [m for m in case.modes if m in BACKWARD_MODES]
    workload = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if provider.own_problem is not None:
                problem = provider.own_problem(case, problem)
            workload = provider.build(case, problem)
            check = verify(problem, workload, bool(backward_modes), tolerance)
            for mode, row in rows.items():
                row.check_error = check.grad_error if mode in BACKWARD_MODES and check.grad_error is not None else check.out_error
            if check.out_mismatch:
                _mark(rows, case.modes, FAILED, check.out_mismatch)
            elif check.grad_mismatch:
                _mark(rows, backward_modes, FAILED, check.grad_mismatch)
        except Exception as error:  # reported in every row of this provider, never dropped
            _mark(rows, case.modes, *classify(error, caught))
    if workload is not None and all(r.status != OK for r in rows.values()):
        workload = None
    return rows, workload, problem


def _prepare(workload: Workload, mode: str, problem: Problem, row: Row, ctx: RunContext) -> Optional[Callable[[], None]]:
    """The timed closure of one mode, warmed up (compilation and autotuning stay out of memory
    and time), with its peak memory recorded in the row; None, with the row marked, when it
    fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run = mode_callable(workload, mode, problem.grad_out)
            run()
            row.peak_mem_mib, note = peak_memory(run, ctx.device)
            row.memory_note = note or ""
            return run
        except Exception as error:  # reported in the row, without the figures of the calls before it
            _fail(row, error, caught)
            return None


def _record(row: Row, timing: Timing, suite: Suite, case: Any) -> None:
    row.median_ms, row.p20_ms, row.p80_ms, row.reps = timing.median_ms, timing.p20_ms, timing.p80_ms, timing.reps
    row.throughput = suite.work(case, row.mode) / (timing.median_ms * 1e-3) / METRIC_UNITS[suite.metric]


def run_provider(suite: Suite, case: Any, problem: Problem, provider: Provider, ctx: RunContext) -> list[Row]:
    """Check one provider on one case, then measure each mode that passed the check, one mode
    after the other (GPU runs: do_bench per provider)."""
    rows, workload, problem = check_provider(suite, case, problem, provider, ctx)
    if workload is None:
        free_memory(ctx.device)
        return list(rows.values())
    for mode, row in rows.items():
        if row.status != OK:
            continue
        if time.monotonic() > ctx.deadline:
            _mark(rows, [mode], SKIPPED, "time budget spent")
            continue
        run = _prepare(workload, mode, problem, row, ctx)
        if run is None:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                _record(row, ctx.time(run), suite, case)
            except Exception as error:  # reported in the row, without the figures of the calls before it
                _fail(row, error, caught)
            finally:
                del run
    del workload
    free_memory(ctx.device)
    return list(rows.values())


def run_case_interleaved(suite: Suite, case: Any, problem: Problem, providers: Sequence[Provider],
                         ctx: RunContext) -> list[list[Row]]:
    """CPU runs: check every provider on the case, then per mode warm each up and measure its
    peak memory, then time them together in interleaved rounds (harness.time_cpu_interleaved).
    Returns each provider's rows, in the providers' order."""
    checked = []
    for provider in providers:
        if ctx.progress is not None:
            ctx.progress.set_postfix_str(f"{suite.op} {case.label} {provider.name}"[:60])
        if time.monotonic() > ctx.deadline:
            rows = _rows_for(suite, case, provider, ctx)
            _mark(rows, case.modes, SKIPPED, "time budget spent")
            checked.append((rows, None, problem))
        else:
            checked.append(check_provider(suite, case, problem, provider, ctx))
    for mode in case.modes:
        runs: dict[int, Callable[[], None]] = {}
        for index, (rows, workload, own_problem) in enumerate(checked):
            if workload is None or rows[mode].status != OK:
                continue
            if time.monotonic() > ctx.deadline:
                _mark(rows, [mode], SKIPPED, "time budget spent")
                continue
            run = _prepare(workload, mode, own_problem, rows[mode], ctx)
            if run is not None:
                runs[index] = run
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            timings = time_cpu_interleaved({str(i): run for i, run in runs.items()}, ctx.timer)
        for index in runs:
            row, timing = checked[index][0][mode], timings[str(index)]
            if isinstance(timing, BaseException):
                _fail(row, timing, caught)
            else:
                _record(row, timing, suite, case)
        del runs
    result = [list(rows.values()) for rows, _, _ in checked]
    del checked
    free_memory(ctx.device)
    return result


def _run_case_sequential(suite: Suite, case: Any, problem: Optional[Problem],
                         problem_error: Optional[tuple[str, str]], providers: Sequence[Provider], ctx: RunContext):
    """GPU runs (and cases without inputs): each provider's rows, one provider after the other."""
    for provider in providers:
        if ctx.progress is not None:
            ctx.progress.set_postfix_str(f"{suite.op} {case.label} {provider.name}"[:60])
        if problem is None or time.monotonic() > ctx.deadline:
            case_rows = _rows_for(suite, case, provider, ctx)
            _mark(case_rows, case.modes, *((problem is None and problem_error) or (SKIPPED, "time budget spent")))
            yield list(case_rows.values())
        else:
            yield run_provider(suite, case, problem, provider, ctx)


def run_suite(
    suite: Suite,
    cases: Sequence[Any],
    providers: Sequence[Provider],
    ctx: RunContext,
    on_rows: Callable[[list[Row]], None] = lambda rows: None,
) -> list[Row]:
    """Every case x provider; ``providers`` are those available on this machine."""
    rows: list[Row] = []
    if not providers:
        return rows
    for case in cases:
        problem: Optional[Problem] = None
        problem_error: Optional[tuple[str, str]] = None
        if time.monotonic() <= ctx.deadline:
            try:
                problem = suite.make_problem(case, ctx.device)
            except Exception as error:  # the reference itself failed (e.g. out of memory): every row says so
                status, reason = classify(error)
                problem_error = (FAILED if status == OK else status, f"inputs/reference: {reason}")
            free_memory(ctx.device)
        if problem is not None and ctx.device.type == "cpu" and time.monotonic() <= ctx.deadline:
            per_provider = run_case_interleaved(suite, case, problem, providers, ctx)
        else:
            per_provider = _run_case_sequential(suite, case, problem, problem_error, providers, ctx)
        for new in per_provider:
            rows.extend(new)
            on_rows(new)
            if ctx.progress is not None:
                ctx.progress.update(1)
        del problem, per_provider
        free_memory(ctx.device)
    return rows
