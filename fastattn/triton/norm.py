"""Triton residual + LayerNorm / RMSNorm: one fused pass forward, one fused pass backward.

forward:  h = dropout(x) + residual (fp32), written once in the residual stream's dtype.
          The statistics are taken on h as stored (rounded to that dtype), so the saved h,
          mean and rstd agree exactly in backward (else a low-variance row, e.g. N = 1, turns
          the rounding of h into a gradient error of order rstd). LayerNorm: mean = E[h],
          rstd = 1/sqrt(Var[h] + eps); RMSNorm: rstd = 1/sqrt(E[h^2] + eps);
          y = xhat * weight + bias, xhat = (h - mean) * rstd.
backward: from the saved h, mean, rstd: g = dy * weight, c1 = E[xhat * g], c2 = E[g];
          dh = rstd * (g - xhat * c1 - c2) (RMSNorm: no c2) + dh_prenorm;
          dresidual = dh, dx = dh * keep / (1 - p); dweight = sum_rows(dy * xhat),
          dbias = sum_rows(dy), reduced deterministically from per-program fp32 partials.

Layout: rows up to ``FWD_MAX_FUSED_N`` (forward; ``FWD_MAX_FUSED_N_DROPOUT`` with dropout) /
``BWD_MAX_FUSED_N`` (backward) are held in registers, BLOCK_M rows per program when N is
small. Wider rows use the looped kernels over column blocks of ``LOOP_BLOCK_N``: forward, a
statistics pass (Chan's merge of per-block mean/M2) then a normalization pass recomputing h;
backward, a pass for c1/c2 then one for the gradients, the dweight/dbias partials accumulated
in the program's own global row.

Dropout: keep(row, col) = uniform(philox(key=seed, counter=(col, row, offset, 0))) >= p, a pure
function of (rng.seed, rng.offset, row, col), regenerated in backward; :func:`dropout_mask`
exposes it.

Expected traffic (an expectation from the formulas, not a measurement): forward moves
M * N * (sx + sr + sy + sh) + N * (sw + sb) bytes (sr = 0 without a residual, sh = 0 when h
aliases x); backward M * N * (sh + sdy + sdx + sdres + sdh) bytes plus the dweight/dbias
partials, 2 * P * N * 4 bytes written and read back (P = 2 x SM count rows, L2-resident for
N <= 16384). bf16 add + LayerNorm: 8 bytes per element each way, so a 4096 x 4096 call moves
134 MB: about 34 us at ~3.9 TB/s copy bandwidth, 38 us at the 90% target. The looped
backward (N > BWD_MAX_FUSED_N) reads h and dy twice and updates its partial row per row: the
second reads and the partial updates should hit L2, but it is the path to measure first.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastattn.backends.capabilities import GPU_DTYPES, NormCapabilities
from fastattn.options import (
    NormForwardResult,
    NormGrads,
    NormInputs,
    NormOptions,
    RngState,
    residual_out_dtype,
)

N_MAX = 65536
CAPABILITIES = NormCapabilities(dtypes=GPU_DTYPES, max_hidden=N_MAX)
#: Drawn afresh for every call: specializing on them (== 1, % 16) would recompile at random.
_PER_CALL_ARGS = ["seed", "offset"]

#: Widest row kept in registers by the one-pass kernels; wider rows loop over column blocks.
#: Limits from the AOT register reports (tests/test_triton_norm_aot.py): above them ptxas
#: spills on sm_80 or sm_90 (the philox state of dropout; the backward's ~6 live row arrays).
FWD_MAX_FUSED_N = 16384
FWD_MAX_FUSED_N_DROPOUT = 8192
BWD_MAX_FUSED_N = 4096
#: Column block of the looped kernels.
LOOP_BLOCK_N = 4096
#: Target elements per program tile for narrow rows (several rows per program).
TILE_ELEMENTS = 2048


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _keep_mask(seed, offset, rows, cols, dropout_p):
    """bool keep mask, broadcast of rows (BLOCK_M, 1) and cols (1, BLOCK_N)."""
    zero = (rows * 0 + cols * 0).to(tl.uint32)
    c0 = cols.to(tl.uint32) + zero
    c1 = rows.to(tl.uint32) + zero
    c2 = (zero + offset).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, zero)
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _load_h(
    X,  # (M, N) x dtype
    RES,  # (M, N) residual dtype
    rows,  # (BLOCK_M, 1) int64
    cols,  # (1, BLOCK_N) int32
    mask,
    stride_x,
    stride_res,
    dropout_p,
    dropout_scale,
    seed,
    offset,
    HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """h = dropout(x) + residual in fp32 (0 where masked)."""
    h = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = _keep_mask(seed, offset, rows, cols, dropout_p)
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RES:
        h += tl.load(RES + rows * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _norm_fwd_kernel(
    X,  # (M, N) x dtype
    RES,  # (M, N) residual dtype (unused without residual)
    W,  # (N,) weight dtype
    B,  # (N,) bias dtype
    Y,  # (M, N) x dtype
    H,  # (M, N) residual_out dtype (unused when h aliases x)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    stride_x,
    stride_res,
    stride_y,
    stride_h,
    M,
    N,
    eps,
    dropout_p,
    dropout_scale,
    seed,
    offset,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """BLOCK_M whole rows per program, BLOCK_N >= N."""
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row_ids < M
    rows = row_ids.to(tl.int64)[:, None]  # int64: row * stride may pass 2^31
    cols = tl.arange(0, BLOCK_N)[None, :]
    mask = row_mask[:, None] & (cols < N)
    h = _load_h(X, RES, rows, cols, mask, stride_x, stride_res, dropout_p, dropout_scale, seed, offset,
                HAS_RES, HAS_DROPOUT)
    if STORE_H:
        # cast: residual stream; the statistics use h as stored, consistent with the backward.
        h = h.to(H.dtype.element_ty)
        tl.store(H + rows * stride_h + cols, h, mask=mask)
        h = h.to(tl.float32)
    if IS_RMS:
        centered = h
    else:
        mean = tl.sum(h, axis=1) / N
        tl.store(MEAN + row_ids, mean, mask=row_mask)
        centered = tl.where(mask, h - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row_ids, rstd, mask=row_mask)
    y = centered * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)  # cast: output dtype


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _norm_fwd_looped_kernel(
    X,  # (M, N) x dtype
    RES,  # (M, N) residual dtype
    W,  # (N,)
    B,  # (N,)
    Y,  # (M, N) x dtype
    H,  # (M, N) residual_out dtype
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    stride_x,
    stride_res,
    stride_y,
    stride_h,
    M,
    N,
    eps,
    dropout_p,
    dropout_scale,
    seed,
    offset,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One row per program, N > BLOCK_N: a statistics pass writing h, then a normalization
    pass that recomputes h from the inputs (L2 hits) instead of reading it back."""
    row = tl.program_id(0)
    rows = tl.full((1, 1), row, tl.int64)
    count = 0.0
    mean = 0.0
    m2 = 0.0  # LayerNorm: sum of squared deviations; RMSNorm: sum of squares
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)[None, :]
        mask = cols < N
        h = _load_h(X, RES, rows, cols, mask, stride_x, stride_res, dropout_p, dropout_scale, seed, offset,
                    HAS_RES, HAS_DROPOUT)
        if STORE_H:
            h = h.to(H.dtype.element_ty)  # cast: residual stream (statistics use h as stored)
            tl.store(H + rows * stride_h + cols, h, mask=mask)
            h = h.to(tl.float32)
        if IS_RMS:
            m2 += tl.sum(tl.sum(h * h, axis=1), axis=0)
        else:
            # Chan et al.: merge this block's (count, mean, M2) into the running ones.
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(tl.sum(h, axis=1), axis=0) / n_b
            d = tl.where(mask, h - mean_b, 0.0)
            m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
            delta = mean_b - mean
            total = count + n_b
            mean += delta * (n_b / total)
            m2 += m2_b + delta * delta * (count * n_b / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    tl.store(RSTD + row, rstd)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)[None, :]
        mask = cols < N
        h = _load_h(X, RES, rows, cols, mask, stride_x, stride_res, dropout_p, dropout_scale, seed, offset,
                    HAS_RES, HAS_DROPOUT)
        if STORE_H:
            h = h.to(H.dtype.element_ty).to(tl.float32)  # the same rounding as the stored h
        if IS_RMS:
            y = h * rstd
        else:
            y = (h - mean) * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)  # cast: output dtype


