"""Decoding benchmark: one new token per sequence over a KV cache, sweep over cache length,
contiguous and paged caches, per batch size.

Every provider does the whole decoding step: store the new token's key/value at position
``cache_seqlens[b]`` of sequence b's cache (in place), then attend the one query over the
``cache_seqlens[b] + 1`` valid positions. Sequences have different lengths (see
:func:`cache_seqlens`), so padding is real. Decoding is memory-bound: the metric is the
bandwidth achieved reading K and V (:func:`decode_bytes`).
Providers: every fastattn backend (``flash_attention_with_kvcache(..., backend=name)``); naive
PyTorch (gather the pages, matmul-softmax-matmul with a length mask, the baseline); torch
``scaled_dot_product_attention`` with a key padding mask for the lengths.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from fastattn.bench.common import check_preset, default_dtype, fastattn_providers, randn
from fastattn.bench.harness import NAIVE, TORCH, Problem, Provider, Workload
from fastattn.bench.runner import Suite

#: Sequences of the batch the float64 reference covers: the first (the longest) and the last
#: (the shortest), so a provider that ignores the per-sequence lengths fails the check.
REFERENCE_ROWS = (0, -1)


@dataclasses.dataclass(frozen=True)
class DecodeCase:
    batch: int
    heads: int
    heads_kv: int
    cache_len: int  # capacity per sequence; the longest sequence fills it after the step
    head_dim: int
    paged: bool
    block_size: int
    dtype: torch.dtype
    modes: tuple[str, ...] = ("forward",)  # decoding is inference

    @property
    def x(self) -> int:
        return self.cache_len

    @property
    def layout(self) -> str:
        return f"paged{self.block_size}" if self.paged else "contiguous"

    @property
    def variant(self) -> str:
        return f"B{self.batch} {self.layout}"

    @property
    def label(self) -> str:
        return f"B{self.batch} H{self.heads}/{self.heads_kv} L{self.cache_len} D{self.head_dim} {self.layout}"

    @property
    def params(self) -> dict:
        return {
            "batch": self.batch, "heads": self.heads, "heads_kv": self.heads_kv, "cache_len": self.cache_len,
            "head_dim": self.head_dim, "paged": self.paged, "block_size": self.block_size,
        }


def cache_seqlens(batch: int, cache_len: int) -> list[int]:
    """Valid positions of each sequence before the step: from cache_len - 1 (sequence 0, full
    after the step) down to about cache_len / 2 (the last), evenly spread."""
    return [cache_len - 1 - (b * (cache_len // 2)) // batch for b in range(batch)]


def decode_bytes(batch: int, cache_len: int, heads_kv: int, head_dim: int, elem_bytes: int) -> float:
    """Bytes of K and V one decoding step must read: every attended position's key and value,
    ``2 * sum_b (cache_seqlens[b] + 1) * Hkv * D * elem_bytes`` (q, the new token and the
    output are negligible next to them)."""
    positions = sum(n + 1 for n in cache_seqlens(batch, cache_len))
    return float(2 * positions * heads_kv * head_dim * elem_bytes)


def work(case: DecodeCase, mode: str) -> float:
    return decode_bytes(case.batch, case.cache_len, case.heads_kv, case.head_dim, case.dtype.itemsize)


def cases(preset: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> list[DecodeCase]:
    check_preset(preset)
    dtype = default_dtype(device, dtype)
    if preset == "smoke":
        heads, heads_kv, head_dim, block = 4, 2, 16, 16
        batches, lengths = (3,), (64, 96)
    elif device.type == "cuda":
        # Llama-like GQA heads: 32 query heads over 8 kv heads of 128. At B64 x 32k the bf16
        # K and V are 8 GiB, far beyond the H200's L2: the step streams from HBM.
        heads, heads_kv, head_dim, block = 32, 8, 128, 256
        if preset == "quick":
            batches, lengths = (1, 16, 64), (1024, 8192, 32768)
        else:
            batches, lengths = (1, 4, 16, 64), (1024, 2048, 4096, 8192, 16384, 32768)
    else:
        heads, heads_kv, head_dim, block = 8, 2, 64, 256
        batches, lengths = ((1, 8), (1024, 4096)) if preset == "quick" else ((1, 8, 64), (1024, 4096, 16384))
    return [
        DecodeCase(batch, heads, heads_kv, length, head_dim, paged, block, dtype)
        for paged in (False, True)
        for batch in batches
        for length in lengths
    ]


# --------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------
def _slots(case: DecodeCase, block_table: Optional[torch.Tensor], positions: torch.Tensor):
    """(B, L) positions -> indices into dims 0 and 1 of the cache holding them."""
    rows = torch.arange(case.batch, device=positions.device)[:, None].expand_as(positions)
    if block_table is None:
        return rows, positions
    return block_table.long().gather(1, positions // case.block_size), positions % case.block_size


def _attend64(q, keys, values) -> torch.Tensor:
    """One sequence in float64: q (1, H, D), keys/values (n, Hkv, D) -> (1, H, D)."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # (n, H, D)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[-1])  # (H, 1, n)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def make_problem(case: DecodeCase, device: torch.device) -> Problem:
    b, h, hkv, d = case.batch, case.heads, case.heads_kv, case.head_dim
    blocks_per_seq = math.ceil(case.cache_len / case.block_size)
    block_table = None
    if case.paged:
        # sequence b's j-th block is j * B + b: every sequence is scattered over the pool
        block_table = torch.arange(b * blocks_per_seq, dtype=torch.int32, device=device).view(blocks_per_seq, b).t().contiguous()
        cache_shape = (b * blocks_per_seq, case.block_size, hkv, d)  # (num_blocks, block_size, Hkv, D)
    else:
        cache_shape = (b, case.cache_len, hkv, d)  # (B, Lcache, Hkv, D)
    # every slot random, the stale ones past each length too: reading them changes the result
    k_cache, v_cache = (randn(*cache_shape, device=device, dtype=case.dtype, grad=False) for _ in range(2))
    q = randn(b, 1, h, d, device=device, dtype=case.dtype, grad=False)  # (B, 1, H, D)
    k_new, v_new = (randn(b, 1, hkv, d, device=device, dtype=case.dtype, grad=False) for _ in range(2))
    seqlens = torch.tensor(cache_seqlens(b, case.cache_len), dtype=torch.int32, device=device)  # (B,)

    expected = []
    for row in REFERENCE_ROWS:
        n = int(seqlens[row])
        dim0, dim1 = _slots(case, block_table, torch.arange(n, device=device)[None].expand(b, -1))
        keys = torch.cat([k_cache[dim0[row], dim1[row]], k_new[row]])  # (n + 1, Hkv, D)
        values = torch.cat([v_cache[dim0[row], dim1[row]], v_new[row]])
        expected.append(_attend64(q[row], keys, values))
    return Problem(
        inputs=(q, k_cache, v_cache, k_new, v_new, seqlens, block_table),
        grad_out=(),
        expected_out=(torch.stack(expected),),  # (len(REFERENCE_ROWS), 1, H, D)
        expected_grads=(),
        out_names=("out",),
        grad_names=(),
        select=lambda t: t[list(REFERENCE_ROWS)],
    )


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def _fastattn(case: DecodeCase, problem: Problem, backend: str) -> Workload:
    import fastattn

    q, k_cache, v_cache, k_new, v_new, seqlens, block_table = problem.inputs
    return Workload(
        lambda: fastattn.flash_attention_with_kvcache(
            q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=block_table, backend=backend
        ),
        (),
    )


