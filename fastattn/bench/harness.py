"""The benchmark harness: providers, cases, correctness gate, timers, memory, result rows.

One suite per op (attention, norm, ffn, model) supplies cases and providers; this module runs
every (case, provider) pair the same way:

1. build the provider's workload for the case (a forward closure and the tensors whose
   gradients backward computes);
2. check it against the float64 reference (forward output, then gradients); a mismatch marks
   the affected modes failed with the error and they are not timed;
3. per mode (forward = inference under no_grad; backward = autograd backward of a retained
   graph; forward+backward = both), measure peak memory in one untimed call, then time it:
   ``triton.testing.do_bench`` with quantiles on a GPU, a repeat-and-median timer on CPU.

A provider that raises, is not supported for the inputs, or runs out of memory becomes a row
with that status and the reason; nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import itertools
import math
import os
import statistics
import time
import warnings
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

MODES: tuple[str, ...] = ("forward", "backward", "forward+backward")
BACKWARD_MODES = frozenset({"backward", "forward+backward"})

# Provider families. "naive" is the baseline of every speedup; every provider that is not
# fastattn's own is a peer.
FASTATTN, NAIVE, TORCH, COMPILE, PEER = "fastattn", "naive", "torch", "compile", "peer"

# Row statuses.
OK, FAILED, OOM, UNSUPPORTED, SKIPPED = "ok", "failed", "oom", "unsupported", "skipped"

# Relative L2 error allowed against the float64 reference, per dtype: rounding of the inputs
# and outputs alone costs about one unit roundoff; tf32 and low-precision softmax a few more.
# A wrong kernel lands near 1.
REL_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

Outputs = Union[torch.Tensor, tuple[torch.Tensor, ...]]


class Unsupported(Exception):
    """Raised by a provider's fn factory when it cannot serve this case (reason in the message)."""


# --------------------------------------------------------------------------------------------
# Cases, problems, providers
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Problem:
    """One case's tensors on the device plus the float64 reference results.

    inputs:   the op's tensors in call order (differentiable ones have requires_grad; None
              for an absent optional tensor).
    grad_out: one gradient per forward output, in the providers' output order.
    expected_out, expected_grads: float64 reference for the forward outputs and the gradients
              of the workload's ``wrt`` tensors, compared after ``select``.
    out_names, grad_names: how mismatches name those tensors.
    select:   maps a provider's tensor to the part the reference covers (identity, or e.g.
              batch 0 and the first heads of attention, where a full float64 reference would
              not fit).
    """

    inputs: tuple[Optional[torch.Tensor], ...]
    grad_out: tuple[torch.Tensor, ...]
    expected_out: tuple[torch.Tensor, ...]
    expected_grads: tuple[Optional[torch.Tensor], ...]
    out_names: tuple[str, ...]
    grad_names: tuple[str, ...]
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def differentiable(self) -> list[torch.Tensor]:
        """The inputs that require grad, in order: what op providers differentiate."""
        return [t for t in self.inputs if t is not None and t.requires_grad]


@dataclasses.dataclass
class Workload:
    """What a provider built for one case: ``fn()`` runs the forward and returns its outputs;
    backward differentiates them with respect to ``wrt``."""

    fn: Callable[[], Outputs]
    wrt: Sequence[torch.Tensor]


def _always_available(device: torch.device) -> Optional[str]:
    return None


def _supports_all(case: Any) -> Optional[str]:
    return None


@dataclasses.dataclass(frozen=True)
class Provider:
    """One implementation to compare.

    build:        fn factory ``(case, problem) -> Workload``; may raise :class:`Unsupported`.
    availability: machine-level reason it cannot run at all (not installed, needs a GPU), or
                  None; such providers are listed once, not once per case.
    supports:     per-case reason it cannot serve this case, or None.
    skip_modes:   modes it cannot be timed in, with the reason.
    own_problem:  for a bound that computes a different function than the op (e.g. its GEMMs
                  alone): ``(case, problem) -> Problem`` with the same inputs and that
                  function's own float64 reference, so it is still checked before it is timed.
    """

    name: str
    family: str
    build: Callable[[Any, Problem], Workload]
    availability: Callable[[torch.device], Optional[str]] = _always_available
    supports: Callable[[Any], Optional[str]] = _supports_all
    skip_modes: dict = dataclasses.field(default_factory=dict)
    own_problem: Optional[Callable[[Any, Problem], Problem]] = None

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        return self.availability(device)

    def unsupported_reason(self, case: Any) -> Optional[str]:
        return self.supports(case)


def optional_module(name: str) -> tuple[Optional[ModuleType], Optional[str]]:
    """Import a third-party package if it is installed: (module, None) or (None, reason)."""
    try:
        return importlib.import_module(name), None
    except ImportError as err:
        return None, f"{name.split('.')[0]} is not installed ({err})"


