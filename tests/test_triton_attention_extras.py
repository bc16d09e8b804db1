"""Triton attention, flash-attn 2 extras (fastattn.triton.attention): sliding window, softcap,
ALiBi, variable-length (cu_seqlens) batches and KV-cache decoding (contiguous and paged,
split-KV), against the float64 reference with the 2x-baseline rule of tests/helpers.py.

Runs on the GPU when there is one, else through the Triton interpreter: tiny shapes, one flag
at a time, then combinations. KV-cache results are checked against an explicit float64 gather
of each sequence's cache followed by the dense reference.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from fastattn.options import AttentionInputs, AttentionOptions, KVCacheInputs, RngState
from fastattn.reference import attention as reference
from fastattn.triton import attention as tattn
from helpers import assert_close_to_reference
from attention_cases import baseline


@dataclasses.dataclass(frozen=True)
class ExtrasCase:
    batch: int = 2
    heads: int = 4
    heads_kv: int = 2
    seqlen_q: int = 37
    seqlen_k: int = 53
    head_dim: int = 40
    dtype: torch.dtype = torch.float16
    causal: bool = False
    alignment: str = "bottom_right"
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # "heads" (H,) or "batch" (B, H)
    kpm: bool = False
    dropout_p: float = 0.0

    def __str__(self) -> str:
        parts = [f"b{self.batch}h{self.heads}kv{self.heads_kv}", f"{self.seqlen_q}x{self.seqlen_k}",
                 f"d{self.head_dim}", str(self.dtype).replace("torch.", "")]
        if self.causal:
            parts.append(f"causal-{self.alignment}")
        elif self.alignment != "bottom_right":
            parts.append(self.alignment)
        if self.window != (-1, -1):
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap}")
        if self.alibi:
            parts.append(f"alibi-{self.alibi}")
        if self.kpm:
            parts.append("kpm")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p}")
        return "-".join(parts)


def _options(case) -> AttentionOptions:
    """The case's options; a KV-cache case (no alignment, no dropout) is bottom-right aligned."""
    left, right = case.window
    return AttentionOptions(
        softmax_scale=case.head_dim ** -0.5, causal=case.causal,
        causal_alignment=getattr(case, "alignment", "bottom_right"), dropout_p=getattr(case, "dropout_p", 0.0),
        window_left=left, window_right=0 if case.causal else right, softcap=case.softcap,
    )


def _slopes(kind: Optional[str], batch: int, heads: int, device: str) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    shape = (heads,) if kind == "heads" else (batch, heads)
    return torch.rand(shape, device=device) * 0.5


def _to64(inputs):
    return dataclasses.replace(inputs, q=inputs.q.double(), k=inputs.k.double(), v=inputs.v.double())


def _assert_results(out, lse, grads, out64, lse64, grads64, base_out, base_grads, like):
    assert out.dtype == like[0].dtype and lse.dtype == torch.float32 and lse.shape == lse64.shape
    assert_close_to_reference(out, out64, base_out, "out")
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), dead), "lse is -inf exactly on the rows that see no key"
    assert not torch.isnan(lse).any()
    assert (lse[~dead] - lse64[~dead]).abs().max().item() <= 1e-3 if (~dead).any() else True
    for name, grad, t, grad64, base in zip(("dq", "dk", "dv"), grads, like, grads64, base_grads):
        assert grad.dtype == t.dtype and grad.shape == t.shape, name
        assert_close_to_reference(grad, grad64, base, name)


