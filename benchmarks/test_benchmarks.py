"""pytest-benchmark entry: a small, fast subset of the suites.

    pytest benchmarks/ --benchmark-only

Each benchmark first checks the provider against the float64 reference (a mismatch fails the
test, it is never timed), then times one mode with pytest-benchmark. Sizes are the suites'
"smoke" preset, so this runs in seconds on CPU; the fastattn provider is the triton backend
on a GPU and the reference backend on CPU (where triton would mean the interpreter). CI
checks that this runs, never the timings.
"""

import pytest
import torch

from fastattn.bench.cli import load_suite
from fastattn.bench.env import device_name
from fastattn.bench.harness import REL_TOLERANCE, mode_callable, synchronize
from fastattn.bench.runner import verify


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _provider(suite, name: str, device: torch.device):
    if name == "fastattn":
        name = "fastattn-triton" if device.type == "cuda" else "fastattn-reference"
    provider = next(p for p in suite.providers("smoke") if p.name == name)
    reason = provider.unavailable_reason(device)
    if reason:
        pytest.skip(f"{name}: {reason}")
    return provider


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("provider_name", ["fastattn", "naive"])
@pytest.mark.parametrize("op", ["attention", "norm", "ffn", "model"])
def test_benchmark(benchmark, op, provider_name, mode, device):
    suite = load_suite(op)
    case = suite.cases("smoke", device, None)[0]
    provider = _provider(suite, provider_name, device)
    problem = suite.make_problem(case, device)
    workload = provider.build(case, problem)
    check = verify(problem, workload, mode != "forward", REL_TOLERANCE[case.dtype] * suite.tolerance_scale)
    assert check.out_mismatch is None and check.grad_mismatch is None, check

    run = mode_callable(workload, mode, problem.grad_out)

    def timed() -> None:
        run()
        synchronize(device)

    benchmark.extra_info.update(
        {"case": case.label, "provider": provider.name, "mode": mode, "device": str(device), "device_name": device_name(device)}
    )
    benchmark.pedantic(timed, rounds=5, warmup_rounds=1)
