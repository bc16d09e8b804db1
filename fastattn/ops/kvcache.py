"""One decoding step over a KV cache (flash-attn's ``flash_attn_with_kvcache``): validation,
the in-place append of the new keys/values, the public function. Inference only, so there is
no autograd layer.

Data path: public function -> validate (shapes, dtypes, devices, then the index values with
one host sync) -> AttentionOptions -> backends.select (capabilities ``kvcache``,
``paged_kvcache``) -> append k/v into the cache (one vectorized ``index_put_``, shared by every
backend) -> backend ``attention`` module
``kvcache_forward(inputs: KVCacheInputs, options: AttentionOptions)`` returning
out (B, Lq, H, D) in q's dtype and lse (B, H, Lq) float32.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from fastattn.backends import select
from fastattn.ops import _checks as checks
from fastattn.ops._amp import autocast_off
from fastattn.ops.attention import _flash_options, _validate_alibi
from fastattn.options import KVCacheInputs

_CONTIGUOUS_CACHE = "(batch_cache, seqlen_cache, nheads_kv, headdim)"
_PAGED_CACHE = "(num_blocks, block_size, nheads_kv, headdim)"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _check_index(name: str, t, ndim: int, layout: str, q: torch.Tensor) -> None:
    checks.check_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    checks.check_ndim(name, t, ndim, layout)
    if t.shape[0] != q.shape[0]:
        raise ValueError(f"{name} must have q's batch ({q.shape[0]}) rows, got shape {tuple(t.shape)}")
    checks.check_same_device(name, t, "q", q)


def _validate_tensors(q, k_cache, v_cache, k, v, block_table, cache_batch_idx) -> int:
    """Shapes, dtypes and devices; returns seqlen_new (0 without k/v)."""
    checks.check_tensor("q", q)
    checks.check_ndim("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    checks.check_float_dtype("q", q)
    checks.check_nonempty("q", q)
    b, _, h, d = q.shape
    layout = _PAGED_CACHE if block_table is not None else _CONTIGUOUS_CACHE
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        checks.check_tensor(name, cache)
        checks.check_ndim(name, cache, 4, layout)
        checks.check_same_dtype(name, cache, "q", q)
        checks.check_same_device(name, cache, "q", q)
        checks.check_nonempty(name, cache)
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1): it is updated in place, "
                             f"so it cannot be copied; got strides {cache.stride()}")
    n, length, hkv, _ = k_cache.shape
    checks.check_shape("k_cache", k_cache, (n, length, hkv, d), layout)
    checks.check_shape("v_cache", v_cache, (n, length, hkv, d), layout)
    if h % hkv != 0:
        raise ValueError(f"q's nheads ({h}) must be a multiple of the cache's nheads_kv ({hkv})")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new keys and values to append) or neither")
    seqlen_new = 0
    if k is not None:
        for name, t in (("k", k), ("v", v)):
            checks.check_tensor(name, t)
            checks.check_ndim(name, t, 4, "(batch, seqlen_new, nheads_kv, headdim)")
            checks.check_same_dtype(name, t, "q", q)
            checks.check_same_device(name, t, "q", q)
            checks.check_nonempty(name, t)
        seqlen_new = k.shape[1]
        checks.check_shape("k", k, (b, seqlen_new, hkv, d), "(batch, seqlen_new, nheads_kv, headdim)")
        checks.check_shape("v", v, (b, seqlen_new, hkv, d), "(batch, seqlen_new, nheads_kv, headdim)")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx selects rows of a contiguous cache; it cannot be combined with "
                             "block_table (as flash-attn)")
        _check_index("block_table", block_table, 2, "(batch, max_blocks_per_seq)", q)
    elif cache_batch_idx is not None:
        _check_index("cache_batch_idx", cache_batch_idx, 1, "(batch,)", q)
    elif n < b:
        raise ValueError(f"k_cache has {n} rows (batch_cache) but q's batch is {b}: pass cache_batch_idx or a "
                         f"cache with >= batch rows")
    return seqlen_new


def _validate_cache_seqlens(cache_seqlens, q: torch.Tensor, capacity: int, seqlen_new: int) -> torch.Tensor:
    """(B,) int32 on q's device; a Python int is checked here and broadcast (as flash-attn)."""
    b = q.shape[0]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not 0 <= cache_seqlens <= capacity - seqlen_new:
            raise ValueError(_seqlens_range_message(cache_seqlens, cache_seqlens, capacity, seqlen_new))
        return torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be an int or an int32 tensor (batch,), got {type(cache_seqlens).__name__}")
    _check_index("cache_seqlens", cache_seqlens, 1, "(batch,)", q)
    return cache_seqlens.contiguous()


