"""CUDA FlashAttention: backend primitives over ``torch.ops.fastattn.attention_fwd`` and
``attention_bwd`` (csrc/attention.cpp, kernels/attention/), plus their fake tensors and autograd.

Kernels (kernels/attention/, design and expected figures in docs/cuda_attention.md):

- sm_90 forward (FlashAttention-3 style, ``flash_fwd_sm90_kernel.cuh``): warpgroup MMA
  (``wgmma``) on sm_90a, 128 query rows per CTA in 2 warpgroups, ``S = Q K^T`` with both
  operands in 128-byte-swizzled shared memory, ``O += P V`` with P from registers, the softmax
  of one key block overlapping the P V of the previous one. It serves the forward on a
  compute-capability 9.x GPU when there is no dropout, sliding window, softcap or ALiBi
  (head-dim buckets 64, 128, 256; :func:`forward_kernel`, the rule of
  ``kernels/attention/flash_api.cu``); ``FASTATTN_DISABLE_SM90_FWD=1`` turns it off.
- everything else (sm_80+, dropout, window / softcap / ALiBi, the whole backward): warp-level
  ``mma.sync.m16n8k16`` (fp32 accumulation) fed by ``ldmatrix`` from shared memory and
  ``cp.async`` tile loads, one code path for sm_80 and sm_90.

Both forward kernels return the same out and fp32 lse, so the backward does not care which ran.

- forward (mma.sync): one CTA per (128 or 64 query rows, head, batch); each warp owns 16 or 32
  rows, so the online softmax (exp2, scale folded with log2 e) runs in the accumulator
  registers and P is reused in registers as the A operand of P V. Returns out and the fp32 lse.
- backward: delta = rowsum(dO * O); a dK/dV kernel per key block that loops over the query
  heads of its GQA group and the query blocks (dK, dV in fp32 registers; when that grid is
  smaller than the GPU, e.g. MQA with a small batch, the group's heads are split over several
  CTAs whose fp32 partials a reduction sums in a fixed order); dQ either
  accumulated with fp32 atomics from the same kernel (default) or, ``deterministic``, by a
  separate kernel that loops over key blocks (bitwise reproducible).
- head dims 1..256 served by buckets 32, 64, 96, 128, 192, 256 (columns past the real head dim
  masked; a head dim that is not a multiple of 8 is zero-padded by the host code);
  any seqlen_q / seqlen_k; causal bottom-right or top-left; GQA / MQA; key_padding_mask;
  attn_mask bool / q's dtype / fp32 with any strides (0 = broadcast); dropout from
  kernels/common/philox.cuh; rows that see no key give 0, lse -inf and zero gradients.
- flash-attn 2 extras (issue 12), forward and backward, mma.sync kernels: sliding window as a
  generalisation of the causal band (key blocks outside it skipped on both sides, causal = right
  edge 0); softcap ``c * tanh(scale * q.k / c)`` on the fp32 scores, dS times ``1 - tanh^2``
  (tanh recomputed from S); ALiBi ``-slope[b, h] * |i + shift - j|`` from (H,) or (B, H) fp32
  slopes, added in the mask pass. All three are runtime data (no extra kernel instantiations).
  Not served here: variable-length batches and KV-cache decoding (the triton backend serves them).

Casting points: q, k, v, dO are read in their dtype; S, dP, O, dK, dV, dQ accumulate in fp32;
P and dS are rounded to the input dtype as mma operands; out, dq, dk, dv are rounded when
stored; lse and delta stay fp32.

Dropout keep mask of the logical (B, H, Lq, Lk) probability tensor: element
e = ((b * H + h) * Lq + i) * Lk + j is kept iff ``dropout_keep(seed, offset, e, threshold(p))``
(kernels/common/philox.cuh); :func:`dropout_mask` materialises it.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from fastattn.backends.capabilities import HALF_DTYPES, AttentionCapabilities
from fastattn.cuda import ensure_loaded
from fastattn.cuda.philox import dropout_keep_mask
from fastattn.options import AttentionInputs, AttentionOptions, RngState

# float32 is not served: the kernels are fp16 / bf16 tensor-core kernels (mma.sync
# m16n8k16); the triton backend serves float32.
CAPABILITIES = AttentionCapabilities(
    dtypes=HALF_DTYPES, min_head_dim=1, max_head_dim=256, window=True, softcap=True, alibi=True
)

# Batch and heads are grid dimensions z and y (csrc/attention.cpp).
_MAX_GRID_YZ = 65535


def not_supported_reasons(inputs: AttentionInputs, options: AttentionOptions) -> list[str]:
    reasons = []
    if inputs.batch > _MAX_GRID_YZ:
        reasons.append(f"batch {inputs.batch} is above {_MAX_GRID_YZ} (CUDA grid limit)")
    if inputs.nheads > _MAX_GRID_YZ:
        reasons.append(f"nheads {inputs.nheads} is above {_MAX_GRID_YZ} (CUDA grid limit)")
    mask = inputs.attn_mask
    if mask is not None and mask.dtype not in (torch.bool, inputs.dtype, torch.float32):
        reasons.append(f"attn_mask dtype {str(mask.dtype).replace('torch.', '')} is not supported "
                       "(bool, q's dtype or float32)")
    if inputs.device.type == "cuda" and torch.cuda.get_device_capability(inputs.device) < (8, 0):
        reasons.append("needs a GPU of compute capability 8.0 or newer (mma.sync f16/bf16 m16n8k16)")
    return reasons


#: Forward kernels of kernels/attention/flash_api.cu.
SM90_WGMMA = "sm90_wgmma"
MMA_SYNC = "mma_sync"


def forward_kernel(dropout_p: float, capability: tuple[int, int], extras: bool = False) -> str:
    """Which forward kernel serves a call (``fwd_uses_sm90`` in kernels/attention/flash_api.cu):
    the wgmma kernel on a 9.x device without dropout and without ``extras`` (a sliding window,
    softcap or ALiBi: :func:`uses_extras`), every head dim up to 256, unless
    ``FASTATTN_DISABLE_SM90_FWD`` is set (and not "0"); the mma.sync kernel otherwise, also when
    the extension was built without sm_90a code (the launcher then falls back)."""
    disabled = os.environ.get("FASTATTN_DISABLE_SM90_FWD", "") not in ("", "0")
    if capability[0] == 9 and dropout_p == 0.0 and not extras and not disabled:
        return SM90_WGMMA
    return MMA_SYNC


def uses_extras(inputs: AttentionInputs, options: AttentionOptions) -> bool:
    """Whether a call has a sliding window, softcap or ALiBi, as csrc/attention.cpp sees it: a
    window side at least as long as both sequences is unbounded, causal alone is no window."""
    longest = max(inputs.seqlen_q, inputs.seqlen_k)
    window = 0 <= options.window_left < longest or (
        not options.causal and 0 <= options.window_right < longest)
    return window or options.softcap > 0 or inputs.alibi_slopes is not None


def _dropout_args(options: AttentionOptions, rng: Optional[RngState]) -> tuple[float, int, int]:
    if options.dropout_p == 0.0:
        return 0.0, 0, 0
    if rng is None:
        raise ValueError("dropout_p > 0 needs an RngState (drawn by the autograd layer)")
    return options.dropout_p, rng.seed, rng.offset


def dropout_mask(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (B, H, Lq, Lk) keep mask the kernels apply to the probabilities (None without
    dropout)."""
    if options.dropout_p == 0.0:
        return None
    p, seed, offset = _dropout_args(options, rng)
    shape = (inputs.batch, inputs.nheads, inputs.seqlen_q, inputs.seqlen_k)
    # The host code hands p to the kernels as a float32 (csrc/attention.cpp): same threshold.
    p32 = float(torch.tensor(p, dtype=torch.float32))
    return dropout_keep_mask(seed, offset, shape, p32, device=inputs.device)


