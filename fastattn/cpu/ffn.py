"""CPU feed-forward: ``y = dropout(act(x @ w1.T + b1)) @ w2.T + b2`` over
``torch.ops.fastattn.cpu_ffn_fwd`` / ``cpu_ffn_bwd`` (csrc/cpu/ffn.cpp), plus their fake tensors.

The GEMMs are torch's CPU BLAS (``at::mm`` / ``at::addmm``: MKL for fp32, oneDNN for bf16 /
fp16); what lies between them is one vectorized pass over the GEMM output
(``at::vec::Vectorized<float>``, ``at::parallel_for`` over row blocks):

- forward: ``z = x @ w1.T``; one pass adds b1 (fp32; for bf16 / fp16 addmm adds it so z is
  rounded once) and writes ``a = act(z) * keep / (1 - p)``; ``y = addmm(b2, a, w2.T)``. With
  ``options.recompute`` a overwrites z (for swiglu its gate half): no (M, d_hidden) buffer is
  kept for backward.
- backward: z recomputed the same way when not saved; ``da = dy @ w2``; one pass writes
  ``dz = da * keep / (1 - p) * act'(z)`` (in place over da, except swiglu) and the dropped
  activation ``a_d`` (the dw2 GEMM's operand), and accumulates db1 (of dz as stored) and db2
  (of dy) in per-block fp32 partial rows summed in block order (bitwise reproducible with any
  thread count); then ``dw2 = dy.T @ a_d``, ``dx = dz @ w1``, ``dw1 = dz.T @ x``.

Workspace: the temporaries no caller sees (forward's activation with a saved z; backward's
``da`` / ``dz`` and ``a_d``) live in grow-only buffers the extension reuses across calls, so
they do not page-fault again on every call (several ms per 16 MiB on a small machine). Memory
held: up to 2 buffers of at most 64 MiB each (larger temporaries are fresh tensors) per call
running at once, until :func:`release_workspace`. Outputs and the saved z are always fresh.

Dropout: the Triton backend's mask of the (M, F) activation (:func:`dropout_mask`,
fastattn/cpu/dropout_masks.py), regenerated in backward, never stored.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastattn.backends.capabilities import GPU_DTYPES, FeedForwardCapabilities
from fastattn.cpu import ensure_loaded
from fastattn.cpu.dropout_masks import ffn_keep_mask
# The cpu ops take the CUDA ops' schemas (csrc/ops.cpp): same argument plumbing and fake tensors.
from fastattn.cuda.ffn import _ffn_bwd_fake, _ffn_fwd_fake, _rng_args
from fastattn.options import FeedForwardGrads, FeedForwardInputs, FeedForwardOptions, RngState, seed_offset

CAPABILITIES = FeedForwardCapabilities(dtypes=GPU_DTYPES)


def dropout_mask(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (M, F): the keep mask the kernels apply for this rng (None without dropout)."""
    if options.dropout_p == 0.0:
        return None
    seed, offset = _rng_args(options, rng)
    return ffn_keep_mask(seed, offset, inputs.rows, inputs.w2.shape[1], options.dropout_p, device=inputs.device)


def forward(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]):
    """y (M, d_out) in x's dtype; z (M, d_hidden) in x's dtype, or None with recompute."""
    ensure_loaded()
    seed, offset = _rng_args(options, rng)
    y, z = torch.ops.fastattn.cpu_ffn_fwd(
        inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2, options.activation, options.dropout_p,
        seed, offset, not options.recompute,
    )
    return y, (None if options.recompute else z)


def eager_plan(inputs: FeedForwardInputs, options: FeedForwardOptions):
    """The plain eager call for inputs like these: ``run(x, w1, b1, w2, b2, rng) -> y (...,
    d_out)`` for x (..., d_model) as the caller passed it (flattened below autograd), which
    records (when autograd needs it) one C++ autograd node (``cpu_ffn_autograd``,
    csrc/cpu/autograd.cpp) over the same kernels as :func:`forward` / :func:`backward`."""
    ensure_loaded()
    op = torch.ops.fastattn.cpu_ffn_autograd.default
    activation, p, save_z = options.activation, options.dropout_p, not options.recompute

    def run(x, w1, b1, w2, b2, rng: Optional[RngState]):
        seed, offset = seed_offset(rng)
        return op(x, w1, b1, w2, b2, activation, p, seed, offset, save_z)

    return run


def backward(
    dy: torch.Tensor,
    z: Optional[torch.Tensor],
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
) -> FeedForwardGrads:
    ensure_loaded()
    seed, offset = _rng_args(options, rng)
    dx, dw1, db1, dw2, db2 = torch.ops.fastattn.cpu_ffn_bwd(
        dy, z, inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2, options.activation, options.dropout_p,
        seed, offset,
    )
    return FeedForwardGrads(
        dx=dx,
        dw1=dw1,
        db1=db1 if inputs.b1 is not None else None,
        dw2=dw2,
        db2=db2 if inputs.b2 is not None else None,
    )


def release_workspace() -> None:
    """Frees the workspace buffers the cpu FFN keeps between calls (idle ones; a call running in
    another thread keeps its own). The next call allocates them again."""
    ensure_loaded()
    torch.ops.fastattn.cpu_ffn_release_workspace()


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake implementations of cpu_ffn_fwd / cpu_ffn_bwd, once, after the CPU library defining
    the schemas is loaded (called by fastattn._build.load_cpu_extension)."""
    torch.library.register_fake("fastattn::cpu_ffn_fwd")(_ffn_fwd_fake)
    torch.library.register_fake("fastattn::cpu_ffn_bwd")(_ffn_bwd_fake)
