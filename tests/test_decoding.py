"""Incremental decoding over a KV cache: ``fastattn.nn.KVCache``, the incremental path of
``fastattn.nn.MultiheadAttention`` (equal to torch's own module run on the whole sequence) and
the reference Transformer's cached greedy decoding (equal to re-running the decoder)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastattn.models import BOS, EOS, PAD, SyntheticTranslation, Transformer, TransformerConfig
from fastattn.nn import KVCache, MultiheadAttention

F64 = torch.float64
LAYOUTS = [None, 3]  # contiguous, paged with blocks of 3 positions (sequences span several blocks)


def _layout_id(block_size):
    return "contiguous" if block_size is None else f"paged{block_size}"


def _module(embed_dim=40, num_heads=4, batch_first=False, **kw):
    return MultiheadAttention(embed_dim, num_heads, batch_first=batch_first, dtype=F64, **kw).eval()


@pytest.fixture(autouse=True)
def _inference():
    """Decoding over a cache is inference-only (flash_attention_with_kvcache has no backward)."""
    with torch.no_grad():
        yield


def _torch_forward(module, query, key, value, **kw):
    """torch's own MultiheadAttention on the same Parameters (the oracle)."""
    return nn.MultiheadAttention.forward(module, query, key, value, need_weights=False, **kw)[0]


def _step(x, t, batch_first, length=1):
    """Tokens t..t+length of a (L, N, E) or (N, L, E) sequence."""
    return x[:, t:t + length] if batch_first else x[t:t + length]


def _cat(parts, batch_first):
    return torch.cat(parts, dim=1 if batch_first else 0)


def _seq(n, length, embed_dim, batch_first):
    shape = (n, length, embed_dim) if batch_first else (length, n, embed_dim)
    return torch.randn(shape, dtype=F64)


# --------------------------------------------------------------------------------------------
# KVCache
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", LAYOUTS, ids=_layout_id)
def test_kv_cache_write_packs_kept_tokens_after_each_length(block_size):
    cache = KVCache(3, 7, 2, 5, dtype=F64, block_size=block_size)
    k1, v1 = torch.randn(3, 2, 2, 5, dtype=F64), torch.randn(3, 2, 2, 5, dtype=F64)
    cache.write(k1, v1)
    k2, v2 = torch.randn(3, 3, 2, 5, dtype=F64), torch.randn(3, 3, 2, 5, dtype=F64)
    keep = torch.tensor([[True, True, True], [False, True, False], [False, False, False]])
    cache.write(k2, v2, keep)
    assert cache.lengths.tolist() == [5, 3, 2] and cache.lengths.dtype == torch.int32
    keys, values = cache.keys_values()  # (B, max_len, Hkv, D)
    assert keys.shape == (3, 7, 2, 5)
    for b in range(3):
        expected_k = torch.cat([k1[b], k2[b][keep[b]]])
        expected_v = torch.cat([v1[b], v2[b][keep[b]]])
        n = int(cache.lengths[b])
        assert torch.equal(keys[b, :n], expected_k) and torch.equal(values[b, :n], expected_v)
    assert cache.valid_mask().sum(1).tolist() == [5, 3, 2]
    if block_size is not None:
        assert cache.k.shape == (3 * 3, 3, 2, 5) and cache.block_table.shape == (3, 3)
        assert sorted(cache.block_table.flatten().tolist()) == list(range(9))  # each block owned once


def test_kv_cache_rejects_bad_arguments_and_overflow():
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KVCache(2, 0, 1, 4)
    with pytest.raises(ValueError, match="block_size must be None"):
        KVCache(2, 4, 1, 4, block_size=0)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        KVCache(2, 4, 1, 4, dtype=torch.int32)
    cache = KVCache(2, 4, 1, 4, dtype=F64)
    cache.write(torch.randn(2, 3, 1, 4, dtype=F64), torch.randn(2, 3, 1, 4, dtype=F64))
    with pytest.raises(ValueError, match="max_len=4 positions per sequence"):
        cache.write(torch.randn(2, 2, 1, 4, dtype=F64), torch.randn(2, 2, 1, 4, dtype=F64))


