"""Residual add + LayerNorm (and RMSNorm) benchmark: sweep over hidden size.

Every provider computes the pre-norm block's pair ``h = x + residual; y = norm(h)`` and
returns (y, h), the new residual stream included, as a Transformer needs both.
Providers: every fastattn backend (``add_layer_norm`` / ``rms_norm`` with ``prenorm=True``);
naive PyTorch (add, then ``F.layer_norm`` / ``F.rms_norm``); ``torch.compile`` of it;
flash-attn's Triton ``layer_norm_fn``, Liger-Kernel and Apex when installed.
"""

from __future__ import annotations

import dataclasses
import functools
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
from fastattn.bench.harness import MODES, NAIVE, PEER, Problem, Provider, Workload, needs_cuda, optional_module
from fastattn.bench.runner import Suite

EPS = {"layer": 1e-5, "rms": 1e-6}


@dataclasses.dataclass(frozen=True)
class NormCase:
    rows: int
    hidden: int
    kind: str  # "layer" | "rms"
    dtype: torch.dtype
    modes: tuple[str, ...] = MODES

    @property
    def x(self) -> int:
        return self.hidden

    @property
    def variant(self) -> str:
        return {"layer": "add+LayerNorm", "rms": "add+RMSNorm"}[self.kind]

    @property
    def label(self) -> str:
        return f"M{self.rows} N{self.hidden} {self.variant}"

    @property
    def params(self) -> dict:
        return {"rows": self.rows, "hidden": self.hidden, "kind": self.kind}