@triton.jit
def _grad_h(
    h,  # (BLOCK_M, BLOCK_N) fp32
    dy,  # (BLOCK_M, BLOCK_N) fp32
    w,  # (1, BLOCK_N) fp32
    mean,  # (BLOCK_M, 1) fp32
    rstd,  # (BLOCK_M, 1) fp32
    mask,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
):
    """(xhat, g = dy * w), zero where masked."""
    if IS_RMS:
        xhat = tl.where(mask, h * rstd, 0.0)
    else:
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    if HAS_W:
        g = dy * w
    else:
        g = dy
    return xhat, g


@triton.jit
def _store_grads(
    dh,  # (BLOCK_M, BLOCK_N) fp32: gradient through y
    DH_IN,  # (M, N) residual_out dtype: prenorm gradient of h
    DX,  # (M, N) x dtype
    DRES,  # (M, N) residual dtype
    rows,
    cols,
    mask,
    stride_dhin,
    stride_dx,
    stride_dres,
    dropout_p,
    dropout_scale,
    seed,
    offset,
    HAS_DH: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    if HAS_DH:
        dh += tl.load(DH_IN + rows * stride_dhin + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        tl.store(DRES + rows * stride_dres + cols, dh.to(DRES.dtype.element_ty), mask=mask)  # cast: residual dtype
    if HAS_DROPOUT:
        keep = _keep_mask(seed, offset, rows, cols, dropout_p)
        dh = tl.where(keep, dh * dropout_scale, 0.0)
    tl.store(DX + rows * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)  # cast: x dtype


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _norm_bwd_kernel(
    H,  # (M, N) residual_out dtype: the saved h
    W,  # (N,)
    DY,  # (M, N) x dtype
    DH_IN,  # (M, N) prenorm gradient of h (unused without prenorm)
    DX,  # (M, N) x dtype
    DRES,  # (M, N) residual dtype (unused without residual)
    MEAN,  # (M,) fp32 (unused for RMSNorm)
    RSTD,  # (M,) fp32
    DW_PART,  # (P, N) fp32: this program's dweight partial row
    DB_PART,  # (P, N) fp32: this program's dbias partial row
    stride_h,
    stride_dy,
    stride_dhin,
    stride_dx,
    stride_dres,
    M,
    N,
    rows_per_program,
    dropout_p,
    dropout_scale,
    seed,
    offset,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """A strip of rows_per_program rows per program, BLOCK_M at a time, BLOCK_N >= N."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    cols = tl.arange(0, BLOCK_N)[None, :]
    col_mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    else:
        w = 1.0
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    # rows_per_program is a multiple of BLOCK_M; rows past M (last program) are masked.
    # Loop bounds from arguments only (the triton 3.6 interpreter cannot range over program_id).
    for r in range(0, rows_per_program, BLOCK_M):
        row_ids = row_start + r + tl.arange(0, BLOCK_M)
        row_mask = row_ids < M
        rows = row_ids.to(tl.int64)[:, None]
        mask = row_mask[:, None] & col_mask
        h = tl.load(H + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row_ids, mask=row_mask, other=0.0)[:, None]
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row_ids, mask=row_mask, other=0.0)[:, None]
        xhat, g = _grad_h(h, dy, w, mean, rstd, mask, IS_RMS, HAS_W)
        c1 = tl.sum(xhat * g, axis=1)[:, None] / N
        if IS_RMS:
            dh = (g - xhat * c1) * rstd
        else:
            c2 = tl.sum(g, axis=1)[:, None] / N
            dh = (g - xhat * c1 - c2) * rstd
        _store_grads(dh, DH_IN, DX, DRES, rows, cols, mask, stride_dhin, stride_dx, stride_dres,
                     dropout_p, dropout_scale, seed, offset, HAS_DH, HAS_RES, HAS_DROPOUT)
        if HAS_W:
            dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_B:
            db_acc += tl.sum(dy, axis=0)
    part = pid.to(tl.int64) * N + tl.arange(0, BLOCK_N)
    if HAS_W:
        tl.store(DW_PART + part, dw_acc, mask=tl.arange(0, BLOCK_N) < N)
    if HAS_B:
        tl.store(DB_PART + part, db_acc, mask=tl.arange(0, BLOCK_N) < N)


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _norm_bwd_looped_kernel(
    H,  # (M, N) residual_out dtype
    W,  # (N,)
    DY,  # (M, N) x dtype
    DH_IN,  # (M, N)
    DX,  # (M, N) x dtype
    DRES,  # (M, N) residual dtype
    MEAN,  # (M,) fp32
    RSTD,  # (M,) fp32
    DW_PART,  # (P, N) fp32, zero-initialized: this program's row, read-modify-write
    DB_PART,  # (P, N) fp32, zero-initialized
    stride_h,
    stride_dy,
    stride_dhin,
    stride_dx,
    stride_dres,
    M,
    N,
    rows_per_program,
    dropout_p,
    dropout_scale,
    seed,
    offset,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """N > BLOCK_N: per row, a pass for c1/c2, then a pass for the gradients."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    part_row = pid.to(tl.int64) * N
    for r in range(0, rows_per_program):
        # Rows past M (last program) are masked out of every load and store.
        row = row_start + r
        rows = tl.full((1, 1), row, tl.int64)
        in_range = rows < M
        rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
        if IS_RMS:
            mean = 0.0
        else:
            mean = tl.load(MEAN + row, mask=row < M, other=0.0)
        sum_xg = 0.0
        sum_g = 0.0
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = (cols < N) & in_range
            h = tl.load(H + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = 1.0
            xhat, g = _grad_h(h, dy, w, mean, rstd, mask, IS_RMS, HAS_W)
            sum_xg += tl.sum(tl.sum(xhat * g, axis=1), axis=0)
            sum_g += tl.sum(tl.sum(g, axis=1), axis=0)
        c1 = sum_xg / N
        c2 = sum_g / N
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)[None, :]
            mask = (cols < N) & in_range
            h = tl.load(H + rows * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = 1.0
            xhat, g = _grad_h(h, dy, w, mean, rstd, mask, IS_RMS, HAS_W)
            if IS_RMS:
                dh = (g - xhat * c1) * rstd
            else:
                dh = (g - xhat * c1 - c2) * rstd
            _store_grads(dh, DH_IN, DX, DRES, rows, cols, mask, stride_dhin, stride_dx, stride_dres,
                         dropout_p, dropout_scale, seed, offset, HAS_DH, HAS_RES, HAS_DROPOUT)
            # Own partial row: no other program touches it, so no atomics and a fixed order.
            if HAS_W:
                dw_ptr = DW_PART + part_row + cols
                tl.store(dw_ptr, tl.load(dw_ptr, mask=mask, other=0.0) + dy * xhat, mask=mask)
            if HAS_B:
                db_ptr = DB_PART + part_row + cols
                tl.store(db_ptr, tl.load(db_ptr, mask=mask, other=0.0) + dy, mask=mask)


@triton.jit
def _sum_partials_kernel(
    DW_PART,  # (P, N) fp32
    DB_PART,  # (P, N) fp32
    DW,  # (N,) weight dtype
    DB,  # (N,) bias dtype
    P,
    N,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Column block per program; partial rows summed in a fixed order (deterministic)."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    col_mask = cols < N
    dw = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    db = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        prow = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)[:, None]
        mask = (prow < P) & col_mask
        if HAS_W:
            dw += tl.load(DW_PART + prow * N + cols, mask=mask, other=0.0)
        if HAS_B:
            db += tl.load(DB_PART + prow * N + cols, mask=mask, other=0.0)
    out_cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_W:
        tl.store(DW + out_cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=out_cols < N)  # cast: param dtype
    if HAS_B:
        tl.store(DB + out_cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=out_cols < N)


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _dropout_mask_kernel(
    KEEP,  # (M, N) int8
    M,
    N,
    dropout_p,
    seed,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row_ids.to(tl.int64)[:, None]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    mask = (rows < M) & (cols < N)
    keep = _keep_mask(seed, offset, rows, cols, dropout_p)
    tl.store(KEEP + rows * N + cols, keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher: block choices
# --------------------------------------------------------------------------------------------
def _warps_for(tile: int) -> int:
    """About 8 elements (one 16-byte vector of 16-bit values) per thread, 1..16 warps."""
    return min(16, max(1, tile // 256))


class _Config(NamedTuple):
    name: str  # as in aot_specs
    looped: bool
    block_m: int
    block_n: int
    num_warps: int


def _fused_blocks(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the one-pass kernels for hidden size n."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, TILE_ELEMENTS // block_n)
    return block_m, block_n, _warps_for(block_m * block_n)


def _fwd_config(n: int, has_dropout: bool) -> _Config:
    if n <= (FWD_MAX_FUSED_N_DROPOUT if has_dropout else FWD_MAX_FUSED_N):
        block_m, block_n, warps = _fused_blocks(n)
        suffix = "_nodropout" if block_n > FWD_MAX_FUSED_N_DROPOUT else ""
        return _Config(f"fwd_n{block_n}{suffix}", False, block_m, block_n, warps)
    return _Config("fwd_looped", True, 1, LOOP_BLOCK_N, _warps_for(LOOP_BLOCK_N) // 2)


def _bwd_config(n: int) -> _Config:
    if n <= BWD_MAX_FUSED_N:
        block_m, block_n, warps = _fused_blocks(n)
        if block_n <= 32:
            # Many rows per tile: the per-row vectors (mean, rstd, c1, c2) add up, so a
            # quarter tile at 4 elements per thread (8 spilled a few bytes, AOT report sm_80).
            block_m, warps = block_m // 4, 4
        return _Config(f"bwd_n{block_n}", False, block_m, block_n, warps)
    return _Config("bwd_looped", True, 1, LOOP_BLOCK_N, _warps_for(LOOP_BLOCK_N) // 2)


@functools.lru_cache(maxsize=None)
def _partial_programs(device: torch.device) -> int:
    """Programs of the backward: about two per SM (8 under the interpreter)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # weight and bias are read with unit stride; a strided parameter is copied (N elements).
    return None if t is None else t.contiguous()


def _dropout_args(options: NormOptions, rng: Optional[RngState]) -> tuple[bool, float, float, int, int]:
    """(has_dropout, p, 1/(1-p), seed, offset)."""
    if options.dropout_p <= 0.0 or rng is None:
        return False, 0.0, 1.0, 0, 0
    p = float(options.dropout_p)
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return True, p, scale, int(rng.seed), int(rng.offset)


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------
def forward(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> NormForwardResult:
    x, res = inputs.x, inputs.residual
    w, b = _contiguous(inputs.weight), _contiguous(inputs.bias)
    m, n = x.shape
    has_dropout, p, scale, seed, offset = _dropout_args(options, rng)
    h_dtype = residual_out_dtype(inputs, options)
    store_h = res is not None or has_dropout or h_dtype != x.dtype
    is_rms = options.kind == "rms"
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    h = torch.empty((m, n), dtype=h_dtype, device=x.device) if store_h else x
    mean = None if is_rms else torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return NormForwardResult(y=y, h=h, mean=mean, rstd=rstd)
    args = (
        x,
        x if res is None else res,
        x if w is None else w,
        x if b is None else b,
        y,
        h,
        rstd if mean is None else mean,
        rstd,
        x.stride(0),
        0 if res is None else res.stride(0),
        y.stride(0),
        h.stride(0),
        m,
        n,
        float(options.eps),
        p,
        scale,
        seed,
        offset,
    )
    flags = dict(
        IS_RMS=is_rms,
        HAS_RES=res is not None,
        HAS_W=w is not None,
        HAS_B=b is not None,
        HAS_DROPOUT=has_dropout,
        STORE_H=store_h,
    )
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        cfg = _fwd_config(n, has_dropout)
        if cfg.looped:
            _norm_fwd_looped_kernel[(m,)](*args, **flags, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps)
        else:
            _norm_fwd_kernel[(triton.cdiv(m, cfg.block_m),)](
                *args, **flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps
            )
    return NormForwardResult(y=y, h=h, mean=mean, rstd=rstd)


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
    x, res = inputs.x, inputs.residual
    w, b = _contiguous(inputs.weight), _contiguous(inputs.bias)
    m, n = x.shape
    device = x.device
    has_dropout, p, scale, seed, offset = _dropout_args(options, rng)
    # The kernels index dy and dh by row stride with contiguous columns.
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    if dh is not None and dh.stride(-1) != 1:
        dh = dh.contiguous()
    dx = torch.empty((m, n), dtype=x.dtype, device=device)
    dres = None if res is None else torch.empty((m, n), dtype=res.dtype, device=device)
    dw = None if w is None else torch.empty((n,), dtype=w.dtype, device=device)
    db = None if b is None else torch.empty((n,), dtype=b.dtype, device=device)
    if m == 0:
        return NormGrads(
            dx=dx,
            dresidual=dres,
            dweight=None if dw is None else dw.zero_(),
            dbias=None if db is None else db.zero_(),
        )
    cfg = _bwd_config(n)
    looped, block_m, block_n, warps = cfg.looped, cfg.block_m, cfg.block_n, cfg.num_warps
    programs = min(_partial_programs(device), triton.cdiv(m, block_m))
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    alloc = torch.zeros if looped else torch.empty
    dw_part = alloc((programs, n), dtype=torch.float32, device=device) if w is not None else rstd
    db_part = alloc((programs, n), dtype=torch.float32, device=device) if b is not None else rstd
    args = (
        h,
        x if w is None else w,
        dy,
        dy if dh is None else dh,
        dx,
        dx if dres is None else dres,
        rstd if mean is None else mean,
        rstd,
        dw_part,
        db_part,
        h.stride(0),
        dy.stride(0),
        0 if dh is None else dh.stride(0),
        dx.stride(0),
        0 if dres is None else dres.stride(0),
        m,
        n,
        rows_per_program,
        p,
        scale,
        seed,
        offset,
    )
    flags = dict(
        IS_RMS=options.kind == "rms",
        HAS_W=w is not None,
        HAS_B=b is not None,
        HAS_DH=dh is not None,
        HAS_RES=res is not None,
        HAS_DROPOUT=has_dropout,
    )
    with torch.cuda.device(device) if x.is_cuda else contextlib.nullcontext():
        if looped:
            _norm_bwd_looped_kernel[(programs,)](*args, **flags, BLOCK_N=block_n, num_warps=warps)
        else:
            _norm_bwd_kernel[(programs,)](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        if w is not None or b is not None:
            _sum_partials_kernel[(triton.cdiv(n, 256),)](
                dw_part,
                db_part,
                dx if dw is None else dw,
                dx if db is None else db,
                programs,
                n,
                HAS_W=w is not None,
                HAS_B=b is not None,
                BLOCK_P=16,
                BLOCK_N=256,
                num_warps=4,
            )
    return NormGrads(dx=dx, dresidual=dres, dweight=dw, dbias=db)


def dropout_mask(inputs: NormInputs, options: NormOptions, rng: Optional[RngState]) -> torch.Tensor:
    """bool (M, N): True where forward and backward keep element (row, col)."""
    m, n = inputs.x.shape
    has_dropout, p, _, seed, offset = _dropout_args(options, rng)
    if not has_dropout:
        return torch.ones((m, n), dtype=torch.bool, device=inputs.device)
    keep = torch.empty((m, n), dtype=torch.int8, device=inputs.device)
    if m == 0:
        return keep.bool()
    block_m, block_n = 16, 256
    with torch.cuda.device(inputs.device) if inputs.x.is_cuda else contextlib.nullcontext():
        _dropout_mask_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            keep, m, n, p, seed, offset, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4
        )
    return keep.bool()


# --------------------------------------------------------------------------------------------
# Ahead-of-time check of the shipped configurations (fastattn.triton.aot protocol)
# --------------------------------------------------------------------------------------------
def aot_specs(arch: int) -> Iterator[tuple]:
    """Every block configuration the launchers can pick, each with all features on (the most
    live registers): bf16 x/y/dy/dx, fp32 residual stream and weights, dropout (except the
    ``_nodropout`` ones, only used without it), prenorm."""
    fwd_sig = {
        "X": "*bf16", "RES": "*fp32", "W": "*fp32", "B": "*fp32", "Y": "*bf16", "H": "*fp32",
        "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i32", "stride_res": "i32", "stride_y": "i32",
        "stride_h": "i32", "M": "i32", "N": "i32", "eps": "fp32", "dropout_p": "fp32",
        "dropout_scale": "fp32", "seed": "i32", "offset": "i32",
    }
    fwd_flags = dict(IS_RMS=False, HAS_RES=True, HAS_W=True, HAS_B=True, HAS_DROPOUT=True, STORE_H=True)
    bwd_sig = {
        "H": "*fp32", "W": "*fp32", "DY": "*bf16", "DH_IN": "*fp32", "DX": "*bf16", "DRES": "*fp32",
        "MEAN": "*fp32", "RSTD": "*fp32", "DW_PART": "*fp32", "DB_PART": "*fp32", "stride_h": "i32",
        "stride_dy": "i32", "stride_dhin": "i32", "stride_dx": "i32", "stride_dres": "i32", "M": "i32",
        "N": "i32", "rows_per_program": "i32", "dropout_p": "fp32", "dropout_scale": "fp32",
        "seed": "i32", "offset": "i32",
    }
    bwd_flags = dict(IS_RMS=False, HAS_W=True, HAS_B=True, HAS_DH=True, HAS_RES=True, HAS_DROPOUT=True)
    fwd_div = ("stride_x", "stride_res", "stride_y", "stride_h", "N")
    bwd_div = ("stride_h", "stride_dy", "stride_dhin", "stride_dx", "stride_dres", "N")
    fwd_configs = {_fwd_config(2**k, d) for k in range(FWD_MAX_FUSED_N.bit_length() + 1) for d in (False, True)}
    for cfg in sorted(fwd_configs, key=lambda c: (c.looped, c.block_n)):
        flags = dict(fwd_flags, HAS_DROPOUT=not cfg.name.endswith("_nodropout"), BLOCK_N=cfg.block_n)
        if cfg.looped:
            yield (cfg.name, _norm_fwd_looped_kernel, fwd_sig, flags, cfg.num_warps, 1, fwd_div)
        else:
            yield (cfg.name, _norm_fwd_kernel, fwd_sig, dict(flags, BLOCK_M=cfg.block_m), cfg.num_warps, 1,
                   fwd_div if cfg.block_n >= 16 else ())
    bwd_configs = {_bwd_config(2**k) for k in range(BWD_MAX_FUSED_N.bit_length() + 1)}
    for cfg in sorted(bwd_configs, key=lambda c: (c.looped, c.block_n)):
        flags = dict(bwd_flags, BLOCK_N=cfg.block_n)
        if cfg.looped:
            yield (cfg.name, _norm_bwd_looped_kernel, bwd_sig, flags, cfg.num_warps, 1, bwd_div)
        else:
            yield (cfg.name, _norm_bwd_kernel, bwd_sig, dict(flags, BLOCK_M=cfg.block_m), cfg.num_warps, 1,
                   bwd_div if cfg.block_n >= 16 else ())
    sum_sig = {"DW_PART": "*fp32", "DB_PART": "*fp32", "DW": "*bf16", "DB": "*bf16", "P": "i32", "N": "i32"}
    yield ("sum_partials", _sum_partials_kernel, sum_sig, dict(HAS_W=True, HAS_B=True, BLOCK_P=16, BLOCK_N=256),
           4, 1, ("N",))
    mask_sig = {"KEEP": "*i8", "M": "i32", "N": "i32", "dropout_p": "fp32", "seed": "i32", "offset": "i32"}
    yield ("dropout_mask", _dropout_mask_kernel, mask_sig, dict(BLOCK_M=16, BLOCK_N=256), 4, 1, ("N",))
    # Triton turns an integer argument equal to 1 into a constant (M = 1 when decoding one
    # token, seed or offset 1): the kernels must compile with every such argument constant.
    fwd1, bwd1, fwd_loop, bwd_loop = _fwd_config(1, True), _bwd_config(1), _fwd_config(N_MAX, True), _bwd_config(N_MAX)
    ones_cases = (
        (_norm_fwd_kernel, fwd_sig, dict(fwd_flags, BLOCK_M=fwd1.block_m, BLOCK_N=1), fwd1.num_warps),
        (_norm_fwd_looped_kernel, fwd_sig, dict(fwd_flags, BLOCK_N=fwd_loop.block_n), fwd_loop.num_warps),
        (_norm_bwd_kernel, bwd_sig, dict(bwd_flags, BLOCK_M=bwd1.block_m, BLOCK_N=1), bwd1.num_warps),
        (_norm_bwd_looped_kernel, bwd_sig, dict(bwd_flags, BLOCK_N=bwd_loop.block_n), bwd_loop.num_warps),
        (_sum_partials_kernel, sum_sig, dict(HAS_W=True, HAS_B=True, BLOCK_P=16, BLOCK_N=256), 4),
        (_dropout_mask_kernel, mask_sig, dict(BLOCK_M=16, BLOCK_N=256), 4),
    )
    for kernel, sig, constexprs, warps in ones_cases:
        ones = {a: 1 for a, t in sig.items() if t == "i32"}
        yield (f"{kernel.__name__.strip('_')} ints=1", kernel, {a: t for a, t in sig.items() if a not in ones},
               dict(constexprs, **ones), warps, 1, ())
