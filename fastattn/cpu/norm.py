"""CPU residual + LayerNorm / RMSNorm: backend primitives over ``torch.ops.fastattn.cpu_norm_fwd``
and ``cpu_norm_bwd`` (csrc/cpu/norm.cpp), plus their fake tensors.

Kernels: blocks of rows handed out one at a time to ``torch.get_num_threads()`` threads; each
row is read from memory once per direction and its passes (h and its sum, centred sum of
squares, output) run vectorized (``at::vec::Vectorized<float>``) on rows held in cache, the next
rows prefetched. Backward takes rows in groups of 8 and adds their dweight / dbias
contributions to the block's partial rows once per group. fp32 statistics, taken on h as
stored (rounded to its dtype). dweight / dbias: per-block fp32 partial rows summed in block
order, the blocks fixed by the row count, so the gradients are bitwise reproducible with any
thread count. Dropout: the Triton backend's mask (:func:`dropout_mask`,
fastattn/cpu/dropout_masks.py), regenerated in backward. Outputs of 128 KiB and more (y, h, dx,
dresidual) come from a pool of reused buffers (csrc/cpu/buffer_pool.h): a fresh buffer's page
faults cost more than the kernel that fills it. Up to 512 MiB of idle blocks are kept, until
:func:`fastattn.cpu.release_memory`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from fastattn.backends.capabilities import GPU_DTYPES, NormCapabilities
from fastattn.cpu import ensure_loaded
from fastattn.cpu.dropout_masks import norm_keep_mask
# The cpu ops take the CUDA ops' schemas (csrc/ops.cpp) and dtypes: same argument plumbing,
# same fake tensors, same per-tensor dtype reasons.
from fastattn.cuda.norm import (  # noqa: F401  (same op schema as the CUDA norm)
    _dropout_args, _norm_bwd_fake, _norm_fwd_fake, _stores_h, not_supported_reasons, run_forward,
)
from fastattn.options import (
    NormForwardResult,
    NormGrads,
    NormInputs,
    NormOptions,
    RngState,
    residual_out_dtype,
    seed_offset,
)

CAPABILITIES = NormCapabilities(dtypes=GPU_DTYPES)


def dropout_mask(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (M, N) keep mask the kernels apply to x (None without dropout)."""
    if options.dropout_p == 0.0:
        return None
    p, seed, offset = _dropout_args(options, rng)
    m, n = inputs.x.shape
    return norm_keep_mask(seed, offset, m, n, p, device=inputs.device)


def forward(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> NormForwardResult:
    ensure_loaded()
    return run_forward(torch.ops.fastattn.cpu_norm_fwd, inputs, options, rng)


def eager_plan(inputs: NormInputs, options: NormOptions):
    """The plain eager call for inputs like these: ``run(x, residual, weight, bias, rng) -> (y,
    h)`` shaped like x (h None when it is x), which records (when autograd needs it) one C++
    autograd node (``cpu_norm_autograd``, csrc/cpu/autograd.cpp) over the same kernels as
    :func:`forward` / :func:`backward`. x and residual (..., N) as the caller passed them
    (flattened below autograd); ``inputs``: a validated call of the same signature."""
    ensure_loaded()
    op = torch.ops.fastattn.cpu_norm_autograd.default
    h_dtype = residual_out_dtype(inputs, options)
    store_h = _stores_h(inputs, options, h_dtype)
    eps, p, is_rms = options.eps, options.dropout_p, options.kind == "rms"

    def run(x, residual, weight, bias, rng: Optional[RngState]):
        seed, offset = seed_offset(rng)
        y, h = op(x, residual, weight, bias, eps, p, seed, offset, is_rms, store_h, h_dtype)
        return y, (h if store_h else None)

    return run


def backward(
    dy: torch.Tensor,
    dh: Optional[torch.Tensor],
    h: torch.Tensor,
    mean: Optional[torch.Tensor],
    rstd: torch.Tensor,
    inputs: NormInputs,
    options: NormOptions,
    rng: Optional[RngState],
) -> NormGrads:
    """``inputs`` supplies only shapes and dtypes of x / residual and the weight / bias.

    Without dropout, when the residual has x's dtype, dresidual and dx have the same values and
    are returned as one tensor (as torch's own ``x + residual`` backward does): one (M, N)
    buffer fewer to allocate and write."""
    ensure_loaded()
    p, seed, offset = _dropout_args(options, rng)
    shared = inputs.residual is not None and p == 0.0 and inputs.residual.dtype == inputs.x.dtype
    residual_dtype = None if inputs.residual is None or shared else inputs.residual.dtype
    dx, dresidual, dweight, dbias = torch.ops.fastattn.cpu_norm_bwd(
        dy, dh, h, mean, rstd, inputs.weight, inputs.bias, p, seed, offset, options.kind == "rms", residual_dtype,
    )
    if inputs.residual is None:
        dresidual = None
    elif shared:
        dresidual = dx
    return NormGrads(
        dx=dx,
        dresidual=dresidual,
        dweight=None if inputs.weight is None else dweight,
        dbias=None if inputs.bias is None else dbias,
    )


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake implementations of cpu_norm_fwd / cpu_norm_bwd, once, after the CPU library defining
    the schemas is loaded (called by fastattn._build.load_cpu_extension)."""
    torch.library.register_fake("fastattn::cpu_norm_fwd")(_norm_fwd_fake)
    torch.library.register_fake("fastattn::cpu_norm_bwd")(_norm_bwd_fake)
