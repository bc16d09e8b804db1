"""fastattn.replace_modules: swaps torch.nn modules for fastattn's in place, keeps the very
same Parameter objects, and leaves the model's outputs and gradients unchanged."""

import copy

import pytest
import torch
from torch import nn

import fastattn
import fastattn.nn as fnn

# nn.Transformer warns that its nested-tensor inference path is off for some configurations.
pytestmark = [
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage"),
]

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


def _transformer(norm_first, batch_first):
    return nn.Transformer(
        d_model=16, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=24,
        dropout=0.0, batch_first=batch_first, norm_first=norm_first, dtype=F64,
    )


def _transformer_inputs(batch_first, b=3, s=7, t=5):
    shape = lambda L: (b, L, 16) if batch_first else (L, b, 16)  # noqa: E731
    src_kpm = torch.rand(b, s) < 0.3
    src_kpm[:, 0] = False
    return (torch.randn(shape(s), dtype=F64), torch.randn(shape(t), dtype=F64)), {
        "tgt_mask": nn.Transformer.generate_square_subsequent_mask(t, dtype=F64),
        "src_key_padding_mask": src_kpm,
        "memory_key_padding_mask": src_kpm,
        "tgt_is_causal": True,
    }


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_replace_transformer_same_outputs_and_parameters(norm_first, batch_first):
    original = _transformer(norm_first, batch_first)
    model = copy.deepcopy(original)
    params = list(model.parameters())
    keys = list(model.state_dict())
    args, kwargs = _transformer_inputs(batch_first)

    assert fastattn.replace_modules(model) is model
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert list(model.state_dict()) == keys
    for layer in (*model.encoder.layers, *model.decoder.layers):
        assert type(layer) in (fnn.TransformerEncoderLayer, fnn.TransformerDecoderLayer)
        assert type(layer.self_attn) is fnn.MultiheadAttention
        assert type(layer.norm1) is fnn.LayerNorm
    assert type(model.encoder.norm) is fnn.LayerNorm and type(model.decoder.norm) is fnn.LayerNorm

    expected = original(*args, **kwargs)
    out = model(*args, **kwargs)
    torch.testing.assert_close(out, expected, **TIGHT)
    dy = torch.randn_like(out)
    expected.backward(dy)
    out.backward(dy)
    for g, g_ref in zip(_grads(model), _grads(original)):
        torch.testing.assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize("batch_first", [False, True])
def test_replace_transformer_inference(batch_first):
    """eval + no_grad: torch's encoder packs padded batches into nested tensors; the replaced
    model still gives the same outputs (zeros at padded positions included)."""
    original = _transformer(False, batch_first).eval()
    model = fastattn.replace_modules(copy.deepcopy(original))
    args, kwargs = _transformer_inputs(batch_first)
    # right padding (what torch's nested path needs): sentences of 7, 4 and 2 tokens
    kwargs["src_key_padding_mask"] = kwargs["memory_key_padding_mask"] = torch.arange(7) >= torch.tensor([[7], [4], [2]])
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kwargs), original(*args, **kwargs), **TIGHT)
        memory = model.encoder(args[0], src_key_padding_mask=kwargs["src_key_padding_mask"])
        expected = original.encoder(args[0], src_key_padding_mask=kwargs["src_key_padding_mask"])
    torch.testing.assert_close(memory, expected, **TIGHT)


def test_existing_optimizer_keeps_training_the_model():
    model = _transformer(True, True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fastattn.replace_modules(model)
    args, kwargs = _transformer_inputs(True)
    before = [p.detach().clone() for p in model.parameters()]
    model(*args, **kwargs).pow(2).mean().backward()
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed)


class _CustomAttention(nn.MultiheadAttention):
    """A user subclass may override forward: replace_modules must leave it alone."""

    def forward(self, query, key, value, **kwargs):
        out, weights = super().forward(query, key, value, **kwargs)
        return 2 * out, weights


class _UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 16, dtype=F64)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, dtype=F64)
        self.custom = _CustomAttention(16, 4, dtype=F64)
        self.blocks = nn.Sequential(
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, activation="gelu", dtype=F64),
            nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True, dtype=F64),
        )
        self.norm = nn.LayerNorm(16, dtype=F64)
        self.rms = nn.RMSNorm(16, dtype=F64)
        self.head = nn.Linear(16, 3, dtype=F64)

    def forward(self, x, kpm):
        x = self.embed(x)
        x = x + self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        x = x + self.attn(x, x, x, key_padding_mask=kpm)[0]  # need_weights=True: torch's path
        y = x.transpose(0, 1)
        x = x + self.custom(y, y, y, need_weights=False)[0].transpose(0, 1)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=kpm)
        return self.head(self.rms(self.norm(x)))


def test_replace_user_model():
    original = _UserModel()
    model = copy.deepcopy(original)
    params = list(model.parameters())
    fastattn.replace_modules(model, backend="reference")
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert type(model.attn) is fnn.MultiheadAttention and model.attn.backend == "reference"
    assert type(model.custom) is _CustomAttention
    assert type(model.norm) is fnn.LayerNorm and type(model.rms) is fnn.RMSNorm
    assert all(type(b) is fnn.TransformerEncoderLayer and b.backend == "reference" for b in model.blocks)
    assert type(model.embed) is nn.Linear

    x = torch.randn(2, 9, 6, dtype=F64)
    kpm = torch.rand(2, 9) < 0.3
    kpm[:, 0] = False
    expected, out = original(x, kpm), model(x, kpm)
    torch.testing.assert_close(out, expected, **TIGHT)
    out.sum().backward()
    expected.sum().backward()
    for g, g_ref in zip(_grads(model), _grads(original)):
        torch.testing.assert_close(g, g_ref, **TIGHT)


def test_replace_root_module_and_idempotence():
    mha = nn.MultiheadAttention(8, 2, dtype=F64)
    weight = mha.in_proj_weight
    assert fastattn.replace_modules(mha) is mha
    assert type(mha) is fnn.MultiheadAttention and mha.in_proj_weight is weight and mha.backend is None
    fastattn.replace_modules(mha)  # already converted: unchanged
    assert type(mha) is fnn.MultiheadAttention and mha.backend is None
    fastattn.replace_modules(mha, backend="reference")  # an explicit backend is applied to it
    assert mha.backend == "reference"


def test_replace_forward_hooks_survive():
    model = nn.Sequential(nn.LayerNorm(8, dtype=F64))
    calls = []
    model[0].register_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    fastattn.replace_modules(model)
    model(torch.randn(2, 8, dtype=F64))
    assert calls == [fnn.LayerNorm]


def test_replace_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastattn.replace_modules(torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.replace_modules(nn.LayerNorm(4), backend="no-such-backend")