def _seqlens_range_message(lowest: int, highest: int, capacity: int, seqlen_new: int) -> str:
    return (f"cache_seqlens must be in [0, capacity - seqlen_new] = [0, {capacity - seqlen_new}] so that the "
            f"{seqlen_new} new tokens fit the cache (capacity {capacity} positions per sequence), "
            f"got values in [{lowest}, {highest}]")


def _validate_index_values(inputs: KVCacheInputs, seqlen_new: int, appends: bool) -> None:
    """Range checks of cache_seqlens, block_table and cache_batch_idx, reading their reductions
    to the host at once (one sync)."""
    capacity, device = inputs.max_seqlen_k, inputs.device
    if not inputs.is_paged and inputs.cache_batch_idx is None:  # the lengths alone: one read
        lengths = inputs.cache_seqlens.tolist()
        if min(lengths) < 0 or max(lengths) > capacity - seqlen_new:
            raise ValueError(_seqlens_range_message(min(lengths), max(lengths), capacity, seqlen_new))
        return
    seqlens = inputs.cache_seqlens.long()  # (B,) before the append
    stats = [seqlens.min(), seqlens.max()]
    if inputs.is_paged:
        block_size, num_blocks = inputs.k_cache.shape[1], inputs.k_cache.shape[0]
        blocks_needed = (seqlens + seqlen_new + block_size - 1) // block_size  # (B,)
        used = torch.arange(inputs.block_table.shape[1], device=device)[None] < blocks_needed[:, None]
        table = inputs.block_table
        stats.append((used & ((table < 0) | (table >= num_blocks))).sum())
    if inputs.cache_batch_idx is not None:
        rows = inputs.cache_batch_idx.sort().values
        stats += [rows[0], rows[-1], (rows[1:] == rows[:-1]).sum()]
    values = torch.stack([s.long() for s in stats]).tolist()
    lowest, highest = values[0], values[1]
    if lowest < 0 or highest > capacity - seqlen_new:
        raise ValueError(_seqlens_range_message(lowest, highest, capacity, seqlen_new))
    if inputs.is_paged and values[2]:
        raise ValueError(
            f"block_table entries a sequence uses (the first ceil((cache_seqlens + seqlen_new) / block_size) of "
            f"its row) must be in [0, num_blocks) = [0, {num_blocks}); {values[2]} are not"
        )
    if inputs.cache_batch_idx is not None:
        first, last, repeats = values[-3:]
        rows_cache = inputs.k_cache.shape[0]
        if first < 0 or last >= rows_cache:
            raise ValueError(f"cache_batch_idx must be in [0, batch_cache) = [0, {rows_cache}), got values in "
                             f"[{first}, {last}]")
        if appends and repeats:
            raise ValueError("cache_batch_idx must not repeat a row when k/v are appended (two sequences would "
                             "write the same cache row)")


def _validate_inference(**tensors) -> None:
    if not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if t is not None and t.requires_grad]
    if needing:
        raise ValueError(
            f"flash_attention_with_kvcache is inference-only (no gradient, as flash-attn), but "
            f"{', '.join(needing)} require grad: call it under torch.no_grad() or torch.inference_mode(), "
            f"or detach them"
        )


