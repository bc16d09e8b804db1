"""flash_attention_with_kvcache on the reference backend: the shared cases of
tests/attention_extras_cases.py against the explicit float64 formula (with the in-place append
checked entry by entry and paged vs contiguous layouts compared), equality with
flash_attention on each valid prefix, a token-by-token decoding loop, and the validation of
cache_seqlens / block_table / cache_batch_idx before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastattn
from fastattn.reference import attention as ref_attention
from attention_extras_cases import (
    KVCACHE_CASES,
    check_kvcache,
    check_kvcache_matches_flash_attention,
)
from helpers import max_error


@pytest.mark.parametrize("case", KVCACHE_CASES, ids=str)
def test_kvcache_matches_explicit_formula(case):
    check_kvcache(case, "reference", "cpu")


@pytest.mark.parametrize("case", [KVCACHE_CASES[i] for i in (1, 3, 4, 8)], ids=str)
def test_kvcache_equals_flash_attention_on_the_valid_prefix(case):
    check_kvcache_matches_flash_attention(case, "reference", "cpu")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_decoding_loop_equals_causal_attention(paged):
    """Prefill 5 tokens, then decode 1 token at a time (advancing cache_seqlens ourselves):
    every step equals causal flash_attention over the sequence so far."""
    b, h, hkv, d, steps, prefill = 2, 4, 2, 24, 6, 5
    q = torch.randn(b, prefill + steps, h, d, dtype=torch.float64)
    k = torch.randn(b, prefill + steps, hkv, d, dtype=torch.float64)
    v = torch.randn_like(k)
    if paged:
        k_cache = torch.zeros(8, 4, hkv, d, dtype=torch.float64)
        block_table = torch.tensor([[7, 2, 5, 0], [1, 6, 3, 4]], dtype=torch.int32)
    else:
        k_cache, block_table = torch.zeros(b, 16, hkv, d, dtype=torch.float64), None
    v_cache = torch.zeros_like(k_cache)
    expected = fastattn.flash_attention(q, k, v, causal=True, backend="reference")
    seqlens, start = torch.zeros(b, dtype=torch.int32), 0
    for length in (prefill, *[1] * steps):
        end = start + length
        out = fastattn.flash_attention_with_kvcache(
            q[:, start:end], k_cache, v_cache, k[:, start:end], v[:, start:end], cache_seqlens=seqlens,
            block_table=block_table, causal=True, backend="reference",
        )
        assert max_error(out, expected[:, start:end]) < 1e-12, f"tokens {start}:{end}"
        seqlens, start = seqlens + length, end


def test_kvcache_int_cache_seqlens_equals_the_tensor():
    q, k_cache, v_cache = torch.randn(2, 1, 4, 16), torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    k, v = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    caches = [(k_cache.clone(), v_cache.clone()) for _ in range(2)]
    outs = [fastattn.flash_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, causal=True)
            for (kc, vc), seqlens in zip(caches, (9, torch.tensor([9, 9], dtype=torch.int32)))]
    assert torch.equal(outs[0], outs[1]) and torch.equal(caches[0][0], caches[1][0])


def test_kvcache_is_inference_only():
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    k_cache, v_cache = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="inference-only .* q require grad"):
        fastattn.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)
    with torch.no_grad():
        out = fastattn.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)
    assert not out.requires_grad
    with torch.inference_mode():
        fastattn.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=3)


def test_kvcache_backend_without_the_capability_leaves_the_cache_untouched(monkeypatch):
    monkeypatch.setattr(ref_attention, "CAPABILITIES",
                        dataclasses.replace(ref_attention.CAPABILITIES, paged_kvcache=False))
    args = _base_args(paged=True)
    before = args["k_cache"].clone()
    with pytest.raises(fastattn.BackendNotSupportedError, match="paged KV cache"):
        fastattn.flash_attention_with_kvcache(**args, backend="reference")
    assert torch.equal(args["k_cache"], before)


def _base_args(paged: bool) -> dict:
    """batch 2, 4 heads over 2 kv heads, headdim 8, one new token. Contiguous: capacity 16,
    cached (3, 14). Paged: 6 blocks of 4, cached (3, 5), 4 table columns (-1 = not used)."""
    if paged:
        cache_shape, seqlens = (6, 4, 2, 8), [3, 5]
        table = torch.tensor([[0, 1, 2, 3], [4, 5, -1, -1]], dtype=torch.int32)
    else:
        cache_shape, seqlens, table = (2, 16, 2, 8), [3, 14], None
    return dict(q=torch.randn(2, 1, 4, 8), k_cache=torch.randn(cache_shape), v_cache=torch.randn(cache_shape),
                k=torch.randn(2, 1, 2, 8), v=torch.randn(2, 1, 2, 8),
                cache_seqlens=torch.tensor(seqlens, dtype=torch.int32), block_table=table)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_CONTIGUOUS = [
    ({"cache_seqlens": torch.tensor([3, 14])}, TypeError, "cache_seqlens must have dtype torch.int32"),
    ({"cache_seqlens": 3.0}, TypeError, "cache_seqlens must be an int or an int32 tensor"),
    ({"cache_seqlens": _i32(3, 14, 1)}, ValueError, r"cache_seqlens must have q's batch \(2\) rows"),
    ({"cache_seqlens": _i32(3, 14)[None]}, ValueError, "cache_seqlens must be 1-D"),
    ({"cache_seqlens": _i32(-1, 3)}, ValueError, r"cache_seqlens must be in \[0, capacity - seqlen_new\] = \[0, 15\].*\[-1, 3\]"),
    ({"cache_seqlens": _i32(3, 16)}, ValueError, r"cache_seqlens must be in \[0, capacity - seqlen_new\] = \[0, 15\]"),
    ({"cache_seqlens": 16}, ValueError, r"cache_seqlens must be in \[0, capacity - seqlen_new\] = \[0, 15\]"),
    ({"cache_batch_idx": _i32(0, 2)}, ValueError, r"cache_batch_idx must be in \[0, batch_cache\) = \[0, 2\)"),
    ({"cache_batch_idx": _i32(1, 1)}, ValueError, "cache_batch_idx must not repeat a row"),
    ({"cache_batch_idx": torch.tensor([0, 1])}, TypeError, "cache_batch_idx must have dtype torch.int32"),
    ({"v": None}, ValueError, "pass both k and v"),
    ({"k": torch.randn(2, 1, 4, 8)}, ValueError, r"k must have shape \(batch, seqlen_new, nheads_kv, headdim\)"),
    ({"k": torch.randn(2, 1, 2, 8, dtype=torch.float64)}, TypeError, "k must have the same dtype as q"),
    ({"k_cache": torch.randn(2, 16, 2, 8).half()}, TypeError, "k_cache must have the same dtype as q"),
    ({"v_cache": torch.randn(2, 8, 16, 2).transpose(1, 3)}, ValueError, "v_cache must have a contiguous last dim"),
    ({"v_cache": torch.randn(2, 15, 2, 8)}, ValueError, "v_cache must have shape"),
    ({"k_cache": torch.randn(1, 16, 2, 8), "v_cache": torch.randn(1, 16, 2, 8)}, ValueError, "pass cache_batch_idx"),
    ({"q": torch.randn(2, 1, 3, 8)}, ValueError, "must be a multiple of the cache's nheads_kv"),
    ({"q": torch.randn(2, 4, 8)}, ValueError, "q must be 4-D"),
    ({"alibi_slopes": torch.rand(2, 3)}, ValueError, "alibi_slopes must have shape"),
    ({"softcap": -2.0}, ValueError, "softcap must be a finite float >= 0"),
]

BAD_PAGED = [
    ({"block_table": torch.tensor([[0, 1, 2, 3], [4, 5, 0, 0]])}, TypeError, "block_table must have dtype torch.int32"),
    ({"block_table": _i32(0, 1, 2, 3)}, ValueError, "block_table must be 2-D"),
    ({"block_table": _i32(0, 1, 2, 3)[None]}, ValueError, r"block_table must have q's batch \(2\) rows"),
    ({"block_table": torch.tensor([[0, 1, 2, 3], [4, 6, -1, -1]], dtype=torch.int32)}, ValueError,
     r"block_table entries a sequence uses .* \[0, 6\); 1 are not"),
    ({"block_table": torch.tensor([[-1, 1, 2, 3], [4, 5, -1, -1]], dtype=torch.int32)}, ValueError,
     r"block_table entries a sequence uses"),
    ({"block_table": torch.tensor([[0], [4]], dtype=torch.int32)}, ValueError,  # 1 block of 4 < 5 + 1
     r"cache_seqlens must be in \[0, capacity - seqlen_new\] = \[0, 3\]"),
    ({"cache_seqlens": _i32(3, 16)}, ValueError, r"= \[0, 15\]"),
    ({"cache_batch_idx": _i32(0, 1)}, ValueError, "cache_batch_idx .* cannot be combined with block_table"),
    ({"k_cache": torch.randn(6, 4, 2, 4), "v_cache": torch.randn(6, 4, 2, 4)}, ValueError, "k_cache must have shape"),
]


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kvcache_rejects_bad_arguments_before_writing(monkeypatch, paged):
    check_rejected_before_the_kernel(monkeypatch, ref_attention, "reference", paged)


def check_rejected_before_the_kernel(monkeypatch, attention_module, backend: str, paged: bool) -> None:
    """Every BAD_* call raises its error before ``attention_module.kvcache_forward`` runs and
    leaves the cache untouched."""

    def kernel_ran(*args, **kwargs):
        raise AssertionError("validation must reject the call before any kernel runs")

    monkeypatch.setattr(attention_module, "kvcache_forward", kernel_ran)
    for overrides, error, match in BAD_PAGED if paged else BAD_CONTIGUOUS:
        args = {**_base_args(paged), **overrides}
        caches = [t.clone() for t in (args["k_cache"], args["v_cache"])]
        with pytest.raises(error, match=match):
            fastattn.flash_attention_with_kvcache(**args, backend=backend)
        assert torch.equal(args["k_cache"], caches[0]) and torch.equal(args["v_cache"], caches[1]), overrides


def test_kvcache_unused_block_table_entries_are_not_read():
    args = _base_args(paged=True)
    out = fastattn.flash_attention_with_kvcache(**args, backend="reference")
    assert out.shape == (2, 1, 4, 8) and torch.isfinite(out).all()
