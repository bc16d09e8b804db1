"""Triton feed-forward: ``y = dropout(act(x @ w1.T + b1)) @ w2.T + b2``.

Kernels (Triton matmul tutorial structure: grouped tile order, fp32 accumulators, operands in
any strides so transposed weights are read in place, never copied):

- ``_ffn_fwd_kernel``: first GEMM with b1, the activation and dropout fused into the epilogue.
  It writes the saved pre-activation z (unless ``options.recompute``) and the dropped
  activation a; z never round-trips through memory to compute a. swiglu keeps two
  accumulators (gate rows and up rows of w1) and writes ``silu(gate) * up``.
- ``_ffn_matmul_kernel``: ``C = A @ B (+ bias)`` over strided views, used for the second
  forward GEMM (b2 fused) and for dx = dz @ w1, dw1 = dz^T @ x, dw2 = dy^T @ a.
- ``_ffn_bwd_dz_kernel``: ``da = dy @ w2`` with the dropout mask, act'(z) (swiglu: both
  halves) fused into the epilogue: ``dz = da * keep / (1 - p) * act'(z)``. The same epilogue
  writes the dropped activation a once (M x F), the operand of the dw2 GEMM, rather than
  recomputing it in that GEMM's prologue for every d_out tile.
- ``_ffn_bias_grad_kernel``: db1 = colsum(dz), db2 = colsum(dy), one program per column
  block looping over the rows in a fixed order (deterministic, no atomics). Not fused into the
  dw GEMMs: there A = dz^T / dy^T feeds wgmma from shared memory, and summing it as well
  either copied every A tile to registers in every program (one pipeline stage less) or, with
  a reload in the first column of tiles only, spilled registers on sm_80 (AOT-checked). The
  separate pass rereads dz and dy once, M * (d_hidden + d_out) elements: expected ~1% of the
  backward time at model sizes (not measured).
- ``_ffn_dropout_mask_kernel``: the keep mask alone, for tests and the reference.

Dropout: keep iff lane ``col % 4`` of ``tl.rand4x(seed, offset + row * ceil(F / 4) + col // 4)``
is >= p, a pure function of (seed, offset, row, col), so forward, backward and
:func:`dropout_mask` agree.

Memory: z (M x d_hidden, x's dtype) is the only activation saved for backward; with
``recompute=True`` it is not kept (M x d_hidden elements saved per call) and backward reruns
``_ffn_fwd_kernel`` to rebuild it. Backward temporaries: dz (M x d_hidden) and a (M x F).

Casting points: operands are read in their dtype, every product accumulates in fp32, the bias
is added in fp32, activation/dropout run in fp32, and the result is cast to the output's
dtype at the store. fp32 inputs use ``input_precision="ieee"`` unless ``options.allow_tf32``.

Tuning: autotune candidates per arch (sm_80, sm_90; see ``_CONFIG_TABLE``), one small config
under the interpreter. On sm_90 every 16-bit and tf32 GEMM compiles to wgmma, on sm_80 to mma
(tests/test_triton_ffn_aot.py checks each shipped config: compiles, fits, no spills).

Expected speed on an H200 (expectations, not measurements): with d_hidden = F (2F for swiglu),
forward FLOPs = 2*M*d_model*d_hidden + 2*M*F*d_out, backward 2x that (plus one forward GEMM
with recompute). For bf16 M=8192, d_model=4096, d_ff=16384 (gelu) that is 2.2 TFLOP forward
and 4.4 TFLOP backward; at an expected 60-70% of the 989 TFLOP/s bf16 datasheet peak, about
3.2-3.7 ms forward and 6.4-7.4 ms backward. We expect forward+backward >= 1.2x naive
``Linear -> act -> Linear`` in PyTorch (which round-trips z and act(z) through memory and
runs separate bias/activation/dropout/reduction kernels) and within 5% of cuBLAS running the
same GEMMs alone.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from fastattn.backends import triton_interpret_enabled
from fastattn.backends.capabilities import FeedForwardCapabilities
from fastattn.options import FeedForwardGrads, FeedForwardInputs, FeedForwardOptions, RngState

CAPABILITIES = FeedForwardCapabilities()
#: Drawn afresh for every call: specializing on them (== 1, % 16) would recompile at random.
_PER_CALL_ARGS = ["seed", "rng_offset"]

_INV_SQRT2: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(math.sqrt(2.0 / math.pi))
_GELU_TANH_C: tl.constexpr = tl.constexpr(0.044715)
# In jit code these constants multiply tensors from the right: constexpr * tensor breaks the
# triton 3.9 interpreter.


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row-tiles share their B columns in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRETER_BF16: tl.constexpr):
    if INTERPRETER_BF16:
        # The interpreter stores bf16 as uint16 and its tl.dot multiplies those integers.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _cast_out(x, ptr, INTERPRETER_BF16: tl.constexpr):
    """cast: fp32 -> ptr's element type, rounding to nearest even."""
    if INTERPRETER_BF16:
        # The interpreter truncates fp32 -> bf16: round the fp32 bits first so it is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _dropout_keep(seed, rng_offset, rows, col_start, F, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """bool (BLOCK_M, BLOCK_N): keep decision of hidden units (rows, col_start + j).

    Unit (row, col) keeps iff lane col % 4 of ``tl.rand4x(seed, offset + row * ceil(F/4) +
    col // 4)`` is >= p: one Philox call per 4 units, so a thread holds the state of a quarter
    of its tile (a call per unit spills registers on 128x128 tiles). col_start % 4 == 0.
    """
    groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    offsets = rng_offset + rows.to(tl.int64)[:, None] * ((F + 3) // 4) + groups[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, offsets)
    # join(join(u0, u2), join(u1, u3))[..., j, a, b] = u_{2a+b}: column 4j + 2a + b after reshape
    u = tl.join(tl.join(u0, u2), tl.join(u1, u3))
    return tl.reshape(u, (BLOCK_M, BLOCK_N)) >= dropout_p


@triton.jit
def _sigmoid(z):
    # Own formula: tl.sigmoid fails under the triton 3.9 interpreter. exp overflow -> 0, no NaN.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _silu_parts(g):
    s = _sigmoid(g)
    return g * s, s * (1.0 + g * (1.0 - s))  # silu(g), silu'(g)


@triton.jit
def _tanh_parts(u):
    """(1 + tanh(u), 1 - tanh(u)^2) from e = exp(-2|u|) in (0, 1]: no overflow, and no
    cancellation where tanh saturates (there 1 - t^2 is what scales gelu_tanh's derivative)."""
    e = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + e)
    one_plus_t = tl.where(u >= 0.0, 2.0 * r, 2.0 * e * r)
    return one_plus_t, 4.0 * e * r * r


@triton.jit
def _act_fwd(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32 for the elementwise activations."""
    if ACTIVATION == "relu":
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == "gelu":
        out = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    elif ACTIVATION == "gelu_tanh":
        one_plus_t, _ = _tanh_parts((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        out = 0.5 * z * one_plus_t
    else:
        out = z * _sigmoid(z)
    return out


@triton.jit
def _act_fwd_grad(z, ACTIVATION: tl.constexpr):
    """(act(z), act'(z)) in fp32 for the elementwise activations."""
    if ACTIVATION == "relu":
        out = tl.maximum(z, 0.0)
        grad = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))
        out = z * cdf
        grad = cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACTIVATION == "gelu_tanh":
        one_plus_t, sech2 = _tanh_parts((z + z * z * z * _GELU_TANH_C) * _SQRT_2_OVER_PI)
        out = 0.5 * z * one_plus_t
        grad = 0.5 * one_plus_t + 0.5 * z * sech2 * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _GELU_TANH_C))
    else:
        out, grad = _silu_parts(z)
    return out, grad


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _ffn_fwd_kernel(
    x_ptr,  # (M, K) K = d_model
    w1_ptr,  # (d_hidden, K); d_hidden = F, or 2F for swiglu (rows [gate; up])
    b1_ptr,  # (d_hidden,), read only if HAS_BIAS
    z_ptr,  # (M, d_hidden) out: pre-activation, written only if STORE_Z
    a_ptr,  # (M, F) out: dropout(act(z)), written only if STORE_A
    M,
    F,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_zm,
    stride_zn,
    stride_am,
    stride_an,
    seed,
    rng_offset,
    dropout_p,
    dropout_scale,
    M_BUCKET,  # autotuning key only
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    STORE_A: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    GATED: tl.constexpr = ACTIVATION == "swiglu"
    pid_m, pid_n = _tile_coords(M, F, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap around (their results are never stored), so only the K
    # remainder needs a load mask.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % F).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w1_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # w1.T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        wu_ptrs = w_ptrs + F * stride_wn  # the up half of w1
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        xt = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _dot(xt, wt, acc, INPUT_PRECISION, INTERPRETER_BF16)
        if GATED:
            wu = tl.load(wu_ptrs, mask=k_mask[:, None], other=0.0)
            acc_up = _dot(xt, wu, acc_up, INPUT_PRECISION, INTERPRETER_BF16)
            wu_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask_n = offs_n < F
    out_mask = (offs_m < M)[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(b1_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(b1_ptr + F + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    z_ptrs = z_ptr + offs_m.to(tl.int64)[:, None] * stride_zm + offs_n[None, :] * stride_zn
    if STORE_Z:
        tl.store(z_ptrs, _cast_out(acc, z_ptr, INTERPRETER_BF16), mask=out_mask)
        if GATED:
            tl.store(z_ptrs + F * stride_zn, _cast_out(acc_up, z_ptr, INTERPRETER_BF16), mask=out_mask)
    if STORE_A:
        # The activation is applied to the fp32 accumulator, before z is rounded.
        if GATED:
            silu, _ = _silu_parts(acc)
            act = silu * acc_up
        else:
            act = _act_fwd(acc, ACTIVATION)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_offset, offs_m, pid_n * BLOCK_N, F, dropout_p, BLOCK_M, BLOCK_N)
            act = tl.where(keep, act * dropout_scale, 0.0)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_n[None, :] * stride_an
        tl.store(a_ptrs, _cast_out(act, a_ptr, INTERPRETER_BF16), mask=out_mask)


@triton.jit
def _ffn_matmul_kernel(
    a_ptr,  # (M, K) strided view (a, dz, dz.T, dy.T)
    b_ptr,  # (K, N) strided view (w2.T, w1, x, a)
    bias_ptr,  # (N,), read only if HAS_BIAS
    c_ptr,  # (M, N) out
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    M_BUCKET,  # autotuning keys only
    K_BUCKET,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        at = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _dot(at, bt, acc, INPUT_PRECISION, INTERPRETER_BF16)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, _cast_out(acc, c_ptr, INTERPRETER_BF16), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _ffn_bwd_dz_kernel(
    dy_ptr,  # (M, K) K = d_out
    w2_ptr,  # (K, F)
    z_ptr,  # (M, d_hidden) saved or recomputed pre-activation
    dz_ptr,  # (M, d_hidden) out
    a_ptr,  # (M, F) out: dropout(act(z)), the dw2 GEMM's operand
    M,
    F,
    K,
    stride_dym,
    stride_dyk,
    stride_wk,
    stride_wn,
    stride_zm,
    stride_zn,
    stride_dzm,
    stride_dzn,
    stride_am,
    stride_an,
    seed,
    rng_offset,
    dropout_p,
    dropout_scale,
    M_BUCKET,  # autotuning key only
    ACTIVATION: tl.constexpr,
    DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    GATED: tl.constexpr = ACTIVATION == "swiglu"
    pid_m, pid_n = _tile_coords(M, F, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % F).to(tl.int64)
    dy_ptrs = dy_ptr + rows[:, None] * stride_dym + offs_k[None, :] * stride_dyk
    w_ptrs = w2_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K
        dyt = tl.load(dy_ptrs, mask=k_mask[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _dot(dyt, wt, acc, INPUT_PRECISION, INTERPRETER_BF16)
        dy_ptrs += BLOCK_K * stride_dyk
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue: acc = d act(z) before dropout; fold the mask, then act'(z).
    mask_n = offs_n < F
    out_mask = (offs_m < M)[:, None] & mask_n[None, :]
    if DROPOUT:
        keep = _dropout_keep(seed, rng_offset, offs_m, pid_n * BLOCK_N, F, dropout_p, BLOCK_M, BLOCK_N)
        acc = tl.where(keep, acc * dropout_scale, 0.0)
    row64 = offs_m.to(tl.int64)[:, None]
    z_ptrs = z_ptr + row64 * stride_zm + offs_n[None, :] * stride_zn
    dz_ptrs = dz_ptr + row64 * stride_dzm + offs_n[None, :] * stride_dzn
    z = tl.load(z_ptrs, mask=out_mask, other=0.0).to(tl.float32)  # cast: z dtype -> fp32
    if GATED:
        up = tl.load(z_ptrs + F * stride_zn, mask=out_mask, other=0.0).to(tl.float32)
        silu, dsilu = _silu_parts(z)
        act = silu * up
        tl.store(dz_ptrs, _cast_out(acc * up * dsilu, dz_ptr, INTERPRETER_BF16), mask=out_mask)
        tl.store(dz_ptrs + F * stride_dzn, _cast_out(acc * silu, dz_ptr, INTERPRETER_BF16), mask=out_mask)
    else:
        act, grad = _act_fwd_grad(z, ACTIVATION)
        tl.store(dz_ptrs, _cast_out(acc * grad, dz_ptr, INTERPRETER_BF16), mask=out_mask)
    if DROPOUT:
        act = tl.where(keep, act * dropout_scale, 0.0)
    a_ptrs = a_ptr + row64 * stride_am + offs_n[None, :] * stride_an
    tl.store(a_ptrs, _cast_out(act, a_ptr, INTERPRETER_BF16), mask=out_mask)


@triton.jit
def _ffn_bias_grad_kernel(
    g_ptr,  # (M, N) gradient rows: dz or dy
    db_ptr,  # (N,) out: column sums, in the bias dtype
    M,
    N,
    stride_gm,
    stride_gn,
    INTERPRETER_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m in range(0, tl.cdiv(M, BLOCK_M)):
        rows = m * BLOCK_M + offs_m
        ptrs = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + offs_n[None, :] * stride_gn
        acc += tl.load(ptrs, mask=(rows < M)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
    tl.store(db_ptr + offs_n, _cast_out(tl.sum(acc, axis=0), db_ptr, INTERPRETER_BF16), mask=mask_n)


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _ffn_dropout_mask_kernel(
    keep_ptr,  # (M, F) out, uint8 view of a bool tensor
    M,
    F,
    stride_km,
    seed,
    rng_offset,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, rng_offset, offs_m, tl.program_id(1) * BLOCK_N, F, dropout_p, BLOCK_M, BLOCK_N)
    ptrs = keep_ptr + offs_m.to(tl.int64)[:, None] * stride_km + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m < M)[:, None] & (offs_n < F)[None, :])


# --------------------------------------------------------------------------------------------
# Shipped configurations
# --------------------------------------------------------------------------------------------
def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


#: (arch, operand bytes, family) -> autotune candidates (BLOCK_M, BLOCK_N, BLOCK_K, warps,
#: stages). Families: "matmul" (bias epilogue: the widest tiles); "fwd"/"dz" (the
#: activation, its derivative and dropout in the epilogue, next to the accumulator); their
#: "_gated" swiglu forms (two accumulators in fwd, gate and up tiles of z in dz). Every entry
#: compiles without register spills (tests/test_triton_ffn_aot.py), which is what bounds the
#: epilogue kernels' tiles: dz holds at most 32 fp32 elements per thread.
_CONFIG_TABLE = {
    (90, 2, "matmul"): [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    (90, 2, "fwd"): [(128, 128, 64, 8, 4), (64, 128, 64, 4, 4)],
    (90, 2, "fwd_gated"): [(128, 64, 64, 8, 4), (64, 64, 64, 4, 4)],
    (90, 2, "dz"): [(128, 64, 64, 8, 4), (64, 128, 64, 8, 4)],
    (90, 2, "dz_gated"): [(128, 64, 64, 8, 4), (64, 64, 64, 4, 4)],
    (80, 2, "matmul"): [(128, 256, 32, 8, 3), (128, 128, 32, 4, 4), (64, 128, 32, 4, 4)],
    (80, 2, "fwd"): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 4)],
    (80, 2, "fwd_gated"): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 4)],
    (80, 2, "dz"): [(128, 64, 32, 8, 3), (64, 128, 32, 8, 3)],
    (80, 2, "dz_gated"): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 4)],
}
#: fp32 operands (both archs): half the K depth for the same shared memory; ieee is FMA-based.
_FP32_CONFIGS = {
    "matmul": [(128, 128, 32, 8, 3), (64, 128, 32, 8, 3)],
    "fwd": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],
    "fwd_gated": [(64, 64, 32, 8, 3)],
    "dz": [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3)],
    "dz_gated": [(64, 64, 32, 8, 3)],
}
_CONFIG_TABLE.update({(arch, 4, family): cfgs for arch in (80, 90) for family, cfgs in _FP32_CONFIGS.items()})

#: Column-sum kernel: (BLOCK_M, BLOCK_N), warps. Memory-bound and small next to the GEMMs; the
#: fp32 accumulator takes 32 registers per thread.
_BIAS_GRAD_BLOCK = (64, 64)
_BIAS_GRAD_WARPS = 4

#: Under the interpreter: one config, no autotuning. Each interpreted program costs Python
#: overhead, so tiles are 64 wide; GROUP_M=2 still exercises several tile groups.
_INTERPRETER_CONFIG = (64, 64, 64, 4, 1)
_INTERPRETER_GROUP_M = 2


def shipped_configs(arch: int, itemsize: int, family: str) -> list[triton.Config]:
    """The autotune candidates for compute capability ``arch`` (80 or 90; newer parts use
    90's, older 80's), operand size in bytes (2 or 4) and family (see ``_CONFIG_TABLE``)."""
    key = (90 if arch >= 90 else 80, 4 if itemsize >= 4 else 2, family)
    return [_cfg(*c) for c in _CONFIG_TABLE[key]]


#: (call, kernel, family, activation, the runtime arguments the launcher passes as 1, flags,
#: 16-bit dtype): the call patterns of forward/backward on contiguous tensors. fwd2 = a @ w2.T
#: (+b2); dx = dz @ w1; dw = dz.T @ x, likewise dw2 = dy.T @ a.
_AOT_CALLS = (
    ("fwd", "fwd", "fwd", "gelu", ("stride_xk", "stride_wk", "stride_zn", "stride_an"), {}, "bf16"),
    ("fwd", "fwd", "fwd_gated", "swiglu", ("stride_xk", "stride_wk", "stride_zn", "stride_an"), {}, "fp16"),
    ("dz", "dz", "dz", "gelu", ("stride_dyk", "stride_wn", "stride_zn", "stride_dzn", "stride_an"), {}, "fp16"),
    ("dz", "dz", "dz_gated", "swiglu", ("stride_dyk", "stride_wn", "stride_zn", "stride_dzn", "stride_an"), {}, "bf16"),
    ("fwd2", "matmul", "matmul", None, ("stride_ak", "stride_bk", "stride_cn"), {"HAS_BIAS": True}, "bf16"),
    ("dx", "matmul", "matmul", None, ("stride_ak", "stride_bn", "stride_cn"), {"HAS_BIAS": False}, "fp16"),
    ("dw", "matmul", "matmul", None, ("stride_am", "stride_bn", "stride_cn"), {"HAS_BIAS": False}, "bf16"),
)
#: Random values, never specialized on divisibility.
_AOT_UNALIGNED = ("seed", "rng_offset")


def aot_specs(arch: int) -> Iterator[tuple]:
    """Every shipped config of every GEMM call pattern for ``sm_<arch>``, in a 16-bit dtype,
    fp32 with tf32 and fp32 in ieee, then the bias-gradient kernel (the protocol of
    :mod:`fastattn.triton.aot`). Sizes and strides are specialized as multiples of 16, as for
    model shapes. Launches nothing."""
    for call, kernel_name, family, activation, unit_strides, flags, half in _AOT_CALLS:
        fn = _KERNELS[kernel_name]
        for dtype_name, precision in ((half, None), ("fp32", "tf32"), ("fp32", "ieee")):
            for config in shipped_configs(arch, 4 if dtype_name == "fp32" else 2, family):
                constexprs = dict(config.kwargs, INPUT_PRECISION=precision, INTERPRETER_BF16=False, **flags)
                constexprs.update({name: 1 for name in unit_strides})
                if kernel_name != "matmul":
                    constexprs.update(ACTIVATION=activation, DROPOUT=True)
                if kernel_name == "fwd":
                    constexprs.update(HAS_BIAS=True, STORE_Z=True, STORE_A=True)
                signature = {}
                for name in fn.arg_names:
                    if name in constexprs:
                        continue
                    if name.endswith("_ptr"):
                        signature[name] = "*" + dtype_name
                    elif name in ("dropout_p", "dropout_scale"):
                        signature[name] = "fp32"
                    else:
                        signature[name] = "i32"
                aligned = tuple(n for n, t in signature.items() if t == "i32" and n not in _AOT_UNALIGNED)
                kw = config.kwargs
                name = (
                    f"{call}{'[' + activation + ']' if activation else ''} "
                    f"{dtype_name}{'/' + precision if precision else ''} "
                    f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
                )
                yield (name, fn, signature, constexprs, config.num_warps, config.num_stages, aligned)
    bm, bn = _BIAS_GRAD_BLOCK
    for dtype_name in ("bf16", "fp32"):
        signature = {"g_ptr": "*" + dtype_name, "db_ptr": "*" + dtype_name, "M": "i32", "N": "i32", "stride_gm": "i32"}
        constexprs = {"stride_gn": 1, "INTERPRETER_BF16": False, "BLOCK_M": bm, "BLOCK_N": bn}
        # num_stages: the launcher's default (3).
        yield (f"db {dtype_name} {bm}x{bn} w{_BIAS_GRAD_WARPS}", _ffn_bias_grad_kernel, signature, constexprs,
               _BIAS_GRAD_WARPS, 3, ("M", "N", "stride_gm"))


def _arch_of(device: torch.device) -> Optional[int]:
    """Compute capability as an int (90 for sm_90), or None under the interpreter."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


_KERNELS = {"fwd": _ffn_fwd_kernel, "dz": _ffn_bwd_dz_kernel, "matmul": _ffn_matmul_kernel}
#: Token counts (M; K in the weight-gradient GEMMs) enter by power-of-two bucket, so a new
#: batch or sequence length reuses the tuned choice instead of benchmarking again.
_TUNE_KEYS = {"fwd": ["M_BUCKET", "F", "K"], "dz": ["M_BUCKET", "F", "K"], "matmul": ["M_BUCKET", "N", "K_BUCKET"]}


def _bucket(n: int) -> int:
    return triton.next_power_of_2(n)


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, arch: Optional[int], itemsize: int, family: str):
    """The autotuned launcher of one kernel for one arch, built at first use (not import)."""
    if arch is None:
        configs = [_cfg(*_INTERPRETER_CONFIG, group_m=_INTERPRETER_GROUP_M)]
    else:
        configs = shipped_configs(arch, itemsize, family)
    return triton.autotune(configs=configs, key=_TUNE_KEYS[kernel])(_KERNELS[kernel])


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype, options: FeedForwardOptions) -> Optional[str]:
    if dtype != torch.float32:
        return None  # tensor-core default for 16-bit operands
    return "tf32" if options.allow_tf32 else "ieee"


def _interpreter_bf16(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and triton_interpret_enabled()


def _grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def _dropout_args(options: FeedForwardOptions, rng: Optional[RngState]) -> tuple[bool, int, int, float, float]:
    p = options.dropout_p
    if p == 0.0 or rng is None:
        return False, 0, 0, 0.0, 1.0
    return True, rng.seed, rng.offset, p, 1.0 / (1.0 - p)


def _launch_fwd(
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
    z: Optional[torch.Tensor],
    a: Optional[torch.Tensor],
) -> None:
    """z (M, d_hidden) and/or a (M, F) from the first GEMM; a None output is not written."""
    x, w1 = inputs.x, inputs.w1
    M, K = x.shape
    F = inputs.w2.shape[1]
    dropout, seed, offset, p, scale = _dropout_args(options, rng)
    # An output that is not written still needs a pointer and strides: alias the other one.
    z_arg = z if z is not None else a
    a_arg = a if a is not None else z
    family = "fwd_gated" if options.activation == "swiglu" else "fwd"
    kernel = _tuned("fwd", _arch_of(x.device), x.element_size(), family)
    kernel[_grid(M, F)](
        x, w1, inputs.b1 if inputs.b1 is not None else x, z_arg, a_arg,
        M, F, K,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
        z_arg.stride(0), z_arg.stride(1), a_arg.stride(0), a_arg.stride(1),
        seed, offset, p, scale, _bucket(M),
        ACTIVATION=options.activation,
        HAS_BIAS=inputs.b1 is not None,
        STORE_Z=z is not None,
        STORE_A=a is not None,
        DROPOUT=dropout,
        INPUT_PRECISION=_input_precision(x.dtype, options),
        INTERPRETER_BF16=_interpreter_bf16(x.dtype),
    )  # fmt: skip


def _launch_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    options: FeedForwardOptions,
    bias: Optional[torch.Tensor] = None,
) -> None:
    """out (M, N) = a (M, K) @ b (K, N) + bias."""
    M, K = a.shape
    N = b.shape[1]
    kernel = _tuned("matmul", _arch_of(a.device), a.element_size(), "matmul")
    kernel[_grid(M, N)](
        a, b, bias if bias is not None else out, out,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        _bucket(M), _bucket(K),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=_input_precision(a.dtype, options),
        INTERPRETER_BF16=_interpreter_bf16(a.dtype),
    )  # fmt: skip


def _bias_grad(g: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Column sums of g (M, N) in the bias dtype, or None without a bias."""
    if bias is None:
        return None
    M, N = g.shape
    db = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)
    _ffn_bias_grad_kernel[(triton.cdiv(N, _BIAS_GRAD_BLOCK[1]),)](
        g, db, M, N, g.stride(0), g.stride(1),
        INTERPRETER_BF16=_interpreter_bf16(db.dtype),
        BLOCK_M=_BIAS_GRAD_BLOCK[0], BLOCK_N=_BIAS_GRAD_BLOCK[1], num_warps=_BIAS_GRAD_WARPS,
    )  # fmt: skip
    return db