@pytest.mark.parametrize("block_size", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("heads,heads_kv", [(4, 4), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
def test_kv_cache_attend_matches_float64_formula(block_size, heads, heads_kv):
    """Prefill 5 tokens (causal), then 2 single steps, one with a padded token: each step's
    output equals softmax(q k^T / sqrt(D)) v over the real keys so far (bottom-right causal)."""
    b, d, steps = 2, 8, [5, 1, 1]
    cache = KVCache(b, 9, heads_kv, d, dtype=F64, block_size=block_size)
    seen_k, seen_v = [[] for _ in range(b)], [[] for _ in range(b)]
    for n, step in enumerate(steps):
        q = torch.randn(b, step, heads, d, dtype=F64)
        k, v = torch.randn(b, step, heads_kv, d, dtype=F64), torch.randn(b, step, heads_kv, d, dtype=F64)
        keep = torch.tensor([[True], [False]]) if n == 2 else None  # sequence 1's last token is padding
        out = cache.attend(q, k, v, keep=keep, causal=True)
        for i in range(b):
            for j in range(step):
                if keep is None or keep[i, j]:
                    seen_k[i].append(k[i, j])
                    seen_v[i].append(v[i, j])
            keys, values = torch.stack(seen_k[i]), torch.stack(seen_v[i])  # (n, Hkv, D)
            group = heads // heads_kv
            keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
            scores = torch.einsum("qhd,khd->hqk", q[i], keys) / math.sqrt(d)
            if keep is None:  # the new tokens are the last `step` keys
                pos = torch.arange(step)[:, None] + len(keys) - step
                scores = scores.masked_fill(torch.arange(len(keys))[None] > pos, float("-inf"))
            expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
            torch.testing.assert_close(out[i], expected, rtol=1e-6, atol=1e-6)
    assert cache.lengths.tolist() == [7, 6]


# --------------------------------------------------------------------------------------------
# MultiheadAttention: incremental == torch's module on the whole sequence
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "key-padding"])
def test_mha_self_attention_incremental_equals_full(block_size, batch_first, padded):
    """A 3-token causal prefill, then one token per step, equals the full causal forward; with
    key padding (tokens of some sequences are padding mid-sequence) at every real query."""
    m = _module(batch_first=batch_first)
    n, length = 3, 7
    x = _seq(n, length, 40, batch_first)
    kpm = torch.zeros(n, length, dtype=torch.bool)
    if padded:
        kpm[1, 4] = kpm[2, 5:] = True  # True = padding (torch's convention)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    full = _torch_forward(m, x, x, x, attn_mask=causal, key_padding_mask=kpm if padded else None)

    cache = m.new_kv_cache(n, length, block_size=block_size)
    prefill = _step(x, 0, batch_first, 3)
    outs = [m(prefill, prefill, prefill, need_weights=False, is_causal=True, kv_cache=cache)[0]]
    for t in range(3, length):
        xt = _step(x, t, batch_first)
        mask = kpm[:, t:t + 1] if padded else None
        out, weights = m(xt, xt, xt, key_padding_mask=mask, need_weights=False, is_causal=True, kv_cache=cache)
        assert weights is None
        outs.append(out)
    inc = _cat(outs, batch_first)
    real = ~kpm if batch_first else ~kpm.t()  # the caller's (N, L) or (L, N) layout
    torch.testing.assert_close(inc[real], full[real], rtol=1e-10, atol=1e-10)
    # a padded query attends over the real keys before it, as in the full forward
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-10)
    assert cache.lengths.tolist() == (~kpm).sum(1).tolist()


@pytest.mark.parametrize("block_size", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "key-padding"])
def test_mha_cross_attention_incremental_equals_full(block_size, batch_first, padded):
    """The memory is projected into the cache on the first step only (later steps pass None);
    kdim/vdim differ from embed_dim; padding anywhere in the memory."""
    m = _module(batch_first=batch_first, kdim=24, vdim=16)
    n, length, src_len = 3, 5, 6
    x = _seq(n, length, 40, batch_first)
    shape = (n, src_len) if batch_first else (src_len, n)
    memory_k, memory_v = torch.randn(*shape, 24, dtype=F64), torch.randn(*shape, 16, dtype=F64)
    kpm = torch.zeros(n, src_len, dtype=torch.bool)
    if padded:
        kpm[0, 4:] = kpm[1, 0] = kpm[1, 3] = True
    full = _torch_forward(m, x, memory_k, memory_v, key_padding_mask=kpm if padded else None)

    cache = m.new_kv_cache(n, src_len, block_size=block_size, cross=True)
    outs = []
    for t in range(length):
        first = t == 0
        outs.append(m(
            _step(x, t, batch_first), memory_k if first else None, memory_v if first else None,
            key_padding_mask=kpm if padded and first else None, need_weights=False, kv_cache=cache,
        )[0])
    torch.testing.assert_close(_cat(outs, batch_first), full, rtol=1e-10, atol=1e-10)
    assert cache.filled and cache.lengths.tolist() == (~kpm).sum(1).tolist()


def test_mha_unbatched_and_separate_projections():
    m = _module(kdim=24, vdim=24)  # separate q/k/v projection weights
    x = torch.randn(4, 40, dtype=F64)  # (L, E)
    memory = torch.randn(6, 24, dtype=F64)
    full = _torch_forward(m, x, memory, memory)
    cache = m.new_kv_cache(1, 6, cross=True)
    inc = torch.cat([m(x[t:t + 1], memory, memory, need_weights=False, kv_cache=cache)[0] for t in range(4)])
    torch.testing.assert_close(inc, full, rtol=1e-10, atol=1e-10)


def test_mha_default_forward_is_untouched():
    m = _module()
    x = _seq(2, 5, 40, False)
    out, weights = m(x, x, x)  # need_weights=True by default: torch's contract
    ref, ref_weights = nn.MultiheadAttention.forward(m, x, x, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights, ref_weights)


