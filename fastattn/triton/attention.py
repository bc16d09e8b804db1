"""Triton FlashAttention (the FlashAttention-2 algorithm): fused, tiled, online-softmax
attention that never materializes the (seqlen_q x seqlen_k) score matrix.

Kernels, in call order:

- ``_attn_fwd_kernel``: one program per (query block, head, batch). Streams key/value
  blocks, keeps the running row max ``m`` and row sum ``l`` in fp32 (log2 units: the softmax
  scale is folded with log2(e) and ``exp2`` is used), writes the output and the logsumexp
  (natural log, fp32). Key blocks a causal query block cannot see are never visited; the key
  loop is split into full blocks (no bound or causal mask) and boundary blocks (masked).
- ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dO * O)`` in fp32.
- ``_attn_bwd_dkdv_kernel``: one program per (key block, kv head, batch) recomputes P from the
  saved logsumexp and accumulates dK/dV in fp32 registers. For grouped-query attention it
  loops over the query heads of its kv head inside the kernel, so dK/dV are reduced without
  atomics and without repeating k/v in memory. With ``D_SPLIT`` > 1 (D=256 on sm_90) each key
  block has D_SPLIT programs that all recompute P and dP but own a slice of dK/dV's head dim.
- ``_attn_bwd_dq_kernel``: one program per (query block, head, batch) recomputes P and dP and
  owns its dQ rows. No atomics anywhere, so the backward is deterministic (bitwise-identical
  gradients run to run) whatever ``options.deterministic`` says. The price is recomputing
  Q K^T and dO V^T (7 block GEMMs instead of 5); an atomic-dQ variant inside the dK/dV kernel
  was built and dropped: it spilled registers in every D=128 config tried (AOT). It splits
  dQ's head dim over ``D_SPLIT`` programs as dK/dV does (masked D=256 on sm_90, fp32 D=256
  on sm_80).

Masking semantics (see ``fastattn/options.py``): causal in both alignments through one
``causal_shift`` (query i sees key j iff ``j <= i + causal_shift``); key_padding_mask and bool
attn_mask are loaded as bytes (False = -inf score); a float attn_mask is added to the scaled
scores; every mask is read through its strides (stride 0 on broadcast dims). A query row that
sees no key keeps ``m = -inf``: the online softmax then uses 0 as its reference max (so
``exp2(-inf - -inf)`` never occurs), the row ends with ``l = 0`` and is written as output 0 and
lse -inf; the backward reads lse -inf as +inf, which makes every probability of that row 0, so
its gradients are 0, never NaN.

Dropout is applied to the normalized probabilities and regenerated in the backward, never
stored. One Philox4x32-10 call (seed ``rng.seed``) serves the 2 x 2 group of queries
{i, i + 8} x keys {j, j + 8}, i and j in ``16 * n + (0..7)``: its counter is
``(gj, gi, b * H + h, rng.offset)`` with ``gi = (i // 16) * 8 + i % 8`` (gj likewise), and
the keep decision of (b, h, i, j) is ``u >= dropout_p`` with ``u`` its word
``2 * ((i // 8) % 2) + (j // 8) % 2`` as a uniform. Rows and columns 8 apart sit in the same
thread of the mma / wgmma accumulator layouts, in both the (queries x keys) and the transposed
dK/dV orientation, so the four words land where they are used without moving data: a quarter
of the Philox work and live state of one call per element (which spilled). The mask is a pure
function of (seed, offset, b, h, i, j) in four 32-bit counters, so no offset overflows at
128k x 128k. :func:`dropout_mask` materializes it (through the same Triton function) for tests.

Precision: inputs fp16 / bf16 / fp32, every dot accumulates in fp32; probabilities and dS are
rounded to the input dtype before their tensor-core dot (the casting points are marked in the
code). fp32 inputs use ``input_precision="ieee"`` (FMA units, no tensor cores): tf32 would
round q and k to 10 mantissa bits and fail the fp32 tolerance. With dropout or an attn_mask
the autotuner tries only the smaller configs shipped for those launches (``masked``), where
the score-shaped mask tile and the dropout words fit in registers (see ``select_configs``).

Large tensors: batch/head/sequence offsets are formed in int64 before they meet a stride; the
in-block offsets stay int32, so 128k-token sequences of packed qkv views do not overflow.

Block configurations: ``SHIPPED_CONFIGS[arch][kernel]`` for sm_80 (Ampere, mma.sync) and
sm_90 (Hopper, wgmma), autotuned per (head dim, causal, masks, sequence-length bucket, dtype)
and pruned by head dim, dtype class, launch kind (dropout / attn_mask or neither) and an
estimate of shared memory; every one compiles without register spills for the launches it
serves (AOT test, ``aot_specs``). The interpreter uses the small
``INTERPRETER_CONFIGS``. Expected speeds are written down in ``docs/attention_perf.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastattn.backends import triton_interpret_enabled
from fastattn.backends.capabilities import AttentionCapabilities
from fastattn.options import AttentionInputs, AttentionOptions, KVCacheInputs, RngState

CAPABILITIES = AttentionCapabilities(
    min_head_dim=8, max_head_dim=256, max_seqlen=131072, window=True, softcap=True, alibi=True, varlen=True,
    kvcache=True, paged_kvcache=True,
)

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
#: Different on every dropout call: no recompilation for their divisibility or value 1.
_PER_CALL_ARGS = ["seed", "rng_offset"]


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` in fp32. UPCAST is set only under the interpreter for bf16: triton's
    interpreter multiplies bf16 operands as their raw uint16 bits; bf16 -> fp32 is exact."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _interleave_2x2(a00, a01, a10, a11, R: tl.constexpr, C: tl.constexpr):
    """(R, C) tile whose element (16x + 8s + u, 16y + 8t + v) is a_st[8x + u, 8y + v]
    (a_st: (R // 2, C // 2)). Rows i, i + 8 and columns j, j + 8 sit in the same thread of
    the mma / wgmma accumulator layouts, so no data moves between threads."""
    a00 = tl.reshape(a00, (R // 16, 8, C // 16, 8))
    a01 = tl.reshape(a01, (R // 16, 8, C // 16, 8))
    a10 = tl.reshape(a10, (R // 16, 8, C // 16, 8))
    a11 = tl.reshape(a11, (R // 16, 8, C // 16, 8))
    j = tl.join(tl.join(a00, a01), tl.join(a10, a11))  # (x, u, y, v, t, s)
    return tl.reshape(tl.permute(j, (0, 5, 1, 2, 4, 3)), (R, C))


@triton.jit
def _dropout_keep(seed, rng_offset, bh, start_row, start_col, dropout_p,
                  R: tl.constexpr, C: tl.constexpr, ROWS_ARE_KEYS: tl.constexpr):
    """Keep decisions of an (R, C) tile starting at (start_row, start_col) of head
    ``bh = b * H + h``; rows are queries (columns keys) unless ROWS_ARE_KEYS. One Philox call
    serves the 2x2 group of queries {i, i + 8} x keys {j, j + 8} (i, j multiples of 16 plus
    0..7): counter (key group, query group, bh, offset), word 2 * (query half) + key half."""
    tl.static_assert(R % 16 == 0 and C % 16 == 0, "dropout tiles are made of 16 x 16 groups")
    # Row 16x + 8s + u (start_row a multiple of 16) belongs to group start_row / 2 + 8x + u.
    gr = start_row // 2 + tl.arange(0, R // 2)
    gc = start_col // 2 + tl.arange(0, C // 2)
    z = gr[:, None] * 0 + gc[None, :] * 0
    if ROWS_ARE_KEYS:
        w0, w1, w2, w3 = tl.philox(seed, gr[:, None] + z, gc[None, :] + z, z + bh, z + rng_offset)
        # (key half s, query half t) -> word 2 t + s
        r = _interleave_2x2(w0, w2, w1, w3, R, C)
    else:
        w0, w1, w2, w3 = tl.philox(seed, gc[None, :] + z, gr[:, None] + z, z + bh, z + rng_offset)
        r = _interleave_2x2(w0, w1, w2, w3, R, C)
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _tanh(x):
    """fp32 tanh from exp2 of a non-positive argument: never overflows."""
    e = tl.math.exp2(tl.abs(x) * -2.0 * _LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores_log2(qk, rel, qk_scale, softcap_log2, slope_log2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in log2 units from raw ``q.k``: scaled, soft-capped (``softcap * tanh(scale q.k /
    softcap)``), minus ``slope * |rel|`` (ALiBi; rel = j - (i + shift)). Also returns the tanh
    (the backward's softcap derivative is ``1 - tanh^2``); qk itself without softcap."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (qk_scale / softcap_log2))
        s = t * softcap_log2
    else:
        t = qk
        s = qk * qk_scale
    if HAS_ALIBI:
        s = s - slope_log2 * tl.abs(rel).to(tl.float32)
    return s, t


@triton.jit
def _visible(rows, cols, cols_ok, lo_shift, hi_shift, IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr):
    """Query ``rows`` see key ``cols`` iff ``rows + lo_shift <= cols <= rows + hi_shift`` (each
    edge only when its flag is set) and the key exists. Broadcasts like its arguments."""
    visible = cols_ok
    if IS_CAUSAL:
        visible = visible & (cols <= rows + hi_shift)
    if HAS_LEFT:
        visible = visible & (cols >= rows + lo_shift)
    return visible


@triton.jit
def _key_range(start_m, end_m, Lk, lo_shift, hi_shift, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_LEFT: tl.constexpr):
    """Key bounds of query rows [start_m, end_m) (non-empty): no row sees a key outside
    [lo, hi) (lo block-aligned; blocks outside are never visited); without a left edge every
    row sees every key of [0, full_hi) (block-aligned), 0 <= full_hi <= hi <= Lk."""
    if IS_CAUSAL:
        hi = tl.minimum(tl.maximum(end_m + hi_shift, 0), Lk)
        full_hi = tl.minimum(tl.maximum(start_m + hi_shift + 1, 0), Lk) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full_hi = Lk // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        lo = tl.minimum(tl.maximum(start_m + lo_shift, 0) // BLOCK_N * BLOCK_N, hi)
    else:
        lo = 0
    return lo, full_hi, hi


@triton.jit
def _seq_bounds(CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN: tl.constexpr):
    """(first q row, first k row, Lq, Lk) of sequence ``off_b``: from cu_seqlens for a packed
    batch, else (0, 0, Lq, Lk)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + off_b)
        k_start = tl.load(CU_K + off_b)
        return q_start, k_start, tl.load(CU_Q + off_b + 1) - q_start, tl.load(CU_K + off_b + 1) - k_start
    else:
        return 0, 0, Lq, Lk


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, kpm_base, mask_base,
    stride_kl, stride_vl, stride_kpml, stride_mk, mask_row_offs,
    start_m, rows, rows_ok, offs_d, bh,
    lo, hi, Lk, lo_shift, hi_shift, shift, qk_scale, softcap_log2, slope_log2, dropout_p, seed, rng_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """Key blocks [lo, hi) of one query block. MASKED: bounds and the window / causal edges
    are applied (the boundary blocks); otherwise every key of every block is known visible.
    Scores are turned into log2 units before the row max when a softcap, ALiBi or an additive
    mask changes them elementwise, else the scale is folded into the max and the exponent."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    start = tl.cast(lo, tl.int64)
    kT_ptrs = k_base + start * stride_kl + offs_n[None, :] * stride_kl + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    v_ptrs = v_base + start * stride_vl + offs_n[:, None] * stride_vl + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
    kpm_ptrs = kpm_base + start * stride_kpml + offs_n * stride_kpml  # (BLOCK_N,)
    # Loop-invariant int32 offsets and a scalar base: a pointer tile carried through the loop
    # costs two registers per score element (spilled with dropout and both masks).
    m_offs = mask_row_offs[:, None] + offs_n[None, :] * stride_mk  # (BLOCK_M, BLOCK_N)
    m_base = mask_base + start * stride_mk
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < Lk
        if MASKED:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & cols_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=cols_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        qk = _mma(q, kT, None, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
        if MASK_KIND == 2 or HAS_SOFTCAP or HAS_ALIBI:
            qk, _tanh_s = _scores_log2(qk, cols[None, :] - (rows[:, None] + shift), qk_scale, softcap_log2, slope_log2,
                                 HAS_SOFTCAP, HAS_ALIBI)
            if MASK_KIND == 2:
                bias = tl.load(m_base + m_offs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
                qk = qk + bias * _LOG2E
        if MASKED:
            visible = _visible(rows[:, None], cols[None, :], cols_ok[None, :], lo_shift, hi_shift, IS_CAUSAL, HAS_LEFT)
            qk = tl.where(visible, qk, _NEG_INF)
        if HAS_KPM:
            kpm = tl.load(kpm_ptrs, mask=cols_ok, other=0)
            qk = tl.where(kpm[None, :] != 0, qk, _NEG_INF)
        if MASK_KIND == 1:
            allowed = tl.load(m_base + m_offs, mask=rows_ok[:, None] & cols_ok[None, :], other=0)
            qk = tl.where(allowed != 0, qk, _NEG_INF)
        if MASK_KIND == 2 or HAS_SOFTCAP or HAS_ALIBI:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MASKED or HAS_KPM or MASK_KIND != 0:
            # A row that has seen no key yet keeps m = -inf; use 0 as its reference max.
            m_ref = tl.where(m_new == _NEG_INF, 0.0, m_new)
        else:
            m_ref = m_new
        if MASK_KIND == 2 or HAS_SOFTCAP or HAS_ALIBI:
            p = tl.math.exp2(qk - m_ref[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, bh, start_m, start_n, dropout_p, rows.shape[0], BLOCK_N, False)
            p = tl.where(keep, p, 0.0)
        # Casting point: probabilities rounded to the input dtype for the tensor-core dot.
        acc = _mma(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST)
        m_i = m_new
        kT_ptrs += BLOCK_N * stride_kl
        v_ptrs += BLOCK_N * stride_vl
        kpm_ptrs += BLOCK_N * stride_kpml
        m_base += BLOCK_N * stride_mk
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _attn_fwd_kernel(
    Q,  # (B, Lq, H, D), or (total_q, H, D) when IS_VARLEN
    K,  # (B, Lk, Hkv, D), or (total_k, Hkv, D)
    V,  # (B, Lk, Hkv, D), or (total_k, Hkv, D)
    KPM,  # (B, Lk) uint8 (1 = real key); unused unless HAS_KPM
    MASK,  # (B, H, Lq, Lk) uint8 or float, broadcast dims stride 0; unused unless MASK_KIND
    CU_Q,  # (B + 1,) int32 cu_seqlens_q; unused unless IS_VARLEN
    CU_K,  # (B + 1,) int32 cu_seqlens_k; unused unless IS_VARLEN
    ALIBI,  # (B or 1, H) fp32 slopes, batch stride stride_ab; unused unless HAS_ALIBI
    OUT,  # like Q, contiguous, q's dtype
    LSE,  # (B, H, Lq) or (H, total_q) fp32 contiguous, natural log
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_kpmb, stride_kpml,
    stride_mb, stride_mh, stride_ml, stride_mk,
    stride_ob, stride_ol, stride_oh,
    stride_lseb, stride_lseh, stride_ab,  # varlen: batch strides 0, rows start at cu_seqlens
    H, group, Lq, Lk,  # varlen: max_seqlen_q / max_seqlen_k
    bottom_right,  # 1: the diagonal is shifted by Lk - Lq (per sequence), 0: top-left
    window_left, window_right,  # key j visible iff i + shift - left <= j <= i + shift + right (per flag)
    qk_scale,  # softmax_scale * log2(e)
    softcap_log2,  # softcap * log2(e); unused unless HAS_SOFTCAP
    dropout_p, seed, rng_offset,
    LQ_BUCKET, LK_BUCKET,  # autotuning keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,  # a right edge (causal: window_right = 0)
    HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_KPM: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 bool, 2 additive float
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        # Heaviest query blocks (most visible keys) first: a shorter tail.
        pid_m = tl.num_programs(0) - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, k_start, Lq, Lk = _seq_bounds(CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:
        return  # a packed sequence shorter than max_seqlen_q
    off_kvh = off_h // group
    bh = off_b * H + off_h
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    rows_ok = rows < Lq
    d_ok = offs_d < HEAD_DIM
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    kvh64 = off_kvh.to(tl.int64)
    m64 = tl.cast(start_m, tl.int64) + q_start
    n0 = tl.cast(k_start, tl.int64)
    shift = (Lk - Lq) * bottom_right
    lo_shift = shift - window_left
    hi_shift = shift + window_right
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI + off_b * stride_ab + off_h) * _LOG2E
    else:
        slope_log2 = 0.0

    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_ql + offs_m[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + n0 * stride_kl
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + n0 * stride_vl
    kpm_base = KPM + b64 * stride_kpmb
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh + m64 * stride_ml
    mask_row_offs = offs_m * stride_ml

    lo, full_hi, hi = _key_range(start_m, tl.minimum(start_m + BLOCK_M, Lq), Lk, lo_shift, hi_shift,
                                 BLOCK_N, IS_CAUSAL, HAS_LEFT)
    if HAS_LEFT:
        # One masked loop over the band: most of a window's blocks are edge blocks, and a
        # third copy of the loop spilled registers (AOT).
        full_hi = lo
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, mask_base,
        stride_kl, stride_vl, stride_kpml, stride_mk, mask_row_offs,
        start_m, rows, rows_ok, offs_d, bh, lo, full_hi, Lk, lo_shift, hi_shift, shift, qk_scale, softcap_log2,
        slope_log2, dropout_p, seed, rng_offset,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_KPM, MASK_KIND,
        HAS_DROPOUT, DOT_PRECISION, UPCAST,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, mask_base,
        stride_kl, stride_vl, stride_kpml, stride_mk, mask_row_offs,
        start_m, rows, rows_ok, offs_d, bh, full_hi, hi, Lk, lo_shift, hi_shift, shift, qk_scale, softcap_log2,
        slope_log2, dropout_p, seed, rng_offset,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_KPM, MASK_KIND,
        HAS_DROPOUT, DOT_PRECISION, UPCAST,
    )

    seen = l_i > 0.0  # False: the row saw no key
    l_safe = tl.where(seen, l_i, 1.0)
    inv_l = tl.where(seen, 1.0 / l_safe, 0.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, _NEG_INF)
    out = acc * inv_l[:, None]
    o_ptrs = OUT + b64 * stride_ob + h64 * stride_oh + m64 * stride_ol + offs_m[:, None] * stride_ol + offs_d[None, :]
    # Casting point: fp32 accumulator to the output dtype.
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lseb + h64 * stride_lseh + q_start + rows, lse, mask=rows_ok)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT,  # (B, Lq, H, D)
    DO,  # (B, Lq, H, D)
    DELTA,  # (B, H, Lq) fp32 contiguous
    stride_ob, stride_ol, stride_oh,
    stride_dob, stride_dol, stride_doh,
    H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows < Lq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    rows64 = rows.to(tl.int64)
    o = tl.load(OUT + b64 * stride_ob + h64 * stride_oh + rows64[:, None] * stride_ol + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows64[:, None] * stride_dol + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b64 * H + h64) * Lq + rows, delta, mask=rows < Lq)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, mask_base,
    stride_ql, stride_dol, stride_ml, mask_col_offs,
    start_n, cols, cols_ok, kpm_ok, offs_d, offs_dout, bh,
    lo, hi, diag_end, left_begin, Lq, lo_shift, hi_shift, shift, qk_scale, softcap_log2, slope_log2,
    dropout_p, seed, rng_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_SPLIT: tl.constexpr,
):
    """Query blocks [lo, hi) against one key block, in the transposed orientation (keys x
    queries) so that P^T and dS^T feed dV and dK without a transpose. The causal / window edges
    are applied only to blocks before ``diag_end`` or from ``left_begin`` on (a uniform branch:
    one loop, where two loops cost registers and spilled at D=128). Rows past Lq load
    lse = +inf, so P = 0; key rows past Lk hold k = v = 0 and only reach dK/dV rows that are
    never stored. dk, dv hold the head-dim columns ``offs_dout`` (all unless D_SPLIT > 1)."""
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    # Loop-invariant int32 offsets; the int64 row start is added per step.
    qT_offs = offs_m[None, :] * stride_ql + offs_d[:, None]  # (BLOCK_D, BLOCK_M)
    do_offs = offs_m[:, None] * stride_dol + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
    mT_offs = offs_m[None, :] * stride_ml + mask_col_offs[:, None]  # (BLOCK_N, BLOCK_M)
    dout_ok = offs_dout < HEAD_DIM
    q_part_offs = offs_m[:, None] * stride_ql + offs_dout[None, :]  # (BLOCK_M, BLOCK_D // D_SPLIT)
    do_part_offs = offs_m[:, None] * stride_dol + offs_dout[None, :]  # (BLOCK_M, BLOCK_D // D_SPLIT)
    for start_m in range(lo, hi, BLOCK_M):
        m64 = tl.cast(start_m, tl.int64)
        rows = start_m + offs_m
        rows_ok = rows < Lq
        if HEAD_DIM == BLOCK_D:
            qT = tl.load(q_base + m64 * stride_ql + qT_offs, mask=rows_ok[None, :], other=0.0)
            do = tl.load(do_base + m64 * stride_dol + do_offs, mask=rows_ok[:, None], other=0.0)
        else:
            qT = tl.load(q_base + m64 * stride_ql + qT_offs, mask=d_ok[:, None] & rows_ok[None, :], other=0.0)
            do = tl.load(do_base + m64 * stride_dol + do_offs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + rows, mask=rows_ok, other=_POS_INF)
        delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)
        # lse = -inf marks a row that saw no key: +inf makes all its probabilities 0.
        lse2 = tl.where(lse == _NEG_INF, _POS_INF, lse) * _LOG2E
        qkT = _mma(k, qT, None, DOT_PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M) fp32
        sT, tT = _scores_log2(qkT, cols[:, None] - (rows[None, :] + shift), qk_scale, softcap_log2, slope_log2,
                              HAS_SOFTCAP, HAS_ALIBI)
        if MASK_KIND == 2:
            bias = tl.load(mask_base + m64 * stride_ml + mT_offs, mask=cols_ok[:, None] & rows_ok[None, :],
                           other=0.0).to(tl.float32)
            sT = sT + bias * _LOG2E
        pT = tl.math.exp2(sT - lse2[None, :])
        if IS_CAUSAL or HAS_LEFT:
            if (start_m < diag_end) | (start_m >= left_begin):
                pT = tl.where(_visible(rows[None, :], cols[:, None], True, lo_shift, hi_shift, IS_CAUSAL, HAS_LEFT),
                              pT, 0.0)
        if HAS_KPM:
            pT = tl.where(kpm_ok[:, None], pT, 0.0)
        if MASK_KIND == 1:
            allowed = tl.load(mask_base + m64 * stride_ml + mT_offs, mask=cols_ok[:, None] & rows_ok[None, :], other=0)
            pT = tl.where(allowed != 0, pT, 0.0)
        dpT = _mma(v, tl.trans(do), None, DOT_PRECISION, UPCAST)  # (BLOCK_N, BLOCK_M) fp32
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, bh, start_n, start_m, dropout_p, cols.shape[0], BLOCK_M, True)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pdT = tl.where(keep, pT * inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            pdT = pT
        if D_SPLIT == 1:
            do_part = do
            q_part = tl.trans(qT)
        else:
            part_ok = rows_ok[:, None] & dout_ok[None, :]
            do_part = tl.load(do_base + m64 * stride_dol + do_part_offs, mask=part_ok, other=0.0)
            q_part = tl.load(q_base + m64 * stride_ql + q_part_offs, mask=part_ok, other=0.0)
        # Casting points: dropped probabilities and dS^T rounded to the input dtype for the dots.
        dv = _mma(pdT.to(do.dtype), do_part, dv, DOT_PRECISION, UPCAST)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dsT_in = dsT.to(qT.dtype)
        dk = _mma(dsT_in, q_part, dk, DOT_PRECISION, UPCAST)
    return dk, dv


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _attn_bwd_dkdv_kernel(
    Q,  # (B, Lq, H, D), or (total_q, H, D) when IS_VARLEN
    K,  # (B, Lk, Hkv, D), or (total_k, Hkv, D)
    V,  # (B, Lk, Hkv, D), or (total_k, Hkv, D)
    KPM,  # (B, Lk) uint8; unused unless HAS_KPM
    MASK,  # (B, H, Lq, Lk) uint8 or float; unused unless MASK_KIND
    CU_Q,  # (B + 1,) int32; unused unless IS_VARLEN
    CU_K,  # (B + 1,) int32; unused unless IS_VARLEN
    ALIBI,  # (B or 1, H) fp32; unused unless HAS_ALIBI
    DO,  # like Q
    LSE,  # (B, H, Lq) or (H, total_q) fp32
    DELTA,  # like LSE
    DK,  # like K, contiguous, k's dtype
    DV,  # like V, contiguous, v's dtype
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_kpmb, stride_kpml,
    stride_mb, stride_mh, stride_ml, stride_mk,
    stride_dob, stride_dol, stride_doh,
    stride_dkb, stride_dkl, stride_dkh,
    stride_lseb, stride_lseh, stride_ab,
    H, group, Lq, Lk, bottom_right, window_left, window_right, qk_scale, softcap_log2, softmax_scale,
    dropout_p, seed, rng_offset,
    LQ_BUCKET, LK_BUCKET,  # autotuning keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_SPLIT: tl.constexpr,  # programs per key block, each owning BLOCK_D // D_SPLIT columns of dK/dV
):
    # With D_SPLIT > 1 every program recomputes the key block's P^T and dP^T (full head dim)
    # but accumulates only its slice of dK/dV: at D=256 the full accumulators of a 64-key
    # wgmma tile spilled.
    start_n = tl.program_id(0) // D_SPLIT * BLOCK_N
    offs_dout = tl.program_id(0) % D_SPLIT * (BLOCK_D // D_SPLIT) + tl.arange(0, BLOCK_D // D_SPLIT)
    off_kvh = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, k_start, Lq, Lk = _seq_bounds(CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN)
    if start_n >= Lk:
        return  # a packed sequence shorter than max_seqlen_k
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = start_n + offs_n
    cols_ok = cols < Lk
    d_ok = offs_d < HEAD_DIM
    b64 = off_b.to(tl.int64)
    kvh64 = off_kvh.to(tl.int64)
    n64 = tl.cast(start_n, tl.int64) + k_start
    q0 = tl.cast(q_start, tl.int64)
    tile_ok = cols_ok[:, None] & d_ok[None, :]
    k_off = b64 * stride_kb + kvh64 * stride_kh + n64 * stride_kl
    k = tl.load(K + k_off + offs_n[:, None] * stride_kl + offs_d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    v_off = b64 * stride_vb + kvh64 * stride_vh + n64 * stride_vl
    v = tl.load(V + v_off + offs_n[:, None] * stride_vl + offs_d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
    if HAS_KPM:
        kpm_ok = tl.load(KPM + b64 * stride_kpmb + cols * stride_kpml, mask=cols_ok, other=0) != 0
    else:
        kpm_ok = cols_ok
    mask_col_offs = offs_n * stride_mk
    shift = (Lk - Lq) * bottom_right
    lo_shift = shift - window_left
    hi_shift = shift + window_right

    # Query blocks [m_lo, m_full) cross the right edge of this key block; from m_full on, every
    # row sees every key of it up to the right edge. Below m_lo no row sees any of its keys.
    # With a left edge, no row from m_hi on sees any of its keys, and query blocks from
    # left_begin on hold a row that does not see its first key.
    if IS_CAUSAL:
        m_lo = tl.minimum(tl.maximum(start_n - hi_shift, 0) // BLOCK_M * BLOCK_M, Lq)
        diag = tl.maximum(start_n + BLOCK_N - 1 - hi_shift, 0)
        m_full = tl.minimum(tl.maximum((diag + BLOCK_M - 1) // BLOCK_M * BLOCK_M, m_lo), Lq)
    else:
        m_lo = start_n * 0
        m_full = m_lo
    if HAS_LEFT:
        m_hi = tl.minimum(tl.maximum(tl.minimum(start_n + BLOCK_N, Lk) - lo_shift, 0), Lq)
        left_begin = start_n - lo_shift - BLOCK_M + 2
    else:
        m_hi = Lq
        left_begin = Lq

    dk = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D // D_SPLIT], tl.float32)
    for g in range(0, group):
        off_h = off_kvh * group + g
        h64 = off_h.to(tl.int64)
        bh = off_b * H + off_h
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q0 * stride_ql
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q0 * stride_dol
        lse_base = LSE + b64 * stride_lseb + h64 * stride_lseh + q0
        delta_base = DELTA + b64 * stride_lseb + h64 * stride_lseh + q0
        mask_base = MASK + b64 * stride_mb + h64 * stride_mh + n64 * stride_mk
        if HAS_ALIBI:
            slope_log2 = tl.load(ALIBI + off_b * stride_ab + off_h) * _LOG2E
        else:
            slope_log2 = 0.0
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base,
            stride_ql, stride_dol, stride_ml, mask_col_offs,
            start_n, cols, cols_ok, kpm_ok, offs_d, offs_dout, bh, m_lo, m_hi, m_full, left_begin, Lq,
            lo_shift, hi_shift, shift, qk_scale, softcap_log2, slope_log2, dropout_p, seed, rng_offset,
            HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_KPM, MASK_KIND,
            HAS_DROPOUT, DOT_PRECISION, UPCAST, D_SPLIT,
        )

    dk = dk * softmax_scale
    out_off = (b64 * stride_dkb + kvh64 * stride_dkh + n64 * stride_dkl
               + offs_n[:, None] * stride_dkl + offs_dout[None, :])
    out_ok = cols_ok[:, None] & (offs_dout < HEAD_DIM)[None, :]
    # Casting points: fp32 accumulators to the gradients' dtypes.
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, kpm_base, mask_base,
    stride_kl, stride_vl, stride_kpml, stride_mk, mask_row_offs,
    start_m, rows, rows_ok, offs_d, offs_dout, bh,
    lo, hi, Lk, lo_shift, hi_shift, shift, qk_scale, softcap_log2, slope_log2, dropout_p, seed, rng_offset,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, D_SPLIT: tl.constexpr,
):
    """Key blocks [lo, hi) of one query block: dQ += dS K with dS recomputed; dq holds the
    head-dim columns ``offs_dout`` (all of them unless D_SPLIT > 1)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    start = tl.cast(lo, tl.int64)
    kT_ptrs = k_base + start * stride_kl + offs_n[None, :] * stride_kl + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    # (BLOCK_N, BLOCK_D // D_SPLIT)
    k_part_ptrs = k_base + start * stride_kl + offs_n[:, None] * stride_kl + offs_dout[None, :]
    dout_ok = offs_dout < HEAD_DIM
    vT_ptrs = v_base + start * stride_vl + offs_n[None, :] * stride_vl + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
    kpm_ptrs = kpm_base + start * stride_kpml + offs_n * stride_kpml  # (BLOCK_N,)
    # Loop-invariant int32 offsets and a scalar base: a pointer tile carried through the loop
    # costs two registers per score element (spilled with dropout and both masks).
    m_offs = mask_row_offs[:, None] + offs_n[None, :] * stride_mk  # (BLOCK_M, BLOCK_N)
    m_base = mask_base + start * stride_mk
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < Lk
        if MASKED:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None] & cols_ok[None, :], other=0.0)
            vT = tl.load(vT_ptrs, mask=d_ok[:, None] & cols_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        else:
            kT = tl.load(kT_ptrs, mask=d_ok[:, None], other=0.0)
            vT = tl.load(vT_ptrs, mask=d_ok[:, None], other=0.0)
        qk = _mma(q, kT, None, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
        s, t = _scores_log2(qk, cols[None, :] - (rows[:, None] + shift), qk_scale, softcap_log2, slope_log2,
                            HAS_SOFTCAP, HAS_ALIBI)
        if MASK_KIND == 2:
            bias = tl.load(m_base + m_offs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
            s = s + bias * _LOG2E
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            visible = _visible(rows[:, None], cols[None, :], cols_ok[None, :], lo_shift, hi_shift, IS_CAUSAL, HAS_LEFT)
            p = tl.where(visible, p, 0.0)
        if HAS_KPM:
            kpm = tl.load(kpm_ptrs, mask=cols_ok, other=0)
            p = tl.where(kpm[None, :] != 0, p, 0.0)
        if MASK_KIND == 1:
            allowed = tl.load(m_base + m_offs, mask=rows_ok[:, None] & cols_ok[None, :], other=0)
            p = tl.where(allowed != 0, p, 0.0)
        dp = _mma(do, vT, None, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rng_offset, bh, start_m, start_n, dropout_p, rows.shape[0], BLOCK_N, False)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        # Casting point: dS rounded to the input dtype for the dot.
        if D_SPLIT == 1:
            k_part = tl.trans(kT)
        else:
            k_part = tl.load(k_part_ptrs, mask=cols_ok[:, None] & dout_ok[None, :], other=0.0)
        dq = _mma(ds.to(kT.dtype), k_part, dq, DOT_PRECISION, UPCAST)
        kT_ptrs += BLOCK_N * stride_kl
        k_part_ptrs += BLOCK_N * stride_kl
        vT_ptrs += BLOCK_N * stride_vl
        kpm_ptrs += BLOCK_N * stride_kpml
        m_base += BLOCK_N * stride_mk
    return dq


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _attn_bwd_dq_kernel(
    Q,  # (B, Lq, H, D), or (total_q, H, D) when IS_VARLEN
    K,  # (B, Lk, Hkv, D), or (total_k, Hkv, D)
    V,  # (B, Lk, Hkv, D), or (total_k, Hkv, D)
    KPM,  # (B, Lk) uint8; unused unless HAS_KPM
    MASK,  # (B, H, Lq, Lk) uint8 or float; unused unless MASK_KIND
    CU_Q,  # (B + 1,) int32; unused unless IS_VARLEN
    CU_K,  # (B + 1,) int32; unused unless IS_VARLEN
    ALIBI,  # (B or 1, H) fp32; unused unless HAS_ALIBI
    DO,  # like Q
    LSE,  # (B, H, Lq) or (H, total_q) fp32
    DELTA,  # like LSE
    DQ,  # like Q, contiguous, q's dtype
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_kpmb, stride_kpml,
    stride_mb, stride_mh, stride_ml, stride_mk,
    stride_dob, stride_dol, stride_doh,
    stride_dqb, stride_dql, stride_dqh,
    stride_lseb, stride_lseh, stride_ab,
    H, group, Lq, Lk, bottom_right, window_left, window_right, qk_scale, softcap_log2, softmax_scale,
    dropout_p, seed, rng_offset,
    LQ_BUCKET, LK_BUCKET,  # autotuning keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_SPLIT: tl.constexpr,  # programs per query block, each owning BLOCK_D // D_SPLIT columns of dQ
):
    # As in dK/dV: with D_SPLIT > 1 each program recomputes P and dP and owns a slice of dQ.
    pid_m = tl.program_id(0) // D_SPLIT
    offs_dout = tl.program_id(0) % D_SPLIT * (BLOCK_D // D_SPLIT) + tl.arange(0, BLOCK_D // D_SPLIT)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) // D_SPLIT - 1 - pid_m
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    q_start, k_start, Lq, Lk = _seq_bounds(CU_Q, CU_K, off_b, Lq, Lk, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= Lq:
        return  # a packed sequence shorter than max_seqlen_q
    off_kvh = off_h // group
    bh = off_b * H + off_h
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = start_m + offs_m
    rows_ok = rows < Lq
    d_ok = offs_d < HEAD_DIM
    tile_ok = rows_ok[:, None] & d_ok[None, :]
    b64 = off_b.to(tl.int64)
    h64 = off_h.to(tl.int64)
    kvh64 = off_kvh.to(tl.int64)
    m64 = tl.cast(start_m, tl.int64) + q_start
    n0 = tl.cast(k_start, tl.int64)
    shift = (Lk - Lq) * bottom_right
    lo_shift = shift - window_left
    hi_shift = shift + window_right
    if HAS_ALIBI:
        slope_log2 = tl.load(ALIBI + off_b * stride_ab + off_h) * _LOG2E
    else:
        slope_log2 = 0.0

    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + m64 * stride_ql + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + m64 * stride_dol + offs_m[:, None] * stride_dol + offs_d[None, :],
                 mask=tile_ok, other=0.0)  # (BLOCK_M, BLOCK_D)
    lse_rows = b64 * stride_lseb + h64 * stride_lseh + q_start + rows
    lse = tl.load(LSE + lse_rows, mask=rows_ok, other=_POS_INF)
    lse2 = tl.where(lse == _NEG_INF, _POS_INF, lse) * _LOG2E  # rows that saw no key: P = 0
    delta = tl.load(DELTA + lse_rows, mask=rows_ok, other=0.0)
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + n0 * stride_kl
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + n0 * stride_vl
    kpm_base = KPM + b64 * stride_kpmb
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh + m64 * stride_ml
    mask_row_offs = offs_m * stride_ml

    lo, full_hi, hi = _key_range(start_m, tl.minimum(start_m + BLOCK_M, Lq), Lk, lo_shift, hi_shift,
                                 BLOCK_N, IS_CAUSAL, HAS_LEFT)
    if HAS_LEFT:
        full_hi = lo  # one masked loop over the band, as in the forward
    dq = tl.zeros([BLOCK_M, BLOCK_D // D_SPLIT], tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, kpm_base, mask_base,
        stride_kl, stride_vl, stride_kpml, stride_mk, mask_row_offs,
        start_m, rows, rows_ok, offs_d, offs_dout, bh, lo, full_hi, Lk, lo_shift, hi_shift, shift, qk_scale,
        softcap_log2, slope_log2, dropout_p, seed, rng_offset,
        HEAD_DIM, BLOCK_D, BLOCK_N, False, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_KPM, MASK_KIND,
        HAS_DROPOUT, DOT_PRECISION, UPCAST, D_SPLIT,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, kpm_base, mask_base,
        stride_kl, stride_vl, stride_kpml, stride_mk, mask_row_offs,
        start_m, rows, rows_ok, offs_d, offs_dout, bh, full_hi, hi, Lk, lo_shift, hi_shift, shift, qk_scale,
        softcap_log2, slope_log2, dropout_p, seed, rng_offset,
        HEAD_DIM, BLOCK_D, BLOCK_N, True, IS_CAUSAL, HAS_LEFT, HAS_SOFTCAP, HAS_ALIBI, HAS_KPM, MASK_KIND,
        HAS_DROPOUT, DOT_PRECISION, UPCAST, D_SPLIT,
    )
    dq = dq * softmax_scale
    dq_ptrs = (DQ + b64 * stride_dqb + h64 * stride_dqh + m64 * stride_dql
               + offs_m[:, None] * stride_dql + offs_dout[None, :])
    # Casting point: fp32 accumulator to q's dtype.
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None] & (offs_dout < HEAD_DIM)[None, :])


@triton.jit(do_not_specialize=_PER_CALL_ARGS)
def _dropout_mask_kernel(
    KEEP,  # (B, H, Lq, Lk) uint8 contiguous
    H, Lq, Lk, dropout_p, seed, rng_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(2) * H + tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    base = KEEP + bh.to(tl.int64) * Lq * Lk + rows.to(tl.int64)[:, None] * Lk
    for start_n in range(0, Lk, BLOCK_N):
        cols = start_n + offs_n
        keep = _dropout_keep(seed, rng_offset, bh, tl.program_id(0) * BLOCK_M, start_n, dropout_p,
                             BLOCK_M, BLOCK_N, False)
        tl.store(base + cols[None, :], keep.to(tl.uint8), mask=(rows < Lq)[:, None] & (cols < Lk)[None, :])


# --------------------------------------------------------------------------------------------
# KV-cache decoding (flash-decoding: split-KV, then a logsumexp combine)
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_decode_kernel(
    Q,  # (B, Lq, H, D)
    K_CACHE,  # contiguous (B_cache, Lcache, Hkv, D), or paged (num_blocks, page_size, Hkv, D)
    V_CACHE,  # like K_CACHE
    CACHE_SEQLENS,  # (B,) int32: valid keys of each sequence
    BLOCK_TABLE,  # (B, max_blocks) int32 pages of each sequence; unused unless PAGED
    CACHE_BATCH_IDX,  # (B,) int32 cache rows; unused unless HAS_BATCH_IDX
    ALIBI,  # (B or 1, H) fp32; unused unless HAS_ALIBI
    OUT,  # one split: (B, Lq, H, D) q's dtype; else (num_splits, B, Lq, H, D) fp32 workspace
    LSE,  # one split: (B, H, Lq) fp32; else (num_splits, B, H, Lq) fp32 workspace
    stride_qb, stride_ql, stride_qh,
    stride_kb, stride_kl, stride_kh,
    stride_vb, stride_vl, stride_vh,
    stride_btb, stride_ab,
    stride_os, stride_ob, stride_ol, stride_oh,
    stride_ls, stride_lb, stride_lh,
    group, Lq, num_splits, page_size, window_left, window_right,
    qk_scale,  # softmax_scale * log2(e)
    softcap_log2,  # softcap * log2(e); unused unless HAS_SOFTCAP
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr, HAS_BATCH_IDX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: one split of the visible keys of one (batch, kv head), for BLOCK_M rows of
    the packed (query, head-of-the-group) matrix: row r is query r // group of head
    kv_head * group + r % group, so a whole GQA group shares each K/V tile it loads. Query i
    sits at key position ``cache_seqlens[b] - Lq + i`` (bottom-right). Writes the normalized
    partial output and its logsumexp (or, with one split, the final ones)."""
    pid_m = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    off_kvh = tl.program_id(1)
    off_b = tl.program_id(2)
    b64 = off_b.to(tl.int64)
    kvh64 = off_kvh.to(tl.int64)
    Lk = tl.load(CACHE_SEQLENS + off_b)
    shift = Lk - Lq
    lo_shift = shift - window_left
    hi_shift = shift + window_right
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < Lq * group
    qi = rows // group  # (BLOCK_M,) query index
    heads = off_kvh * group + rows % group  # (BLOCK_M,) query head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_offs = b64 * stride_qb + qi.to(tl.int64)[:, None] * stride_ql + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(Q + q_offs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if HAS_ALIBI:
        slope_log2 = (tl.load(ALIBI + off_b * stride_ab + heads, mask=rows_ok, other=0.0) * _LOG2E)[:, None]
    else:
        slope_log2 = 0.0

    # This split's share of the keys any row of the block sees, in whole BLOCK_N steps.
    first_q = pid_m * BLOCK_M // group
    last_q = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq * group) - 1
    lo, _full_hi, hi = _key_range(first_q, last_q // group + 1, Lk, lo_shift, hi_shift, BLOCK_N, IS_CAUSAL, HAS_LEFT)
    chunk = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    split_lo = lo + split * chunk
    split_hi = tl.minimum(split_lo + chunk, hi)

    if PAGED:
        k_base = K_CACHE + kvh64 * stride_kh
        v_base = V_CACHE + kvh64 * stride_vh
    else:
        if HAS_BATCH_IDX:
            cache_row = tl.load(CACHE_BATCH_IDX + off_b).to(tl.int64)
        else:
            cache_row = b64
        k_base = K_CACHE + cache_row * stride_kb + kvh64 * stride_kh
        v_base = V_CACHE + cache_row * stride_vb + kvh64 * stride_vh
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(split_lo, split_hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = cols < split_hi
        if PAGED:
            page = tl.load(BLOCK_TABLE + b64 * stride_btb + cols // page_size, mask=cols_ok, other=0).to(tl.int64)
            slot = (cols % page_size).to(tl.int64)
            k_offs = page * stride_kb + slot * stride_kl  # (BLOCK_N,) int64
            v_offs = page * stride_vb + slot * stride_vl
        else:
            k_offs = cols.to(tl.int64) * stride_kl
            v_offs = cols.to(tl.int64) * stride_vl
        kT = tl.load(k_base + k_offs[None, :] + offs_d[:, None], mask=d_ok[:, None] & cols_ok[None, :], other=0.0)
        v = tl.load(v_base + v_offs[:, None] + offs_d[None, :], mask=cols_ok[:, None] & d_ok[None, :], other=0.0)
        qk = _mma(q, kT, None, DOT_PRECISION, UPCAST)  # (BLOCK_M, BLOCK_N) fp32
        s, _tanh_s = _scores_log2(qk, cols[None, :] - (qi[:, None] + shift), qk_scale, softcap_log2, slope_log2,
                            HAS_SOFTCAP, HAS_ALIBI)
        visible = _visible(qi[:, None], cols[None, :], cols_ok[None, :], lo_shift, hi_shift, IS_CAUSAL, HAS_LEFT)
        s = tl.where(visible, s, _NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == _NEG_INF, 0.0, m_new)  # a row that has seen no key yet
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Casting point: probabilities rounded to the cache dtype for the tensor-core dot.
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc * tl.where(seen, 1.0 / l_safe, 0.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, _NEG_INF)
    s64 = split.to(tl.int64)
    o_offs = (s64 * stride_os + b64 * stride_ob + qi.to(tl.int64)[:, None] * stride_ol
              + heads[:, None] * stride_oh + offs_d[None, :])
    # Casting point: fp32 accumulator to q's dtype (one split) or the fp32 workspace.
    tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(LSE + s64 * stride_ls + b64 * stride_lb + heads * stride_lh + qi, lse, mask=rows_ok)


@triton.jit
def _attn_decode_combine_kernel(
    O_PART,  # (num_splits, B, Lq, H, D) fp32 contiguous
    LSE_PART,  # (num_splits, B, H, Lq) fp32 contiguous
    OUT,  # (B, Lq, H, D) contiguous, q's dtype
    LSE,  # (B, H, Lq) fp32 contiguous
    num_splits, B, H, Lq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (query, head, batch): out = sum_s w_s o_s / sum_s w_s with
    w_s = exp(lse_s - max lse); a row no split saw stays output 0, lse -inf."""
    qi = tl.program_id(0) // H
    off_h = tl.program_id(0) % H
    b64 = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse_row = (b64 * H + off_h) * Lq + qi
    lse_s = tl.load(LSE_PART + splits.to(tl.int64) * (B * H * Lq) + lse_row, mask=s_ok, other=_NEG_INF)
    m = tl.max(lse_s, 0)
    m_ref = tl.where(m == _NEG_INF, 0.0, m)
    w = tl.math.exp2((lse_s - m_ref) * _LOG2E)  # (BLOCK_S,); 0 for splits that saw no key
    total = tl.sum(w, 0)
    o_row = ((b64 * Lq + qi) * H + off_h) * HEAD_DIM
    o_s = tl.load(O_PART + splits.to(tl.int64)[:, None] * (B * Lq * H * HEAD_DIM) + o_row + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    seen = total > 0.0
    out = tl.sum(o_s * w[:, None], 0) * tl.where(seen, 1.0 / tl.where(seen, total, 1.0), 0.0)
    tl.store(OUT + o_row + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE + lse_row, tl.where(seen, m_ref + tl.log(tl.where(seen, total, 1.0)), _NEG_INF))


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One block configuration. For the forward and dQ kernels BLOCK_M is the query block of a
    program and BLOCK_N the key step; for dK/dV BLOCK_N is the key block of a program and
    BLOCK_M the query step. ``block_ds``: the BLOCK_D (padded head dims) it is shipped for;
    ``fp32``: shipped for fp32 inputs (whose IEEE dots run on FMA units, not tensor cores, so
    small tiles lose nothing and keep compile time and registers low) instead of fp16/bf16.
    ``masked``: True: only for launches with dropout or an attn_mask (a score-shaped tile
    generated or loaded per step costs registers, and the large tiles spilled with it); False:
    only for launches with neither; None: both. ``kpm``: also serves launches with a
    key_padding_mask (False where that spilled). ``window``: also serves launches with a left
    window edge or cu_seqlens (False where that spilled). ``d_split`` (backward only): programs
    per key block (dK/dV) or query block (dQ), each accumulating BLOCK_D / d_split gradient
    columns."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_ds: tuple
    fp32: bool = False
    masked: Optional[bool] = False
    d_split: int = 1
    kpm: bool = True
    window: bool = True

    @property
    def launch_key(self) -> tuple:
        """What distinguishes two compiled kernels (and autotuner entries)."""
        return self.block_m, self.block_n, self.num_warps, self.num_stages, self.d_split

    def meta(self, kernel: str) -> dict:
        """The block constexprs of a launch of ``kernel``."""
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if kernel != "fwd":
            meta["D_SPLIT"] = self.d_split
        return meta

    def triton_config(self, kernel: str) -> "triton.Config":
        return triton.Config(self.meta(kernel), num_warps=self.num_warps, num_stages=self.num_stages)

    def serves(self, masked: bool, kpm: bool = False, window: bool = False) -> bool:
        return (self.masked is None or self.masked == masked) and (self.kpm or not kpm) and (self.window or not window)

    def shared_bytes_estimate(self, kernel: str, block_d: int, elem: int) -> int:
        """Pipelined operand tiles (plus dK/dV's transposed q and dO tiles, plus an attn_mask
        tile for ``masked`` configs); matches the compiled kernels to a few KiB (measured
        with the AOT test)."""
        m, n, s = self.block_m, self.block_n, self.num_stages
        mask_tile = elem * m * n if self.masked else 0
        if kernel == "fwd":
            return elem * block_d * (m + 2 * s * n) + mask_tile
        if kernel == "dkdv":
            return elem * block_d * (2 * n + 2 * s * m + 2 * m) + mask_tile
        return elem * block_d * (2 * m + 2 * s * n) + mask_tile


_SMALL_D = (16, 32, 64)
_ALL_D = _SMALL_D + (128, 256)
#: fp32 (IEEE) configs, with and without dropout / masks: FMA dots keep whole operand rows in
#: registers, so only 16 x 16 score tiles are spill-free at every head dim (the larger ones
#: tried spilled 24 B to 14 KB, see docs/attention_perf.md); D=256 needs more warps or a
#: split head dim.
_FP32_D128 = _SMALL_D + (128,)
_FP32_CONFIGS = {
    80: {
        "fwd": (KernelConfig(16, 16, 8, 2, _ALL_D, True, None),),
        "dkdv": (KernelConfig(16, 16, 8, 2, _FP32_D128, True, None), KernelConfig(16, 16, 4, 2, (256,), True, None, 2)),
        # Two programs per query block spilled 8 B once the window / varlen arguments came.
        "dq": (KernelConfig(16, 16, 8, 2, _FP32_D128, True, None), KernelConfig(16, 16, 8, 2, (256,), True, None, 4)),
    },
    90: {
        "fwd": (KernelConfig(16, 16, 8, 2, _ALL_D, True, None),),
        "dkdv": (KernelConfig(16, 16, 4, 2, _FP32_D128, True, None), KernelConfig(16, 16, 8, 2, (256,), True, None)),
        "dq": (KernelConfig(16, 16, 8, 2, _ALL_D, True, None),),
    },
}
#: Shipped configurations per architecture family (80: Ampere/Ada, 90: Hopper and later). Each
#: compiles without register spills at the largest BLOCK_D it serves, for the launches it
#: serves (AOT test: causal without masks, or with dropout and both masks when ``masked``).
SHIPPED_CONFIGS: dict[int, dict[str, tuple[KernelConfig, ...]]] = {
    80: {
        "fwd": (
            KernelConfig(128, 64, 8, 2, _SMALL_D),
            KernelConfig(64, 64, 4, 3, _SMALL_D),
            KernelConfig(128, 32, 8, 2, (128,)),
            KernelConfig(64, 64, 8, 2, (128,)),
            KernelConfig(64, 32, 8, 2, (256,)),
            KernelConfig(32, 32, 4, 2, (256,)),
            KernelConfig(64, 32, 8, 2, _SMALL_D + (128,), masked=True),
            KernelConfig(32, 32, 8, 2, (256,), masked=True),
        ) + _FP32_CONFIGS[80]["fwd"],
        "dkdv": (
            # 32-query blocks (32 x 128 w8 s2, 32 x 64 w4 s3) spilled 8 / 24 B under triton 3.6
            # (AOT, D=64); 32 x 64 w4 s3 also spilled 16 B with a key_padding_mask under 3.9.
            KernelConfig(16, 128, 8, 2, _SMALL_D),
            KernelConfig(16, 64, 4, 3, _SMALL_D, kpm=False),
            KernelConfig(32, 64, 8, 2, (128,)),
            KernelConfig(32, 64, 8, 3, (128,)),
            KernelConfig(32, 32, 8, 2, (256,)),
            KernelConfig(16, 64, 4, 2, _SMALL_D, masked=True),
            KernelConfig(32, 32, 8, 2, (128,), masked=True),
            KernelConfig(32, 32, 8, 2, (256,), masked=True),
        ) + _FP32_CONFIGS[80]["dkdv"],
        "dq": (
            KernelConfig(128, 32, 8, 2, _SMALL_D),
            KernelConfig(64, 32, 4, 2, _SMALL_D + (128,)),
            KernelConfig(64, 64, 8, 2, (128,)),
            KernelConfig(64, 32, 8, 2, (256,)),
            KernelConfig(32, 32, 4, 2, (256,)),
            KernelConfig(64, 32, 8, 2, _SMALL_D + (128,), masked=True),
            KernelConfig(16, 32, 4, 2, (256,), masked=True),
        ) + _FP32_CONFIGS[80]["dq"],
    },
    90: {
        "fwd": (
            # With a left window edge and cu_seqlens both spilled 8-16 B (AOT, D=64).
            KernelConfig(128, 128, 8, 3, _SMALL_D, window=False),
            KernelConfig(128, 128, 8, 2, _SMALL_D, window=False),
            KernelConfig(64, 64, 4, 3, _SMALL_D),
            KernelConfig(128, 64, 8, 3, (128,)),
            KernelConfig(128, 64, 8, 2, (128,)),
            KernelConfig(128, 32, 8, 3, (128, 256)),
            # 4 warps spilled 48 B under triton 3.6 (AOT, D=256).
            KernelConfig(64, 32, 8, 3, (256,)),
            KernelConfig(64, 32, 8, 3, _SMALL_D + (128,), masked=True),
            KernelConfig(64, 16, 8, 2, (256,), masked=True),
        ) + _FP32_CONFIGS[90]["fwd"],
        "dkdv": (
            KernelConfig(32, 128, 8, 3, _SMALL_D),
            # 64 x 128 w8 s2 spilled 16 B under triton 3.6 (AOT, D=64).
            KernelConfig(64, 64, 8, 2, _SMALL_D),
            KernelConfig(32, 64, 4, 2, _SMALL_D),
            KernelConfig(32, 128, 8, 2, (128,)),
            KernelConfig(32, 64, 8, 2, (128,)),
            # Two (four with masks) programs per key block split dK/dV's head dim: the full
            # 64 x 256 accumulators of a wgmma tile spilled, and 32 keys are too few for wgmma.
            KernelConfig(16, 64, 8, 2, (256,), d_split=2),
            KernelConfig(16, 64, 8, 2, _SMALL_D + (128,), masked=True),
            # Four programs spilled 56 B with softcap and ALiBi on top of the masks.
            KernelConfig(16, 64, 8, 2, (256,), masked=True, d_split=8),
        ) + _FP32_CONFIGS[90]["dkdv"],
        "dq": (
            KernelConfig(128, 64, 8, 3, _SMALL_D),
            # With a key_padding_mask it spilled 48 B (AOT, D=64).
            KernelConfig(128, 128, 8, 2, _SMALL_D, kpm=False),
            KernelConfig(128, 64, 8, 2, (128,)),
            KernelConfig(128, 32, 8, 2, (128, 256)),
            KernelConfig(64, 16, 8, 2, (256,)),
            KernelConfig(64, 32, 8, 2, _SMALL_D + (128,), masked=True),
            KernelConfig(64, 16, 8, 2, (256,), masked=True, d_split=4),
        ) + _FP32_CONFIGS[90]["dq"],
    },
}

#: Under TRITON_INTERPRET=1: small blocks (fast tests, many boundary cases), no autotuning.
INTERPRETER_CONFIGS = {
    "fwd": KernelConfig(32, 16, 4, 1, ()),
    "dkdv": KernelConfig(16, 32, 4, 1, ()),
    "dq": KernelConfig(32, 16, 4, 1, ()),
}
#: The interpreter splits the backward over two programs per block from this BLOCK_D on, so
#: that the tests cover both variants (the split ones are shipped for D=256 on sm_90).
_INTERPRETER_D_SPLIT_FROM = 128
#: Elements of O (and of dO) per preprocess program: 32 per thread of 4 warps, no spills.
_PREPROCESS_TILE = 4096
_DROPOUT_MASK_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Block shape of the KV-cache kernel: BLOCK_M packed (query, head) rows per program,
    BLOCK_N keys per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: Queries up to this length take the split-KV path (flash-attn's decoding regime).
DECODE_SPLIT_MAX_SEQLEN_Q = 16
#: Most splits of one (batch, kv head): the combine reads one partial row per split.
DECODE_MAX_SPLITS = 64
INTERPRETER_DECODE_CONFIG = DecodeConfig(16, 16, 4, 1)


def decode_block_ms(arch: int, block_d: int, fp32: bool) -> tuple[int, ...]:
    """Packed row blocks shipped: tl.dot needs 16 rows; 64 rows (one wgmma warpgroup) only on
    sm_90 up to D=128 (64 x 256 and sm_80's 64 x 128 spilled, AOT); fp32 IEEE dots hold
    whole rows in registers: 16."""
    if fp32:
        return (16,)
    return (16, 32, 64) if arch == 90 and block_d <= 128 else (16, 32)


def _decode_block_m(rows: int, largest: int) -> int:
    return min(max(16, triton.next_power_of_2(rows)), largest)


def decode_config(arch: int, rows: int, block_d: int, fp32: bool) -> DecodeConfig:
    """The shipped KV-cache config for ``rows`` = Lq * (nheads // nheads_kv) packed rows.
    Decoding reads every K/V byte once, so BLOCK_N only needs to keep loads in flight; half
    the keys per step at D=256 keeps the tiles in registers (AOT: no spills)."""
    block_m = _decode_block_m(rows, max(decode_block_ms(arch, block_d, fp32)))
    if fp32:
        return DecodeConfig(block_m, 32 if block_d <= 128 else 16, 4, 2)
    return DecodeConfig(block_m, 64 if block_d <= 128 else 32, 4, 3 if arch == 90 else 2)


def decode_num_splits(programs: int, max_seqlen_k: int, block_n: int, sm_count: int) -> int:
    """Splits per program for flash-decoding: about two waves of ``sm_count`` programs in all,
    at least four key blocks per split of the longest cache, at most DECODE_MAX_SPLITS; 1
    when the (row block, kv head, batch) programs already fill the GPU."""
    if programs >= sm_count:
        return 1
    by_length = max(1, max_seqlen_k // (4 * block_n))
    return max(1, min(triton.cdiv(2 * sm_count, programs), by_length, DECODE_MAX_SPLITS))


def arch_family(capability: tuple[int, int]) -> int:
    """The SHIPPED_CONFIGS key for a compute capability."""
    return 90 if capability[0] >= 9 else 80


def _preprocess_block_m(block_d: int) -> int:
    return min(128, _PREPROCESS_TILE // block_d)


def block_d_for(head_dim: int) -> int:
    # tl.dot needs an inner dimension of at least 16.
    return max(16, triton.next_power_of_2(head_dim))


@functools.lru_cache(maxsize=None)
def _max_shared_bytes(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return int(props["max_shared_mem"])


def select_configs(
    kernel: str, arch: int, block_d: int, elem_size: int, shared_limit: int, has_dropout: bool = False,
    has_mask: bool = False, has_kpm: bool = False, has_window: bool = False,
) -> list[KernelConfig]:
    """The shipped configs the autotuner may try: those for this BLOCK_D, dtype class and
    launch kind (with dropout or an attn_mask / softcap / ALiBi (``has_mask``), or with
    neither; with a key_padding_mask: see
    ``KernelConfig.masked`` and ``kpm``; with a left window edge or cu_seqlens:
    ``window``) whose tiles fit in ``shared_limit`` bytes, else (a
    GPU with less shared memory) the one with the smallest estimate. Never empty."""
    fp32 = elem_size == 4
    masked = has_dropout or has_mask
    candidates = [c for c in SHIPPED_CONFIGS[arch][kernel]
                  if block_d in c.block_ds and c.fp32 == fp32 and c.serves(masked, has_kpm, has_window)]
    fitting = [c for c in candidates if c.shared_bytes_estimate(kernel, block_d, elem_size) <= shared_limit]
    return fitting or [min(candidates, key=lambda c: c.shared_bytes_estimate(kernel, block_d, elem_size))]


def _prune(kernel: str, arch: int, configs, named_args, **kwargs):
    q = named_args["Q"]
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    # Softcap and ALiBi change every score elementwise, as an attn_mask does: the masked configs.
    score_work = kwargs["MASK_KIND"] != 0 or kwargs["HAS_SOFTCAP"] or kwargs["HAS_ALIBI"]
    chosen = select_configs(kernel, arch, kwargs["BLOCK_D"], q.element_size(), _max_shared_bytes(device_index),
                            kwargs["HAS_DROPOUT"], score_work, kwargs["HAS_KPM"],
                            kwargs["HAS_LEFT"] or kwargs["IS_VARLEN"])
    keys = {c.launch_key for c in chosen}
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages,
                                   c.kwargs.get("D_SPLIT", 1)) in keys]


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_TUNING_KEYS = ["HEAD_DIM", "IS_CAUSAL", "HAS_LEFT", "HAS_SOFTCAP", "HAS_ALIBI", "IS_VARLEN", "HAS_KPM", "MASK_KIND",
                "HAS_DROPOUT", "LQ_BUCKET", "LK_BUCKET"]


@functools.lru_cache(maxsize=None)
def _autotuned(kernel: str, arch: int):
    """The autotuned kernel for an architecture family, built on first use (not at import)."""
    # One triton.Config per distinct launch shape (an fp16 and an fp32 config may share one).
    unique = {c.launch_key: c for c in SHIPPED_CONFIGS[arch][kernel]}
    return triton.autotune(
        configs=[c.triton_config(kernel) for c in unique.values()],
        key=_TUNING_KEYS,
        prune_configs_by={"early_config_prune": functools.partial(_prune, kernel, arch)},
    )(_KERNELS[kernel])


def _seq_bucket(n: int) -> int:
    """Sequence lengths enter the tuning key by power-of-two bucket, so new lengths reuse it."""
    return triton.next_power_of_2(n)


#: CUDA's limit on grid axes y and z, which carry the heads and the batch.
_GRID_YZ_LIMIT = 65535


def not_supported_reasons(inputs: AttentionInputs, options: AttentionOptions) -> list[str]:
    """The launch grid is (row blocks, heads, batch): heads and batch may not exceed 65535."""
    reasons = []
    for what, n in (("batch", inputs.batch), ("nheads", inputs.nheads)):
        if n > _GRID_YZ_LIMIT:
            reasons.append(f"{what} {n} is above {_GRID_YZ_LIMIT}, the CUDA grid-axis limit of the Triton launch")
    return reasons


def _launch(kernel: str, grid_rows: int, batch: int, heads: int, args: tuple, constexprs: dict) -> None:
    """Launch ``kernel`` over (blocks of grid_rows, heads, batch) with the interpreter config
    or the autotuned one for this GPU."""
    block_name = "BLOCK_N" if kernel == "dkdv" else "BLOCK_M"

    def grid(meta):
        return (triton.cdiv(grid_rows, meta[block_name]) * meta.get("D_SPLIT", 1), heads, batch)

    if triton_interpret_enabled():
        cfg = INTERPRETER_CONFIGS[kernel]
        if kernel != "fwd" and constexprs["BLOCK_D"] >= _INTERPRETER_D_SPLIT_FROM:
            cfg = dataclasses.replace(cfg, d_split=2)
        meta = cfg.meta(kernel)
        _KERNELS[kernel][grid(meta)](*args, **constexprs, **meta, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)
        return
    arch = arch_family(torch.cuda.get_device_capability(args[0].device))

    _autotuned(kernel, arch)[grid](*args, **constexprs)


# --------------------------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------------------------
def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not on whichever device is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _band_args(options: AttentionOptions) -> tuple[int, int, int]:
    """(bottom_right, window_left, window_right) kernel arguments: causal is a right edge at 0;
    an unbounded edge is switched off by its constexpr (IS_CAUSAL / HAS_LEFT), its value unused."""
    right = 0 if options.causal else options.window_right
    return int(options.causal_alignment == "bottom_right"), max(options.window_left, 0), max(right, 0)


def _softcap_log2(options: AttentionOptions) -> float:
    return options.softcap * math.log2(math.e) if options.softcap > 0 else 1.0


def _extras_args(inputs: AttentionInputs, options: AttentionOptions) -> tuple:
    """cu_seqlens_q, cu_seqlens_k, alibi_slopes (q as the placeholder of absent ones)."""
    cu_q = inputs.cu_seqlens_q if inputs.is_varlen else inputs.q
    cu_k = inputs.cu_seqlens_k if inputs.is_varlen else inputs.q
    alibi = inputs.alibi_slopes if inputs.alibi_slopes is not None else inputs.q
    return cu_q, cu_k, alibi


def _alibi_batch_stride(slopes: Optional[torch.Tensor]) -> int:
    """Slopes (B, H) step by H per batch element; shared (H,) slopes by 0."""
    return slopes.stride(0) if slopes is not None and slopes.dim() == 2 else 0


def _lse_strides(lse: torch.Tensor) -> tuple[int, int]:
    """(batch, head) strides of lse (B, H, Lq), or (0, total_q) of a packed batch's (H, total_q)."""
    return (lse.stride(0), lse.stride(1)) if lse.dim() == 3 else (0, lse.stride(0))


def _mask_args(inputs: AttentionInputs):
    """(kpm tensor, kpm strides, mask tensor, mask strides, mask kind). Bool masks are read as
    bytes (a zero-copy view); absent masks pass q as an untouched placeholder pointer."""
    kpm = inputs.key_padding_mask
    if kpm is None:
        kpm_t, kpm_strides = inputs.q, (0, 0)
    else:
        kpm_t = kpm.view(torch.uint8)
        kpm_strides = (kpm_t.stride(0), kpm_t.stride(1))
    mask = inputs.attn_mask
    if mask is None:
        return kpm_t, kpm_strides, inputs.q, (0, 0, 0, 0), 0
    kind = 1 if mask.dtype == torch.bool else 2
    mask_t = mask.view(torch.uint8) if kind == 1 else mask
    return kpm_t, kpm_strides, mask_t, tuple(mask_t.stride()), kind


def _rng_args(options: AttentionOptions, rng: Optional[RngState]) -> tuple[float, int, int, bool]:
    if options.dropout_p > 0.0:
        if rng is None:
            raise ValueError("dropout_p > 0 needs an RngState")
        return float(options.dropout_p), int(rng.seed), int(rng.offset), True
    return 0.0, 0, 0, False


def _common_constexprs(inputs: AttentionInputs, options: AttentionOptions, mask_kind: int, has_dropout: bool) -> dict:
    dtype = inputs.dtype
    return dict(
        HEAD_DIM=inputs.head_dim,
        BLOCK_D=block_d_for(inputs.head_dim),
        IS_CAUSAL=bool(options.causal or options.window_right >= 0),
        HAS_LEFT=options.window_left >= 0,
        HAS_SOFTCAP=options.softcap > 0,
        HAS_ALIBI=inputs.alibi_slopes is not None,
        IS_VARLEN=inputs.is_varlen,
        HAS_KPM=inputs.key_padding_mask is not None,
        MASK_KIND=mask_kind,
        HAS_DROPOUT=has_dropout,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=triton_interpret_enabled() and dtype == torch.bfloat16,
    )


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, seqlen, head) strides of a (B, L, H, D) tensor whose last dim is contiguous; a
    packed (total, H, D) tensor gets batch stride 0 (its sequences start at cu_seqlens)."""
    if t.dim() == 3:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


# --------------------------------------------------------------------------------------------
# Primitives
# --------------------------------------------------------------------------------------------
def forward(inputs: AttentionInputs, options: AttentionOptions, rng: Optional[RngState]):
    """out in q's layout and dtype, lse fp32 natural log (-inf: row saw no key): (B, Lq, H, D)
    and (B, H, Lq), or for a packed batch (total_q, H, D) and (H, total_q)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    b, lq, lk, h, hkv = inputs.batch, inputs.seqlen_q, inputs.seqlen_k, inputs.nheads, inputs.nheads_kv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (h, q.shape[0]) if inputs.is_varlen else (b, h, lq)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    kpm_t, kpm_strides, mask_t, mask_strides, mask_kind = _mask_args(inputs)
    dropout_p, seed, offset, has_dropout = _rng_args(options, rng)
    args = (
        q, k, v, kpm_t, mask_t, *_extras_args(inputs, options), out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *kpm_strides, *mask_strides, *_strides3(out),
        *_lse_strides(lse), _alibi_batch_stride(inputs.alibi_slopes),
        h, h // hkv, lq, lk, *_band_args(options),
        options.softmax_scale * math.log2(math.e), _softcap_log2(options),
        dropout_p, seed, offset, _seq_bucket(lq), _seq_bucket(lk),
    )
    with _on_device(q):
        _launch("fwd", lq, b, h, args, _common_constexprs(inputs, options, mask_kind, has_dropout))
    return out, lse


def backward(
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    inputs: AttentionInputs,
    options: AttentionOptions,
    rng: Optional[RngState],
):
    """(dq, dk, dv) with q/k/v's shapes and dtypes; dk/dv summed over each kv head's group.
    Always deterministic (no atomics), so ``options.deterministic`` needs nothing extra."""
    q, k, v = inputs.q, inputs.k, inputs.v
    b, lq, lk, h, hkv, d = (inputs.batch, inputs.seqlen_q, inputs.seqlen_k, inputs.nheads, inputs.nheads_kv,
                            inputs.head_dim)
    device = q.device
    lse = lse.contiguous()
    block_d = block_d_for(d)

    with _on_device(q):
        # A packed batch's rows are one (1, total_q) sequence here, delta (H, total_q) like lse.
        delta = torch.empty(lse.shape, dtype=torch.float32, device=device)
        rows = out.shape[-3]
        pre_block_m = _preprocess_block_m(block_d)
        _attn_bwd_preprocess_kernel[(triton.cdiv(rows, pre_block_m), h, 1 if inputs.is_varlen else b)](
            out, dout, delta, *_strides3(out), *_strides3(dout), h, rows,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=pre_block_m,
        )

        dk = torch.empty(k.shape, dtype=k.dtype, device=device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=device)
        kpm_t, kpm_strides, mask_t, mask_strides, mask_kind = _mask_args(inputs)
        extras = _extras_args(inputs, options)
        dropout_p, seed, offset, has_dropout = _rng_args(options, rng)
        constexprs = _common_constexprs(inputs, options, mask_kind, has_dropout)
        tail = (
            *_lse_strides(lse), _alibi_batch_stride(inputs.alibi_slopes),
            h, h // hkv, lq, lk, *_band_args(options), options.softmax_scale * math.log2(math.e),
            _softcap_log2(options), options.softmax_scale,
            dropout_p, seed, offset, _seq_bucket(lq), _seq_bucket(lk),
        )
        dkdv_args = (
            q, k, v, kpm_t, mask_t, *extras, dout, lse, delta, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *kpm_strides, *mask_strides, *_strides3(dout),
            *_strides3(dk), *tail,
        )
        _launch("dkdv", lk, b, hkv, dkdv_args, constexprs)

        dq = torch.empty(q.shape, dtype=q.dtype, device=device)
        dq_args = (
            q, k, v, kpm_t, mask_t, *extras, dout, lse, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *kpm_strides, *mask_strides, *_strides3(dout),
            *_strides3(dq), *tail,
        )
        _launch("dq", lq, b, h, dq_args, constexprs)
    return dq, dk, dv


def kvcache_forward(inputs: KVCacheInputs, options: AttentionOptions, *, num_splits: Optional[int] = None):
    """Attention of q over each sequence's valid cache prefix (bottom-right causal / window,
    softcap, ALiBi): out (B, Lq, H, D) in q's dtype, lse (B, H, Lq) fp32 natural log.

    Flash-decoding: for Lq <= DECODE_SPLIT_MAX_SEQLEN_Q the keys of each (batch, kv head) are
    split over ``num_splits`` programs (default: enough to fill the GPU, see
    :func:`decode_num_splits`) whose partial results a second kernel merges by logsumexp;
    longer queries run one split. ``num_splits`` forces the count (tests)."""
    q = inputs.q
    b, lq, h, d = q.shape
    hkv = inputs.nheads_kv
    group = h // hkv
    rows = lq * group
    block_d = block_d_for(d)
    fp32 = q.dtype == torch.float32
    if triton_interpret_enabled():
        cfg, sm_count = dataclasses.replace(INTERPRETER_DECODE_CONFIG, block_m=_decode_block_m(rows, 16)), 4
    else:
        arch = arch_family(torch.cuda.get_device_capability(q.device))
        cfg = decode_config(arch, rows, block_d, fp32)
        sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count
    m_blocks = triton.cdiv(rows, cfg.block_m)
    if num_splits is None:
        num_splits = 1
        if lq <= DECODE_SPLIT_MAX_SEQLEN_Q:
            num_splits = decode_num_splits(m_blocks * hkv * b, inputs.max_seqlen_k, cfg.block_n, sm_count)
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        o_target, lse_target = out, lse
        o_strides = (0, *out.stride()[:3])
        lse_strides = (0, *lse.stride()[:2])
    else:
        o_target = torch.empty((num_splits, b, lq, h, d), dtype=torch.float32, device=q.device)
        lse_target = torch.empty((num_splits, b, h, lq), dtype=torch.float32, device=q.device)
        o_strides = o_target.stride()[:4]
        lse_strides = lse_target.stride()[:3]
    k_cache, v_cache, seqlens = inputs.k_cache, inputs.v_cache, inputs.cache_seqlens
    block_table = inputs.block_table if inputs.is_paged else seqlens
    batch_idx = inputs.cache_batch_idx if inputs.cache_batch_idx is not None else seqlens
    alibi = inputs.alibi_slopes if inputs.alibi_slopes is not None else lse
    page_size = k_cache.shape[1] if inputs.is_paged else 1
    _, window_left, window_right = _band_args(options)
    with _on_device(q):
        _attn_decode_kernel[(m_blocks * num_splits, hkv, b)](
            q, k_cache, v_cache, seqlens, block_table, batch_idx, alibi, o_target, lse_target,
            *_strides3(q), *_strides3(k_cache), *_strides3(v_cache),
            block_table.stride(0), _alibi_batch_stride(inputs.alibi_slopes), *o_strides, *lse_strides,
            group, lq, num_splits, page_size, window_left, window_right,
            options.softmax_scale * math.log2(math.e), _softcap_log2(options),
            HEAD_DIM=d, BLOCK_D=block_d, IS_CAUSAL=bool(options.causal or options.window_right >= 0),
            HAS_LEFT=options.window_left >= 0, HAS_SOFTCAP=options.softcap > 0,
            HAS_ALIBI=inputs.alibi_slopes is not None, PAGED=inputs.is_paged,
            HAS_BATCH_IDX=inputs.cache_batch_idx is not None,
            DOT_PRECISION="ieee" if fp32 else "tf32", UPCAST=triton_interpret_enabled() and q.dtype == torch.bfloat16,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if num_splits > 1:
            _attn_decode_combine_kernel[(lq * h, b)](
                o_target, lse_target, out, lse, num_splits, b, h, lq,
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            )
    return out, lse


def dropout_mask(inputs: AttentionInputs, options: AttentionOptions, rng: RngState) -> torch.Tensor:
    """bool (B, H, Lq, Lk): the keep mask the kernels draw for this rng (True = kept), made by
    the same Triton function. For tests; the kernels never store it."""
    b, lq, h, _ = inputs.q.shape
    lk = inputs.seqlen_k
    keep = torch.empty((b, h, lq, lk), dtype=torch.uint8, device=inputs.device)
    grid = (triton.cdiv(lq, _DROPOUT_MASK_BLOCK), h, b)
    with _on_device(keep):
        _dropout_mask_kernel[grid](
            keep, h, lq, lk, float(options.dropout_p), int(rng.seed), int(rng.offset),
            BLOCK_M=_DROPOUT_MASK_BLOCK, BLOCK_N=_DROPOUT_MASK_BLOCK,
        )
    return keep.view(torch.bool)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compilation specs (protocol of fastattn.triton.aot)
# --------------------------------------------------------------------------------------------
_TENSOR_ARGS = {"Q", "K", "V", "OUT", "DO", "DK", "DV", "DQ", "K_CACHE", "V_CACHE"}
_FP32_ARGS = {"LSE", "DELTA", "ALIBI", "O_PART", "LSE_PART", "qk_scale", "softmax_scale", "softcap_log2", "dropout_p"}
_BYTE_ARGS = {"KPM", "MASK", "KEEP"}
_INT32_ARGS = {"CU_Q", "CU_K", "CACHE_SEQLENS", "BLOCK_TABLE", "CACHE_BATCH_IDX"}
_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Arguments that a typical launch makes 16-divisible (pointers and q/k/v/o strides), so the
#: AOT build vectorizes its loads as the run-time specialization does.
AOT_DIVISIBLE_BY_16 = tuple(
    f"stride_{t}{d}" for t in ("q", "k", "v", "o", "do", "dk", "dq") for d in ("b", "l", "h")
)


def aot_name(kernel: str, cfg: KernelConfig, features: str) -> str:
    """Name of the AOT spec of ``cfg`` compiled for ``features`` ("causal" / "window-varlen" /
    "all-features")."""
    dtype = "fp32" if cfg.fp32 else "bf16"
    split = f" split{cfg.d_split}" if cfg.d_split > 1 else ""
    return (f"{kernel} {dtype} D{max(cfg.block_ds)} {features} "
            f"M{cfg.block_m} N{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{split}")


def _aot_signature(kernel, dtype: torch.dtype, constexprs: dict, ones: tuple = ()) -> tuple[dict, dict]:
    """Runtime-argument types of ``kernel`` for ``dtype`` inputs; ``ones`` are integer arguments
    the launch would pass as 1, which triton specializes into constants."""
    signature, consts = {}, dict(constexprs)
    for name in kernel.arg_names:
        if name in consts:
            continue
        if name in ones:
            consts[name] = 1
        elif name in _TENSOR_ARGS:
            signature[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in _BYTE_ARGS:
            signature[name] = "*u8"
        elif name in _INT32_ARGS:
            signature[name] = "*i32"
        elif name in _FP32_ARGS:
            signature[name] = "*fp32" if name.isupper() else "fp32"
        else:
            signature[name] = "i32"
    return signature, consts


def aot_specs(arch: int):
    """One AotSpec per shipped configuration of the forward, dK/dV and dQ kernels for
    ``sm_<arch>`` and per kind of launch it serves, at the largest BLOCK_D it serves, bf16
    (fp32 for the fp32 configs): "causal" (no masks, no dropout: the performance path),
    "window-varlen" (causal plus a left window edge and cu_seqlens, with a key_padding_mask
    where the config serves one: a superset of the other launches the performance configs
    serve) and "all-features" (causal, left window edge, cu_seqlens, key_padding_mask,
    additive attn_mask, dropout, softcap and ALiBi: a superset of every masked launch); the
    backward preprocess; and the KV-cache kernels (:func:`decode_aot_specs`)."""
    from fastattn.triton.aot import AotSpec

    family = arch_family((arch // 10, arch % 10))
    base = dict(IS_CAUSAL=True, HAS_LEFT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, IS_VARLEN=False, HAS_KPM=False,
                MASK_KIND=0, HAS_DROPOUT=False, UPCAST=False)
    window = dict(base, HAS_LEFT=True, IS_VARLEN=True)
    full = dict(window, HAS_KPM=True, MASK_KIND=2, HAS_DROPOUT=True, HAS_SOFTCAP=True, HAS_ALIBI=True)
    for kernel, configs in SHIPPED_CONFIGS[family].items():
        jit_fn = _KERNELS[kernel]
        for cfg in configs:
            block_d = max(cfg.block_ds)
            dtype = torch.float32 if cfg.fp32 else torch.bfloat16
            # A launch with masks passes their contiguous last stride, 1, which triton makes a constant.
            variants = (
                ("causal", base, (), False),
                ("window-varlen", dict(window, HAS_KPM=cfg.kpm), ("stride_kpml",) if cfg.kpm else (), False),
                ("all-features", full, ("stride_kpml", "stride_mk"), True),
            )
            for features, flags, ones, masked in variants:
                if not cfg.serves(masked, window=flags["HAS_LEFT"]):
                    continue
                constexprs = dict(
                    flags, **cfg.meta(kernel), HEAD_DIM=block_d, BLOCK_D=block_d,
                    DOT_PRECISION="ieee" if cfg.fp32 else "tf32",
                )
                signature, constexprs = _aot_signature(jit_fn, dtype, constexprs, ones)
                divisible = tuple(n for n in AOT_DIVISIBLE_BY_16 if n in signature)
                yield AotSpec(aot_name(kernel, cfg, features), jit_fn, signature, constexprs, cfg.num_warps,
                              cfg.num_stages, divisible)
    signature, constexprs = _aot_signature(
        _attn_bwd_preprocess_kernel, torch.bfloat16, dict(HEAD_DIM=256, BLOCK_D=256, BLOCK_M=_preprocess_block_m(256))
    )
    yield AotSpec("bwd_preprocess bf16 D256", _attn_bwd_preprocess_kernel, signature, constexprs, 4, 1)
    yield from decode_aot_specs(arch)


#: BLOCK_D at which each shipped KV-cache config is compiled: the largest of each BLOCK_N step.
DECODE_AOT_BLOCK_DS = (128, 256)


def decode_aot_name(cfg: DecodeConfig, fp32: bool, block_d: int, layout: str) -> str:
    dtype = "fp32" if fp32 else "bf16"
    return (f"decode {dtype} D{block_d} {layout} M{cfg.block_m} N{cfg.block_n} "
            f"w{cfg.num_warps} s{cfg.num_stages}")


def decode_aot_specs(arch: int):
    """The KV-cache kernel for every shipped (dtype class, BLOCK_M, BLOCK_N) at the largest
    BLOCK_D of its BLOCK_N, with every flag on (causal, left window, softcap, ALiBi), writing
    the fp32 split workspace, for a paged and a contiguous (cache_batch_idx) cache; plus the
    combine kernel."""
    from fastattn.triton.aot import AotSpec

    family = arch_family((arch // 10, arch % 10))
    flags = dict(IS_CAUSAL=True, HAS_LEFT=True, HAS_SOFTCAP=True, HAS_ALIBI=True, UPCAST=False)
    for fp32 in (False, True):
        dtype = torch.float32 if fp32 else torch.bfloat16
        for block_d in DECODE_AOT_BLOCK_DS:
            for block_m in decode_block_ms(family, block_d, fp32):
                cfg = decode_config(family, block_m, block_d, fp32)
                for layout, paged in (("paged", True), ("contiguous", False)):
                    constexprs = dict(flags, PAGED=paged, HAS_BATCH_IDX=not paged, HEAD_DIM=block_d, BLOCK_D=block_d,
                                      DOT_PRECISION="ieee" if fp32 else "tf32", BLOCK_M=cfg.block_m,
                                      BLOCK_N=cfg.block_n)
                    signature, constexprs = _aot_signature(_attn_decode_kernel, dtype, constexprs)
                    signature["OUT"] = "*fp32"  # the split workspace
                    divisible = tuple(n for n in AOT_DIVISIBLE_BY_16 if n in signature)
                    yield AotSpec(decode_aot_name(cfg, fp32, block_d, layout), _attn_decode_kernel, signature,
                                  constexprs, cfg.num_warps, cfg.num_stages, divisible)
    signature, constexprs = _aot_signature(
        _attn_decode_combine_kernel, torch.bfloat16, dict(HEAD_DIM=256, BLOCK_D=256, BLOCK_S=DECODE_MAX_SPLITS)
    )
    signature["O_PART"] = "*fp32"
    yield AotSpec("decode_combine bf16 D256", _attn_decode_combine_kernel, signature, constexprs, 4, 1)