def _launch_dz(
    dy: torch.Tensor,
    z: torch.Tensor,
    dz: torch.Tensor,
    a: torch.Tensor,
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
) -> None:
    w2 = inputs.w2
    M, K = dy.shape
    F = w2.shape[1]
    dropout, seed, offset, p, scale = _dropout_args(options, rng)
    family = "dz_gated" if options.activation == "swiglu" else "dz"
    kernel = _tuned("dz", _arch_of(dy.device), dy.element_size(), family)
    kernel[_grid(M, F)](
        dy, w2, z, dz, a,
        M, F, K,
        dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1),
        z.stride(0), z.stride(1), dz.stride(0), dz.stride(1), a.stride(0), a.stride(1),
        seed, offset, p, scale, _bucket(M),
        ACTIVATION=options.activation,
        DROPOUT=dropout,
        INPUT_PRECISION=_input_precision(dy.dtype, options),
        INTERPRETER_BF16=_interpreter_bf16(dy.dtype),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------
def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not on whichever device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def not_supported_reasons(inputs: FeedForwardInputs, options: FeedForwardOptions) -> list[str]:
    arch = _arch_of(inputs.device)
    if arch is not None and arch < 80:
        return [f"compute capability {arch / 10:.1f} is below 8.0 (Triton ffn kernels need sm_80+)"]
    return []


