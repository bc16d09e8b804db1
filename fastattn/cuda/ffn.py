"""CUDA feed-forward: ``y = dropout(act(x @ w1.T + b1)) @ w2.T + b2``.

The primitives call ``torch.ops.fastattn.ffn_fwd`` / ``ffn_bwd`` (csrc/ffn.cpp), which run
one tensor-core GEMM template (kernels/ffn/ffn_gemm_kernel.cuh: mma.sync m16n8k16, ldmatrix,
4-stage cp.async ring, NT / NN / TN layouts) with fused epilogues:

- forward: ``x @ w1.T`` with b1, the activation and dropout in the epilogue (swiglu: gate and
  up tiles of the same columns in two accumulators), writing a = dropout(act(z)) and, unless
  ``options.recompute``, z; then ``a @ w2.T + b2``.
- backward: ``dy @ w2`` with ``* keep / (1 - p) * act'(z)`` in the epilogue, which also writes
  the dropped activation a_d; then dw2 = dy^T a_d, dx = dz w1, dw1 = dz^T x, and db1 / db2 by
  a deterministic two-pass column sum. With ``recompute`` a plain biased GEMM rebuilds z first.

On an H100/H200 (sm_90) with the CUTLASS headers present at build time (``FASTATTN_HAVE_CUTLASS``),
the plain GEMMs and the relu / gelu / gelu_tanh / silu epilogues without dropout run CUTLASS 3.x
TMA + wgmma kernels whose epilogue visitor trees compute the same fp32 formulas
(kernels/ffn/ffn_sm90_launch_template.h); dropout, swiglu, operands TMA cannot describe
(bases off 16 bytes, strides or contiguous sizes off 8 elements) and every other GPU use the
hand-written kernel. ``FASTATTN_FFN_CUTLASS=0`` forces the hand-written kernel everywhere
(docs/cuda_ffn.md); :func:`cutlass_serves` tells which engine a device would use.

Dropout keep mask of the (M, F) activation: element (row, col) is kept iff
``dropout_keep(seed, offset, row * F + col, threshold(p))`` of kernels/common/philox.cuh, a pure
function of (seed, offset, row, col) and F.

Casting points: operands are read in their dtype; products accumulate in fp32; bias,
activation, dropout and act' are applied in fp32; z, a, dz, a_d and every output are rounded
to x's dtype when stored; bias gradients sum the stored dz / dy in fp32.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from fastattn.backends.capabilities import HALF_DTYPES, FeedForwardCapabilities
from fastattn.options import FeedForwardGrads, FeedForwardInputs, FeedForwardOptions, RngState

# float32 is not served: the kernels are fp16/bf16 tensor-core GEMMs (mma.sync m16n8k16, and
# wgmma on sm_90); the triton backend serves float32.
CAPABILITIES = FeedForwardCapabilities(dtypes=HALF_DTYPES)

# Kernel sizes are int32 with room for tile arithmetic (kMaxDim in kernels/ffn/ffn_params.h).
_MAX_DIM = 2**31 - 1 - 256


def not_supported_reasons(inputs: FeedForwardInputs, options: FeedForwardOptions) -> list[str]:
    sizes = {
        "rows (M)": inputs.rows,
        "d_model": inputs.x.shape[1],
        "d_hidden": inputs.w1.shape[0],
        "d_out": inputs.w2.shape[0],
    }
    return [
        f"{name} = {size} is above {_MAX_DIM} (int32 kernel indexing)"
        for name, size in sizes.items()
        if size > _MAX_DIM
    ]


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake (meta) kernels and autograd of fastattn::ffn_fwd / ffn_bwd; called once by
    fastattn._build after the extension (which defines the schemas) is loaded."""
    torch.library.register_fake("fastattn::ffn_fwd")(_ffn_fwd_fake)
    torch.library.register_fake("fastattn::ffn_bwd")(_ffn_bwd_fake)
    torch.library.register_autograd("fastattn::ffn_fwd", _ffn_fwd_backward, setup_context=_ffn_fwd_setup_context)


def _ops():
    from fastattn.cuda import ensure_loaded

    ensure_loaded()
    return torch.ops.fastattn