def needs_cuda(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else "needs a CUDA device"


# --------------------------------------------------------------------------------------------
# Correctness gate
# --------------------------------------------------------------------------------------------
def as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_2 / ||expected||_2 in float64 (inf when actual is not finite)."""
    a = actual.detach().to(device=expected.device, dtype=torch.float64)
    if not torch.isfinite(a).all():
        return math.inf
    denom = expected.norm().item()
    diff = (a - expected).norm().item()
    return diff / denom if denom > 0 else diff


def compare(
    names: Sequence[str],
    actual: Sequence[Optional[torch.Tensor]],
    expected: Sequence[Optional[torch.Tensor]],
    select: Callable[[torch.Tensor], torch.Tensor],
    tolerance: float,
) -> tuple[float, Optional[str]]:
    """Worst relative error over the tensors, and the mismatch message (None if all pass)."""
    worst = 0.0
    for name, act, exp in zip(names, actual, expected):
        if exp is None:
            continue
        if act is None:
            act = torch.zeros_like(exp)  # an input the provider's graph does not use
        part = select(act)
        if tuple(part.shape) != tuple(exp.shape):
            return math.inf, f"{name}: shape {tuple(part.shape)} != reference {tuple(exp.shape)}"
        err = relative_error(part, exp)
        worst = max(worst, err)
        if not err <= tolerance:
            return err, f"mismatch: {name} relative error {err:.2e} > {tolerance:.0e}"
    return worst, None


# --------------------------------------------------------------------------------------------
# Modes, timers, memory
# --------------------------------------------------------------------------------------------
def mode_callable(workload: Workload, mode: str, grad_out: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """The closure timed for ``mode``. backward keeps one forward graph alive and replays the
    backward through it (retain_graph), so only the backward is timed."""
    wrt = list(workload.wrt)
    if mode == "forward":

        def run() -> None:
            with torch.no_grad():
                workload.fn()

        return run
    if mode == "backward":
        outs = as_tuple(workload.fn())

        def run() -> None:
            torch.autograd.grad(outs, wrt, grad_out, retain_graph=True, allow_unused=True)

        return run
    if mode == "forward+backward":

        def run() -> None:
            torch.autograd.grad(as_tuple(workload.fn()), wrt, grad_out, allow_unused=True)

        return run
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


@dataclasses.dataclass(frozen=True)
class TimerSettings:
    """GPU: do_bench's warmup and rep (milliseconds of running; rep grows to fit at least
    gpu_min_reps calls). CPU: seconds and counts of repeats."""

    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    gpu_min_reps: int = 10
    cpu_min_time_s: float = 0.5
    cpu_min_reps: int = 5
    cpu_max_reps: int = 200
    #: Untimed calls (at least one) before each provider's block in a round of
    #: time_cpu_interleaved: long enough for the caches and memory to settle after the others.
    cpu_settle_s: float = 0.05


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gpu(fn: Callable[[], None], settings: TimerSettings) -> Timing:
    """triton.testing.do_bench: CUDA events, L2 flushed between runs, 20/50/80% quantiles."""
    from triton.testing import do_bench  # imported here: only GPU runs need triton

    # do_bench repeats rep / (its estimate of one call) times: make rep long enough for
    # gpu_min_reps calls of a slow workload (a whole model step), so the quantiles mean something.
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    rep = max(settings.gpu_rep_ms, settings.gpu_min_reps * once_ms)
    p20, median, p80 = do_bench(fn, warmup=settings.gpu_warmup_ms, rep=rep, quantiles=[0.2, 0.5, 0.8])
    # do_bench does not return its repeat count; this is the count it derives from rep.
    reps = max(1, int(rep / max(median, 1e-6)))
    return Timing(float(median), float(p20), float(p80), reps)


def time_cpu(fn: Callable[[], None], settings: TimerSettings) -> Timing:
    """Repeat-and-median: repeat until both cpu_min_reps calls and cpu_min_time_s seconds are
    reached (at most cpu_max_reps calls); the caller has already warmed fn up."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < settings.cpu_max_reps and (
        len(samples) < settings.cpu_min_reps or time.perf_counter() - start < settings.cpu_min_time_s
    ):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), q[1], q[7], len(samples))