# --------------------------------------------------------------------------------------------
# Dense batches: window, softcap, ALiBi
# --------------------------------------------------------------------------------------------
def _check_dense(case: ExtrasCase, device: str, expect_dead_rows: bool = False) -> None:
    b, h, hkv, lq, lk, d = case.batch, case.heads, case.heads_kv, case.seqlen_q, case.seqlen_k, case.head_dim
    q = torch.randn(b, lq, h, d, device=device, dtype=case.dtype)
    k = torch.randn(b, lk, hkv, d, device=device, dtype=case.dtype)
    v = torch.randn(b, lk, hkv, d, device=device, dtype=case.dtype)
    kpm = torch.rand(b, lk, device=device) > 0.25 if case.kpm else None
    inputs = AttentionInputs(q, k, v, key_padding_mask=kpm, alibi_slopes=_slopes(case.alibi, b, h, device))
    options = _options(case)
    rng = RngState.draw() if case.dropout_p > 0 else None
    out, lse = tattn.forward(inputs, options, rng)
    dout = torch.randn_like(out)
    grads = tattn.backward(dout, out, lse, inputs, options, rng)
    keep = tattn.dropout_mask(inputs, options, rng) if rng is not None else None
    inputs64 = _to64(inputs)
    out64, lse64 = reference.forward(inputs64, options, rng, dropout_mask=keep)
    grads64 = reference.backward(dout.double(), out64, lse64, inputs64, options, rng, dropout_mask=keep)
    base_out, _, base_grads = baseline(inputs, options, keep, dout)
    _assert_results(out, lse, grads, out64, lse64, grads64, base_out, base_grads, (q, k, v))
    dead = torch.isneginf(lse64)
    if expect_dead_rows:
        assert dead.any(), "the case was meant to have rows that see no key"
    dead_rows = dead.transpose(1, 2)  # (B, Lq, H)
    assert (out[dead_rows] == 0).all() and (grads[0][dead_rows] == 0).all()


ALONE = [
    ExtrasCase(window=(17, 5)),
    ExtrasCase(window=(9, -1)),
    ExtrasCase(window=(-1, 3), alignment="top_left"),
    ExtrasCase(window=(0, 0), seqlen_q=53, seqlen_k=37),
    ExtrasCase(causal=True, window=(11, -1)),
    ExtrasCase(softcap=2.5),
    ExtrasCase(softcap=30.0, dtype=torch.bfloat16),
    ExtrasCase(alibi="heads"),
    ExtrasCase(alibi="batch", alignment="top_left", dtype=torch.float32),
]


@pytest.mark.parametrize("case", ALONE, ids=str)
def test_each_flag_alone(case, device):
    _check_dense(case, device)


COMBINED = [
    ExtrasCase(causal=True, window=(13, -1), softcap=3.0, alibi="heads", heads=6, heads_kv=2, seqlen_q=113,
               seqlen_k=70, head_dim=80),
    ExtrasCase(window=(20, 7), softcap=4.0, alibi="batch", heads=3, heads_kv=1, dtype=torch.bfloat16, head_dim=96),
    ExtrasCase(causal=True, alignment="top_left", window=(25, -1), alibi="heads", kpm=True, dropout_p=0.2,
               dtype=torch.float32),
    ExtrasCase(window=(8, 8), softcap=5.0, kpm=True, dropout_p=0.15, seqlen_q=45, seqlen_k=45, head_dim=256),
]


@pytest.mark.parametrize("case", COMBINED, ids=str)
def test_flags_combined(case, device):
    _check_dense(case, device)


def test_window_rows_that_see_no_key(device):
    # Bottom-right alignment with Lq > Lk and a narrow window: the first rows see nothing.
    _check_dense(ExtrasCase(window=(2, 1), seqlen_q=60, seqlen_k=20, softcap=2.0), device, expect_dead_rows=True)


def test_window_skips_key_blocks_outside_the_band(device):
    """Key blocks outside a query block's band are never loaded: NaN there leaves the output
    and dQ of that block unchanged (a visited block would turn 0 * NaN into NaN). 512 keys and
    rows 0..127 / 384..511 hold for every shipped block size (at most 128)."""
    case = ExtrasCase(batch=1, heads=1, heads_kv=1, seqlen_q=512, seqlen_k=512, window=(2, 1), head_dim=16)
    q, k, v = (torch.randn(1, 512, 1, 16, device=device, dtype=case.dtype) for _ in range(3))
    options = _options(case)
    inputs = AttentionInputs(q, k, v)
    out, lse = tattn.forward(inputs, options, None)
    dout = torch.randn_like(out)
    dq = tattn.backward(dout, out, lse, inputs, options, None)[0]
    for rows, poisoned_keys in ((slice(0, 128), slice(384, 512)), (slice(384, 512), slice(0, 128))):
        k_bad, v_bad = k.clone(), v.clone()
        k_bad[:, poisoned_keys] = float("nan")
        v_bad[:, poisoned_keys] = float("nan")
        bad = AttentionInputs(q, k_bad, v_bad)
        out_bad, lse_bad = tattn.forward(bad, options, None)
        dq_bad = tattn.backward(dout, out_bad, lse_bad, bad, options, None)[0]
        assert torch.equal(out_bad[:, rows], out[:, rows]) and torch.equal(dq_bad[:, rows], dq[:, rows])


