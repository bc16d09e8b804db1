"""Feed-forward benchmark: ``y = act(x @ w1.T + b1) @ w2.T + b2``, sweep over tokens.

Providers: every fastattn backend (``feed_forward(..., backend=name)``); naive PyTorch
(Linear-act-Linear, the baseline); ``torch.compile`` of it; Liger-Kernel's fused SwiGLU
activation between two torch GEMMs when installed (swiglu cases only: Liger has no plain
GELU/ReLU MLP); and ``torch-gemms-only``, the bound the CUDA FFN's target is stated against
("within 5% of cuBLAS GEMM time"): the same two GEMMs through torch (cuBLAS on a GPU) with no
bias, activation or dropout, checked against its own float64 reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastattn.bench.common import (
    check_preset,
    compile_provider,
    compiled,
    default_dtype,
    fastattn_providers,
    randn,
    reference_grads,
    to_reference,
)
from fastattn.bench.harness import MODES, NAIVE, PEER, TORCH, Problem, Provider, Workload, needs_cuda, optional_module
from fastattn.bench.runner import Suite


@dataclasses.dataclass(frozen=True)
class FeedForwardCase:
    tokens: int
    d_model: int
    d_ff: int
    activation: str
    dtype: torch.dtype
    modes: tuple[str, ...] = MODES

    @property
    def d_hidden(self) -> int:
        """Rows of w1: d_ff, or 2 * d_ff for swiglu ([gate; up])."""
        return 2 * self.d_ff if self.activation == "swiglu" else self.d_ff

    @property
    def x(self) -> int:
        return self.tokens

    @property
    def variant(self) -> str:
        return self.activation

    @property
    def label(self) -> str:
        return f"M{self.tokens} d{self.d_model} F{self.d_ff} {self.activation}"

    @property
    def params(self) -> dict:
        return {"tokens": self.tokens, "d_model": self.d_model, "d_ff": self.d_ff, "activation": self.activation}


def ffn_flops(tokens: int, d_model: int, d_hidden: int, d_ff: int, d_out: int, mode: str) -> float:
    """GEMM FLOPs. Forward: 2 * M * d_model * d_hidden (x @ w1.T) + 2 * M * d_ff * d_out
    (a @ w2.T). Backward: 2x forward (a data-gradient and a weight-gradient GEMM per forward
    GEMM). forward+backward: 3x forward. Activation and bias FLOPs are not counted."""
    forward = 2.0 * tokens * d_model * d_hidden + 2.0 * tokens * d_ff * d_out
    return forward * {"forward": 1.0, "backward": 2.0, "forward+backward": 3.0}[mode]


def work(case: FeedForwardCase, mode: str) -> float:
    return ffn_flops(case.tokens, case.d_model, case.d_hidden, case.d_ff, case.d_model, mode)


def cases(preset: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> list[FeedForwardCase]:
    check_preset(preset)
    dtype = default_dtype(device, dtype)
    if preset == "smoke":
        return [FeedForwardCase(tokens, 32, 64, "gelu", dtype) for tokens in (16, 40)]
    if device.type == "cuda":
        # LLaMA-7B's width: w1 + w2 are 256 MiB in bf16, z at 16k tokens 512 MiB.
        d_model, d_ff = 4096, 16384
        tokens = (2048, 8192, 16384) if preset == "quick" else (1024, 2048, 4096, 8192, 16384)
    else:
        # Issue 10's CPU target shape (M2048 d512 F2048 gelu) is on the sweep in every preset.
        d_model, d_ff = 512, 2048
        tokens = (256, 1024, 2048) if preset == "quick" else (256, 512, 1024, 2048, 4096)
    activations = ("gelu",) if preset == "quick" else ("gelu", "swiglu")
    return [FeedForwardCase(m, d_model, d_ff, act, dtype) for act in activations for m in tokens]


def make_problem(case: FeedForwardCase, device: torch.device) -> Problem:
    d, dh, f = case.d_model, case.d_hidden, case.d_ff
    # 1/sqrt(fan_in) keeps activations of unit size, as a trained layer's would be.
    x = randn(case.tokens, d, device=device, dtype=case.dtype)
    w1 = randn(dh, d, device=device, dtype=case.dtype, scale=1 / math.sqrt(d))
    b1 = randn(dh, device=device, dtype=case.dtype, scale=0.1)
    w2 = randn(d, f, device=device, dtype=case.dtype, scale=1 / math.sqrt(f))
    b2 = randn(d, device=device, dtype=case.dtype, scale=0.1)
    dy = randn(case.tokens, d, device=device, dtype=case.dtype, grad=False)

    import fastattn

    ref = [to_reference(t) for t in (x, w1, b1, w2, b2)]
    y64 = fastattn.feed_forward(*ref, activation=case.activation, backend="reference")
    return Problem(
        inputs=(x, w1, b1, w2, b2),
        grad_out=(dy,),
        expected_out=(y64.detach(),),
        expected_grads=reference_grads((y64,), ref, (dy,)),
        out_names=("y",),
        grad_names=("dx", "dw1", "db1", "dw2", "db2"),
    )


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def _fastattn(case: FeedForwardCase, problem: Problem, backend: str) -> Workload:
    import fastattn

    x, w1, b1, w2, b2 = problem.inputs
    return Workload(
        lambda: fastattn.feed_forward(x, w1, b1, w2, b2, activation=case.activation, backend=backend),
        problem.differentiable,
    )


def torch_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation as plain torch.nn.functional calls (the naive baseline's, and the tests')."""
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    if activation == "swiglu":
        gate, up = z.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation {activation!r}")