@pytest.mark.parametrize(
    "call,error,fragment",
    [
        (lambda m, x, c: m(x, x, x, kv_cache=c), ValueError, "need_weights=True is not available"),
        (lambda m, x, c: m(x, x, x, need_weights=False, attn_mask=torch.zeros(1, 1), kv_cache=c), ValueError, "attn_mask is not supported"),
        (lambda m, x, c: m(x, x, x, need_weights=False, kv_cache="cache"), TypeError, "kv_cache must be a fastattn.nn.KVCache"),
        (lambda m, x, c: m(x, None, None, need_weights=False, kv_cache=c), ValueError, "key and value are required"),
        (lambda m, x, c: m(x[:, :1], x[:, :1], x[:, :1], need_weights=False, kv_cache=c), ValueError, "holds 2 sequences"),
        (lambda m, x, c: m(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool), need_weights=False,
                           kv_cache=c), ValueError, "key_padding_mask must have shape"),
        (lambda m, x, c: m(x, x, x, key_padding_mask=torch.ones(2, 2, dtype=torch.bool), need_weights=False,
                           is_causal=True, kv_cache=c), ValueError, "one query per sequence"),
        (lambda m, x, c: [m(x, x, x, need_weights=False, kv_cache=c) for _ in range(3)], ValueError, "max_len=5"),
    ],
)
def test_mha_incremental_rejects_bad_calls(call, error, fragment):
    m = _module()
    x = _seq(2, 2, 40, False)  # (L=2, N=2, E)
    with pytest.raises(error, match=fragment):
        call(m, x, m.new_kv_cache(2, 5))


def test_mha_incremental_needs_inference_mode():
    m = _module()
    x = _seq(2, 1, 40, False)
    with torch.enable_grad(), pytest.raises(ValueError, match="inference-only"):
        m(x, x, x, need_weights=False, kv_cache=m.new_kv_cache(2, 4))


def test_mha_incremental_rejects_extra_keys():
    m = _module(add_bias_kv=True)
    x = _seq(2, 1, 40, False)
    with pytest.raises(ValueError, match="add_bias_kv and add_zero_attn"):
        m(x, x, x, need_weights=False, kv_cache=m.new_kv_cache(2, 4))


# --------------------------------------------------------------------------------------------
# The reference Transformer: cached greedy decoding == re-running the decoder
# --------------------------------------------------------------------------------------------
TASK = SyntheticTranslation(n_words=11, min_len=2, max_len=9)


def _model(impl, norm_first, dtype=F64):
    config = TransformerConfig(
        src_vocab_size=TASK.vocab_size, tgt_vocab_size=TASK.vocab_size, max_len=TASK.max_target_len,
        n_layer=2, n_head=4, d_model=32, d_ff=48, dropout=0.0, impl=impl, norm_first=norm_first,
    )
    return Transformer(config).to(dtype).eval()


@pytest.mark.parametrize("block_size", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-norm", "post-norm"])
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_model_decode_step_equals_full_decoder(impl, norm_first, block_size):
    """Logits of one token per step over the caches equal the full decoder's, a padded target
    token (masked as a key) and padded sources included."""
    model = _model(impl, norm_first)
    batch = TASK.sample(4, torch.Generator().manual_seed(3))
    src, tgt = batch.src, batch.tgt_in
    assert bool((src == PAD).any()) and bool((tgt == PAD).any())
    tgt = tgt.clone()
    tgt[0, 2] = PAD  # padding inside a sequence, not only at its end
    memory = model.encode(src)
    with torch.no_grad():
        full = model.decode(tgt, memory, src)  # (B, T, V)
        caches = model.new_caches(src.shape[0], tgt.shape[1], src.shape[1], block_size)
        steps = torch.stack([model.decode_step(tgt[:, t:t + 1], t, memory, src, caches) for t in range(tgt.shape[1])], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def trained_state():
    """A briefly trained model's weights: an untrained one repeats one token, which would not
    exercise different tokens per sequence, EOS and the padding after it."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = _model("naive", True, torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(30):
            batch = TASK.sample(16, gen)
            loss = model(batch.src, batch.tgt_in, batch.tgt_out)[1]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.state_dict()


@pytest.mark.parametrize("block_size", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_model_generate_with_cache_equals_without(impl, block_size, dtype, trained_state):
    model = _model(impl, norm_first=True, dtype=dtype)
    model.load_state_dict(trained_state)
    src = TASK.sample(6, torch.Generator().manual_seed(5)).src
    without = model.generate(src, TASK.max_target_len, BOS, EOS, use_cache=False)
    with_cache = model.generate(src, TASK.max_target_len, BOS, EOS, use_cache=True, block_size=block_size)
    assert torch.equal(with_cache, without)
    assert len(set(without.flatten().tolist())) > 4, "the decoded tokens should vary"
    assert bool((without == EOS).any()) and bool((without == PAD).any())  # a finished sequence, padded


def test_model_generate_rejects_bad_arguments():
    model = _model("naive", True)
    src = TASK.sample(2, torch.Generator().manual_seed(1)).src
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(src, 0, BOS, EOS)
    with pytest.raises(TypeError, match="use_cache"):
        model.generate(src, 3, BOS, EOS, use_cache=1)
