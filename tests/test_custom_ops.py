"""fastattn's ops as torch custom ops: opcheck for each, torch.compile(fullgraph=True) of the
public functions and nn modules (forward and backward, equal to eager, dropout included),
torch.export, and backend forcing inside a compiled function.

Compiles are few and shared (inductor on CPU is slow): one for all public functions, one for
all nn modules; the rest use the "aot_eager" backend, which traces the same graphs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fastattn
import fastattn.nn as fnn
from fastattn.backends import BackendNotSupportedError, get_backend
from fastattn.models import SyntheticTranslation, Transformer, TransformerConfig
from fastattn.ops import _custom_op
from fastattn.options import AttentionOptions, FeedForwardOptions, NormOptions

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}
OPS = torch.ops.fastattn


def _randn(*shape, dtype=F64, grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def _opcheck_pair(forward, forward_args, backward, backward_args_of):
    """opcheck the forward op (with autograd) and its backward op on a real call's tensors."""
    torch.library.opcheck(forward, forward_args)
    outputs = forward(*forward_args)
    torch.library.opcheck(backward, backward_args_of(outputs))


# --------------------------------------------------------------------------------------------
# Options codec
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [
        AttentionOptions(softmax_scale=0.1 + 0.2, causal=True, causal_alignment="top_left", dropout_p=1 / 3),
        NormOptions(kind="rms", eps=1e-300, prenorm=True, residual_in_fp32=True),
        FeedForwardOptions(activation="swiglu", dropout_p=0.25, recompute=True),
    ],
)
def test_options_round_trip_exactly(options):
    assert _custom_op.decode_options(type(options), _custom_op.encode_options(options)) == options


def test_options_codec_needs_no_change_for_new_fields():
    @dataclasses.dataclass(frozen=True)
    class Extended:
        softcap: float = float("inf")
        window: tuple = (-1, 3)
        name: str = "a, b=c"
        slope: float | None = None
        bias: float = float("-inf")

    decoded = _custom_op.decode_options(Extended, _custom_op.encode_options(Extended()))
    assert decoded == Extended()


# --------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch (dynamic shapes)
# --------------------------------------------------------------------------------------------
def _rng(options):
    """The forward ops' rng argument: (seed, offset) with dropout, else None."""
    return torch.tensor([12345, 678], dtype=torch.int64) if options.dropout_p > 0 else None


def test_opcheck_dropout_seed():
    draws = torch.zeros((), dtype=torch.int64)
    torch.library.opcheck(OPS.dropout_seed, (draws,))
    torch.manual_seed(5)
    first = OPS.dropout_seed(draws)
    torch.manual_seed(5)
    assert torch.equal(OPS.dropout_seed(draws), first), "the seed comes from torch's generator"
    assert first.shape == (2,) and first.dtype == torch.int64 and int(draws) == 2  # opcheck used clones


