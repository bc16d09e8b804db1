"""Attention benchmark: sweep over sequence length, non-causal and causal.

Providers: every fastattn backend (``flash_attention(..., backend=name)``); naive PyTorch
(matmul-softmax-matmul, the baseline); ``torch.nn.functional.scaled_dot_product_attention``
forced to each of its backends (flash, efficient, cudnn, math) with
``torch.nn.attention.sdpa_kernel``; ``torch.compile`` of the naive code; flash-attn 2 and 3
when installed.
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
from fastattn.bench.harness import MODES, NAIVE, PEER, TORCH, Problem, Provider, Workload, as_tuple, needs_cuda, optional_module
from fastattn.bench.runner import Suite

#: Heads the float64 reference covers (of batch element 0): enough to catch a wrong kernel,
#: small enough that the (Lq x Lk) float64 score matrices fit at long sequence lengths.
REFERENCE_HEADS = 2


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: torch.dtype
    modes: tuple[str, ...] = MODES
    #: Appended to the variant: a fixed-shape case outside the sweep gets series of its own.
    tag: str = ""

    @property
    def x(self) -> int:
        return self.seqlen

    @property
    def variant(self) -> str:
        return ("causal" if self.causal else "non-causal") + (f" {self.tag}" if self.tag else "")

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.heads} L{self.seqlen} D{self.head_dim} {self.variant}"

    @property
    def params(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "seqlen": self.seqlen, "head_dim": self.head_dim, "causal": self.causal}


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, causal: bool, mode: str) -> float:
    """Matmul FLOPs. Forward: two GEMMs per head, Q K^T and P V, each 2 * Lq * Lk * D, so
    4 * B * H * Lq * Lk * D, halved for causal. Backward: 2.5x forward (dV, dP, dQ, dK plus the
    recomputed Q K^T). forward+backward: 3.5x forward."""
    forward = 4.0 * batch * heads * seqlen_q * seqlen_k * head_dim
    if causal:
        forward /= 2
    return forward * {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}[mode]


def work(case: AttentionCase, mode: str) -> float:
    return attention_flops(case.batch, case.heads, case.seqlen, case.seqlen, case.head_dim, case.causal, mode)


def cases(preset: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> list[AttentionCase]:
    check_preset(preset)
    dtype = default_dtype(device, dtype)
    if preset == "smoke":
        return [AttentionCase(1, 2, seqlen, 16, False, dtype) for seqlen in (32, 48)]
    if device.type == "cuda":
        # 16k tokens per case (batch = 16384 / L), 16 heads of 128: q, k, v and out are 256 MiB
        # together, several times the H200's 60 MB L2; the naive provider's score matrix is
        # 8 GiB at L = 16384.
        heads, head_dim, tokens = 16, 128, 16384
        seqlens = (1024, 4096, 16384) if preset == "quick" else (512, 1024, 2048, 4096, 8192, 16384)
    else:
        heads, head_dim, tokens = 4, 64, 512
        seqlens = (128, 256, 512) if preset == "quick" else (128, 256, 512, 1024)
    sweep = [
        AttentionCase(max(1, tokens // seqlen), heads, seqlen, head_dim, causal, dtype)
        for causal in (False, True)
        for seqlen in seqlens
    ]
    if device.type == "cuda":
        return sweep
    # The CPU backend's targets (issue 10): B4 H8 L1024 D64 forward+backward, both masks, and
    # forward-only at L4096.
    targets = [AttentionCase(4, 8, 1024, 64, causal, dtype, modes=("forward+backward",), tag="B4 H8 D64")
               for causal in (False, True)]
    targets.append(AttentionCase(1, 8, 4096, 64, False, dtype, modes=("forward",), tag="B1 H8 D64"))
    return sweep + targets


def make_problem(case: AttentionCase, device: torch.device) -> Problem:
    shape = (case.batch, case.seqlen, case.heads, case.head_dim)  # (B, L, H, D)
    q, k, v = (randn(*shape, device=device, dtype=case.dtype) for _ in range(3))
    dout = randn(*shape, device=device, dtype=case.dtype, grad=False)
    hs = min(case.heads, REFERENCE_HEADS)

    def select(t: torch.Tensor) -> torch.Tensor:
        return t[:1, :, :hs]

    import fastattn

    ref = [to_reference(select(t)) for t in (q, k, v)]
    out64 = fastattn.flash_attention(*ref, causal=case.causal, backend="reference")
    grads64 = reference_grads((out64,), ref, (select(dout),))
    return Problem(
        inputs=(q, k, v),
        grad_out=(dout,),
        expected_out=(out64.detach(),),
        expected_grads=grads64,
        out_names=("out",),
        grad_names=("dq", "dk", "dv"),
        select=select,
    )


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def _fastattn(case: AttentionCase, problem: Problem, backend: str) -> Workload:
    import fastattn

    q, k, v = problem.inputs
    return Workload(lambda: fastattn.flash_attention(q, k, v, causal=case.causal, backend=backend), (q, k, v))


def naive_attention(q, k, v, masked: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Plain PyTorch attention in the flash layout: q, k, v (B, L, H, D) -> (B, L, H, D)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, Lq, Lk)
    if masked is not None:
        scores = scores.masked_fill(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2)


def _causal_mask(case: AttentionCase, device: torch.device) -> Optional[torch.Tensor]:
    """(L, L) bool, True = masked; built once per case, as a module buffer would be."""
    if not case.causal:
        return None
    return torch.ones(case.seqlen, case.seqlen, dtype=torch.bool, device=device).triu(1)


def _naive(case: AttentionCase, problem: Problem, compile_it: bool = False) -> Workload:
    q, k, v = problem.inputs
    masked, scale = _causal_mask(case, q.device), 1.0 / math.sqrt(case.head_dim)
    fn = compiled(naive_attention) if compile_it else naive_attention
    return Workload(lambda: fn(q, k, v, masked, scale), (q, k, v))


def _sdpa_availability(backend: str, device: torch.device) -> Optional[str]:
    try:
        from torch.nn.attention import SDPBackend
    except ImportError as err:
        return f"this torch has no torch.nn.attention ({err})"
    if not hasattr(SDPBackend, backend):
        return f"this torch's SDPBackend has no {backend}"
    return None


def _sdpa(case: AttentionCase, problem: Problem, backend: str) -> Workload:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = problem.inputs
    chosen = getattr(SDPBackend, backend)

    def fn() -> torch.Tensor:
        with sdpa_kernel(chosen):  # the backward kernel is fixed by the forward's choice
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=case.causal)
        return out.transpose(1, 2)

    return Workload(fn, (q, k, v))


def _half_only(case: AttentionCase) -> Optional[str]:
    if case.dtype in (torch.float16, torch.bfloat16):
        return None
    return f"runs float16/bfloat16 only, not {str(case.dtype).replace('torch.', '')}"


def _package_on_cuda(package: str, device: torch.device) -> Optional[str]:
    return optional_module(package)[1] or needs_cuda(device)


def _flash_attn(case: AttentionCase, problem: Problem, package: str) -> Workload:
    module = optional_module(package)[0]
    q, k, v = problem.inputs
    # flash-attn 2 returns out; some flash-attn 3 releases return (out, lse).
    return Workload(lambda: as_tuple(module.flash_attn_func(q, k, v, causal=case.causal))[0], (q, k, v))


def providers(preset: str) -> list[Provider]:
    sdpa = [
        Provider(
            name=f"torch-sdpa-{label}",
            family=TORCH,
            build=functools.partial(_sdpa, backend=backend),
            availability=functools.partial(_sdpa_availability, backend),
        )
        for label, backend in (
            ("flash", "FLASH_ATTENTION"),
            ("efficient", "EFFICIENT_ATTENTION"),
            ("cudnn", "CUDNN_ATTENTION"),
            ("math", "MATH"),
        )
    ]
    peers = [
        Provider(
            name=name,
            family=PEER,
            build=functools.partial(_flash_attn, package=package),
            availability=functools.partial(_package_on_cuda, package),
            supports=_half_only,
        )
        for name, package in (("flash-attn-2", "flash_attn"), ("flash-attn-3", "flash_attn_interface"))
    ]
    return [
        *fastattn_providers("attention", _fastattn),
        Provider(name="naive", family=NAIVE, build=_naive),
        *sdpa,
        compile_provider("naive+compile", functools.partial(_naive, compile_it=True)),
        *peers,
    ]


SUITE = Suite(
    op="attention",
    sweep="seqlen",
    metric="TFLOP/s",
    cases=cases,
    providers=providers,
    make_problem=make_problem,
    work=work,
    budget_weight=2.0,
)
