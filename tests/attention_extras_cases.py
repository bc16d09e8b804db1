"""Shared cases for the flash-attn 2 extras: variable-length (packed) batches and KV-cache
decoding. Case dataclasses, input builders, an explicit float64 oracle written independently of
fastattn/reference/attention.py, and ``check_*`` functions taking a ``backend`` name, so the
reference, Triton and CPU suites run the same cases (filter ``VARLEN_CASES`` /
``KVCACHE_CASES`` by what a backend supports, or build smaller cases with the dataclasses).

Tolerance: tests/helpers.py (error vs the float64 oracle <= 2 x the error of the same explicit
formula run in the case's dtype, + atol). Rows that see no key: output 0, lse -inf, dq 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

import fastattn
from helpers import ATOL, assert_close_to_reference, max_error


# --------------------------------------------------------------------------------------------
# The explicit formula (the oracle in float64, the error yardstick in the case's dtype)
# --------------------------------------------------------------------------------------------
def explicit_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, slopes=None, scale=None):
    """q (B, Lq, H, D), k/v (B, Lk, Hkv, D), slopes (H,) or (B, H) or None; in q's dtype.
    ``softmax_j(softcap(scale q.k) - slope |j - (i + Lk - Lq)|)`` over the keys j with
    ``-left <= j - (i + Lk - Lq) <= right`` (right = 0 under causal). Returns out (B, Lq, H, D)
    and lse (B, H, Lq) (-inf and output 0 on rows that see no key)."""
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    lq, lk = q.shape[1], k.shape[1]
    rel = torch.arange(lk, device=q.device)[None] - (torch.arange(lq, device=q.device)[:, None] + lk - lq)
    if slopes is not None:
        per_batch = slopes if slopes.dim() == 2 else slopes[None]
        s = s - per_batch.to(s.dtype)[:, :, None, None] * rel.abs().to(s.dtype)
    ok = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    right = 0 if causal else window[1]
    if right >= 0:
        ok &= rel <= right
    if window[0] >= 0:
        ok &= rel >= -window[0]
    s = s.masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num()
    return torch.einsum("bhij,bjhd->bihd", p, vv), torch.logsumexp(s.float(), -1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtrasCase:
    """Fields shared by the varlen and KV-cache cases (keyword-only)."""

    heads: int = 4
    heads_kv: int = 2
    head_dim: int = 40
    dtype: torch.dtype = torch.float64
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # "h": (nheads,), "bh": (batch, nheads)


def _flags_str(case: ExtrasCase) -> list[str]:
    parts = [str(case.dtype).replace("torch.", ""), f"h{case.heads}kv{case.heads_kv}d{case.head_dim}"]
    if case.causal:
        parts.append("causal")
    if case.window != (-1, -1):
        parts.append(f"win{case.window[0]}_{case.window[1]}")
    if case.softcap:
        parts.append(f"cap{case.softcap}")
    if case.alibi:
        parts.append(f"alibi-{case.alibi}")
    return parts


def _slopes(alibi: Optional[str], batch: int, heads: int, device) -> Optional[torch.Tensor]:
    """ALiBi slopes (heads,) or (batch, heads) fp32, or None."""
    if alibi is None:
        return None
    shape = (heads,) if alibi == "h" else (batch, heads)
    return torch.rand(shape, device=device) * 0.5


def _flag_kwargs(case) -> dict:
    return dict(causal=case.causal, window_size=case.window, softcap=case.softcap)


# --------------------------------------------------------------------------------------------
# Variable-length batches
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VarlenCase(ExtrasCase):
    seqlens_q: tuple[int, ...]
    seqlens_k: Optional[tuple[int, ...]] = None  # None: seqlens_q (self-attention)
    dropout_p: float = 0.0

    @property
    def lengths_k(self) -> tuple[int, ...]:
        return self.seqlens_q if self.seqlens_k is None else self.seqlens_k

    def __str__(self) -> str:
        lens = "q" + "_".join(map(str, self.seqlens_q)) + "-k" + "_".join(map(str, self.lengths_k))
        drop = [f"drop{self.dropout_p}"] if self.dropout_p else []
        return "-".join([lens, *_flags_str(self), *drop])


def _cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_varlen(case: VarlenCase, device) -> dict:
    """Keyword arguments of fastattn.flash_attention_varlen for ``case`` (q, k, v require grad)."""
    total_q, total_k = sum(case.seqlens_q), sum(case.lengths_k)
    q = torch.randn(total_q, case.heads, case.head_dim, device=device, dtype=case.dtype)
    k = torch.randn(total_k, case.heads_kv, case.head_dim, device=device, dtype=case.dtype)
    v = torch.randn(total_k, case.heads_kv, case.head_dim, device=device, dtype=case.dtype)
    return dict(
        q=q.requires_grad_(), k=k.requires_grad_(), v=v.requires_grad_(),
        cu_seqlens_q=_cu_seqlens(case.seqlens_q, device),
        cu_seqlens_k=_cu_seqlens(case.lengths_k, device),
        max_seqlen_q=max(case.seqlens_q),
        max_seqlen_k=max(case.lengths_k),
        alibi_slopes=_slopes(case.alibi, len(case.seqlens_q), case.heads, device),
        dropout_p=case.dropout_p,
        **_flag_kwargs(case),
    )


def explicit_varlen(args: dict, dtype: torch.dtype, dout: torch.Tensor):
    """The explicit formula on each sequence of ``args`` (make_varlen's dict) in ``dtype``:
    out (total_q, H, D), lse (H, total_q) and the packed gradients (dq, dk, dv) for dout."""
    q, k, v = (args[n].detach().to(dtype).requires_grad_() for n in ("q", "k", "v"))
    cq, ck = args["cu_seqlens_q"].tolist(), args["cu_seqlens_k"].tolist()
    slopes = args["alibi_slopes"]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        seq_slopes = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        o, l = explicit_attention(
            q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
            causal=args["causal"], window=args["window_size"], softcap=args["softcap"], slopes=seq_slopes,
        )
        outs.append(o[0])
        lses.append(l[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype), allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))
    return out.detach(), lse, grads


def _check_dead_rows(out, lse, lse64, dq, heads_dim: int) -> None:
    """lse is -inf exactly where the oracle's is; output and dq are 0 there; nothing is NaN.
    heads_dim: the dim of lse holding the heads (0 for varlen (H, total), 1 for (B, H, Lq))."""
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), dead), "lse is -inf exactly on the rows that see no key"
    assert not torch.isnan(lse).any() and not torch.isnan(out).any()
    dead_rows = dead.movedim(heads_dim, -1)  # (..., H): out's leading dims
    assert (out[dead_rows] == 0).all(), "rows that see no key give output 0"
    if dq is not None:
        assert (dq[dead_rows] == 0).all(), "rows that see no key pass no gradient"


def check_varlen(case: VarlenCase, backend: str, device) -> None:
    """Output, lse and every gradient of flash_attention_varlen against the float64 oracle."""
    assert case.dropout_p == 0, "dropout cases go through check_varlen_dropout"
    args = make_varlen(case, device)
    out, lse = fastattn.flash_attention_varlen(**args, return_lse=True, backend=backend)
    assert out.shape == args["q"].shape and out.dtype == case.dtype
    assert lse.shape == (case.heads, args["q"].shape[0]) and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (args["q"], args["k"], args["v"]), dout)
    out64, lse64, grads64 = explicit_varlen(args, torch.float64, dout)
    base_out, base_lse, base_grads = explicit_varlen(args, case.dtype, dout)
    assert_close_to_reference(out, out64, base_out, "out")
    live = ~torch.isneginf(lse64)
    assert_close_to_reference(lse[live], lse64[live].double(), base_lse[live], "lse")
    for name, grad, grad64, base, like in zip(("dq", "dk", "dv"), grads, grads64, base_grads,
                                               (args["q"], args["k"], args["v"])):
        assert grad.shape == like.shape and grad.dtype == like.dtype, name
        assert_close_to_reference(grad, grad64, base, name)
    _check_dead_rows(out, lse, lse64, grads[0], heads_dim=0)


def check_varlen_matches_per_sequence(case: VarlenCase, backend: str, device) -> None:
    """flash_attention_varlen equals flash_attention called on each sequence alone (forward and
    gradients, within the dtype's atol): sequences never see each other."""
    args = make_varlen(case, device)
    out, lse = fastattn.flash_attention_varlen(**args, return_lse=True, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (args["q"], args["k"], args["v"]), dout)
    cq, ck = args["cu_seqlens_q"].tolist(), args["cu_seqlens_k"].tolist()
    slopes = args["alibi_slopes"]
    atol = ATOL[case.dtype]
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs or ke == ks:
            continue  # flash_attention needs both non-empty; check_varlen covers these
        q, k, v = (args[n].detach()[None, s:e].requires_grad_() for n, s, e in
                   (("q", qs, qe), ("k", ks, ke), ("v", ks, ke)))
        seq_slopes = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        o, l = fastattn.flash_attention(q, k, v, alibi_slopes=seq_slopes, return_lse=True, backend=backend,
                                        **_flag_kwargs(case))
        g = torch.autograd.grad(o, (q, k, v), dout[None, qs:qe])
        assert max_error(out[qs:qe], o[0]) <= atol, f"sequence {b}: out"
        assert torch.equal(torch.isneginf(lse[:, qs:qe]), torch.isneginf(l[0])), f"sequence {b}: dead rows"
        live = ~torch.isneginf(l[0])
        assert max_error(lse[:, qs:qe][live], l[0][live]) <= atol, f"sequence {b}: lse"
        for name, packed, alone in zip(("dq", "dk", "dv"), (grads[0][qs:qe], grads[1][ks:ke], grads[2][ks:ke]), g):
            assert max_error(packed, alone[0]) <= atol, f"sequence {b}: {name}"


def check_varlen_dropout(case: VarlenCase, backend: str, device) -> None:
    """Dropout, self-consistency: the same seed gives the same output and gradients; dropout
    changes the output; and, the output being linear in v for a fixed mask, backward uses
    forward's mask: ``<dv, v> == <dout, out>`` per (kv head, dim) column."""
    assert case.dropout_p > 0
    args = make_varlen(case, device)

    def run(seed: int, **overrides):
        torch.manual_seed(seed)
        out = fastattn.flash_attention_varlen(**{**args, **overrides}, backend=backend)
        return out, torch.autograd.grad(out, (args["q"], args["k"], args["v"]), dout)

    dout = torch.randn(args["q"].shape, device=device, dtype=case.dtype)
    out, grads = run(1234)
    again, grads_again = run(1234)
    assert torch.equal(out, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again)), \
        "same seed, same dropout mask"
    undropped, _ = run(1234, dropout_p=0.0)
    assert max_error(out, undropped) > 10 * ATOL[case.dtype], "dropout changed nothing"
    # Per (kv head, dim) column: sum_t dv[t,g,d] v[t,g,d] == sum_{t, h in g} dout[t,h,d] out[t,h,d].
    v = args["v"].detach().double()
    lhs = torch.einsum("tgd,tgd->gd", grads[2].double(), v)
    rhs = torch.einsum("thd,thd->hd", dout.double(), out.detach().double())
    rhs = rhs.view(case.heads_kv, case.heads // case.heads_kv, -1).sum(1)
    scale = torch.einsum("tgd,tgd->gd", grads[2].double().abs(), v.abs())
    ratio = ((lhs - rhs).abs() / scale.clamp_min(1e-30)).max().item()
    assert ratio <= 4 * torch.finfo(case.dtype).eps, f"<dv, v> != <dout, out> (relative {ratio:.2e})"


# Odd shapes from flash-attn's own tests; float64 on the oracle side. Each flag alone, then
# combined; GQA and MQA; empty sequences; rows that see no key (Lq > Lk under causal).
VARLEN_CASES = [
    VarlenCase(seqlens_q=(113, 1, 203), head_dim=40),
    VarlenCase(seqlens_q=(1, 239, 113), seqlens_k=(339, 217, 203), head_dim=59, causal=True),
    VarlenCase(seqlens_q=(217, 113), seqlens_k=(239, 1), heads=4, heads_kv=1, head_dim=80, window=(32, 8)),
    VarlenCase(seqlens_q=(203, 339), heads=3, heads_kv=3, head_dim=96, softcap=5.0),
    VarlenCase(seqlens_q=(113, 217), seqlens_k=(217, 113), head_dim=111, alibi="h"),
    VarlenCase(seqlens_q=(1, 239, 0, 113), seqlens_k=(203, 239, 5, 0), heads=6, heads_kv=2, head_dim=128,
               causal=True, window=(64, -1), softcap=8.0, alibi="bh"),
    VarlenCase(seqlens_q=(1, 113), heads=2, heads_kv=2, head_dim=256, causal=True, alibi="h"),
    VarlenCase(seqlens_q=(113, 203), seqlens_k=(217, 203), head_dim=80, dtype=torch.float16, causal=True,
               window=(48, -1), softcap=5.0),
    VarlenCase(seqlens_q=(239, 1), seqlens_k=(113, 217), heads=4, heads_kv=1, head_dim=96, dtype=torch.bfloat16,
               alibi="bh", window=(40, 16)),
    VarlenCase(seqlens_q=(203, 113), heads=2, heads_kv=1, head_dim=59, dtype=torch.float32, causal=True,
               softcap=8.0),
]

VARLEN_DROPOUT_CASES = [
    VarlenCase(seqlens_q=(113, 1, 203), seqlens_k=(217, 5, 203), head_dim=40, dropout_p=0.17),
    VarlenCase(seqlens_q=(239, 113), heads=4, heads_kv=1, head_dim=80, dtype=torch.float16, causal=True,
               window=(64, -1), softcap=5.0, alibi="h", dropout_p=0.1),
]


# --------------------------------------------------------------------------------------------
# KV-cache decoding
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KVCacheCase(ExtrasCase):
    cache_seqlens: tuple[int, ...]  # cached lengths before the append, one per sequence
    seqlen_q: int = 1
    seqlen_new: int = 1  # 0: no k/v to append
    capacity: int = 256  # positions per sequence (seqlen_cache, or max_blocks * block_size)
    block_size: Optional[int] = None  # paged cache when set
    batch_idx: bool = False  # contiguous cache with extra rows, selected by cache_batch_idx

    def __str__(self) -> str:
        layout = f"paged{self.block_size}" if self.block_size else ("rows" if self.batch_idx else "contiguous")
        lens = "cache" + "_".join(map(str, self.cache_seqlens)) + f"-q{self.seqlen_q}-new{self.seqlen_new}"
        return "-".join([layout, lens, *_flags_str(self)])


@dataclasses.dataclass
class KVCacheData:
    """kwargs: flash_attention_with_kvcache's arguments; logical_k/v: (B, capacity, Hkv, D)
    each sequence's cache as one contiguous row (before the append, for the oracle)."""

    kwargs: dict
    logical_k: torch.Tensor
    logical_v: torch.Tensor


def make_kvcache(case: KVCacheCase, device, *, paged: Optional[bool] = None) -> KVCacheData:
    """A random logical cache laid out as ``case`` says (paged: shuffled blocks, unused
    block_table entries -1, spare blocks; rows: shuffled rows, spare rows). ``paged=False``
    lays a paged case out contiguously (to compare the two layouts on the same values)."""
    b, hkv, d, cap = len(case.cache_seqlens), case.heads_kv, case.head_dim, case.capacity
    paged = case.block_size is not None if paged is None else paged
    logical_k = torch.randn(b, cap, hkv, d, device=device, dtype=case.dtype)
    logical_v = torch.randn(b, cap, hkv, d, device=device, dtype=case.dtype)
    seqlens = torch.tensor(case.cache_seqlens, dtype=torch.int32, device=device)
    kwargs = dict(cache_seqlens=seqlens, alibi_slopes=_slopes(case.alibi, b, case.heads, device), **_flag_kwargs(case))
    if paged:
        bs = case.block_size
        assert cap % bs == 0, "capacity must be whole blocks"
        max_blocks, num_blocks = cap // bs, b * (cap // bs) + 2
        table = torch.randperm(num_blocks, device=device)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
        k_cache = torch.randn(num_blocks, bs, hkv, d, device=device, dtype=case.dtype)
        v_cache = torch.randn_like(k_cache)
        k_cache[table.flatten().long()] = logical_k.reshape(b * max_blocks, bs, hkv, d)
        v_cache[table.flatten().long()] = logical_v.reshape(b * max_blocks, bs, hkv, d)
        blocks_used = [-(-(n + case.seqlen_new) // bs) for n in case.cache_seqlens]
        for row, used in enumerate(blocks_used):
            table[row, used:] = -1  # never read
        kwargs["block_table"] = table
    elif case.batch_idx:
        rows = torch.randperm(b + 2, device=device)[:b]
        k_cache = torch.randn(b + 2, cap, hkv, d, device=device, dtype=case.dtype)
        v_cache = torch.randn_like(k_cache)
        k_cache[rows], v_cache[rows] = logical_k, logical_v
        kwargs["cache_batch_idx"] = rows.to(torch.int32)
    else:
        k_cache, v_cache = logical_k.clone(), logical_v.clone()
    kwargs["q"] = torch.randn(b, case.seqlen_q, case.heads, d, device=device, dtype=case.dtype)
    kwargs["k_cache"], kwargs["v_cache"] = k_cache, v_cache
    if case.seqlen_new:
        kwargs["k"] = torch.randn(b, case.seqlen_new, hkv, d, device=device, dtype=case.dtype)
        kwargs["v"] = torch.randn(b, case.seqlen_new, hkv, d, device=device, dtype=case.dtype)
    return KVCacheData(kwargs, logical_k, logical_v)


def expected_cache_after_append(data: KVCacheData, name: str) -> torch.Tensor:
    """The raw cache ``name`` ("k_cache"/"v_cache") as the append must leave it, written
    position by position (an independent loop, not the vectorized append)."""
    kw = data.kwargs
    expected = kw[name].clone()
    new = kw.get(name[0])
    if new is None:
        return expected
    table, rows = kw.get("block_table"), kw.get("cache_batch_idx")
    for b, start in enumerate(kw["cache_seqlens"].tolist()):
        for t in range(new.shape[1]):
            pos = start + t
            if table is not None:
                bs = expected.shape[1]
                expected[int(table[b, pos // bs]), pos % bs] = new[b, t]
            else:
                expected[b if rows is None else int(rows[b]), pos] = new[b, t]
    return expected


def explicit_kvcache(data: KVCacheData, dtype: torch.dtype):
    """The explicit formula on each sequence's cache prefix plus its new tokens, in dtype:
    out (B, Lq, H, D), lse (B, H, Lq)."""
    kw = data.kwargs
    slopes = kw["alibi_slopes"]
    outs, lses = [], []
    for b, start in enumerate(kw["cache_seqlens"].tolist()):
        keys, values = data.logical_k[b, :start], data.logical_v[b, :start]
        if "k" in kw:
            keys, values = torch.cat((keys, kw["k"][b])), torch.cat((values, kw["v"][b]))
        seq_slopes = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        o, l = explicit_attention(kw["q"][b:b + 1].to(dtype), keys[None].to(dtype), values[None].to(dtype),
                                  causal=kw["causal"], window=kw["window_size"], softcap=kw["softcap"],
                                  slopes=seq_slopes)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def check_kvcache(case: KVCacheCase, backend: str, device) -> None:
    """flash_attention_with_kvcache against the float64 oracle; the cache updated in place
    (appended rows equal k/v, every other entry untouched); cache_seqlens not modified; and,
    for a paged case, the same values laid out contiguously give the same output."""
    data = make_kvcache(case, device)
    kw = data.kwargs
    expected_k, expected_v = (expected_cache_after_append(data, n) for n in ("k_cache", "v_cache"))
    seqlens_before = kw["cache_seqlens"].clone()
    with torch.no_grad():
        out, lse = fastattn.flash_attention_with_kvcache(**kw, return_lse=True, backend=backend)
    assert torch.equal(kw["cache_seqlens"], seqlens_before), "cache_seqlens must not be modified"
    assert torch.equal(kw["k_cache"], expected_k) and torch.equal(kw["v_cache"], expected_v), \
        "the append writes k/v at cache_seqlens and nothing else"
    b, lq, h = kw["q"].shape[:3]
    assert out.shape == kw["q"].shape and out.dtype == case.dtype
    assert lse.shape == (b, h, lq) and lse.dtype == torch.float32
    out64, lse64 = explicit_kvcache(data, torch.float64)
    base_out, base_lse = explicit_kvcache(data, case.dtype)
    assert_close_to_reference(out, out64, base_out, "out")
    live = ~torch.isneginf(lse64)
    assert_close_to_reference(lse[live], lse64[live].double(), base_lse[live], "lse")
    _check_dead_rows(out, lse, lse64, None, heads_dim=1)
    if case.block_size is not None:
        contiguous = make_kvcache(case, device, paged=False)
        for name in ("q", "k", "v", "alibi_slopes"):
            contiguous.kwargs[name] = kw[name]
        contiguous.kwargs["k_cache"][:] = data.logical_k
        contiguous.kwargs["v_cache"][:] = data.logical_v
        with torch.no_grad():
            out_c, lse_c = fastattn.flash_attention_with_kvcache(**contiguous.kwargs, return_lse=True,
                                                                 backend=backend)
        assert max_error(out, out_c) <= ATOL[case.dtype], "paged and contiguous caches disagree (out)"
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_c))
        assert max_error(lse[live], lse_c[live]) <= ATOL[case.dtype], "paged and contiguous caches disagree (lse)"


def check_kvcache_matches_flash_attention(case: KVCacheCase, backend: str, device) -> None:
    """Each sequence's output equals flash_attention on its valid prefix (after the append)."""
    data = make_kvcache(case, device)
    kw = data.kwargs
    with torch.no_grad():
        out, lse = fastattn.flash_attention_with_kvcache(**kw, return_lse=True, backend=backend)
    slopes = kw["alibi_slopes"]
    for b, start in enumerate(kw["cache_seqlens"].tolist()):
        length = start + case.seqlen_new
        if length == 0:
            continue  # flash_attention needs keys
        keys = torch.cat((data.logical_k[b, :start], kw["k"][b])) if case.seqlen_new else data.logical_k[b, :start]
        values = torch.cat((data.logical_v[b, :start], kw["v"][b])) if case.seqlen_new else data.logical_v[b, :start]
        seq_slopes = slopes[b] if slopes is not None and slopes.dim() == 2 else slopes
        o, l = fastattn.flash_attention(kw["q"][b:b + 1], keys[None], values[None], alibi_slopes=seq_slopes,
                                        return_lse=True, backend=backend, **_flag_kwargs(case))
        assert max_error(out[b], o[0]) <= ATOL[case.dtype], f"sequence {b}: out"
        live = ~torch.isneginf(l[0])
        assert torch.equal(torch.isneginf(lse[b]), ~live), f"sequence {b}: dead rows"
        assert max_error(lse[b][live], l[0][live]) <= ATOL[case.dtype], f"sequence {b}: lse"


KVCACHE_CASES = [
    KVCacheCase(cache_seqlens=(0, 113, 200), head_dim=40, causal=True),
    KVCacheCase(cache_seqlens=(5, 217, 100), block_size=16, heads=4, heads_kv=1, head_dim=80, causal=True,
                alibi="bh"),
    KVCacheCase(cache_seqlens=(335, 1, 60), seqlen_q=4, seqlen_new=4, capacity=352, block_size=32, head_dim=59,
                causal=True, window=(16, -1), softcap=5.0),
    KVCacheCase(cache_seqlens=(113, 203), seqlen_q=7, seqlen_new=0, batch_idx=True, head_dim=111, alibi="h",
                window=(8, 4)),
    KVCacheCase(cache_seqlens=(0, 7), seqlen_q=5, seqlen_new=2, capacity=16, heads=3, heads_kv=3, head_dim=96,
                causal=True),
    KVCacheCase(cache_seqlens=(239, 0), block_size=64, heads=2, heads_kv=2, head_dim=256),
    KVCacheCase(cache_seqlens=(203, 30), seqlen_q=16, seqlen_new=16, capacity=239, heads=8, heads_kv=2,
                head_dim=128, causal=True, alibi="h", softcap=8.0),
    KVCacheCase(cache_seqlens=(217, 1, 100), block_size=16, head_dim=128, dtype=torch.float16, causal=True,
                window=(64, -1)),
    KVCacheCase(cache_seqlens=(113, 239), seqlen_q=2, seqlen_new=2, batch_idx=True, heads=4, heads_kv=1,
                head_dim=96, dtype=torch.bfloat16, causal=True, alibi="bh"),
    KVCacheCase(cache_seqlens=(203, 7), seqlen_q=3, seqlen_new=1, block_size=32, head_dim=80, dtype=torch.float32,
                softcap=5.0),
]