# --------------------------------------------------------------------------------------------
# Variable-length batches
# --------------------------------------------------------------------------------------------
def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


def _varlen_inputs(lens_q, lens_k, case: ExtrasCase, device):
    h, hkv, d = case.heads, case.heads_kv, case.head_dim
    q = torch.randn(sum(lens_q), h, d, device=device, dtype=case.dtype)
    k = torch.randn(sum(lens_k), hkv, d, device=device, dtype=case.dtype)
    v = torch.randn(sum(lens_k), hkv, d, device=device, dtype=case.dtype)
    return AttentionInputs(q, k, v, alibi_slopes=_slopes(case.alibi, len(lens_q), h, device),
                           cu_seqlens_q=_cu(lens_q, device), cu_seqlens_k=_cu(lens_k, device),
                           max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))


def _sequence(inputs: AttentionInputs, b: int, qs: slice, ks: slice, tensors=None) -> AttentionInputs:
    q, k, v = tensors if tensors is not None else (inputs.q, inputs.k, inputs.v)
    slopes = inputs.alibi_slopes
    if slopes is not None and slopes.dim() == 2:
        slopes = slopes[b]
    return AttentionInputs(q[None, qs], k[None, ks], v[None, ks], alibi_slopes=slopes)


def _varlen_baseline(inputs: AttentionInputs, options, dout, keep=None):
    """The plain-PyTorch yardstick run per sequence, packed back."""
    out = torch.zeros_like(inputs.q)
    grads = [torch.zeros_like(t) for t in (inputs.q, inputs.k, inputs.v)]
    cq, ck = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        if qs.start == qs.stop or ks.start == ks.stop:
            continue
        seq_keep = None if keep is None else keep[b:b + 1, :, :qs.stop - qs.start, :ks.stop - ks.start]
        o, _, g = baseline(_sequence(inputs, b, qs, ks), options, seq_keep, dout[None, qs])
        out[qs] = o[0]
        grads[0][qs], grads[1][ks], grads[2][ks] = g[0][0], g[1][0], g[2][0]
    return out, grads


VARLEN = [
    (ExtrasCase(), [1, 7, 113, 0, 5], [3, 7, 60, 4, 0]),
    (ExtrasCase(causal=True, heads=6, heads_kv=2), [1, 7, 113], [1, 40, 113]),
    (ExtrasCase(causal=True, window=(9, -1), softcap=3.0, alibi="batch", dtype=torch.bfloat16), [7, 1, 50], [20, 9, 31]),
    (ExtrasCase(window=(5, 4), alibi="heads", alignment="top_left", dtype=torch.float32, head_dim=80),
     [33, 2], [17, 40]),
]


@pytest.mark.parametrize("case, lens_q, lens_k", VARLEN, ids=[f"{c}-{q}x{k}" for c, q, k in VARLEN])
def test_varlen(case, lens_q, lens_k, device):
    """Packed batches with odd and empty sequences against the float64 reference, which runs
    each sequence on its own (so varlen equals per-sequence calls); rows of a sequence without
    keys give output 0, lse -inf and zero dQ."""
    inputs = _varlen_inputs(lens_q, lens_k, case, device)
    options = _options(case)
    out, lse = tattn.forward(inputs, options, None)
    assert out.shape == inputs.q.shape and lse.shape == (case.heads, sum(lens_q))
    dout = torch.randn_like(out)
    grads = tattn.backward(dout, out, lse, inputs, options, None)
    inputs64 = _to64(inputs)
    out64, lse64 = reference.forward(inputs64, options, None)
    grads64 = reference.backward(dout.double(), out64, lse64, inputs64, options, None)
    base_out, base_grads = _varlen_baseline(inputs, options, dout)
    _assert_results(out, lse, grads, out64, lse64, grads64, base_out, base_grads, (inputs.q, inputs.k, inputs.v))
    dead = torch.isneginf(lse64).transpose(0, 1)  # (total_q, H)
    assert (out[dead] == 0).all() and (grads[0][dead] == 0).all()