ATTENTION_CASES = {
    "causal": (AttentionOptions(softmax_scale=0.3, causal=True), 4, None, None),
    "gqa_top_left": (AttentionOptions(softmax_scale=0.3, causal=True, causal_alignment="top_left"), 2, None, None),
    "key_padding": (AttentionOptions(softmax_scale=0.3), 4, "kpm", None),
    "bool_mask": (AttentionOptions(softmax_scale=0.3), 4, None, torch.bool),
    "float_mask_dropout": (AttentionOptions(softmax_scale=0.3, dropout_p=0.3), 1, None, F64),
    "window_softcap_alibi": (AttentionOptions(softmax_scale=0.3, window_left=2, window_right=1, softcap=4.0), 2,
                             "alibi", None),
    "varlen_causal": (AttentionOptions(softmax_scale=0.3, causal=True), 2, "varlen", None),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_opcheck_attention(case):
    options, hkv, extra, mask_dtype = ATTENTION_CASES[case]
    b, lq, lk, h, d = 2, 5, 7, 4, 8
    q, k, v = _randn(b, lq, h, d), _randn(b, lk, hkv, d), _randn(b, lk, hkv, d)
    key_padding_mask = torch.rand(b, lk) > 0.3 if extra == "kpm" else None
    alibi_slopes = torch.rand(b, h) if extra == "alibi" else None
    varlen = (None, None, 0, 0)
    if extra == "varlen":  # sequences of (q, k) lengths (2, 4), (0, 3) and (3, 0) packed
        q, k, v = _randn(5, h, d), _randn(7, hkv, d), _randn(7, hkv, d)
        cu_q, cu_k = torch.tensor([0, 2, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 7, 7], dtype=torch.int32)
        varlen = (cu_q, cu_k, 3, 4)
    attn_mask = None
    if mask_dtype is torch.bool:
        attn_mask = torch.rand(b, 1, lq, lk).expand(b, h, lq, lk) > 0.3  # stride-0 head dim
    elif mask_dtype is not None:
        attn_mask = torch.randn(b, h, lq, lk, dtype=mask_dtype)
    tensors = (key_padding_mask, attn_mask, alibi_slopes, *varlen)
    args = (q, k, v, *tensors, _custom_op.encode_options(options), "reference", _rng(options))

    def backward_args(outputs):
        out, lse, state = outputs
        detached = [t.detach() for t in (q, k, v)]
        return (torch.randn_like(out), *detached, *tensors, out.detach(), lse, state,
                _custom_op.encode_options(options))

    _opcheck_pair(OPS.flash_attn_forward, args, OPS.flash_attn_backward, backward_args)


NORM_CASES = {
    "layer_residual_affine": (NormOptions(kind="layer"), True, True, True, F64),
    "rms_no_residual": (NormOptions(kind="rms", eps=1e-6), False, True, False, F64),
    "layer_prenorm_dropout": (NormOptions(kind="layer", prenorm=True, dropout_p=0.2), True, True, True, F64),
    "rms_prenorm_h_is_x": (NormOptions(kind="rms", prenorm=True), False, False, False, F64),
    "residual_in_fp32": (NormOptions(kind="layer", prenorm=True, residual_in_fp32=True), False, True, True, torch.float32),
}


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_opcheck_norm(case):
    options, has_residual, has_weight, has_bias, dtype = NORM_CASES[case]
    m, n = 6, 24
    x = _randn(m, n, dtype=dtype)
    residual = _randn(m, n, dtype=dtype) if has_residual else None
    weight = _randn(n, dtype=dtype) if has_weight else None
    bias = _randn(n, dtype=dtype) if has_bias else None
    args = (x, residual, weight, bias, _custom_op.encode_options(options), "reference", _rng(options))

    def backward_args(outputs):
        y, h, mean, rstd, state = outputs
        saved_h = x.detach() if h.numel() == 0 else h.detach()
        dh = torch.randn_like(saved_h) if options.prenorm and h.numel() else None
        params = [None if p is None else p.detach() for p in (weight, bias)]
        return (torch.randn_like(y), dh, saved_h, *params, mean, rstd, state, x.dtype,
                None if residual is None else residual.dtype, _custom_op.encode_options(options))

    _opcheck_pair(OPS.add_norm_forward, args, OPS.add_norm_backward, backward_args)


FFN_CASES = {
    "gelu_bias": (FeedForwardOptions(activation="gelu"), True),
    "swiglu_no_bias": (FeedForwardOptions(activation="swiglu"), False),
    "relu_recompute": (FeedForwardOptions(activation="relu", recompute=True), True),
    "silu_dropout": (FeedForwardOptions(activation="silu", dropout_p=0.3), True),
}


@pytest.mark.parametrize("case", list(FFN_CASES))
def test_opcheck_ffn(case):
    options, has_bias = FFN_CASES[case]
    m, d_model, d_ff, d_out = 5, 8, 12, 6
    d_hidden = 2 * d_ff if options.activation == "swiglu" else d_ff
    x, w1, w2 = _randn(m, d_model), _randn(d_hidden, d_model), _randn(d_out, d_ff)
    b1, b2 = (_randn(d_hidden), _randn(d_out)) if has_bias else (None, None)
    args = (x, w1, b1, w2, b2, _custom_op.encode_options(options), "reference", _rng(options))

    def backward_args(outputs):
        y, z, state = outputs
        tensors = [None if t is None else t.detach() for t in (x, w1, b1, w2, b2)]
        return (torch.randn_like(y), *tensors, z, state, _custom_op.encode_options(options))

    _opcheck_pair(OPS.ffn_forward, args, OPS.ffn_backward, backward_args)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with inductor: forward and backward equal eager, dropout too
# --------------------------------------------------------------------------------------------
def _all_functions(q, k, v, x, residual, weight, bias, w1, b1, w2, b2):
    """Every public function, dropout in most. The norm of x and the last two FFNs depend on
    nothing before them: a compiler may run them earlier, yet each must get its eager draw."""
    side = fastattn.rms_norm(x, None, weight, dropout_p=0.4)  # independent of the attention
    a = fastattn.flash_attention(q, k, v, causal=True, dropout_p=0.2)  # (B, L, H, D)
    s = fastattn.scaled_dot_product_attention(a.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, dropout_p=0.1)  # (B, H, L, D)
    flat = s.transpose(1, 2).flatten(2) + side  # (B, L, C)
    y, h = fastattn.add_layer_norm(flat, residual, weight, bias, dropout_p=0.3, prenorm=True)
    r = fastattn.rms_norm(y, h, weight, eps=1e-6)
    f = fastattn.feed_forward(r, w1, b1, w2, b2, activation="swiglu", dropout_p=0.25)
    g = fastattn.feed_forward(x, w1, None, w2, None, activation="swiglu", dropout_p=0.5, recompute=True)
    return f + g


def _function_inputs():
    b, l, h, d, ff = 2, 7, 2, 8, 12
    c = h * d
    return [
        _randn(b, l, h, d), _randn(b, l, h, d), _randn(b, l, h, d),
        _randn(b, l, c), _randn(b, l, c), _randn(c), _randn(c),
        _randn(2 * ff, c), _randn(2 * ff), _randn(c, ff), _randn(c),
    ]


def _run_with_grads(fn, inputs, seed):
    inputs = _leaves(inputs)
    torch.manual_seed(seed)
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), [t.grad for t in inputs]


