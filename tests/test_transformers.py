"""Hugging Face transformers integration: attn_implementation="fastattn" and
fuse_norms_and_mlps give the outputs, gradients and generated tokens of transformers' own
"sdpa" path on tiny models built from configs (no downloads, no weights).

Oracle: the same weights with attn_implementation="eager" in float64; baseline: "sdpa" in the
tested dtype (tests/helpers.py rule)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastattn
import fastattn.nn as fnn
from fastattn.backends import triton_interpret_enabled
from tests.helpers import assert_close_to_reference

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (optional: pip install 'fastattn[hf]')"
)
from fastattn.integrations import transformers as fa_hf  # noqa: E402

VOCAB = 61


@pytest.fixture(scope="module", autouse=True)
def _registered():
    fa_hf.register()


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel, cfg


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel, cfg


def _llama(attention_dropout=0.0):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=attention_dropout, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM, cfg


def _bart():
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=None,
    )
    return transformers.BartForConditionalGeneration, cfg


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "bart": _bart}


class _Float64RMSNorm(nn.Module):
    """LlamaRMSNorm's formula in the input's own precision: transformers' rounds through
    float32 even for float64 inputs, which would make a float64 oracle only float32-exact."""

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _build(name, attn_implementation, dtype, state=None):
    cls, cfg = MODELS[name]()
    model = cls._from_config(cfg, attn_implementation=attn_implementation).to(dtype)
    if dtype == torch.float64:
        for module in model.modules():
            if type(module) is transformers.models.llama.modeling_llama.LlamaRMSNorm:
                module.__class__ = _Float64RMSNorm
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def _padding_mask(batch, length, padded, left):
    """(batch, length) long, 1 = real token; row 0 keeps every token, the others lose some."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for row in range(1, batch):
            n_pad = row * 2
            if left:
                mask[row, :n_pad] = 0
            else:
                mask[row, length - n_pad:] = 0
    return mask


def _inputs(name, padded, batch=3, length=9):
    ids = torch.randint(3, VOCAB, (batch, length))
    mask = _padding_mask(batch, length, padded, left=False)
    if name == "bart":
        dec = torch.randint(3, VOCAB, (batch, length - 2))
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
    return {"input_ids": ids, "attention_mask": mask}