def _ffn_fwd_fake(x, w1, b1, w2, b2, activation, dropout_p, seed, offset, save_z):
    y = x.new_empty((x.shape[0], w2.shape[0]))
    z = x.new_empty((x.shape[0], w1.shape[0])) if save_z else x.new_empty((0,))
    return y, z


def _ffn_bwd_fake(dy, z, x, w1, b1, w2, b2, activation, dropout_p, seed, offset):
    db1 = x.new_empty((w1.shape[0],)) if b1 is not None else x.new_empty((0,))
    db2 = x.new_empty((w2.shape[0],)) if b2 is not None else x.new_empty((0,))
    return x.new_empty(x.shape), w1.new_empty(w1.shape), db1, w2.new_empty(w2.shape), db2


def _ffn_fwd_setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, dropout_p, seed, offset, save_z = inputs
    _, z = output
    # z is a saved intermediate, not a differentiable result.
    ctx.mark_non_differentiable(z)
    ctx.save_for_backward(x, w1, b1, w2, b2, z if save_z else None)
    ctx.args = (activation, dropout_p, seed, offset)


def _ffn_fwd_backward(ctx, dy, _dz):
    x, w1, b1, w2, b2, z = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = torch.ops.fastattn.ffn_bwd(dy.contiguous(), z, x, w1, b1, w2, b2, *ctx.args)
    return (
        dx,
        dw1,
        db1 if b1 is not None else None,
        dw2,
        db2 if b2 is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


def cutlass_serves(
    device: Union[torch.device, str, int, None] = None, activation: Optional[str] = None, dropout: bool = False
) -> bool:
    """Whether the FFN GEMMs run on the CUTLASS sm_90a kernels on this CUDA device
    (``fastattn::ffn_cutlass_serves``): the extension was built with the CUTLASS headers, the
    device runs its sm_90a image, ``FASTATTN_FFN_CUTLASS`` is not ``0`` (read per call), and
    the epilogue is one CUTLASS computes. ``activation=None`` asks about the plain GEMMs
    (second forward GEMM, dx, dw1, dw2); an activation asks about the two activation GEMMs
    (``x @ w1.T`` and ``dy @ w2``), which stay hand-written for swiglu and with dropout.

    Operands are assumed TMA-compatible (16-byte aligned bases, row strides and contiguous
    sizes multiples of 8 elements); others take the hand-written kernel whatever this says.
    ``device=None`` is the current CUDA device.
    """
    if device is None:
        index = torch.cuda.current_device()
    else:
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"cutlass_serves needs a CUDA device, got {device}")
        index = torch.cuda.current_device() if device.index is None else device.index
    return bool(_ops().ffn_cutlass_serves(index, activation, dropout))


def _rng_args(options: FeedForwardOptions, rng: Optional[RngState]) -> tuple[int, int]:
    if options.dropout_p == 0.0:
        return 0, 0
    if rng is None:
        raise ValueError("dropout_p > 0 needs an RngState (drawn by the autograd layer)")
    return rng.seed, rng.offset


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def forward(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]):
    """y (M, d_out) in x's dtype; z (M, d_hidden) in x's dtype, or None with recompute."""
    seed, offset = _rng_args(options, rng)
    y, z = _ops().ffn_fwd(
        inputs.x,
        inputs.w1,
        _contiguous(inputs.b1),
        inputs.w2,
        _contiguous(inputs.b2),
        options.activation,
        options.dropout_p,
        seed,
        offset,
        not options.recompute,
    )
    return y, (None if options.recompute else z)


def backward(
    dy: torch.Tensor,
    z: Optional[torch.Tensor],
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
) -> FeedForwardGrads:
    seed, offset = _rng_args(options, rng)
    dx, dw1, db1, dw2, db2 = _ops().ffn_bwd(
        dy.contiguous(),
        z,
        inputs.x,
        inputs.w1,
        _contiguous(inputs.b1),
        inputs.w2,
        _contiguous(inputs.b2),
        options.activation,
        options.dropout_p,
        seed,
        offset,
    )
    return FeedForwardGrads(
        dx=dx,
        dw1=dw1,
        db1=db1 if inputs.b1 is not None else None,
        dw2=dw2,
        db2=db2 if inputs.b2 is not None else None,
    )