def test_compiled_functions_match_eager_with_dropout():
    inputs = _function_inputs()
    compiled = torch.compile(_all_functions, fullgraph=True, backend="inductor")
    out_c, grads_c = _run_with_grads(compiled, inputs, seed=1234)
    out_e, grads_e = _run_with_grads(_all_functions, inputs, seed=1234)
    torch.testing.assert_close(out_c, out_e, **TIGHT)
    for i, (g_c, g_e) in enumerate(zip(grads_c, grads_e)):
        torch.testing.assert_close(g_c, g_e, **TIGHT, msg=lambda m: f"grad of input {i}: {m}")
    out_other, _ = _run_with_grads(compiled, inputs, seed=4321)
    assert not torch.allclose(out_other, out_c), "another seed must draw other dropout masks"


class _AllModules(nn.Module):
    """Every fastattn.nn module in one chain (batch first, E = 16)."""

    def __init__(self, e=16, heads=4, ff=24):
        super().__init__()
        kw = dict(dtype=F64)
        self.mha = fnn.MultiheadAttention(e, heads, dropout=0.1, batch_first=True, **kw)
        self.ln = fnn.LayerNorm(e, **kw)
        self.add_ln = fnn.AddLayerNorm(e, dropout_p=0.2, prenorm=True, **kw)
        self.rms = fnn.RMSNorm(e, **kw)
        self.ffn = fnn.FeedForward(e, ff, dropout=0.1, activation="gelu", **kw)
        self.enc = fnn.TransformerEncoderLayer(e, heads, ff, dropout=0.0, batch_first=True, **kw)
        self.dec = fnn.TransformerDecoderLayer(e, heads, ff, dropout=0.0, batch_first=True, norm_first=True, **kw)

    def forward(self, x, memory, key_padding_mask):
        a, _ = self.mha(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        y, h = self.add_ln(self.ln(a), x)
        r = self.ffn(self.rms(y, h))
        m = self.enc(memory, src_key_padding_mask=key_padding_mask)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=torch.bool)
        return self.dec(r, m, tgt_mask=causal, memory_key_padding_mask=key_padding_mask)


