"""End-to-end benchmark: the reference Transformer (``fastattn.models``), fused vs naive.

Modes: forward = inference (no_grad forward to the logits); backward = the backward of the
logits; forward+backward = a training step (the loss and optimizer step are the same for every
provider and are left out). Sweep over sequence length (source = target length, the tails of
every other sequence padded so the masks are exercised). Throughput is source + target tokens
per second.
Providers: the fused model on each fastattn backend (``impl="fused"``, ``backend=name``); the
naive model (``impl="naive"``: plain PyTorch ops); ``torch.compile`` of the naive model in the
full preset only (compiling the whole model is slow). Every provider loads one state_dict.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Optional

import torch

from fastattn.bench.common import (
    COMPILED_BACKWARD_REASON,
    check_preset,
    default_dtype,
    fastattn_providers,
    randn,
    reference_grads,
)
from fastattn.bench.harness import COMPILE, MODES, NAIVE, Problem, Provider, Workload
from fastattn.bench.runner import Suite


def _models() -> tuple[Optional[ModuleType], Optional[str]]:
    """fastattn.models, written separately, imported only when this suite runs."""
    try:
        import fastattn.models as models
    except ImportError as err:
        return None, f"fastattn.models is not importable ({err})"
    return models, None


@dataclasses.dataclass(frozen=True)
class ModelCase:
    batch: int
    seqlen: int
    d_model: int
    n_head: int
    n_layer: int
    d_ff: int
    vocab: int
    dtype: torch.dtype
    modes: tuple[str, ...] = MODES

    @property
    def x(self) -> int:
        return self.seqlen

    @property
    def variant(self) -> str:
        return "pre-norm"

    @property
    def label(self) -> str:
        return f"B{self.batch} L{self.seqlen} d{self.d_model} H{self.n_head} layers{self.n_layer}"

    @property
    def params(self) -> dict:
        return {
            "batch": self.batch,
            "seqlen": self.seqlen,
            "d_model": self.d_model,
            "n_head": self.n_head,
            "n_layer": self.n_layer,
            "d_ff": self.d_ff,
            "vocab": self.vocab,
        }


def model_tokens(batch: int, seqlen_src: int, seqlen_tgt: int) -> float:
    """Tokens one call processes: every source and target position (padding included)."""
    return float(batch * (seqlen_src + seqlen_tgt))


def work(case: ModelCase, mode: str) -> float:
    return model_tokens(case.batch, case.seqlen, case.seqlen)


def cases(preset: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> list[ModelCase]:
    check_preset(preset)
    dtype = default_dtype(device, dtype)
    if preset == "smoke":
        return [ModelCase(2, 16, 32, 2, 1, 64, 64, dtype)]
    if device.type == "cuda":
        # 183M parameters (4 + 4 layers of width 1024, tied 32k vocabulary), 16k tokens per side.
        size = dict(d_model=1024, n_head=16, n_layer=4, d_ff=4096, vocab=32000)
        tokens, seqlens = 16384, ((512, 2048) if preset == "quick" else (256, 512, 1024, 2048))
    else:
        size = dict(d_model=128, n_head=4, n_layer=2, d_ff=512, vocab=1000)
        tokens, seqlens = 256, ((32, 64, 128) if preset == "quick" else (32, 64, 128, 256))
    return [ModelCase(batch=max(1, tokens // s), seqlen=s, dtype=dtype, **size) for s in seqlens]


def _config(case: ModelCase, models: ModuleType, **overrides):
    return models.TransformerConfig(
        src_vocab_size=case.vocab,
        tgt_vocab_size=case.vocab,
        max_len=case.seqlen,
        n_layer=case.n_layer,
        n_head=case.n_head,
        d_model=case.d_model,
        d_ff=case.d_ff,
        dropout=0.0,  # every provider must compute the same function as the reference
        activation="gelu",
        **overrides,
    )


def _tokens(case: ModelCase, pad_id: int, device: torch.device) -> torch.Tensor:
    ids = torch.randint(pad_id + 1, case.vocab, (case.batch, case.seqlen), device=device)
    ids[1::2, case.seqlen - case.seqlen // 4 :] = pad_id  # right-padded odd rows
    return ids


def make_problem(case: ModelCase, device: torch.device) -> Problem:
    models, reason = _models()
    if models is None:
        raise RuntimeError(reason)
    config = _config(case, models, impl="naive")
    with device:  # initialize on the device, not on the host and then copy
        state = models.Transformer(config).state_dict()
    src, tgt = _tokens(case, config.pad_id, device), _tokens(case, config.pad_id, device)
    dlogits = randn(case.batch, case.seqlen, case.vocab, device=device, dtype=case.dtype, grad=False)
    # The oracle: the fused model on the reference backend in float64 (its attention saves
    # only q, k, v, out and lse, so long sequences fit where the naive float64 model would not).
    with device:
        reference = models.Transformer(dataclasses.replace(config, impl="fused", backend="reference"))
    reference = reference.to(dtype=torch.float64)
    reference.load_state_dict(state)
    reference.train()
    logits64 = reference(src, tgt)[0]
    named = list(reference.named_parameters())
    grads64 = reference_grads((logits64,), [p for _, p in named], (dlogits,))
    return Problem(
        inputs=(src, tgt),
        grad_out=(dlogits,),
        expected_out=(logits64.detach(),),
        expected_grads=grads64,
        out_names=("logits",),
        grad_names=tuple(f"d[{name}]" for name, _ in named),
        extra={"config": config, "state": state},
    )


def _build(case: ModelCase, problem: Problem, impl: str, backend: Optional[str] = None, compile_it: bool = False) -> Workload:
    models = _models()[0]
    src, tgt = problem.inputs
    config = dataclasses.replace(problem.extra["config"], impl=impl, backend=backend)
    with src.device:
        model = models.Transformer(config).to(dtype=case.dtype)
    model.load_state_dict(problem.extra["state"])
    model.train()
    run = torch.compile(model) if compile_it else model
    return Workload(lambda: run(src, tgt)[0], list(model.parameters()))


def _models_availability(device: torch.device) -> Optional[str]:
    return _models()[1]


def _not_in_preset(device: torch.device, preset: str) -> Optional[str]:
    return _models()[1] or f"compiling the whole model is slow: only in the full preset, not {preset}"


def providers(preset: str) -> list[Provider]:
    fused = []
    for p in fastattn_providers(("attention", "norm", "ffn"), functools.partial(_build, impl="fused")):
        # the fused model also needs fastattn.models
        backend_reason = p.availability
        fused.append(
            dataclasses.replace(p, availability=lambda device, r=backend_reason: _models()[1] or r(device))
        )
    compile_availability = _models_availability if preset == "full" else functools.partial(_not_in_preset, preset=preset)
    return [
        *fused,
        Provider(name="naive", family=NAIVE, build=functools.partial(_build, impl="naive"), availability=_models_availability),
        Provider(
            name="naive+compile",
            family=COMPILE,
            build=functools.partial(_build, impl="naive", compile_it=True),
            availability=compile_availability,
            skip_modes={"backward": COMPILED_BACKWARD_REASON},
        ),
    ]


SUITE = Suite(
    op="model",
    sweep="seqlen",
    metric="tokens/s",
    cases=cases,
    providers=providers,
    make_problem=make_problem,
    work=work,
    budget_weight=1.5,
    # logits and gradients pass through 2 x n_layer low-precision blocks
    tolerance_scale=2.0,
)