# --------------------------------------------------------------------------------------------
# The append, for backends without their own (Backend.kvcache_append)
# --------------------------------------------------------------------------------------------
def _append(inputs: KVCacheInputs, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes k, v (B, Lnew, Hkv, D) into the cache at positions cache_seqlens[b] + (0..Lnew-1)
    of sequence b (inputs.cache_seqlens: lengths before the append)."""
    b, seqlen_new = k.shape[:2]
    positions = inputs.cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=k.device)  # (B, Lnew)
    if inputs.is_paged:
        block_size = inputs.k_cache.shape[1]
        rows = inputs.block_table.long().gather(1, positions // block_size)  # (B, Lnew) block ids
        cols = positions % block_size
    else:
        seq_rows = torch.arange(b, device=k.device) if inputs.cache_batch_idx is None else inputs.cache_batch_idx.long()
        rows = seq_rows[:, None].expand(b, seqlen_new)
        cols = positions
    inputs.k_cache.index_put_((rows, cols), k)
    inputs.v_cache.index_put_((rows, cols), v)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def flash_attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    *,
    cache_seqlens: Union[int, torch.Tensor],
    block_table: Optional[torch.Tensor] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: Optional[str] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Decoding attention over a KV cache (flash-attn's ``flash_attn_with_kvcache``).

    If k and v are given, they are first written into the cache IN PLACE at positions
    ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` of sequence b; then q attends over
    the first ``cache_seqlens[b] + seqlen_new`` positions of sequence b's cache. cache_seqlens
    itself is not modified (advance it yourself). Inference only: raises ValueError when grad
    mode is on and an input requires grad (flash-attn would silently return no gradient).

    Arguments:
        q: (batch, seqlen_q, nheads, headdim), float16 / bfloat16 / float32 (float64 on the
            reference backend).
        k_cache, v_cache: q's dtype and device, last dim contiguous (updated in place, never
            copied). Contiguous: (batch_cache, seqlen_cache, nheads_kv, headdim), sequence b in
            row ``cache_batch_idx[b]`` (or b, then batch_cache >= batch). Paged (with
            block_table): (num_blocks, block_size, nheads_kv, headdim).
            ``nheads % nheads_kv == 0``.
        k, v: (batch, seqlen_new, nheads_kv, headdim), q's dtype, or both None.
        cache_seqlens: (batch,) int32 on q's device, or an int for every sequence: the cached
            length of each sequence before the append, in ``[0, capacity - seqlen_new]``
            (capacity: seqlen_cache, or max_blocks_per_seq * block_size when paged).
        block_table: (batch, max_blocks_per_seq) int32: the cache blocks of sequence b in
            order; entries a sequence uses must be in ``[0, num_blocks)`` (the rest are not
            read). Sequences must not share a block that k/v are written into.
        cache_batch_idx: (batch,) int32 rows of a contiguous cache, in ``[0, batch_cache)``,
            distinct when k/v are appended; not with block_table.
        causal: per sequence, query i sits at absolute position
            ``cache_seqlens[b] + seqlen_new - seqlen_q + i`` and sees keys up to it
            (bottom-right aligned).
        softmax_scale: a positive finite float; defaults to ``1 / sqrt(headdim)``.
        window_size: (left, right), -1 = unbounded, relative to the query's absolute position;
            with causal, right is 0.
        softcap: > 0 caps the scaled scores: ``softcap * tanh(scale * q.k / softcap)``.
        alibi_slopes: (nheads,) or (batch, nheads) float32: adds ``-slope * |position_q - j|``.
        return_lse: also return the logsumexp.
        backend: "triton", "cuda", "cpu", "reference" or None (automatic).

    Validation reads the index tensors' ranges on the host (one sync) before anything is
    written; a rejected call leaves the cache untouched.

    Returns:
        out: (batch, seqlen_q, nheads, headdim), q's dtype; and with ``return_lse`` also
        lse: (batch, nheads, seqlen_q) float32. A query that sees no key gets output 0 and lse
        -inf.
    """
    seqlen_new = _validate_tensors(q, k_cache, v_cache, k, v, block_table, cache_batch_idx)
    _validate_inference(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    options = _flash_options(q.shape[3], softmax_scale, 0.0, window_size, softcap, causal=causal,
                             return_lse=return_lse)
    capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])  # per sequence
    inputs = KVCacheInputs(
        q=checks.last_dim_contiguous(q),
        k_cache=k_cache,
        v_cache=v_cache,
        cache_seqlens=_validate_cache_seqlens(cache_seqlens, q, capacity, seqlen_new),  # before the append
        block_table=None if block_table is None else block_table.contiguous(),
        cache_batch_idx=None if cache_batch_idx is None else cache_batch_idx.contiguous(),
        alibi_slopes=_validate_alibi(alibi_slopes, q.shape[0], q.shape[2], q),
    )
    _validate_index_values(inputs, seqlen_new, appends=k is not None)
    attended = KVCacheInputs(  # the lengths after the append (a new tensor)
        q=inputs.q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=inputs.cache_seqlens + seqlen_new,
        block_table=inputs.block_table, cache_batch_idx=inputs.cache_batch_idx, alibi_slopes=inputs.alibi_slopes,
    )
    chosen = select("attention", attended, options, backend)
    with torch.no_grad(), autocast_off(q.device):
        if k is not None:
            (chosen.kvcache_append() or _append)(inputs, k, v)
        out, lse = chosen.kvcache_forward(attended, options)
    return (out, lse) if return_lse else out