def time_cpu_interleaved(
    fns: dict[str, Callable[[], None]], settings: TimerSettings
) -> dict[str, Union[Timing, BaseException]]:
    """Times several providers' calls of one case and mode in cpu_min_reps rounds, each round
    giving every provider (in a rotating order) untimed calls for cpu_settle_s (at least one:
    another provider's fresh allocations leave the caches and memory system busy for a few
    calls, ~30 ms on the development machine), then a block of timed calls (cpu_min_time_s /
    rounds of them, at least one, at most cpu_max_reps / rounds). Each provider is thus timed
    in its steady state, as a block of repeats would time it, while a slow phase of the
    machine (another process, a frequency change) falls on every provider alike: their
    ratios come from the same minutes. A provider that raises leaves the rotation; its entry
    is the exception. The caller has already warmed every fn up."""
    rounds = max(1, settings.cpu_min_reps)
    block_s = settings.cpu_min_time_s / rounds
    block_max = max(1, math.ceil(settings.cpu_max_reps / rounds))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    result: dict[str, Union[Timing, BaseException]] = {}
    active = list(fns)
    for index in range(rounds):
        shift = index % len(active) if active else 0
        for name in active[shift:] + active[:shift]:
            try:
                settle = time.perf_counter()
                fns[name]()  # untimed: the provider's own data back in the caches
                while time.perf_counter() - settle < settings.cpu_settle_s:
                    fns[name]()
                start = time.perf_counter()
                while True:
                    begin = time.perf_counter()
                    fns[name]()
                    end = time.perf_counter()
                    samples[name].append((end - begin) * 1e3)
                    if end - start >= block_s or len(samples[name]) >= (index + 1) * block_max:
                        break
            except Exception as error:  # reported in the provider's row, never dropped
                result[name] = error
        active = [name for name in active if name not in result]
    for name in active:
        values = samples[name]
        q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else [values[0]] * 9
        result[name] = Timing(statistics.median(values), q[1], q[7], len(values))
    return result


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop lines written straight to file descriptor 2."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], None]) -> tuple[Optional[float], Optional[str]]:
    """Peak bytes allocated during fn above what was live before, from the profiler's
    allocation events (CPU has no allocator statistics like torch.cuda.max_memory_allocated)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type().name == "CPU"
        )
    except AttributeError as err:  # the profiler's event API differs in this torch
        return None, f"no allocation events from this torch's profiler ({err})"
    return float(max(itertools.accumulate((n for _, n in events), initial=0))), None


def peak_memory(fn: Callable[[], None], device: torch.device) -> tuple[Optional[float], Optional[str]]:
    """(peak MiB allocated during one call above the memory live before it, or None; reason)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, None
    if device.type == "cpu":
        peak, reason = _cpu_peak_bytes(fn)
        return (None if peak is None else peak / 2**20), reason
    return None, f"no memory statistics for {device.type}"


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and (
        "out of memory" in str(err).lower() or "can't allocate memory" in str(err).lower()
    )


def free_memory(device: torch.device) -> None:
    """Return freed blocks to the GPU so the next provider's peak starts clean (after each
    provider). CPU tensors are freed by reference counting already (and gc.collect after
    torch.compile is slow), but the cpu backend keeps reused buffers: they go back to the system
    after each case (its providers are timed interleaved, with fastattn's buffers kept
    meanwhile, as in a program that runs both)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    else:
        from fastattn import cpu

        cpu.release_memory()


def short_error(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(err: BaseException, caught_warnings: Sequence[warnings.WarningMessage] = ()) -> tuple[str, str]:
    """(status, reason) for an exception raised by a provider."""
    from fastattn.backends import BackendNotSupportedError

    if is_out_of_memory(err):
        return OOM, short_error(err)
    if isinstance(err, (Unsupported, BackendNotSupportedError)):
        return UNSUPPORTED, " ".join(str(err).split())
    if isinstance(err, RuntimeError) and any(s in str(err) for s in ("No available kernel", "No viable backend")):
        # torch SDPA under sdpa_kernel(one backend) found no kernel for these inputs on this
        # device; on CUDA the warnings say why.
        why = [" ".join(str(w.message).split()) for w in caught_warnings]
        return UNSUPPORTED, "; ".join([short_error(err), *why])
    return FAILED, short_error(err)


# --------------------------------------------------------------------------------------------
# Result rows
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One (case, provider, mode) measurement or the reason there is none."""

    op: str
    case: str
    variant: str
    sweep: str
    x: int
    params: dict
    dtype: str
    mode: str
    provider: str
    family: str
    status: str
    reason: str = ""
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: Optional[int] = None
    metric: str = ""
    throughput: Optional[float] = None
    peak_mem_mib: Optional[float] = None
    memory_note: str = ""
    check_error: Optional[float] = None
    speedup_vs_naive: Optional[float] = None
    speedup_vs_best_peer: Optional[float] = None
    best_peer: str = ""
    device: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_speedups(rows: Sequence[Row]) -> None:
    """speedup_vs_naive = naive median / own median for every timed row; for fastattn rows also
    speedup over the fastest peer (any provider that is not fastattn's) in the same case+mode."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.op, row.case, row.mode), []).append(row)
    for group in groups.values():
        timed = [r for r in group if r.status == OK and r.median_ms]
        naive = next((r for r in timed if r.family == NAIVE), None)
        peers = [r for r in timed if r.family != FASTATTN]
        best = min(peers, key=lambda r: r.median_ms) if peers else None
        for row in timed:
            if naive is not None:
                row.speedup_vs_naive = naive.median_ms / row.median_ms
            if row.family == FASTATTN and best is not None:
                row.speedup_vs_best_peer = best.median_ms / row.median_ms
                row.best_peer = best.provider
