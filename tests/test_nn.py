"""fastattn.nn modules as drop-ins: each loads the torch.nn module's state_dict and gives the
same outputs and gradients (float64 on CPU, where fastattn runs its reference backend)."""

import copy
import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastattn.nn as fnn
from tests.conftest import requires_cuda
from tests.helpers import assert_close_to_reference

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


def _pair(torch_cls, fast_cls, *args, **kwargs):
    """A torch module and the fastattn one holding the same weights (float64, CPU)."""
    ref = torch_cls(*args, **kwargs, dtype=F64)
    fast = fast_cls(*args, **kwargs, dtype=F64)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _outputs_and_grads(module, inputs, masks, forward):
    """forward(module, *inputs, *masks) on fresh leaf copies of inputs; returns the output and
    the gradients of the inputs and of the parameters (masks receive none)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = forward(module, *inputs, *masks)
    out = out[0] if isinstance(out, tuple) else out
    module.zero_grad(set_to_none=True)
    out.backward(torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).view(out.shape).sin())
    return out.detach(), [t.grad for t in inputs] + [p.grad for p in module.parameters()]


def _assert_same(ref, fast, inputs, masks, forward):
    out_ref, grads_ref = _outputs_and_grads(ref, inputs, masks, forward)
    out_fast, grads_fast = _outputs_and_grads(fast, inputs, masks, forward)
    torch.testing.assert_close(out_fast, out_ref, **TIGHT)
    assert len(grads_ref) == len(grads_fast)
    for i, (g_fast, g_ref) in enumerate(zip(grads_fast, grads_ref)):
        if g_ref is None:  # an input the forward did not use
            assert g_fast is None, f"grad {i}"
        else:
            torch.testing.assert_close(g_fast, g_ref, **TIGHT, msg=lambda m: f"grad {i}: {m}")


def _signature_matches(torch_cls, fast_cls):
    ours = dict(inspect.signature(fast_cls.__init__).parameters)
    assert ours.pop("backend").default is None
    assert ours.keys() == dict(inspect.signature(torch_cls.__init__).parameters).keys()
    for name, param in inspect.signature(torch_cls.__init__).parameters.items():
        assert ours[name].default == param.default, name


@pytest.mark.parametrize(
    "torch_cls,fast_cls",
    [
        (nn.MultiheadAttention, fnn.MultiheadAttention),
        (nn.LayerNorm, fnn.LayerNorm),
        (nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer),
        (nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer),
    ],
)
def test_same_constructor_and_state_dict_keys(torch_cls, fast_cls):
    _signature_matches(torch_cls, fast_cls)
    args = (16,) if torch_cls is nn.LayerNorm else (16, 4)
    assert list(torch_cls(*args).state_dict()) == list(fast_cls(*args).state_dict())


def test_rms_norm_constructor_matches_torch():
    ours = inspect.signature(fnn.RMSNorm.__init__).parameters
    for name, param in inspect.signature(nn.RMSNorm.__init__).parameters.items():
        assert ours[name].default == param.default, name
    assert list(nn.RMSNorm(8).state_dict()) == list(fnn.RMSNorm(8).state_dict())


# --------------------------------------------------------------------------------------------
# MultiheadAttention
# --------------------------------------------------------------------------------------------
E, H = 12, 3
MHA_VARIANTS = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
    "kdim_vdim": {"kdim": 7, "vdim": 5},
}


def _masks(kind, b, lq, lk, heads=H, dtype=F64):
    """(attn_mask, key_padding_mask, is_causal) in torch's convention (True = not allowed);
    no query row is fully masked."""
    rand_bool = lambda *s: torch.rand(*s) < 0.35  # noqa: E731
    causal = torch.ones(lq, lk, dtype=torch.bool).triu(1)
    kpm = rand_bool(b, lk)
    kpm[:, 0] = False
    am2 = rand_bool(lq, lk)
    am2[:, 0] = False
    am3 = rand_bool(b * heads, lq, lk)
    am3[..., 0] = False
    to_float = lambda m: torch.zeros(m.shape, dtype=dtype).masked_fill(m, float("-inf"))  # noqa: E731
    return {
        "none": (None, None, False),
        "bool_2d": (am2, None, False),
        "float_2d": (to_float(am2) + torch.randn(lq, lk, dtype=dtype), None, False),
        "bool_3d": (am3, None, False),
        "float_3d": (to_float(am3), None, False),
        "kpm_bool": (None, kpm, False),
        "kpm_float": (None, to_float(kpm), False),
        "bool_2d_kpm": (am2, kpm, False),
        "float_3d_kpm_float": (to_float(am3), to_float(kpm), False),
        "causal": (causal, None, True),
        "causal_float_kpm": (to_float(causal), to_float(kpm), True),
    }[kind]


def _mha_case(variant, batch_first, kv, b, lq, lk):
    """Inputs and a forward for the three in-projection paths: kv="self" (query is key is
    value: one packed GEMM), "shared" (key is value), "distinct" (three tensors)."""
    kw = MHA_VARIANTS[variant]
    shape = lambda L, e: (b, L, e) if batch_first else (L, b, e)  # noqa: E731
    if kv == "self":
        inputs = [torch.randn(shape(lq, E), dtype=F64)]
    elif kv == "shared":
        inputs = [torch.randn(shape(lq, E), dtype=F64), torch.randn(shape(lk, E), dtype=F64)]
    else:
        inputs = [
            torch.randn(shape(lq, E), dtype=F64),
            torch.randn(shape(lk, kw.get("kdim", E)), dtype=F64),
            torch.randn(shape(lk, kw.get("vdim", E)), dtype=F64),
        ]
    n = len(inputs)

    def forward(m, *args, is_causal=False):
        q, k, v = (args[0],) * 3 if n == 1 else (args[0], args[1], args[1]) if n == 2 else args[:3]
        attn_mask, kpm = args[n:]
        return m(q, k, v, key_padding_mask=kpm, need_weights=False, attn_mask=attn_mask, is_causal=is_causal)

    return inputs, forward


MASKS = ["none", "bool_2d", "float_2d", "bool_3d", "float_3d", "kpm_bool", "kpm_float",
         "bool_2d_kpm", "float_3d_kpm_float", "causal", "causal_float_kpm"]


@pytest.mark.parametrize("variant", list(MHA_VARIANTS))
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", MASKS)
def test_mha_matches_torch(variant, batch_first, mask):
    ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, batch_first=batch_first, **MHA_VARIANTS[variant])
    kv = "distinct" if variant == "kdim_vdim" else "self"
    b, lq = 2, 5
    lk = 7 if kv == "distinct" and not mask.startswith("causal") else lq
    inputs, forward = _mha_case(variant, batch_first, kv, b, lq, lk)
    attn_mask, kpm, is_causal = _masks(mask, b, lq, lk)
    _assert_same(ref, fast, inputs, [attn_mask, kpm], lambda m, *a: forward(m, *a, is_causal=is_causal))


@pytest.mark.parametrize("kv", ["shared", "distinct"])
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "bool_3d", "causal"])
@pytest.mark.parametrize("variant", ["default", "bias_kv"])
def test_mha_cross_attention(kv, mask, variant):
    """Lq != Lk (causal is top-left aligned, as torch), key is value or three tensors."""
    ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, batch_first=True, **MHA_VARIANTS[variant])
    b, lq, lk = 3, 4, 9
    inputs, forward = _mha_case(variant, True, kv, b, lq, lk)
    attn_mask, kpm, is_causal = _masks(mask, b, lq, lk)
    _assert_same(ref, fast, inputs, [attn_mask, kpm], lambda m, *a: forward(m, *a, is_causal=is_causal))


@pytest.mark.parametrize("variant", ["default", "bias_kv_zero_attn", "kdim_vdim"])
@pytest.mark.parametrize("mask", ["none", "bool_2d", "float_3d", "kpm_bool", "causal"])
def test_mha_unbatched(variant, mask):
    ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, **MHA_VARIANTS[variant])
    kv = "distinct" if variant == "kdim_vdim" else "self"
    lq = 6
    lk = 4 if kv == "distinct" and mask != "causal" else lq
    inputs, forward = _mha_case(variant, False, kv, 1, lq, lk)
    inputs = [t[:, 0] for t in inputs]  # (L, E)
    attn_mask, kpm, is_causal = _masks(mask, 1, lq, lk)
    kpm = None if kpm is None else kpm[0]
    _assert_same(ref, fast, inputs, [attn_mask, kpm], lambda m, *a: forward(m, *a, is_causal=is_causal))


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("mask", ["none", "bool_2d_kpm", "float_2d"])
def test_mha_need_weights_returns_torch_weights(average, mask):
    ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, add_bias_kv=True)
    q, k, v = torch.randn(5, 2, E, dtype=F64), torch.randn(6, 2, E, dtype=F64), torch.randn(6, 2, E, dtype=F64)
    attn_mask, kpm, _ = _masks(mask, 2, 5, 6)
    out_ref, w_ref = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=average)
    out_fast, w_fast = fast(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=average)
    assert w_fast.shape == ((2, 5, 7) if average else (2, H, 5, 7))
    torch.testing.assert_close(w_fast, w_ref, **TIGHT)
    torch.testing.assert_close(out_fast, out_ref, **TIGHT)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_eval_matches_torch_fast_path(batch_first):
    """In eval under no_grad torch takes its own fused path; the results still agree."""
    ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, 4, batch_first=batch_first, dropout=0.3)
    ref.eval(), fast.eval()
    x = torch.randn((3, 6, E) if batch_first else (6, 3, E), dtype=F64)
    kpm = torch.rand(3, 6) < 0.3
    kpm[:, 0] = False
    with torch.no_grad():
        out_ref, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
        out_fast, _ = fast(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out_fast, out_ref, **TIGHT)


@pytest.mark.parametrize("module", ["mha", "encoder"])
def test_learnable_float_mask_gets_torch_gradient(module):
    """A float mask that requires grad (a learned bias) works as in torch, gradient included:
    fastattn's kernels compute no mask gradient, so such calls take torch's path."""
    if module == "encoder":
        ref, fast = _pair(nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer, E, H, dim_feedforward=16, dropout=0.0)
        forward = lambda m, x, mask: m(x, src_mask=mask)  # noqa: E731
    else:
        ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, H)
        forward = lambda m, x, mask: m(x, x, x, attn_mask=mask, need_weights=False)[0]  # noqa: E731
    x = torch.randn(5, 2, E, dtype=F64)
    grads = []
    for module in (ref, fast):
        mask = torch.randn(5, 5, dtype=F64, requires_grad=True)
        with torch.no_grad():
            mask.copy_(torch.arange(25, dtype=F64).view(5, 5).cos())
        forward(module, x, mask).sum().backward()
        grads.append(mask.grad)
    torch.testing.assert_close(grads[1], grads[0], **TIGHT)


def test_mha_dropout_only_in_training():
    fast = fnn.MultiheadAttention(E, H, dropout=0.5, batch_first=True, dtype=F64)
    x = torch.randn(2, 16, E, dtype=F64)
    fast.eval()
    out_eval = fast(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(out_eval, fast(x, x, x, need_weights=False)[0], rtol=0, atol=0)
    fast.train()
    out_train = fast(x, x, x, need_weights=False)[0]
    assert torch.isfinite(out_train).all()
    assert (out_train - out_eval).abs().max() > 1e-3


def test_mha_fully_masked_rows_give_bias_not_nan():
    """A query that may see no key: fastattn's attention gives 0, so the row is out_proj.bias;
    other rows match torch."""
    ref, fast = _pair(nn.MultiheadAttention, fnn.MultiheadAttention, E, H, batch_first=True)
    with torch.no_grad():
        ref.out_proj.bias.normal_()
        fast.out_proj.bias.copy_(ref.out_proj.bias)
    x = torch.randn(2, 5, E, dtype=F64, requires_grad=True)
    attn_mask = torch.rand(5, 5) < 0.3
    attn_mask[:, 0] = False
    attn_mask[2] = True
    out = fast(x, x, x, attn_mask=attn_mask, need_weights=False)[0]
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(out[:, 2], fast.out_proj.bias.expand(2, E), **TIGHT)
    expected = ref(x, x, x, attn_mask=attn_mask, need_weights=False)[0]
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(out[:, keep], expected[:, keep], **TIGHT)


def test_mha_errors():
    fast = fnn.MultiheadAttention(E, H)
    x = torch.randn(4, 2, E)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        fast(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(TypeError, match="bool or floating"):
        fast(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        fast(x, x, x, need_weights=False, attn_mask=torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        fast(x, x, x, need_weights=False, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D .*or 3-D"):
        fast(x[None], x[None], x[None], need_weights=False)
    other_batch = torch.randn(4, 3, E)
    with pytest.raises(ValueError, match=r"key's batch size \(3\) must equal query's \(2\)"):
        fast(x, other_batch, other_batch, need_weights=False)
    with pytest.raises(ValueError, match="key's last dim must be kdim=12"):
        fast(x, x[..., :5], x, need_weights=False)


# --------------------------------------------------------------------------------------------
# Norms and feed-forward
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(13,), (3, 5)])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, True)])
def test_layer_norm_matches_torch(shape, affine, bias):
    ref, fast = _pair(nn.LayerNorm, fnn.LayerNorm, shape, eps=1e-4, elementwise_affine=affine, bias=bias)
    if affine:
        with torch.no_grad():
            for p_ref, p_fast in zip(ref.parameters(), fast.parameters()):
                p_ref.normal_()
                p_fast.copy_(p_ref)
    x = torch.randn(2, 3, *shape, dtype=F64) * 3 + 1
    _assert_same(ref, fast, [x], [], lambda m, x: m(x))


@pytest.mark.parametrize("shape", [(11,), (2, 6)])
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(shape, eps, affine):
    ref, fast = _pair(nn.RMSNorm, fnn.RMSNorm, shape, eps=eps, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            fast.weight.copy_(ref.weight)
    x = torch.randn(4, *shape, dtype=F64) * 0.01  # small values make eps=None (finfo.eps) matter
    _assert_same(ref, fast, [x], [], lambda m, x: m(x))


@pytest.mark.parametrize("prenorm", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_residual_norm_modules(prenorm, with_residual, kind):
    n = 10
    if kind == "layer":
        fast = fnn.AddLayerNorm(n, eps=1e-5, prenorm=prenorm, dtype=F64)
        fast.load_state_dict(nn.LayerNorm(n).state_dict())
    else:
        fast = fnn.RMSNorm(n, eps=1e-5, prenorm=prenorm, dtype=F64)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_()
    x = torch.randn(3, 4, n, dtype=F64, requires_grad=True)
    residual = torch.randn(3, 4, n, dtype=F64, requires_grad=True) if with_residual else None
    out = fast(x, residual)
    h = x + residual if with_residual else x
    if kind == "layer":
        y = F.layer_norm(h, (n,), fast.weight, fast.bias, 1e-5)
    else:
        y = F.rms_norm(h, (n,), fast.weight, 1e-5)
    if prenorm:
        torch.testing.assert_close(out[1], h, **TIGHT)
        out = out[0]
    torch.testing.assert_close(out, y, **TIGHT)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(out, [x, *fast.parameters()], dy)
    want = torch.autograd.grad(y, [x, *fast.parameters()], dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TIGHT)


def test_add_layer_norm_dropout_only_in_training():
    fast = fnn.AddLayerNorm(32, dropout_p=0.5, dtype=F64)
    x, r = torch.randn(4, 32, dtype=F64), torch.randn(4, 32, dtype=F64)
    fast.eval()
    torch.testing.assert_close(fast(x, r), F.layer_norm(x + r, (32,), eps=1e-5), **TIGHT)
    fast.train()
    assert (fast(x, r) - F.layer_norm(x + r, (32,), eps=1e-5)).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_feed_forward_module(activation, bias):
    fast = fnn.FeedForward(10, 12, d_out=7, activation=activation, bias=bias, dtype=F64)
    assert fast.linear1.weight.shape == (24 if activation == "swiglu" else 12, 10)
    x = torch.randn(2, 3, 10, dtype=F64, requires_grad=True)
    z = fast.linear1(x)
    acts = {
        "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"), "silu": F.silu,
        "swiglu": lambda z: F.silu(z.chunk(2, -1)[0]) * z.chunk(2, -1)[1],
    }
    expected = fast.linear2(acts[activation](z))
    out = fast(x)
    assert out.shape == (2, 3, 7)
    torch.testing.assert_close(out, expected, **TIGHT)
    dy = torch.randn_like(out)
    params = [x, *fast.parameters()]
    for g, w in zip(torch.autograd.grad(out, params, dy), torch.autograd.grad(expected, params, dy)):
        torch.testing.assert_close(g, w, **TIGHT)


def test_feed_forward_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation"):
        fnn.FeedForward(8, 16, activation="tanh")


@pytest.mark.parametrize(
    "build,fragment",
    [
        (lambda: fnn.FeedForward(8, 16, dropout=1.5), "dropout must be in [0, 1)"),
        (lambda: fnn.FeedForward(8, 16, recompute="yes"), "recompute must be a bool"),
        (lambda: fnn.AddLayerNorm(8, dropout_p=-0.1), "dropout_p must be in [0, 1)"),
        (lambda: fnn.RMSNorm(8, dropout_p=1.0), "dropout_p must be in [0, 1)"),
        (lambda: fnn.RMSNorm(8, prenorm=1), "prenorm must be a bool"),
    ],
)
def test_module_options_are_checked_at_construction(build, fragment):
    """As torch.nn.Dropout does: a bad option fails when the module is built, not at the first
    training step (in eval it would never be checked)."""
    with pytest.raises((ValueError, TypeError), match=re.escape(fragment)):
        build()


# --------------------------------------------------------------------------------------------
# Transformer layers
# --------------------------------------------------------------------------------------------
D_MODEL, NHEAD, D_FF = 16, 4, 24
ACTIVATIONS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_module_tanh": nn.GELU(approximate="tanh"),
    "custom": lambda x: torch.tanh(x) * x,  # not fusable: the unfused FFN path
}


def _layer_pair(cls_pair, **kw):
    kw = {"dim_feedforward": D_FF, "dropout": 0.0, **kw}
    return _pair(*cls_pair, D_MODEL, NHEAD, **kw)


def _layer_masks(kind, b, lq, lk, float_masks):
    attn_mask, kpm, is_causal = _masks(kind, b, lq, lk, heads=NHEAD)
    if float_masks:
        to_float = lambda m: m if m is None or m.is_floating_point() else torch.zeros(m.shape, dtype=F64).masked_fill(m, float("-inf"))  # noqa: E731
        attn_mask, kpm = to_float(attn_mask), to_float(kpm)
    return attn_mask, kpm, is_causal


ENC = (nn.TransformerEncoderLayer, fnn.TransformerEncoderLayer)
DEC = (nn.TransformerDecoderLayer, fnn.TransformerDecoderLayer)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("bias", [True, False])
def test_encoder_layer_matches_torch(norm_first, batch_first, activation, bias):
    ref, fast = _layer_pair(ENC, norm_first=norm_first, batch_first=batch_first, activation=ACTIVATIONS[activation], bias=bias)
    b, s = 3, 7
    src = torch.randn((b, s, D_MODEL) if batch_first else (s, b, D_MODEL), dtype=F64)
    src_mask, kpm, _ = _layer_masks("bool_2d_kpm", b, s, s, float_masks=False)
    _assert_same(ref, fast, [src], [src_mask, kpm], lambda m, x, am, kp: m(x, src_mask=am, src_key_padding_mask=kp))


@pytest.mark.parametrize("mask", ["none", "float_2d", "bool_3d", "kpm_float", "causal", "causal_float_kpm"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_masks(mask, norm_first):
    ref, fast = _layer_pair(ENC, norm_first=norm_first, batch_first=True)
    b, s = 2, 6
    src = torch.randn(b, s, D_MODEL, dtype=F64)
    src_mask, kpm, is_causal = _layer_masks(mask, b, s, s, float_masks=False)
    _assert_same(
        ref, fast, [src], [src_mask, kpm],
        lambda m, x, am, kp: m(x, src_mask=am, src_key_padding_mask=kp, is_causal=is_causal),
    )


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "custom"])
@pytest.mark.parametrize("masks", ["bool", "float"])
def test_decoder_layer_matches_torch(norm_first, batch_first, activation, masks):
    ref, fast = _layer_pair(DEC, norm_first=norm_first, batch_first=batch_first, activation=ACTIVATIONS[activation])
    b, t, s = 2, 5, 8
    shape = lambda L: (b, L, D_MODEL) if batch_first else (L, b, D_MODEL)  # noqa: E731
    tgt, memory = torch.randn(shape(t), dtype=F64), torch.randn(shape(s), dtype=F64)
    tgt_mask, tgt_kpm, is_causal = _layer_masks("causal_float_kpm" if masks == "float" else "causal", b, t, t, masks == "float")
    memory_mask, memory_kpm, _ = _layer_masks("bool_2d_kpm", b, t, s, masks == "float")

    def forward(m, tgt, memory, tgt_mask, memory_mask, tgt_kpm, memory_kpm):
        return m(
            tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, tgt_key_padding_mask=tgt_kpm,
            memory_key_padding_mask=memory_kpm, tgt_is_causal=is_causal,
        )

    _assert_same(ref, fast, [tgt, memory], [tgt_mask, memory_mask, tgt_kpm, memory_kpm], forward)


@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_unbatched(norm_first):
    enc_ref, enc_fast = _layer_pair(ENC, norm_first=norm_first)
    src = torch.randn(5, D_MODEL, dtype=F64)
    _assert_same(enc_ref, enc_fast, [src], [], lambda m, x: m(x))
    dec_ref, dec_fast = _layer_pair(DEC, norm_first=norm_first)
    tgt, memory = torch.randn(4, D_MODEL, dtype=F64), torch.randn(6, D_MODEL, dtype=F64)
    causal = nn.Transformer.generate_square_subsequent_mask(4, dtype=F64)
    _assert_same(dec_ref, dec_fast, [tgt, memory], [], lambda m, t, mem: m(t, mem, tgt_mask=causal, tgt_is_causal=True))


@pytest.mark.parametrize("cls_pair", [ENC, DEC], ids=["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_eval_with_dropout(cls_pair, norm_first):
    """dropout > 0 is off in eval (torch's own inference fast path included) and on in training."""
    ref, fast = _layer_pair(cls_pair, dropout=0.3, norm_first=norm_first, batch_first=True)
    ref.eval(), fast.eval()
    x = torch.randn(2, 6, D_MODEL, dtype=F64)
    args = (x,) if cls_pair is ENC else (x, torch.randn(2, 3, D_MODEL, dtype=F64))
    with torch.no_grad():
        torch.testing.assert_close(fast(*args), ref(*args), **TIGHT)
    fast.train()
    out = fast(*args)
    assert torch.isfinite(out).all()
    assert (out - ref(*args)).abs().max() > 1e-3


@pytest.mark.parametrize("cls_pair", [ENC, DEC], ids=["encoder", "decoder"])
def test_layers_follow_each_dropout_modules_own_mode(cls_pair):
    """torch applies a layer's nn.Dropout by that module's own train/eval flag: a training
    layer whose dropouts (and attention) are put in eval runs without dropout."""
    ref, fast = _layer_pair(cls_pair, dropout=0.3, batch_first=True)
    for layer in (ref, fast):
        layer.train()
        for module in layer.modules():
            if isinstance(module, (nn.Dropout, nn.MultiheadAttention)):
                module.eval()
    x = torch.randn(2, 6, D_MODEL, dtype=F64)
    args = (x,) if cls_pair is ENC else (x, torch.randn(2, 3, D_MODEL, dtype=F64))
    torch.testing.assert_close(fast(*args), ref(*args), **TIGHT)


def test_layer_backend_is_passed_through(monkeypatch):
    """The module's backend reaches every fastattn op it calls."""
    import fastattn

    seen = []
    for name in ("flash_attention", "scaled_dot_product_attention", "add_layer_norm", "feed_forward"):
        original = getattr(fastattn, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("backend")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(fastattn, name, spy)
    layer = fnn.TransformerDecoderLayer(D_MODEL, NHEAD, D_FF, dropout=0.0, norm_first=True, backend="reference")
    layer(torch.randn(4, 2, D_MODEL), torch.randn(3, 2, D_MODEL))
    assert {name for name, _ in seen} == {"flash_attention", "add_layer_norm", "feed_forward"}
    assert all(backend == "reference" for _, backend in seen)


class _LoRALinear(nn.Linear):
    """A user's wrapper of a layer's Linear (as PEFT's LoRA): same weight, different forward."""

    def forward(self, x):
        return super().forward(x) + 0.5 * x.sum(-1, keepdim=True)


class _ScaledGELU(nn.GELU):
    """A user's subclass of a torch activation: not the activation its base class names."""

    def forward(self, x):
        return 2 * super().forward(x)


SUBMODULE_SWAPS = {
    "subclassed_activation": lambda layer: setattr(layer, "activation", _ScaledGELU()),
    "rms_norm1": lambda layer: setattr(layer, "norm1", nn.RMSNorm(D_MODEL, dtype=F64)),
    "identity_dropout": lambda layer: setattr(layer, "dropout1", nn.Identity()),
    "lora_linear1": lambda layer: setattr(layer, "linear1", _LoRALinear(D_MODEL, D_FF, dtype=F64)),
    "lora_out_proj": lambda layer: setattr(layer.self_attn, "out_proj", _LoRALinear(D_MODEL, D_MODEL, dtype=F64)),
}


@pytest.mark.parametrize("swap", list(SUBMODULE_SWAPS))
@pytest.mark.parametrize("cls_pair", [ENC, DEC], ids=["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_honour_swapped_submodules(swap, cls_pair, norm_first):
    """A torch layer runs its submodules; a fused layer whose norm, dropout or linear was
    replaced by the user must run that replacement too, not read its weights."""
    ref, fast = _layer_pair(cls_pair, norm_first=norm_first, batch_first=True)
    for layer in (ref, fast):
        SUBMODULE_SWAPS[swap](layer)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, D_MODEL, dtype=F64)
    inputs = [x] if cls_pair is ENC else [x, torch.randn(2, 4, D_MODEL, dtype=F64)]
    _assert_same(ref, fast, inputs, [], lambda m, *args: m(*args))


@pytest.mark.parametrize("cls_pair", [ENC, DEC], ids=["encoder", "decoder"])
def test_layers_fire_submodule_hooks(cls_pair):
    """Hooks on a layer's submodules fire as in torch (the hooked ones run unfused), and the
    hooks' effects on the results are the same."""

    def hooked(layer):
        seen = []
        for name in ("self_attn", "norm1", "linear1", "dropout"):
            getattr(layer, name).register_forward_hook(lambda mod, args, out, _n=name: seen.append(_n))
        layer.norm2.register_forward_hook(lambda mod, args, out: out * 2)
        return seen

    ref, fast = _layer_pair(cls_pair, batch_first=True)
    seen_ref, seen_fast = hooked(ref), hooked(fast)
    x = torch.randn(2, 5, D_MODEL, dtype=F64)
    inputs = [x] if cls_pair is ENC else [x, torch.randn(2, 4, D_MODEL, dtype=F64)]
    _assert_same(ref, fast, inputs, [], lambda m, *args: m(*args))
    assert sorted(seen_fast) == sorted(seen_ref) and seen_ref


EMPTY_CASES = {
    "layer_norm": (nn.LayerNorm, fnn.LayerNorm, (8,), lambda m, x: m(x), [(0, 8)]),
    "rms_norm": (nn.RMSNorm, fnn.RMSNorm, (8,), lambda m, x: m(x), [(0, 8)]),
    "mha_batch": (nn.MultiheadAttention, fnn.MultiheadAttention, (8, 2),
                  lambda m, q, kv: m(q, kv, kv, need_weights=False)[0], [(3, 0, 8), (4, 0, 8)]),
    "mha_tgt": (nn.MultiheadAttention, fnn.MultiheadAttention, (8, 2),
                lambda m, q, kv: m(q, kv, kv, need_weights=False)[0], [(0, 2, 8), (4, 2, 8)]),
    "encoder_batch": (*ENC, (8, 2, 16), lambda m, x: m(x), [(3, 0, 8)]),
    "decoder_batch": (*DEC, (8, 2, 16), lambda m, t, mem: m(t, mem), [(3, 0, 8), (4, 0, 8)]),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_drop_ins_accept_empty_inputs_like_torch(case):
    """An empty batch (or an empty target) is no error for the torch modules: the drop-ins
    return the same empty result instead of raising."""
    torch_cls, fast_cls, args, forward, shapes = EMPTY_CASES[case]
    ref = torch_cls(*args, dtype=F64)
    fast = fast_cls(*args, dtype=F64)
    fast.load_state_dict(ref.state_dict())
    inputs = [torch.randn(s, dtype=F64) for s in shapes]
    expected, out = forward(ref, *inputs), forward(fast, *inputs)
    assert out.shape == expected.shape and out.dtype == expected.dtype


def test_layer_is_deep_copyable_and_keeps_class():
    layer = fnn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, backend="reference")
    clone = copy.deepcopy(layer)
    assert type(clone.self_attn) is fnn.MultiheadAttention and clone.backend == "reference"


# --------------------------------------------------------------------------------------------
# On a GPU: fused kernels in low precision against float64 torch
# --------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls_pair", [ENC, DEC], ids=["encoder", "decoder"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_layers_on_gpu(dtype, cls_pair, norm_first):
    kw = {"dim_feedforward": 256, "dropout": 0.0, "norm_first": norm_first, "batch_first": True, "activation": "gelu"}
    ref = cls_pair[0](128, 4, **kw, device="cuda")
    fast = cls_pair[1](128, 4, **kw, device="cuda")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 97, 128, device="cuda")
    kpm = torch.rand(3, 97, device="cuda") < 0.2
    kpm[:, 0] = False

    def run(module, dt):
        module = copy.deepcopy(module).to(dt)
        if cls_pair is ENC:
            return module(x.to(dt), src_key_padding_mask=kpm)
        causal = nn.Transformer.generate_square_subsequent_mask(97, device="cuda", dtype=dt)
        memory = torch.randn(3, 61, 128, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        return module(x.to(dt), memory.to(dt), tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=None)

    assert_close_to_reference(run(fast, dtype), run(ref, F64), run(ref, dtype), "layer output", atol_scale=4.0)
