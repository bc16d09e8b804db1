"""The cpu backend's flash-attn 2 extras (csrc/cpu/attention_varlen.cpp, attention_kvcache.cpp):
the shared cases of tests/attention_extras_cases.py against the explicit float64 formula
(float64 cases run in float32: the cpu backend has no float64 kernels), every varlen gradient,
paged vs contiguous caches, the split-KV combine forced with small chunks and with two threads,
rejected inputs, and torch.library.opcheck of the new ops."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fastattn
from fastattn.cpu import attention as cpu_attention
from fastattn.cpu import attention_kvcache
from fastattn.options import AttentionOptions, KVCacheInputs
from attention_extras_cases import (
    KVCACHE_CASES,
    VARLEN_CASES,
    VARLEN_DROPOUT_CASES,
    KVCacheCase,
    check_kvcache,
    check_kvcache_matches_flash_attention,
    check_varlen,
    check_varlen_dropout,
    check_varlen_matches_per_sequence,
    make_varlen,
)
from helpers import ATOL, max_error
from test_attention_kvcache import _base_args, check_rejected_before_the_kernel


def _cpu_dtype(case):
    """The case in float32 when it is float64 (fp16 / bf16 / fp32 cases unchanged)."""
    return dataclasses.replace(case, dtype=torch.float32) if case.dtype == torch.float64 else case


def _case_id(case) -> str:
    return str(_cpu_dtype(case))


@pytest.fixture
def chunked(monkeypatch):
    """Route the cpu backend's decoding through the kernel with a forced split-KV chunk size."""

    def force(chunk_size: int) -> None:
        monkeypatch.setattr(cpu_attention, "kvcache_forward",
                            functools.partial(attention_kvcache.forward, chunk_size=chunk_size))

    return force


# --------------------------------------------------------------------------------------------
# Variable-length batches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VARLEN_CASES, ids=_case_id)
def test_varlen_matches_explicit_formula(case):
    check_varlen(_cpu_dtype(case), "cpu", "cpu")


@pytest.mark.parametrize("case", [VARLEN_CASES[i] for i in (1, 5, 8)], ids=_case_id)
def test_varlen_equals_per_sequence_calls(case):
    check_varlen_matches_per_sequence(_cpu_dtype(case), "cpu", "cpu")


@pytest.mark.parametrize("case", VARLEN_DROPOUT_CASES, ids=_case_id)
def test_varlen_dropout_self_consistent(case):
    check_varlen_dropout(_cpu_dtype(case), "cpu", "cpu")


def test_varlen_is_served_by_the_cpu_backend_by_default():
    args = make_varlen(_cpu_dtype(VARLEN_CASES[0]), "cpu")
    expected = fastattn.flash_attention_varlen(**args, backend="cpu")
    assert torch.equal(fastattn.flash_attention_varlen(**args), expected)


# --------------------------------------------------------------------------------------------
# KV-cache decoding
# --------------------------------------------------------------------------------------------
# 0: automatic (one chunk per sequence under the tests' single thread); 37: odd chunks that
# cross tile and block boundaries, so every multi-chunk sequence goes through the combine.
@pytest.mark.parametrize("chunk_size", [0, 37], ids=["auto", "chunk37"])
@pytest.mark.parametrize("case", KVCACHE_CASES, ids=_case_id)
def test_kvcache_matches_explicit_formula(case, chunk_size, chunked):
    chunked(chunk_size)
    check_kvcache(_cpu_dtype(case), "cpu", "cpu")


