"""The cpu backend's norm and FFN targets of issue 10, fwd+bwd fp32 wall time:

- add+LayerNorm M4096 N1024 (prenorm: y and h): ``fastattn-cpu`` vs naive (``x + res`` then
  ``F.layer_norm``, autograd) and ``torch.compile`` of it; targets 2x and 1.5x.
- FFN M2048 d512 F2048 gelu: vs naive (Linear-GELU-Linear) and the two GEMMs alone
  (``torch-gemms-only`` of fastattn/bench/ffn.py); targets 1.1x naive, within 10% of the GEMMs.

    python benchmarks/cpu_norm_ffn_targets.py [norm|ffn|all] [--rounds R] [--threads T]

Providers run interleaved, one call each per round, so a shared machine's load hits them
alike; the minimum over rounds is the least disturbed estimate and the ratios use it (medians
are printed beside it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastattn
from fastattn.bench.ffn import gemms_only, naive_ffn
from fastattn.bench.norm import naive_add_norm


def measure(providers: dict, rounds: int) -> dict:
    for fn in providers.values():
        fn()
        fn()
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) * 1e3 for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:12s} min {best[name]:8.2f} ms   median {statistics.median(t) * 1e3:8.2f} ms")
    return best


def norm(rounds: int) -> None:
    m, n = 4096, 1024
    x, res = (torch.randn(m, n, requires_grad=True) for _ in range(2))
    w = (1 + 0.1 * torch.randn(n)).requires_grad_()
    b = (0.1 * torch.randn(n)).requires_grad_()
    dy, dh = torch.randn(m, n), torch.randn(m, n)
    compiled = torch.compile(naive_add_norm)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), [x, res, w, b], (dy, dh))

    print(f"add+LayerNorm fwd+bwd M{m} N{n} fp32, {torch.get_num_threads()} threads")
    best = measure({
        "naive": step(lambda: naive_add_norm(x, res, w, b, "layer", 1e-5)),
        "compile": step(lambda: compiled(x, res, w, b, "layer", 1e-5)),
        "cpu": step(lambda: fastattn.add_layer_norm(x, res, w, b, prenorm=True, backend="cpu")),
    }, rounds)
    print(f"  cpu: {best['naive'] / best['cpu']:.2f}x naive (target 2), "
          f"{best['compile'] / best['cpu']:.2f}x compile (target 1.5)")


def ffn(rounds: int) -> None:
    m, d, f = 2048, 512, 2048
    x = torch.randn(m, d, requires_grad=True)
    w1 = (torch.randn(f, d) / d**0.5).requires_grad_()
    b1 = (0.1 * torch.randn(f)).requires_grad_()
    w2 = (torch.randn(d, f) / f**0.5).requires_grad_()
    b2 = (0.1 * torch.randn(d)).requires_grad_()
    dy = torch.randn(m, d)
    print(f"FFN fwd+bwd M{m} d{d} F{f} gelu fp32, {torch.get_num_threads()} threads")
    best = measure({
        "naive": lambda: torch.autograd.grad(naive_ffn(x, w1, b1, w2, b2, "gelu"), [x, w1, b1, w2, b2], dy),
        "gemms-only": lambda: torch.autograd.grad(gemms_only(x, w1, w2, f), [x, w1, w2], dy),
        "cpu": lambda: torch.autograd.grad(
            fastattn.feed_forward(x, w1, b1, w2, b2, activation="gelu", backend="cpu"), [x, w1, b1, w2, b2], dy),
    }, rounds)
    print(f"  cpu: {best['naive'] / best['cpu']:.3f}x naive (target 1.1), "
          f"{best['cpu'] / best['gemms-only']:.3f}x the GEMMs' time (target <= 1.10)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("op", nargs="?", default="all", choices=("norm", "ffn", "all"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.op in ("norm", "all"):
        norm(args.rounds)
    if args.op in ("ffn", "all"):
        ffn(args.rounds)