def forward(
    inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """y (M, d_out) in x's dtype; z (M, d_hidden) in x's dtype, or None with recompute."""
    x = inputs.x
    M = x.shape[0]
    d_hidden, F, d_out = inputs.w1.shape[0], inputs.w2.shape[1], inputs.w2.shape[0]
    z = None if options.recompute else torch.empty((M, d_hidden), dtype=x.dtype, device=x.device)
    a = torch.empty((M, F), dtype=x.dtype, device=x.device)  # freed when forward returns
    y = torch.empty((M, d_out), dtype=x.dtype, device=x.device)
    with _on_device(x):
        _launch_fwd(inputs, options, rng, z, a)
        _launch_matmul(a, inputs.w2.t(), y, options, bias=inputs.b2)
    return y, z


def backward(
    dy: torch.Tensor,
    z: Optional[torch.Tensor],
    inputs: FeedForwardInputs,
    options: FeedForwardOptions,
    rng: Optional[RngState],
) -> FeedForwardGrads:
    with _on_device(inputs.x):
        return _backward(dy, z, inputs, options, rng)


def _backward(dy, z, inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]) -> FeedForwardGrads:
    x, w1, b1, w2, b2 = inputs.x, inputs.w1, inputs.b1, inputs.w2, inputs.b2
    M = x.shape[0]
    d_hidden, F = w1.shape[0], w2.shape[1]
    if z is None:
        z = torch.empty((M, d_hidden), dtype=x.dtype, device=x.device)
        _launch_fwd(inputs, options, rng, z, None)
    dz = torch.empty((M, d_hidden), dtype=x.dtype, device=x.device)
    a = torch.empty((M, F), dtype=x.dtype, device=x.device)
    _launch_dz(dy, z, dz, a, inputs, options, rng)
    dx = torch.empty_like(x)
    _launch_matmul(dz, w1, dx, options)
    dw1 = torch.empty(w1.shape, dtype=w1.dtype, device=w1.device)
    _launch_matmul(dz.t(), x, dw1, options)
    dw2 = torch.empty(w2.shape, dtype=w2.dtype, device=w2.device)
    _launch_matmul(dy.t(), a, dw2, options)
    return FeedForwardGrads(dx=dx, dw1=dw1, db1=_bias_grad(dz, b1), dw2=dw2, db2=_bias_grad(dy, b2))


def dropout_mask(inputs: FeedForwardInputs, options: FeedForwardOptions, rng: Optional[RngState]) -> Optional[torch.Tensor]:
    """bool (M, F): the keep mask the kernels apply for this rng (None without dropout)."""
    dropout, seed, offset, p, _ = _dropout_args(options, rng)
    if not dropout:
        return None
    M, F = inputs.rows, inputs.w2.shape[1]
    keep = torch.empty((M, F), dtype=torch.bool, device=inputs.device)
    block_m, block_n = 32, 128  # unlike any GEMM tile: the mask must not depend on tiling
    with _on_device(keep):
        _ffn_dropout_mask_kernel[(triton.cdiv(M, block_m), triton.cdiv(F, block_n))](
            keep.view(torch.uint8), M, F, keep.stride(0), seed, offset, p, BLOCK_M=block_m, BLOCK_N=block_n
        )
    return keep