def test_varlen_dropout_uses_the_dense_mask_of_each_sequence(device):
    """The keep decision of (b, h, i, j) depends on the indices only, so sequence b of a packed
    batch drops what row b of a dense (B, H, max_q, max_k) draw drops."""
    case = ExtrasCase(causal=True, dropout_p=0.2, heads=2, heads_kv=1)
    lens_q, lens_k = [7, 40], [30, 40]
    inputs = _varlen_inputs(lens_q, lens_k, case, device)
    options, rng = _options(case), RngState.draw()
    out, lse = tattn.forward(inputs, options, rng)
    dout = torch.randn_like(out)
    grads = tattn.backward(dout, out, lse, inputs, options, rng)
    dense = AttentionInputs(torch.empty(2, 40, 2, 8, device=device), torch.empty(2, 40, 1, 8, device=device),
                            torch.empty(2, 40, 1, 8, device=device))
    keep = tattn.dropout_mask(dense, options, rng)  # (2, H, 40, 40)
    cq, ck = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    out64 = torch.zeros_like(inputs.q, dtype=torch.float64)
    grads64 = [torch.zeros_like(t, dtype=torch.float64) for t in (inputs.q, inputs.k, inputs.v)]
    lse64 = torch.zeros(lse.shape, dtype=torch.float64, device=device)
    inputs64 = _to64(inputs)
    for b in range(2):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        seq = _sequence(inputs64, b, qs, ks)
        seq_keep = keep[b:b + 1, :, :lens_q[b], :lens_k[b]]
        o, l = reference.forward(seq, options, rng, dropout_mask=seq_keep)
        g = reference.backward(dout[None, qs].double(), o, l, seq, options, rng, dropout_mask=seq_keep)
        out64[qs], lse64[:, qs] = o[0], l[0]
        grads64[0][qs], grads64[1][ks], grads64[2][ks] = g[0][0], g[1][0], g[2][0]
    base_out, base_grads = _varlen_baseline(inputs, options, dout, keep)
    _assert_results(out, lse, grads, out64, lse64, grads64, base_out, base_grads, (inputs.q, inputs.k, inputs.v))


# --------------------------------------------------------------------------------------------
# KV-cache decoding
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CacheCase:
    seqlen_q: int = 1
    heads: int = 8
    heads_kv: int = 2
    head_dim: int = 40
    dtype: torch.dtype = torch.float16
    paged: bool = False
    page_size: int = 16
    batch_idx: bool = False
    causal: bool = True
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None
    num_splits: Optional[int] = None

    def __str__(self) -> str:
        parts = [f"q{self.seqlen_q}", f"h{self.heads}kv{self.heads_kv}", f"d{self.head_dim}",
                 str(self.dtype).replace("torch.", ""), f"paged{self.page_size}" if self.paged else "contiguous"]
        for name, on in (("batchidx", self.batch_idx), ("causal", self.causal), (f"win{self.window}", self.window != (-1, -1)),
                         (f"cap{self.softcap}", self.softcap), (f"alibi-{self.alibi}", self.alibi),
                         (f"splits{self.num_splits}", self.num_splits)):
            if on:
                parts.append(name)
        return "-".join(parts)


#: Valid cache lengths of the 3 sequences: one shorter than some queries' positions need
#: (rows that see no key under causal), one at the cache's capacity.
CACHE_SEQLENS = (3, 83, 37)
CACHE_CAPACITY = 96  # 6 pages of 16


