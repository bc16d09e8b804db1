"""CUDA residual + LayerNorm / RMSNorm: backend primitives over ``torch.ops.fastattn.norm_fwd``
and ``norm_bwd`` (csrc/norm.cpp, kernels/norm/), plus their fake tensors and autograd.

Kernels: fp32 statistics, 16-byte vector accesses, register-resident rows up to 16384
(forward) / 8192 (backward) and a looped path beyond (any N; the capability declares up to 65536), dropout from
kernels/common/philox.cuh (mask: :func:`dropout_mask`), deterministic weight/bias gradients
(per-slot fp32 partial rows + a second reduction kernel, no atomics).

Expected on an H200 (not yet measured): forward and backward within 90% of copy bandwidth
(the bytes each must move: x, residual, y, h; dy, h, dx, dresidual) for hidden >= 1024 in
bf16, with M large enough to fill the GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastattn.backends.capabilities import GPU_DTYPES, NormCapabilities
from fastattn.cuda import ensure_loaded
from fastattn.cuda.philox import dropout_keep_mask
from fastattn.options import (
    NormForwardResult,
    NormGrads,
    NormInputs,
    NormOptions,
    RngState,
    residual_out_dtype,
)

CAPABILITIES = NormCapabilities(dtypes=GPU_DTYPES, max_hidden=65536)

_NAMESPACE = "fastattn"


def not_supported_reasons(inputs: NormInputs, options: NormOptions) -> list[str]:
    """The kernels read and write fp16 / bf16 / fp32 only, for every tensor."""
    reasons = []
    for name, t in (("residual", inputs.residual), ("weight", inputs.weight), ("bias", inputs.bias)):
        if t is not None and t.dtype not in GPU_DTYPES:
            reasons.append(f"{name} dtype {str(t.dtype).replace('torch.', '')} is not supported "
                           "(float16, bfloat16, float32)")
    return reasons


def _dropout_args(options: NormOptions, rng: Optional[RngState]) -> tuple[float, int, int]:
    if options.dropout_p == 0.0:
        return 0.0, 0, 0
    if rng is None:
        raise ValueError("dropout_p > 0 needs an RngState (drawn by the autograd layer)")
    return options.dropout_p, rng.seed, rng.offset


def _stores_h(inputs: NormInputs, options: NormOptions, h_dtype: torch.dtype) -> bool:
    """h is x itself (nothing stored) only without residual, dropout or dtype change."""
    return inputs.residual is not None or options.dropout_p > 0 or h_dtype != inputs.x.dtype


def dropout_mask(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (M, N) keep mask the kernels apply to x (None without dropout)."""
    if options.dropout_p == 0.0:
        return None
    p, seed, offset = _dropout_args(options, rng)
    return dropout_keep_mask(seed, offset, inputs.x.shape, p, device=inputs.device)


def forward(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> NormForwardResult:
    ensure_loaded()
    return run_forward(torch.ops.fastattn.norm_fwd, inputs, options, rng)


def run_forward(op, inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> NormForwardResult:
    """Calls ``op`` (a norm_fwd-schema op: CUDA ``norm_fwd`` or CPU ``cpu_norm_fwd``) and
    wraps its outputs; h is x itself when the op stored none."""
    p, seed, offset = _dropout_args(options, rng)
    h_dtype = residual_out_dtype(inputs, options)
    store_h = _stores_h(inputs, options, h_dtype)
    y, h, mean, rstd = op(
        inputs.x, inputs.residual, inputs.weight, inputs.bias, options.eps, p, seed, offset,
        options.kind == "rms", store_h, h_dtype,
    )
    return NormForwardResult(
        y=y,
        h=h if store_h else inputs.x,
        mean=None if options.kind == "rms" else mean,
        rstd=rstd,
    )


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
    """``inputs`` supplies only shapes and dtypes of x / residual and the weight / bias."""
    ensure_loaded()
    p, seed, offset = _dropout_args(options, rng)
    residual_dtype = None if inputs.residual is None else inputs.residual.dtype
    dx, dresidual, dweight, dbias = torch.ops.fastattn.norm_bwd(
        dy, dh, h, mean, rstd, inputs.weight, inputs.bias, p, seed, offset, options.kind == "rms", residual_dtype,
    )
    return NormGrads(
        dx=dx,
        dresidual=None if inputs.residual is None else dresidual,
        dweight=None if inputs.weight is None else dweight,
        dbias=None if inputs.bias is None else dbias,
    )


# --------------------------------------------------------------------------------------------
# Fake tensors and autograd of the ops (torch.compile, opcheck, direct torch.ops use)
# --------------------------------------------------------------------------------------------
def _norm_fwd_fake(x, residual, weight, bias, eps, dropout_p, seed, offset, is_rms, store_h, h_dtype):
    m, n = x.shape
    y = x.new_empty((m, n))
    h = x.new_empty((m, n) if store_h else (0,), dtype=h_dtype)
    mean = x.new_empty((0,) if is_rms else (m,), dtype=torch.float32)
    rstd = x.new_empty((m,), dtype=torch.float32)
    return y, h, mean, rstd


def _norm_bwd_fake(dy, dh, h, mean, rstd, weight, bias, dropout_p, seed, offset, is_rms, residual_dtype):
    m, n = h.shape
    dx = dy.new_empty((m, n))
    dresidual = dy.new_empty((m, n), dtype=residual_dtype) if residual_dtype is not None else dy.new_empty((0,))
    dweight = weight.new_empty((n,)) if weight is not None else dy.new_empty((0,))
    dbias = bias.new_empty((n,)) if bias is not None else dy.new_empty((0,))
    return dx, dresidual, dweight, dbias


def _make_autograd(namespace: str):
    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, _eps, dropout_p, seed, offset, is_rms, store_h, _h_dtype = inputs
        _y, h, mean, rstd = output
        ctx.save_for_backward(h if store_h else x, None if is_rms else mean, rstd, weight, bias)
        ctx.dropout = (dropout_p, seed, offset)
        ctx.is_rms, ctx.store_h = is_rms, store_h
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(mean, rstd)

    def backward(ctx, dy, dh, _dmean, _drstd):
        h, mean, rstd, weight, bias = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros(h.shape, dtype=ctx.x_dtype, device=h.device)
        dropout_p, seed, offset = ctx.dropout
        dx, dresidual, dweight, dbias = getattr(torch.ops, namespace).norm_bwd(
            dy, dh if ctx.store_h else None, h, mean, rstd, weight, bias, dropout_p, seed, offset,
            ctx.is_rms, ctx.residual_dtype,
        )
        return (
            dx,
            None if ctx.residual_dtype is None else dresidual,
            None if weight is None else dweight,
            None if bias is None else dbias,
            None, None, None, None, None, None, None,
        )

    return setup_context, backward


_registered: set[str] = set()


def register_python_ops(namespace: str = _NAMESPACE) -> None:
    """Fake (meta) implementations of norm_fwd / norm_bwd and the autograd of norm_fwd, once
    per namespace, after the library defining the schemas is loaded (called by
    fastattn._build.load_extension; the tests use their own namespace)."""
    if namespace in _registered:
        return
    torch.library.register_fake(f"{namespace}::norm_fwd")(_norm_fwd_fake)
    torch.library.register_fake(f"{namespace}::norm_bwd")(_norm_bwd_fake)
    setup_context, backward_fn = _make_autograd(namespace)
    torch.library.register_autograd(f"{namespace}::norm_fwd", backward_fn, setup_context=setup_context)
    _registered.add(namespace)
