"""The reference backend (the oracle) against direct float64 formulas and torch itself."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn.activations import activation_backward, activation_forward
from fastattn.options import AttentionInputs, AttentionOptions, RngState
from fastattn.reference import attention as ref_attention
from tests.helpers import assert_close_to_reference

F64 = torch.float64


def naive_attention(q, k, v, *, scale, causal=None, kpm=None, mask=None):
    """Direct formula in (B, L, H, D) layout, differentiable by autograd. causal: None,
    "bottom_right" or "top_left"; kpm (B, Lk) bool; mask (B or 1, H or 1, Lq, Lk) bool/float."""
    b, lq, h, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(h // hkv, dim=2)
    v = v.repeat_interleave(h // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if causal is not None:
        shift = lk - lq if causal == "bottom_right" else 0
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril(shift)
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    if mask is not None and mask.dtype == torch.bool:
        allowed &= mask
    elif mask is not None:
        s = s + mask
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: 0
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _qkv(b, lq, lk, h, hkv, d, dtype=F64):
    mk = lambda l, n: torch.randn(b, l, n, d, dtype=dtype, requires_grad=True)  # noqa: E731
    return mk(lq, h), mk(lk, hkv), mk(lk, hkv)


def _grads(out, tensors):
    # by shape, not randn_like: the compared outputs' strides differ, so would the values
    do = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    return torch.autograd.grad(out, tensors, do)


@pytest.mark.parametrize("lq,lk", [(1, 1), (7, 13), (13, 7), (33, 33)])
@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attention_matches_formula(lq, lk, h, hkv, causal):
    q, k, v = _qkv(2, lq, lk, h, hkv, 8)
    kpm = torch.rand(2, lk) > 0.3
    kpm[:, 0] = True
    out = fastattn.flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, backend="reference")
    expected = naive_attention(q, k, v, scale=8**-0.5, causal="bottom_right" if causal else None, kpm=kpm)
    torch.testing.assert_close(out, expected)
    torch.manual_seed(1)
    g = _grads(out, (q, k, v))
    torch.manual_seed(1)
    g_expected = _grads(expected, (q, k, v))
    for name, a, e in zip("qkv", g, g_expected):
        torch.testing.assert_close(a, e, msg=lambda m: f"d{name}: {m}")


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = _qkv(1, 5, 9, 2, 2, 16)
    _, lse = fastattn.flash_attention(q, k, v, softmax_scale=0.3, return_lse=True, backend="reference")
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float())


@pytest.mark.parametrize("alignment", ["bottom_right", "top_left"])
def test_causal_alignments(alignment):
    q, k, v = _qkv(1, 6, 10, 2, 2, 8)
    if alignment == "bottom_right":
        out = fastattn.flash_attention(q, k, v, causal=True, backend="reference")
    else:
        out = fastattn.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, backend="reference"
        ).transpose(1, 2)
    torch.testing.assert_close(out, naive_attention(q, k, v, scale=8**-0.5, causal=alignment))


def test_fully_masked_rows_give_zero_output_lse_and_gradients():
    # Lq > Lk with bottom-right causal: the first Lq - Lk query rows see no key; batch 1 has an
    # all-False padding mask.
    q, k, v = _qkv(2, 9, 4, 2, 1, 8)
    kpm = torch.ones(2, 4, dtype=torch.bool)
    kpm[1] = False
    out, lse = fastattn.flash_attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True, backend="reference")
    assert torch.isfinite(out).all()
    assert (out[:, :5] == 0).all() and (out[1] == 0).all()
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, :, 5:]).all()
    dq, dk, dv = _grads(out, (q, k, v))
    assert (dq[:, :5] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


def test_float_mask_with_all_minus_inf_row_gives_zero_not_nan():
    q, k, v = _qkv(1, 4, 6, 2, 2, 8)
    mask = torch.randn(1, 2, 4, 6, dtype=F64)
    mask[0, 1, 2] = -math.inf
    out = fastattn.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, backend="reference"
    )
    assert (out[0, 1, 2] == 0).all() and torch.isfinite(out).all()
    expected = naive_attention(q, k, v, scale=8**-0.5, mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", [(5, 7), (2, 1, 5, 7), (1, 3, 5, 7)])
def test_sdpa_dropin_matches_torch(mask_kind, mask_shape):
    q, k, v = (torch.randn(2, 3, n, 16, dtype=F64) for n in (5, 7, 7))
    mask = torch.rand(mask_shape) > 0.3 if mask_kind == "bool" else torch.randn(mask_shape, dtype=F64)
    if mask_kind == "bool":
        mask[..., 0] = True  # torch returns NaN on fully-masked rows; fastattn returns 0
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2))


@pytest.mark.parametrize("shape_q,shape_kv", [((7, 16), (9, 16)), ((3, 7, 16), (3, 9, 16)), ((2, 2, 3, 7, 16), (2, 2, 3, 9, 16))])
def test_sdpa_dropin_other_ranks(shape_q, shape_kv):
    q = torch.randn(shape_q, dtype=F64)
    k, v = torch.randn(shape_kv, dtype=F64), torch.randn(shape_kv, dtype=F64)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_sdpa_dropin_gqa():
    q, k, v = torch.randn(2, 6, 5, 8, dtype=F64), torch.randn(2, 2, 7, 8, dtype=F64), torch.randn(2, 2, 7, 8, dtype=F64)
    out = fastattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_attention_dropout_statistics_and_self_consistency():
    inputs = AttentionInputs(*(torch.randn(2, 64, 2, 8, dtype=F64) for _ in range(3)))
    options = AttentionOptions(softmax_scale=0.3, dropout_p=0.25)
    rng = RngState(seed=123, offset=7)
    keep = ref_attention.dropout_keep(inputs, options, rng)
    assert abs(keep.double().mean().item() - 0.75) < 4 * math.sqrt(0.25 * 0.75 / keep.numel())
    assert torch.equal(keep, ref_attention.dropout_keep(inputs, options, rng))
    assert not torch.equal(keep, ref_attention.dropout_keep(inputs, options, RngState(124, 7)))
    out, _ = ref_attention.forward(inputs, options, rng)
    # Explicit formula with the same mask.
    s = torch.einsum("bqhd,bkhd->bhqk", inputs.q, inputs.k) * 0.3
    p = torch.softmax(s, -1) * keep / 0.75
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", p, inputs.v))
    # Same seed -> same output and gradients through the public op.
    q, k, v = _qkv(1, 16, 16, 2, 2, 8)
    torch.manual_seed(5)
    a = fastattn.flash_attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(5)
    b = fastattn.flash_attention(q, k, v, dropout_p=0.3, backend="reference")
    c = fastattn.flash_attention(q, k, v, dropout_p=0.3, backend="reference")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attention_dropout_gradients_match_autograd_of_formula():
    q, k, v = _qkv(1, 6, 8, 2, 1, 8)
    inputs = AttentionInputs(q.detach(), k.detach(), v.detach())
    options = AttentionOptions(softmax_scale=0.4, dropout_p=0.5)
    rng = RngState(3, 4)
    out, lse = ref_attention.forward(inputs, options, rng)
    do = torch.randn_like(out)
    grads = ref_attention.backward(do, out, lse, inputs, options, rng)
    keep = ref_attention.dropout_keep(inputs, options, rng)
    kk, vv = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, kk) * 0.4, -1) * keep / 0.5
    expected = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    for g, e in zip(grads, torch.autograd.grad(expected, (q, k, v), do)):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("hidden", [1, 3, 40])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_norm_matches_formula(kind, hidden, with_residual, affine):
    x = torch.randn(7, hidden, dtype=F64, requires_grad=True)
    r = torch.randn(7, hidden, dtype=F64, requires_grad=True) if with_residual else None
    w = torch.randn(hidden, dtype=F64, requires_grad=True) if affine else None
    b = torch.randn(hidden, dtype=F64, requires_grad=True) if affine and kind == "layer" else None
    if kind == "layer":
        y, h = fastattn.add_layer_norm(x, r, w, b, eps=1e-5, prenorm=True, backend="reference")
    else:
        y, h = fastattn.rms_norm(x, r, w, eps=1e-5, prenorm=True, backend="reference")
    h_expected = x + r if with_residual else x
    if kind == "layer":
        y_expected = F.layer_norm(h_expected, (hidden,), w, b, eps=1e-5)
    else:
        y_expected = h_expected * torch.rsqrt(h_expected.pow(2).mean(-1, keepdim=True) + 1e-5)
        y_expected = y_expected * w if w is not None else y_expected
    torch.testing.assert_close(y, y_expected)
    torch.testing.assert_close(h, h_expected)
    leaves = [t for t in (x, r, w, b) if t is not None]
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), leaves, (dy, dh))
    expected = torch.autograd.grad((y_expected, h_expected), leaves, (dy, dh))
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)


def test_norm_output_dtypes_and_fp32_residual():
    x = torch.randn(4, 3, 16, dtype=torch.bfloat16)
    r = torch.randn(4, 3, 16, dtype=torch.bfloat16)
    y, h = fastattn.add_layer_norm(x, r, prenorm=True, residual_in_fp32=True, backend="reference")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32 and y.shape == x.shape
    y, h = fastattn.rms_norm(x, None, prenorm=True, backend="reference")
    assert h.dtype == torch.bfloat16


def test_norm_dropout_statistics():
    x = torch.ones(64, 256, dtype=F64, requires_grad=True)
    torch.manual_seed(0)
    y, h = fastattn.add_layer_norm(x, torch.zeros_like(x), dropout_p=0.2, prenorm=True, backend="reference")
    kept = (h != 0).double().mean().item()
    assert abs(kept - 0.8) < 4 * math.sqrt(0.2 * 0.8 / h.numel())
    assert torch.allclose(h[h != 0], torch.full_like(h[h != 0], 1 / 0.8))
    (dx,) = torch.autograd.grad(h.sum(), x)
    torch.testing.assert_close(dx, (h != 0).double() / 0.8)


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------
def _torch_activation(z, activation):
    if activation == "swiglu":
        gate, up = z.chunk(2, -1)
        return F.silu(gate) * up
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation](z)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("recompute", [False, True])
def test_feed_forward_matches_formula(activation, bias, recompute):
    d_model, d_ff, d_out = 5, 7, 3
    d_hidden = 2 * d_ff if activation == "swiglu" else d_ff
    x = torch.randn(2, 3, d_model, dtype=F64, requires_grad=True)
    w1 = torch.randn(d_hidden, d_model, dtype=F64, requires_grad=True)
    w2 = torch.randn(d_out, d_ff, dtype=F64, requires_grad=True)
    b1 = torch.randn(d_hidden, dtype=F64, requires_grad=True) if bias else None
    b2 = torch.randn(d_out, dtype=F64, requires_grad=True) if bias else None
    y = fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation, recompute=recompute, backend="reference")
    expected = F.linear(_torch_activation(F.linear(x, w1, b1), activation), w2, b2)
    torch.testing.assert_close(y, expected)
    leaves = [t for t in (x, w1, b1, w2, b2) if t is not None]
    dy = torch.randn_like(y)
    for a, e in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(expected, leaves, dy)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
def test_activation_derivatives_match_autograd(activation):
    z = torch.randn(6, 8, dtype=F64, requires_grad=True)
    a = activation_forward(z, activation)
    torch.testing.assert_close(a, _torch_activation(z, activation))
    da = torch.randn_like(a)
    (expected,) = torch.autograd.grad(a, z, da)
    torch.testing.assert_close(activation_backward(da, z.detach(), activation), expected)


def test_autocast_runs_attention_and_ffn_in_the_autocast_dtype():
    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    w1, w2 = torch.randn(6, 8, requires_grad=True), torch.randn(8, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.flash_attention(q, k, v)
        y = fastattn.feed_forward(q, w1, None, w2, None)
        expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert out.dtype == y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=2e-2, rtol=2e-2)
    (out.float().sum() + y.float().sum()).backward()
    assert q.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# The reference backend in low precision: the last fallback must meet the kernels' rule
# --------------------------------------------------------------------------------------------
LOW_PRECISION = [torch.float16, torch.bfloat16, torch.float32]


def _check_low_precision(run, naive, leaves64, dtype, names):
    """run/naive: tensors -> output; the reference backend (run) in ``dtype`` against float64,
    with plain PyTorch (naive) in ``dtype`` as the baseline, for the output and every grad."""
    low = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    base = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    out, out_base, out64 = run(*low), naive(*base), naive(*leaves64)
    assert out.dtype == dtype
    assert_close_to_reference(out, out64, out_base, "out")
    dout64 = torch.randn_like(out64)
    grads = torch.autograd.grad(out, low, dout64.to(dtype))
    grads_base = torch.autograd.grad(out_base, base, dout64.to(dtype))
    grads64 = torch.autograd.grad(out64, leaves64, dout64)
    for name, g, gb, g64 in zip(names, grads, grads_base, grads64):
        assert g.dtype == dtype
        assert_close_to_reference(g, g64, gb, name)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_attention_low_precision(dtype, d, causal):
    q, k, v = _qkv(1, 113, 203, 2, 1, d)
    kpm = torch.rand(1, 203) > 0.2
    kpm[:, -1] = True  # bottom-right causal: the last key is seen by every query
    align = "bottom_right" if causal else None
    run = lambda q, k, v: fastattn.flash_attention(q, k, v, causal=causal, key_padding_mask=kpm, backend="reference")  # noqa: E731
    naive = lambda q, k, v: naive_attention(q, k, v, scale=d**-0.5, causal=align, kpm=kpm)  # noqa: E731
    _check_low_precision(run, naive, [q, k, v], dtype, ["dq", "dk", "dv"])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_reference_norm_low_precision(dtype, kind):
    x, r = (torch.randn(7, 203, dtype=F64, requires_grad=True) for _ in range(2))
    w, b = torch.randn(203, dtype=F64, requires_grad=True), torch.randn(203, dtype=F64, requires_grad=True)
    if kind == "layer":
        run = lambda x, r, w, b: fastattn.add_layer_norm(x, r, w, b, backend="reference")  # noqa: E731
        naive = lambda x, r, w, b: F.layer_norm(x + r, (203,), w, b)  # noqa: E731
        leaves, names = [x, r, w, b], ["dx", "dresidual", "dweight", "dbias"]
    else:
        run = lambda x, r, w: fastattn.rms_norm(x, r, w, eps=1e-6, backend="reference")  # noqa: E731
        naive = lambda x, r, w: F.rms_norm(x + r, (203,), w, eps=1e-6)  # noqa: E731
        leaves, names = [x, r, w], ["dx", "dresidual", "dweight"]
    _check_low_precision(run, naive, leaves, dtype, names)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_reference_feed_forward_low_precision(dtype, activation):
    d_model, d_ff = 40, 113
    d_hidden = 2 * d_ff if activation == "swiglu" else d_ff
    x = torch.randn(7, d_model, dtype=F64, requires_grad=True)
    w1 = (torch.randn(d_hidden, d_model, dtype=F64) * d_model**-0.5).requires_grad_()
    w2 = (torch.randn(d_model, d_ff, dtype=F64) * d_ff**-0.5).requires_grad_()
    b1, b2 = torch.randn(d_hidden, dtype=F64, requires_grad=True), torch.randn(d_model, dtype=F64, requires_grad=True)
    run = lambda x, w1, b1, w2, b2: fastattn.feed_forward(x, w1, b1, w2, b2, activation=activation, backend="reference")  # noqa: E731
    naive = lambda x, w1, b1, w2, b2: F.linear(_torch_activation(F.linear(x, w1, b1), activation), w2, b2)  # noqa: E731
    _check_low_precision(run, naive, [x, w1, b1, w2, b2], dtype, ["dx", "dw1", "db1", "dw2", "db2"])