def _cache_inputs(case: CacheCase, device) -> KVCacheInputs:
    b, h, hkv, d = len(CACHE_SEQLENS), case.heads, case.heads_kv, case.head_dim
    q = torch.randn(b, case.seqlen_q, h, d, device=device, dtype=case.dtype)
    seqlens = torch.tensor(CACHE_SEQLENS, dtype=torch.int32, device=device)
    slopes = _slopes(case.alibi, b, h, device)
    if case.paged:
        pages_per_seq = CACHE_CAPACITY // case.page_size
        num_blocks = b * pages_per_seq + 3
        k_cache = torch.randn(num_blocks, case.page_size, hkv, d, device=device, dtype=case.dtype)
        v_cache = torch.randn_like(k_cache)
        table = torch.randperm(num_blocks, device=device)[: b * pages_per_seq].view(b, pages_per_seq)
        return KVCacheInputs(q, k_cache, v_cache, seqlens, block_table=table.to(torch.int32), alibi_slopes=slopes)
    k_cache = torch.randn(b + 1, CACHE_CAPACITY, hkv, d, device=device, dtype=case.dtype)
    v_cache = torch.randn_like(k_cache)
    rows = torch.tensor([2, 0, 3], dtype=torch.int32, device=device) if case.batch_idx else None
    return KVCacheInputs(q, k_cache, v_cache, seqlens, cache_batch_idx=rows, alibi_slopes=slopes)


def _gather(inputs: KVCacheInputs, b: int):
    """Sequence b's valid keys and values (n, Hkv, D), gathered explicitly from the cache."""
    n = int(inputs.cache_seqlens[b])
    if inputs.is_paged:
        page = inputs.k_cache.shape[1]
        pages = inputs.block_table[b].long()
        slots = torch.arange(n, device=inputs.device)
        return (inputs.k_cache[pages[slots // page], slots % page], inputs.v_cache[pages[slots // page], slots % page])
    row = int(inputs.cache_batch_idx[b]) if inputs.cache_batch_idx is not None else b
    return inputs.k_cache[row, :n], inputs.v_cache[row, :n]


def _cache_reference(inputs: KVCacheInputs, options: AttentionOptions, float64: bool):
    """(out (B, Lq, H, D), lse (B, H, Lq)): the dense reference (float64) or the plain-PyTorch
    baseline (inputs' dtype) on each sequence's gathered cache, bottom-right aligned."""
    outs, lses = [], []
    for b in range(inputs.batch):
        k, v = _gather(inputs, b)
        slopes = inputs.alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        seq = AttentionInputs(inputs.q[b:b + 1], k[None], v[None], alibi_slopes=slopes)
        if float64:
            out, lse = reference.forward(_to64(seq), options, None)
        else:
            out, _, _ = baseline(seq, options, None, torch.zeros_like(seq.q))
            lse = None
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), (torch.cat(lses) if float64 else None)


def _check_cache(case: CacheCase, device):
    inputs = _cache_inputs(case, device)
    options = _options(case)
    out, lse = tattn.kvcache_forward(inputs, options, num_splits=case.num_splits)
    out64, lse64 = _cache_reference(inputs, options, float64=True)
    base, _ = _cache_reference(inputs, options, float64=False)
    assert out.shape == inputs.q.shape and out.dtype == inputs.dtype
    assert lse.shape == (inputs.batch, inputs.nheads, inputs.seqlen_q) and lse.dtype == torch.float32
    assert_close_to_reference(out, out64, base, "out")
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), dead)
    if (~dead).any():
        assert (lse[~dead] - lse64[~dead]).abs().max().item() <= 1e-3
    assert (out[dead.transpose(1, 2)] == 0).all()
    return inputs, options, out, lse


CACHE_CASES = [
    CacheCase(),
    CacheCase(num_splits=3),
    CacheCase(paged=True, num_splits=4),
    CacheCase(batch_idx=True, num_splits=2, dtype=torch.bfloat16),
    CacheCase(seqlen_q=4, paged=True, page_size=32, window=(10, -1), softcap=3.0, alibi="batch", num_splits=3),
    CacheCase(seqlen_q=7, causal=False, window=(6, 2), alibi="heads", dtype=torch.float32, head_dim=80,
              num_splits=2),
    CacheCase(seqlen_q=16, heads=4, heads_kv=4, paged=True, num_splits=5),
    # Past the split path's query length: one split, several row blocks.
    CacheCase(seqlen_q=20, heads=4, heads_kv=1, batch_idx=True, softcap=2.0),
]