def _output(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _forward_backward(model, inputs, weights):
    model.zero_grad(set_to_none=True)
    out = _output(model, inputs)
    (out * weights.to(out.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_model_matches(name, dtype, padded, convert=None):
    oracle = _build(name, "eager", torch.float64)
    state = oracle.state_dict()
    baseline = _build(name, "sdpa", dtype, state)
    fused = _build(name, "fastattn", dtype, state)
    assert fused.config._attn_implementation == "fastattn"
    if convert is not None:
        convert(fused)
    inputs = _inputs(name, padded)
    weights = torch.randn(_output(oracle, inputs).shape, dtype=torch.float64)

    out64, grads64 = _forward_backward(oracle, inputs, weights)
    out_base, grads_base = _forward_backward(baseline, inputs, weights)
    out, grads = _forward_backward(fused, inputs, weights)
    assert_close_to_reference(out, out64, out_base, f"{name} output")
    assert grads.keys() == grads64.keys()
    for param_name, g in grads.items():
        assert_close_to_reference(g, grads64[param_name], grads_base[param_name], f"{name} grad {param_name}")


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_outputs_and_grads_match_sdpa(name, dtype, padded):
    _assert_model_matches(name, dtype, padded)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bart"])
def test_generate_with_kv_cache_matches_sdpa(name):
    reference = _build(name, "sdpa", torch.float32)
    fused = _build(name, "fastattn", torch.float32, reference.state_dict())
    batch, length = 3, 6
    ids = torch.randint(3, VOCAB, (batch, length))
    # Decoder-only models generate from left-padded prompts; BART pads its source on the right.
    mask = _padding_mask(batch, length, padded=True, left=name != "bart")
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    expected = reference.generate(ids, **kwargs)
    assert torch.equal(fused.generate(ids, **kwargs), expected)


def test_calls_reach_fastattn_with_gqa_masks_and_cache(monkeypatch):
    """The model's attention really runs through fastattn: kv heads as they are (no repeat_kv
    copy), a 4-D bool mask when padded, is_causal alone when not, one query row per decode step."""
    calls = []
    original = fastattn.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        mask = kwargs["attn_mask"]
        calls.append((query.shape[1:3], key.shape[1], None if mask is None else mask.dtype, kwargs["is_causal"]))
        return original(query, key, value, **kwargs)

    monkeypatch.setattr(fastattn, "scaled_dot_product_attention", spy)
    model = _build("llama", "fastattn", torch.float32)
    ids = torch.randint(3, VOCAB, (2, 5))
    model(ids)
    assert calls == [((4, 5), 2, None, True)] * 2
    calls.clear()
    model.generate(ids, attention_mask=_padding_mask(2, 5, True, left=True), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert calls == [((4, 5), 2, torch.bool, False)] * 2 + [((4, 1), 2, torch.bool, False)] * 2


def test_attention_forward_returns_the_flash_layout():
    q = torch.randn(2, 4, 7, 8)
    k, v = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    module = nn.Module()
    out, weights = fa_hf.attention_forward(module, q, k, v, None, scaling=0.3, is_causal=True)
    assert weights is None and out.shape == (2, 7, 4, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_static_cache_tail_is_cut_as_sdpa():
    q = torch.randn(1, 2, 5, 8)
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    out, _ = fa_hf.attention_forward(nn.Module(), q, k, v, None, is_causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :5], v[:, :, :5], is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_dropout_in_training_uses_the_configured_probability(monkeypatch):
    seen = []
    original = fastattn.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["dropout_p"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fastattn, "scaled_dot_product_attention", spy)
    cls, cfg = _llama(attention_dropout=0.25)
    model = cls._from_config(cfg, attn_implementation="fastattn")
    ids = torch.randint(3, VOCAB, (2, 8))

    model.eval()
    eval_logits = model(ids).logits
    assert seen == [0.0, 0.0]
    seen.clear()
    model.train()
    torch.manual_seed(1)
    first = model(ids).logits
    assert seen == [0.25, 0.25]
    torch.manual_seed(1)
    again = model(ids).logits
    torch.manual_seed(2)
    other = model(ids).logits
    assert torch.equal(first, again)  # the mask follows torch's generator
    assert not torch.allclose(first, eval_logits) and not torch.allclose(first, other)
    first.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize(
    "kwargs, what", [({"softcap": 30.0}, "softcap"), ({"s_aux": torch.zeros(4)}, "s_aux"), ({"position_bias": torch.zeros(1)}, "position_bias")]
)
def test_unsupported_arguments_raise(kwargs, what):
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match=what):
        fa_hf.attention_forward(nn.Module(), q, q, q, None, **kwargs)


def test_register_checks_its_arguments():
    with pytest.raises(ValueError, match="backend must be one of"):
        fa_hf.register(backend="nope")
    with pytest.raises(TypeError, match="name"):
        fa_hf.register(name="")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fa_hf.fuse_norms_and_mlps("llama")


# --------------------------------------------------------------------------------------------
# fuse_norms_and_mlps
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_fuse_keeps_parameters_and_state_dict(name):
    model = _build(name, "fastattn", torch.float32)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    assert fa_hf.fuse_norms_and_mlps(model) is model
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    kinds = {type(m) for m in model.modules()}
    assert nn.LayerNorm not in kinds or fnn.LayerNorm in kinds
    expected = {
        "bert": {fnn.LayerNorm, fa_hf.FusedDenseAddLayerNorm},
        "gpt2": {fnn.LayerNorm},
        "llama": {fnn.RMSNorm, fa_hf.FusedSwiGLUMLP},
        "bart": {fnn.LayerNorm},
    }[name]
    assert expected <= kinds
    assert not any(type(m).__name__ in ("LlamaRMSNorm", "LlamaMLP", "BertSelfOutput", "BertOutput") for m in model.modules())


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fused_model_outputs_and_grads_match_sdpa(name, dtype, padded):
    _assert_model_matches(name, dtype, padded, convert=fa_hf.fuse_norms_and_mlps)


def test_fuse_converts_only_the_llama_formula():
    """Mistral copies Llama's RMSNorm and MLP (converted); Gemma's RMSNorm scales by
    1 + weight (left alone) while its MLP is Llama's but with tanh-GELU (left alone)."""
    mistral = transformers.MistralModel(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    ))
    gemma = transformers.GemmaModel(transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    ))
    fa_hf.fuse_norms_and_mlps(mistral)
    fa_hf.fuse_norms_and_mlps(gemma)
    assert type(mistral.norm) is fnn.RMSNorm and type(mistral.layers[0].mlp) is fa_hf.FusedSwiGLUMLP
    assert type(gemma.norm).__name__ == "GemmaRMSNorm" and type(gemma.layers[0].mlp).__name__ == "GemmaMLP"


def test_fused_swiglu_mlp_with_bias_matches():
    cls, cfg = _llama()
    cfg.mlp_bias = True
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg).double()
    fused = fa_hf.fuse_norms_and_mlps(copy.deepcopy(mlp))
    assert type(fused) is fa_hf.FusedSwiGLUMLP
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    expected = mlp(x)
    got = fused(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    dy = torch.randn_like(got)
    fused_grads = torch.autograd.grad(got, [x, *fused.parameters()], dy)
    reference_grads = torch.autograd.grad(expected, [x, *mlp.parameters()], dy)
    names = ["x", *(n for n, _ in fused.named_parameters())]
    for name, g, g_ref in zip(names, fused_grads, reference_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=name)


# --------------------------------------------------------------------------------------------
# Triton kernels (interpreted on CPU): transformers' strides and broadcast masks
# --------------------------------------------------------------------------------------------
def test_llama_on_triton_backend_matches_sdpa():
    if not (torch.cuda.is_available() or triton_interpret_enabled()):
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 for the triton backend")
    name = fa_hf.register("fastattn_triton", backend="triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cls, cfg = _llama()
    cfg.num_hidden_layers = 1
    reference = cls._from_config(cfg, attn_implementation="sdpa").to(device).eval()
    fused = cls._from_config(cfg, attn_implementation=name).to(device).eval()
    fused.load_state_dict(reference.state_dict())
    fa_hf.fuse_norms_and_mlps(fused, backend="triton")
    ids = torch.randint(3, VOCAB, (2, 7), device=device)
    mask = _padding_mask(2, 7, True, left=True).to(device)
    for model in (reference, fused):
        model(ids, attention_mask=mask).logits.square().sum().backward()
    torch.testing.assert_close(fused(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
    for (n, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)