def _append_and_gather(case: DecodeCase, problem: Problem):
    """The plain PyTorch half of a step: store the new key/value at each sequence's length,
    then every sequence's keys/values (B, capacity, Hkv, D) (the pages gathered into a copy)
    and the (B, capacity) bool mask of the valid positions."""
    q, k_cache, v_cache, k_new, v_new, seqlens, block_table = problem.inputs
    dim0, dim1 = _slots(case, block_table, seqlens.long()[:, None])  # (B, 1) each
    k_cache[dim0, dim1] = k_new
    v_cache[dim0, dim1] = v_new
    if block_table is None:
        keys, values = k_cache, v_cache
    else:
        pages = block_table.long()  # (B, blocks per sequence)
        keys = k_cache[pages].flatten(1, 2)  # (B, blocks * block_size, Hkv, D)
        values = v_cache[pages].flatten(1, 2)
    valid = torch.arange(keys.shape[1], device=keys.device)[None] <= seqlens[:, None]  # (B, capacity)
    return keys, values, valid


def naive_decode(q, keys, values, valid) -> torch.Tensor:
    """q (B, 1, H, D), keys/values (B, L, Hkv, D), valid (B, L) bool -> (B, 1, H, D): the query
    heads of one kv head as the rows of one matmul (no repeated K/V)."""
    b, _, h, d = q.shape
    hkv = keys.shape[2]
    qg = q.view(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)) / math.sqrt(d)  # (B, Hkv, G, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), values.transpose(1, 2))  # (B, Hkv, G, D)
    return out.reshape(b, 1, h, d)


def _naive(case: DecodeCase, problem: Problem) -> Workload:
    q = problem.inputs[0]
    return Workload(lambda: naive_decode(q, *_append_and_gather(case, problem)), ())


def _sdpa_gqa_reason(case: DecodeCase) -> Optional[str]:
    from packaging.version import Version

    if case.heads != case.heads_kv and Version(torch.__version__.split("+")[0]) < Version("2.5"):
        return f"torch {torch.__version__}'s scaled_dot_product_attention has no enable_gqa (2.5+)"
    return None


def _sdpa(case: DecodeCase, problem: Problem) -> Workload:
    q = problem.inputs[0]
    gqa = {"enable_gqa": True} if case.heads != case.heads_kv else {}

    def fn() -> torch.Tensor:
        keys, values, valid = _append_and_gather(case, problem)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=valid[:, None, None, :], **gqa,  # (B, 1, 1, L): the key padding mask
        )  # (B, H, 1, D)
        return out.transpose(1, 2)

    return Workload(fn, ())


def providers(preset: str) -> list[Provider]:
    return [
        *fastattn_providers("attention", _fastattn),
        Provider(name="naive", family=NAIVE, build=_naive),
        Provider(name="torch-sdpa", family=TORCH, build=_sdpa, supports=_sdpa_gqa_reason),
    ]


SUITE = Suite(
    op="decode",
    sweep="cache_len",
    metric="GB/s",
    cases=cases,
    providers=providers,
    make_problem=make_problem,
    work=work,
)