def test_compiled_modules_match_eager_with_dropout():
    model = _AllModules()
    x, memory = _randn(2, 6, 16), _randn(2, 6, 16)
    key_padding_mask = torch.zeros(2, 6, dtype=torch.bool)
    key_padding_mask[1, 4:] = True

    def run(module, seed):
        module.zero_grad(set_to_none=True)
        inputs = _leaves([x, memory])
        torch.manual_seed(seed)
        out = module(*inputs, key_padding_mask)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=F64).view(out.shape))
        return [out.detach(), *(t.grad for t in inputs), *(p.grad for p in module.parameters())]

    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    for i, (got, want) in enumerate(zip(run(compiled, 7), run(model, 7), strict=True)):
        torch.testing.assert_close(got, want, **TIGHT, msg=lambda m: f"tensor {i}: {m}")


def test_compiled_autocast_matches_eager():
    q, k, v = (_randn(1, 5, 2, 8, dtype=torch.float32) for _ in range(3))

    def fn(q, k, v, x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fastattn.flash_attention(q, k, v), fastattn.feed_forward(x, w, None, w.T, None)

    x, w = _randn(3, 8, dtype=torch.float32), _randn(4, 8, dtype=torch.float32)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, x, w)
    want = fn(q, k, v, x, w)
    for g, e in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Backend forcing survives compilation
# --------------------------------------------------------------------------------------------
def test_use_backend_is_read_at_each_compiled_call(monkeypatch):
    calls = []
    triton = get_backend("triton")
    for name in ("forward", "backward"):
        original = getattr(triton, name)
        monkeypatch.setattr(triton, name, lambda op, *a, _n=name, _f=original: calls.append((_n, op)) or _f(op, *a))

    compiled = torch.compile(lambda q, k, v: fastattn.flash_attention(q, k, v), fullgraph=True, backend="aot_eager")
    q, k, v = (_randn(1, 3, 1, 16, dtype=torch.float32) for _ in range(3))
    expected = fastattn.flash_attention(q, k, v, backend="reference")
    torch.testing.assert_close(compiled(q, k, v), expected)
    assert calls == [], "automatic choice on CPU is the reference backend"

    with fastattn.use_backend("triton"):  # the interpreter, only when asked for
        out = compiled(q, k, v)
    out.sum().backward()  # outside the block: backward follows the forward's backend
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert calls == [("forward", "attention"), ("backward", "attention")]

    with fastattn.use_backend("cuda"), pytest.raises(BackendNotSupportedError, match="cuda"):
        compiled(q, k, v)


# --------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------
def _fastattn_ops(program) -> set[str]:
    return {
        str(node.target) for node in program.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("fastattn.")
    }


def test_export_multihead_attention():
    mha = fnn.MultiheadAttention(16, 4, batch_first=True, dtype=F64).eval()
    x = _randn(2, 5, 16, grad=False)
    key_padding_mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    kwargs = dict(key_padding_mask=key_padding_mask, need_weights=False)
    program = torch.export.export(mha, (x, x, x), kwargs)
    assert _fastattn_ops(program) == {"fastattn.flash_attn_forward.default"}
    torch.testing.assert_close(program.module()(x, x, x, **kwargs)[0], mha(x, x, x, **kwargs)[0], **TIGHT)


def test_export_reference_transformer():
    task = SyntheticTranslation(n_words=11, min_len=2, max_len=9)
    config = TransformerConfig(
        src_vocab_size=task.vocab_size, tgt_vocab_size=task.vocab_size, max_len=task.max_target_len,
        n_layer=1, n_head=2, d_model=16, d_ff=24, dropout=0.0,
    )
    model = Transformer(config).to(F64).eval()
    batch = task.sample(3)
    program = torch.export.export(model, (batch.src, batch.tgt_in))
    assert _fastattn_ops(program) == {
        "fastattn.flash_attn_forward.default", "fastattn.add_norm_forward.default", "fastattn.ffn_forward.default",
    }
    torch.testing.assert_close(program.module()(batch.src, batch.tgt_in)[0], model(batch.src, batch.tgt_in)[0], **TIGHT)