@pytest.mark.parametrize("case", [KVCACHE_CASES[i] for i in (1, 3, 4, 8)], ids=_case_id)
def test_kvcache_equals_flash_attention_on_the_valid_prefix(case, chunked):
    chunked(16)
    check_kvcache_matches_flash_attention(_cpu_dtype(case), "cpu", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_kvcache_two_threads_split_a_single_sequence(dtype, chunked):
    """One long sequence under two threads is cut into chunks automatically; the result matches
    the single-chunk kernel, and the float64 oracle (check_kvcache) on a paged layout."""
    case = KVCacheCase(cache_seqlens=(1500,), capacity=1536, block_size=64, heads=8, heads_kv=2, head_dim=64,
                       dtype=dtype, causal=True, alibi="h")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_kvcache(case, "cpu", "cpu")
        q = torch.randn(1, 1, 8, 64, dtype=dtype)
        cache = [torch.randn(1, 1536, 2, 64, dtype=dtype) for _ in range(2)]
        inputs = KVCacheInputs(q, *cache, cache_seqlens=torch.tensor([1501], dtype=torch.int32))
        options = AttentionOptions(softmax_scale=0.125, causal=True)
        split_out, split_lse = attention_kvcache.forward(inputs, options)
        whole_out, whole_lse = attention_kvcache.forward(inputs, options, chunk_size=1536)
    finally:
        torch.set_num_threads(threads)
    assert max_error(split_out, whole_out) <= ATOL[dtype] and max_error(split_lse, whole_lse) <= ATOL[torch.float32]


def test_kvcache_decoding_loop_equals_causal_attention(chunked):
    """Prefill, then one token at a time over a paged cache (GQA, odd head dim): every step
    equals causal flash_attention over the sequence so far."""
    chunked(7)
    b, h, hkv, d, steps, prefill = 2, 6, 2, 40, 5, 9
    q = torch.randn(b, prefill + steps, h, d)
    k, v = torch.randn(b, prefill + steps, hkv, d), torch.randn(b, prefill + steps, hkv, d)
    k_cache, v_cache = torch.zeros(9, 4, hkv, d), torch.zeros(9, 4, hkv, d)
    block_table = torch.tensor([[8, 2, 5, 0], [1, 6, 3, 4]], dtype=torch.int32)
    expected = fastattn.flash_attention(q, k, v, causal=True, backend="cpu")
    seqlens, start = torch.zeros(b, dtype=torch.int32), 0
    for length in (prefill, *[1] * steps):
        end = start + length
        out = fastattn.flash_attention_with_kvcache(
            q[:, start:end], k_cache, v_cache, k[:, start:end], v[:, start:end], cache_seqlens=seqlens,
            block_table=block_table, causal=True, backend="cpu",
        )
        assert max_error(out, expected[:, start:end]) <= ATOL[torch.float32], f"tokens {start}:{end}"
        seqlens, start = seqlens + length, end


def test_kvcache_unused_block_table_entries_are_not_read():
    """-1 entries past a sequence's blocks (and a huge one) are never dereferenced."""
    args = _base_args(paged=True)
    args["block_table"][1, 2:] = torch.tensor([-1, 2**30], dtype=torch.int32)
    out = fastattn.flash_attention_with_kvcache(**args, backend="cpu")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_rejects_bad_arguments_before_the_kernel(monkeypatch, paged):
    check_rejected_before_the_kernel(monkeypatch, cpu_attention, "cpu", paged)


def _op_args(paged: bool) -> list:
    args = _base_args(paged)
    return [args["q"], args["k_cache"], args["v_cache"], args["cache_seqlens"] + 1, args["block_table"], None,
            torch.rand(4), 0.3, 0.0, True, -1, 0, 0]


@pytest.mark.parametrize(
    "position, value, match",
    [
        (3, torch.tensor([3, 17], dtype=torch.int32), r"cache_seqlens\[1\] = 17 is outside \[0, 16\]"),
        (3, torch.tensor([-1, 3], dtype=torch.int32), r"cache_seqlens\[0\] = -1"),
        (5, torch.tensor([2, 0], dtype=torch.int32), r"cache_batch_idx\[0\] = 2 is outside \[0, 2\)"),
        (12, -1, "chunk_size must be >= 0"),
    ],
)
def test_kvcache_op_checks_every_index_it_reads(position, value, match):
    """The op itself never reads out of bounds, even when called past the public validation."""
    cpu_attention.ensure_loaded()
    args = _op_args(paged=False)
    args[position] = value
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastattn.cpu_attention_kvcache_fwd(*args)


def test_kvcache_op_checks_block_table_entries():
    cpu_attention.ensure_loaded()
    args = _op_args(paged=True)
    args[4] = torch.tensor([[0, 1, 2, 3], [4, 9, -1, -1]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"block_table\[1, 1\] = 9 is outside \[0, 6\)"):
        torch.ops.fastattn.cpu_attention_kvcache_fwd(*args)


APPEND_LAYOUTS = ["contiguous", "batch_idx", "paged"]


def _append_case(layout: str, dtype: torch.dtype):
    """Caches and a 3-token step for 3 sequences: contiguous (5 rows, sequence b in row b),
    through cache_batch_idx (rows 4, 0, 2), or paged (12 blocks of 4, each sequence's blocks
    scattered, a step that crosses a block boundary); k / v non-contiguous views."""
    g = torch.Generator().manual_seed(7)
    seqlens = torch.tensor([0, 5, 9], dtype=torch.int32)
    block_table = batch_idx = None
    if layout == "paged":
        cache_shape = (12, 4, 2, 8)
        block_table = torch.tensor([[11, 3, 7, 0], [2, 9, 5, 1], [4, 10, 6, 8]], dtype=torch.int32)
    else:
        cache_shape = (5, 16, 2, 8)
        if layout == "batch_idx":
            batch_idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    k_cache, v_cache = (torch.randn(cache_shape, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(3, 2, 3, 8, generator=g).to(dtype).transpose(1, 2) for _ in range(2))  # (B, 3, Hkv, D)
    return KVCacheInputs(q=torch.randn(3, 3, 4, 8).to(dtype), k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens,
                         block_table=block_table, cache_batch_idx=batch_idx), k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", APPEND_LAYOUTS)
def test_kvcache_append_writes_what_index_put_writes(layout, dtype):
    """The cpu backend's one-call append against the shared index_put_ append: the same cache,
    bit for bit, every other slot untouched."""
    from fastattn.ops.kvcache import _append

    inputs, k, v = _append_case(layout, dtype)
    expected = dataclasses.replace(inputs, k_cache=inputs.k_cache.clone(), v_cache=inputs.v_cache.clone())
    _append(expected, k, v)
    cpu_attention.kvcache_append(inputs, k, v)
    assert torch.equal(inputs.k_cache, expected.k_cache)
    assert torch.equal(inputs.v_cache, expected.v_cache)
    assert not torch.equal(inputs.k_cache, _append_case(layout, dtype)[0].k_cache), "nothing was written"


def test_kvcache_append_op_checks_every_slot():
    cpu_attention.ensure_loaded()
    inputs, k, v = _append_case("paged", torch.float32)
    args = [inputs.k_cache, inputs.v_cache, k, v, torch.tensor([0, 5, 14], dtype=torch.int32), inputs.block_table, None]
    with pytest.raises(RuntimeError, match="position 16 of sequence 2 is past its block table"):
        torch.ops.fastattn.cpu_attention_kvcache_append(*args)
    args[4], args[5] = inputs.cache_seqlens, torch.tensor([[11, 3, 7, 0], [2, 12, 5, 1], [4, 10, 6, 8]],
                                                          dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"slot \(12, 1\) of sequence 1 is outside the cache"):
        torch.ops.fastattn.cpu_attention_kvcache_append(*args)


# --------------------------------------------------------------------------------------------
# opcheck (schemas, fake kernels, dispatch) of the new ops
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", APPEND_LAYOUTS)
def test_opcheck_kvcache_append(layout):
    inputs, k, v = _append_case(layout, torch.float32)
    cpu_attention.ensure_loaded()
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_kvcache_append.default,
                          (inputs.k_cache, inputs.v_cache, k, v, inputs.cache_seqlens, inputs.block_table,
                           inputs.cache_batch_idx))


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_opcheck_kvcache(paged):
    cpu_attention.ensure_loaded()
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_kvcache_fwd.default, _op_args(paged))


def test_opcheck_varlen():
    cpu_attention.ensure_loaded()
    args = make_varlen(_cpu_dtype(VARLEN_CASES[1]), "cpu")
    q, k, v = (args[n].detach() for n in ("q", "k", "v"))
    tail = [None, q.shape[-1] ** -0.5, 0.0, True, -1, 0, 0.0, 0, 0]
    cu = [args["cu_seqlens_q"], args["cu_seqlens_k"]]
    out, lse = torch.ops.fastattn.cpu_attention_varlen_fwd(q, k, v, *cu, *tail)
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_varlen_fwd.default, [q, k, v, *cu, *tail])
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_varlen_bwd.default,
                          [torch.randn_like(out), q, k, v, out, lse, *cu, *tail])