def naive_ffn(x, w1, b1, w2, b2, activation: str) -> torch.Tensor:
    """Plain PyTorch: Linear, activation, Linear."""
    return F.linear(torch_activation(F.linear(x, w1, b1), activation), w2, b2)


def _naive(case: FeedForwardCase, problem: Problem, compile_it: bool = False) -> Workload:
    x, w1, b1, w2, b2 = problem.inputs
    fn = compiled(naive_ffn) if compile_it else naive_ffn
    return Workload(lambda: fn(x, w1, b1, w2, b2, case.activation), problem.differentiable)


def _liger_availability(device: torch.device) -> Optional[str]:
    return optional_module("liger_kernel.transformers.functional")[1] or needs_cuda(device)


def _liger_supports(case: FeedForwardCase) -> Optional[str]:
    return None if case.activation == "swiglu" else f"Liger-Kernel fuses gated activations only, not {case.activation}"


def _liger(case: FeedForwardCase, problem: Problem) -> Workload:
    functional = optional_module("liger_kernel.transformers.functional")[0]
    x, w1, b1, w2, b2 = problem.inputs
    f = case.d_ff

    def fn() -> torch.Tensor:
        # gate and up projections as two GEMMs (contiguous outputs, as LigerSwiGLUMLP does)
        gate = F.linear(x, w1[:f], b1[:f])
        up = F.linear(x, w1[f:], b1[f:])
        return F.linear(functional.liger_swiglu(gate, up), w2, b2)

    return Workload(fn, problem.differentiable)


def gemms_only(x, w1, w2, d_ff: int) -> torch.Tensor:
    """The FFN's two GEMMs alone: ``(x @ w1.T)[:, :d_ff] @ w2.T`` (for swiglu the first d_ff
    columns stand in for the activation's output, so both GEMMs keep the FFN's shapes)."""
    return (x @ w1.T)[:, :d_ff] @ w2.T


def _gemms_only_problem(case: FeedForwardCase, problem: Problem) -> Problem:
    x, w1, _, w2, _ = problem.inputs
    ref = [to_reference(t) for t in (x, w1, w2)]
    y64 = gemms_only(*ref, case.d_ff)
    grads = reference_grads((y64,), ref, problem.grad_out)
    # b1 and b2 are not used: their gradients are not compared.
    return dataclasses.replace(problem, expected_out=(y64.detach(),), expected_grads=(grads[0], grads[1], None, grads[2], None))


def _gemms_only(case: FeedForwardCase, problem: Problem) -> Workload:
    x, w1, _, w2, _ = problem.inputs
    return Workload(lambda: gemms_only(x, w1, w2, case.d_ff), problem.differentiable)


def providers(preset: str) -> list[Provider]:
    return [
        *fastattn_providers("ffn", _fastattn),
        Provider(name="naive", family=NAIVE, build=_naive),
        compile_provider("naive+compile", functools.partial(_naive, compile_it=True)),
        Provider(name="liger-kernel", family=PEER, build=_liger, availability=_liger_availability, supports=_liger_supports),
        Provider(name="torch-gemms-only", family=TORCH, build=_gemms_only, own_problem=_gemms_only_problem),
    ]


SUITE = Suite(
    op="ffn",
    sweep="tokens",
    metric="TFLOP/s",
    cases=cases,
    providers=providers,
    make_problem=make_problem,
    work=work,
    budget_weight=1.0,
)