@pytest.mark.parametrize("case", CACHE_CASES, ids=str)
def test_kvcache(case, device):
    _check_cache(case, device)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_split_count_changes_nothing_but_rounding(paged, device):
    case = CacheCase(seqlen_q=2, paged=paged, softcap=4.0, window=(30, -1))
    inputs, options, out, lse = _check_cache(case, device)
    for splits in (1, 6):
        out_s, lse_s = tattn.kvcache_forward(inputs, options, num_splits=splits)
        torch.testing.assert_close(out_s, out, rtol=0, atol=2e-3)
        torch.testing.assert_close(lse_s, lse, rtol=0, atol=1e-5)


def test_kvcache_paged_equals_contiguous(device):
    """The same keys in a paged and in a contiguous cache give the same result."""
    inputs = _cache_inputs(CacheCase(paged=True, seqlen_q=3, alibi="heads"), device)
    rows = [torch.cat([t, t.new_zeros(CACHE_CAPACITY - t.shape[0], *t.shape[1:])]) for t in
            (_gather(inputs, b)[0] for b in range(inputs.batch))]
    vrows = [torch.cat([t, t.new_zeros(CACHE_CAPACITY - t.shape[0], *t.shape[1:])]) for t in
             (_gather(inputs, b)[1] for b in range(inputs.batch))]
    contiguous = dataclasses.replace(inputs, k_cache=torch.stack(rows), v_cache=torch.stack(vrows), block_table=None)
    options = _options(CacheCase())
    for splits in (1, 3):
        out_p, lse_p = tattn.kvcache_forward(inputs, options, num_splits=splits)
        out_c, lse_c = tattn.kvcache_forward(contiguous, options, num_splits=splits)
        assert torch.equal(out_p, out_c) and torch.equal(lse_p, lse_c)


def test_decode_split_heuristic():
    # Few programs and a long cache: split up to two waves; a full GPU or a short cache: 1.
    assert tattn.decode_num_splits(programs=8, max_seqlen_k=32768, block_n=64, sm_count=132) == 33
    assert tattn.decode_num_splits(programs=264, max_seqlen_k=32768, block_n=64, sm_count=132) == 1
    assert tattn.decode_num_splits(programs=1, max_seqlen_k=200, block_n=64, sm_count=132) == 1
    assert tattn.decode_num_splits(programs=1, max_seqlen_k=1 << 20, block_n=64, sm_count=132) == tattn.DECODE_MAX_SPLITS


def test_kvcache_bad_num_splits(device):
    inputs = _cache_inputs(CacheCase(), device)
    with pytest.raises(ValueError, match="num_splits must be a positive int"):
        tattn.kvcache_forward(inputs, _options(CacheCase()), num_splits=0)


def test_capabilities_declare_the_extras():
    caps = tattn.CAPABILITIES
    assert caps.window and caps.softcap and caps.alibi and caps.varlen and caps.kvcache and caps.paged_kvcache


# --------------------------------------------------------------------------------------------
# Public API (fastattn.flash_attention_varlen / flash_attention_with_kvcache) on this backend:
# the shared cases of tests/attention_extras_cases.py in the dtypes Triton serves
# --------------------------------------------------------------------------------------------
from attention_extras_cases import KVCACHE_CASES, VARLEN_CASES, check_kvcache, check_varlen  # noqa: E402

# The fp16/bf16 shared varlen cases take 15-30 s each in the interpreter; the packed-batch
# kernels are covered above, so the API path runs the fp32 one.
_GPU_VARLEN = [c for c in VARLEN_CASES if c.dtype == torch.float32]
_GPU_KVCACHE = [c for c in KVCACHE_CASES if c.dtype != torch.float64]


@pytest.mark.parametrize("case", _GPU_VARLEN, ids=str)
def test_public_varlen(case, device):
    check_varlen(case, "triton", device)


@pytest.mark.parametrize("case", _GPU_KVCACHE, ids=str)
def test_public_kvcache(case, device):
    check_kvcache(case, "triton", device)