def forward(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]):
    """out (B, Lq, H, D) in q's dtype, lse (B, H, Lq) fp32 (natural log, -inf for dead rows)."""
    ensure_loaded()
    p, seed, offset = _dropout_args(options, rng)
    return torch.ops.fastattn.attention_fwd(
        inputs.q, inputs.k, inputs.v, inputs.key_padding_mask, inputs.attn_mask, options.softmax_scale,
        options.causal, options.causal_alignment == "top_left", p, seed, offset,
        options.window_left, options.window_right, options.softcap, inputs.alibi_slopes,
    )


def backward(
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    inputs: AttentionInputs,
    options: AttentionOptions,
    rng: Optional[RngState],
):
    """dq (B, Lq, H, D), dk and dv (B, Lk, Hkv, D) in the inputs' dtype."""
    ensure_loaded()
    p, seed, offset = _dropout_args(options, rng)
    return torch.ops.fastattn.attention_bwd(
        dout, inputs.q, inputs.k, inputs.v, out, lse, inputs.key_padding_mask, inputs.attn_mask,
        options.softmax_scale, options.causal, options.causal_alignment == "top_left", p, seed, offset,
        options.deterministic, options.window_left, options.window_right, options.softcap, inputs.alibi_slopes,
    )


# --------------------------------------------------------------------------------------------
# Fake tensors and autograd of the ops (torch.compile, opcheck, direct torch.ops use)
# --------------------------------------------------------------------------------------------
def _attention_fwd_fake(q, k, v, key_padding_mask, attn_mask, softmax_scale, causal, causal_top_left, dropout_p,
                        seed, offset, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    b, lq, h, d = q.shape
    return q.new_empty((b, lq, h, d)), q.new_empty((b, h, lq), dtype=torch.float32)


def _attention_bwd_fake(dout, q, k, v, out, lse, key_padding_mask, attn_mask, softmax_scale, causal,
                        causal_top_left, dropout_p, seed, offset, deterministic, window_left=-1, window_right=-1,
                        softcap=0.0, alibi_slopes=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, attn_mask, *scalars, window_left, window_right, softcap, alibi_slopes = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, attn_mask, alibi_slopes, out, lse)
    ctx.scalars = tuple(scalars)  # softmax_scale, causal, causal_top_left, dropout_p, seed, offset
    ctx.extras = (window_left, window_right, softcap)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    # Deterministic dQ: direct torch.ops users (torch.compile, opcheck) get reproducible
    # gradients; the public API goes through fastattn.ops and honours options.deterministic.
    q, k, v, key_padding_mask, attn_mask, alibi_slopes, out, lse = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.fastattn.attention_bwd(
        dout.contiguous(), q, k, v, out, lse, key_padding_mask, attn_mask, *ctx.scalars, True, *ctx.extras,
        alibi_slopes,
    )
    return dq, dk, dv, *([None] * 12)


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake (meta) kernels of fastattn::attention_fwd / attention_bwd and the autograd of
    attention_fwd; called once by fastattn._build after the extension (which defines the
    schemas) is loaded."""
    torch.library.register_fake("fastattn::attention_fwd")(_attention_fwd_fake)
    torch.library.register_fake("fastattn::attention_bwd")(_attention_bwd_fake)
    torch.library.register_autograd("fastattn::attention_fwd", _backward, setup_context=_setup_context)