def norm_bytes(rows: int, hidden: int, kind: str, elem_bytes: int, mode: str) -> float:
    """Bytes an ideal kernel moves (each tensor read or written once).
    forward:  read x, residual, weight (, bias); write y, h, and the fp32 row statistics
              (mean and rstd; rstd only for RMSNorm).
    backward: read dy, dh, h, weight and the statistics; write dx, dresidual, dweight (, dbias).
    """
    act = rows * hidden * elem_bytes
    params = hidden * elem_bytes * (2 if kind == "layer" else 1)
    stats = rows * 4 * (2 if kind == "layer" else 1)
    forward = 2 * act + params + 2 * act + stats
    backward = 3 * act + hidden * elem_bytes + stats + 2 * act + params
    return float({"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode])


def work(case: NormCase, mode: str) -> float:
    return norm_bytes(case.rows, case.hidden, case.kind, case.dtype.itemsize, mode)


def cases(preset: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> list[NormCase]:
    check_preset(preset)
    dtype = default_dtype(device, dtype)
    if preset == "smoke":
        return [NormCase(64, hidden, "layer", dtype) for hidden in (48, 200)]
    if device.type == "cuda":
        # 32768 rows: at N = 16384 each (M, N) bf16 tensor is 1 GiB, a forward moves 4 GiB.
        rows = 32768
        hiddens = (1024, 4096, 16384) if preset == "quick" else (1024, 2048, 4096, 8192, 16384)
    else:
        # 4096 rows: issue 10's CPU target shape is M4096 N1024.
        rows = 4096
        hiddens = (256, 1024, 4096) if preset == "quick" else (256, 512, 1024, 2048, 4096)
    kinds = ("layer",) if preset == "quick" else ("layer", "rms")
    return [NormCase(rows, hidden, kind, dtype) for kind in kinds for hidden in hiddens]


def make_problem(case: NormCase, device: torch.device) -> Problem:
    m, n = case.rows, case.hidden
    x = randn(m, n, device=device, dtype=case.dtype)
    residual = randn(m, n, device=device, dtype=case.dtype)
    weight = randn(n, device=device, dtype=case.dtype, scale=0.1, shift=1.0)
    bias = randn(n, device=device, dtype=case.dtype, scale=0.1) if case.kind == "layer" else None
    dy = randn(m, n, device=device, dtype=case.dtype, grad=False)
    dh = randn(m, n, device=device, dtype=case.dtype, grad=False)

    import fastattn

    ref = [to_reference(t) for t in (x, residual, weight, bias)]
    if case.kind == "layer":
        y64, h64 = fastattn.add_layer_norm(*ref, eps=EPS["layer"], prenorm=True, backend="reference")
    else:
        y64, h64 = fastattn.rms_norm(*ref[:3], eps=EPS["rms"], prenorm=True, backend="reference")
    wrt = [t for t in ref if t is not None]
    grad_names = ("dx", "dresidual", "dweight", "dbias")[: len(wrt)]
    return Problem(
        inputs=(x, residual, weight, bias),
        grad_out=(dy, dh),
        expected_out=(y64.detach(), h64.detach()),
        expected_grads=reference_grads((y64, h64), wrt, (dy, dh)),
        out_names=("y", "h"),
        grad_names=grad_names,
    )


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def _fastattn(case: NormCase, problem: Problem, backend: str) -> Workload:
    import fastattn

    x, residual, weight, bias = problem.inputs
    if case.kind == "layer":
        fn = lambda: fastattn.add_layer_norm(x, residual, weight, bias, eps=EPS["layer"], prenorm=True, backend=backend)  # noqa: E731
    else:
        fn = lambda: fastattn.rms_norm(x, residual, weight, eps=EPS["rms"], prenorm=True, backend=backend)  # noqa: E731
    return Workload(fn, problem.differentiable)


def naive_add_norm(x, residual, weight, bias, kind: str, eps: float):
    """Plain PyTorch: the add, then torch's norm; returns (y, h)."""
    h = x + residual
    if kind == "layer":
        return F.layer_norm(h, (h.shape[-1],), weight, bias, eps), h
    return F.rms_norm(h, (h.shape[-1],), weight, eps), h


def _naive(case: NormCase, problem: Problem, compile_it: bool = False) -> Workload:
    x, residual, weight, bias = problem.inputs
    fn = compiled(naive_add_norm) if compile_it else naive_add_norm
    return Workload(lambda: fn(x, residual, weight, bias, case.kind, EPS[case.kind]), problem.differentiable)


def _package_on_cuda(package: str, device: torch.device) -> Optional[str]:
    return optional_module(package)[1] or needs_cuda(device)


def _flash_attn(case: NormCase, problem: Problem) -> Workload:
    layer_norm_fn = optional_module("flash_attn.ops.triton.layer_norm")[0].layer_norm_fn
    x, residual, weight, bias = problem.inputs
    rms = case.kind == "rms"
    # residual fused in; prenorm=True returns (y, residual_out)
    return Workload(
        lambda: layer_norm_fn(x, weight, bias, residual=residual, eps=EPS[case.kind], prenorm=True, is_rms_norm=rms),
        problem.differentiable,
    )


def _liger(case: NormCase, problem: Problem) -> Workload:
    functional = optional_module("liger_kernel.transformers.functional")[0]
    x, residual, weight, bias = problem.inputs
    eps = EPS[case.kind]

    def fn():
        h = x + residual  # Liger's norms take no residual
        if case.kind == "layer":
            return functional.liger_layer_norm(h, weight, bias, eps), h
        return functional.liger_rms_norm(h, weight, eps, in_place=False), h

    return Workload(fn, problem.differentiable)


def _apex(case: NormCase, problem: Problem) -> Workload:
    apex_norm = optional_module("apex.normalization.fused_layer_norm")[0]
    x, residual, weight, bias = problem.inputs
    shape, eps = (case.hidden,), EPS[case.kind]

    def fn():
        h = x + residual  # Apex's norms take no residual
        if case.kind == "layer":
            return apex_norm.fused_layer_norm_affine(h, weight, bias, shape, eps), h
        return apex_norm.fused_rms_norm_affine(h, weight, shape, eps), h

    return Workload(fn, problem.differentiable)


def providers(preset: str) -> list[Provider]:
    peers = [
        ("flash-attn", "flash_attn.ops.triton.layer_norm", _flash_attn),
        ("liger-kernel", "liger_kernel.transformers.functional", _liger),
        ("apex", "apex.normalization.fused_layer_norm", _apex),
    ]
    return [
        *fastattn_providers("norm", _fastattn),
        Provider(name="naive", family=NAIVE, build=_naive),
        compile_provider("naive+compile", functools.partial(_naive, compile_it=True)),
        *(
            Provider(name=name, family=PEER, build=build, availability=functools.partial(_package_on_cuda, package))
            for name, package, build in peers
        ),
    ]


SUITE = Suite(
    op="norm",
    sweep="hidden",
    metric="GB/s",
    cases=cases,
    providers=providers,
    make_problem=make_problem,
    work=work,
    budget_weight=1.0,
)
