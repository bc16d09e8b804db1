"""Bad input raises ValueError/TypeError naming the argument, before any kernel runs."""

import re

import pytest
import torch

import fastattn

Q = lambda *s, dtype=torch.float32: torch.randn(*s, dtype=dtype)  # noqa: E731


def _qkv(b=2, lq=5, lk=6, h=4, hkv=2, d=8, dtype=torch.float32):
    return Q(b, lq, h, d, dtype=dtype), Q(b, lk, hkv, d, dtype=dtype), Q(b, lk, hkv, d, dtype=dtype)


ATTENTION_CASES = [
    # (description, kwargs override builder, error type, message fragment)
    ("q not a tensor", lambda q, k, v: dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
    ("q 3-D", lambda q, k, v: dict(q=q[0]), ValueError, "q must be 4-D"),
    ("int dtype", lambda q, k, v: dict(q=q.long()), TypeError, "q must have dtype"),
    ("dtype mismatch", lambda q, k, v: dict(k=k.double()), TypeError, "k must have the same dtype as q"),
    ("batch mismatch", lambda q, k, v: dict(k=k[:1], v=v[:1]), ValueError, "k must have shape"),
    ("head dim mismatch", lambda q, k, v: dict(v=v[..., :4]), ValueError, "v must have shape"),
    ("k/v length mismatch", lambda q, k, v: dict(v=v[:, :3]), ValueError, "v must have shape"),
    ("heads not multiple", lambda q, k, v: dict(k=Q(2, 6, 3, 8), v=Q(2, 6, 3, 8)), ValueError, "multiple of k/v's nheads_kv"),
    ("empty", lambda q, k, v: dict(q=q[:, :0]), ValueError, "q must not be empty"),
    ("mask dtype", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 6)), TypeError, "key_padding_mask must have dtype torch.bool"),
    ("mask shape", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    ("dropout range", lambda q, k, v: dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    ("dropout type", lambda q, k, v: dict(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
    ("scale sign", lambda q, k, v: dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive"),
    ("causal type", lambda q, k, v: dict(causal=1), TypeError, "causal must be a bool"),
    ("backend name", lambda q, k, v: dict(backend="tpu"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_flash_attention_bad_input(case):
    _, override, error, fragment = case
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update(override(q, k, v))
    with pytest.raises(error, match=re.escape(fragment)):
        fastattn.flash_attention(**args)


def test_flash_attention_device_mismatch_is_reported():
    q, k, v = _qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match="k must be on the same device as q"):
        fastattn.flash_attention(q, meta, v)


SDPA_CASES = [
    ("rank mismatch", dict(key=Q(2, 6, 8)), ValueError, "same number of dims"),
    ("value dim differs", dict(value=Q(2, 3, 6, 4)), ValueError, "value must have key's shape"),
    ("gqa without flag", dict(key=Q(2, 1, 6, 8), value=Q(2, 1, 6, 8)), ValueError, "enable_gqa=True"),
    ("mask not broadcastable", dict(attn_mask=torch.ones(4, 6, dtype=torch.bool)), ValueError, "attn_mask of shape"),
    ("mask int", dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError, "attn_mask must be bool or floating"),
    ("mask and causal", dict(attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True), ValueError, "not both"),
    ("mask requires grad", dict(attn_mask=torch.zeros(5, 6, requires_grad=True)), ValueError, "must not require grad"),
]


@pytest.mark.parametrize("case", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_bad_input(case):
    _, override, error, fragment = case
    args = dict(query=Q(2, 3, 5, 8), key=Q(2, 3, 6, 8), value=Q(2, 3, 6, 8))
    args.update(override)
    with pytest.raises(error, match=re.escape(fragment)):
        fastattn.scaled_dot_product_attention(**args)


NORM_CASES = [
    ("x not tensor", dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ("x int", dict(x=torch.ones(3, 4, dtype=torch.int64)), TypeError, "x must have dtype"),
    ("residual shape", dict(residual=Q(3, 5)), ValueError, "residual must have shape"),
    ("weight shape", dict(weight=Q(5)), ValueError, "weight must have shape (hidden,)"),
    ("bias type", dict(bias=3.0), TypeError, "bias must be a torch.Tensor or None"),
    ("eps", dict(eps=0.0), ValueError, "eps must be a positive"),
    ("prenorm type", dict(prenorm="yes"), TypeError, "prenorm must be a bool"),
    ("dropout", dict(dropout_p=-0.1), ValueError, "dropout_p must be in [0, 1)"),
]


@pytest.mark.parametrize("case", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_add_layer_norm_bad_input(case):
    _, override, error, fragment = case
    args = dict(x=Q(3, 4))
    args.update(override)
    with pytest.raises(error, match=re.escape(fragment)):
        fastattn.add_layer_norm(**args)


FFN_CASES = [
    ("activation", dict(activation="tanh"), ValueError, "activation must be one of"),
    ("w1 shape", dict(w1=Q(7, 4)), ValueError, "w1 must have shape (d_hidden, d_model=5)"),
    ("w2 vs hidden", dict(w2=Q(3, 6)), ValueError, "w1 has 7 rows"),
    ("swiglu rows", dict(activation="swiglu"), ValueError, "2 * d_ff"),
    ("b1 shape", dict(b1=Q(6)), ValueError, "b1 must have shape"),
    ("w2 dtype", dict(w2=Q(3, 7, dtype=torch.float64)), TypeError, "w2 must have the same dtype as x"),
    ("w1 1-D", dict(w1=Q(35)), ValueError, "w1 must be 2-D"),
    ("recompute type", dict(recompute=None), TypeError, "recompute must be a bool"),
]


@pytest.mark.parametrize("case", FFN_CASES, ids=[c[0] for c in FFN_CASES])
def test_feed_forward_bad_input(case):
    _, override, error, fragment = case
    args = dict(x=Q(2, 5), w1=Q(7, 5), b1=Q(7), w2=Q(3, 7), b2=Q(3))
    args.update(override)
    with pytest.raises(error, match=re.escape(fragment)):
        fastattn.feed_forward(**args)


def _sparse(t):
    return t.to_sparse()


def _nested(t):
    return torch.nested.nested_tensor(list(t.unbind(0)))  # (the jagged layout takes seconds to set up)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [_sparse, _nested], ids=["sparse", "nested"])
def test_non_strided_tensors_are_rejected_by_name(layout):
    """Sparse and nested tensors have no strides for a kernel: TypeError naming the argument."""
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="q must be a dense"):
        fastattn.flash_attention(layout(q), k, v)
    x = Q(3, 4, 8)
    with pytest.raises(TypeError, match="residual must be a dense"):
        fastattn.add_layer_norm(x, layout(x))
    with pytest.raises(TypeError, match="x must be a dense"):
        fastattn.feed_forward(layout(x), Q(7, 8), None, Q(8, 7), None)


def test_feed_forward_under_autocast_still_names_a_bad_argument():
    x, w2 = Q(2, 5), Q(3, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="w1 must be a torch.Tensor"):
            fastattn.feed_forward(x, "w1", None, w2, None)


def test_empty_backend_name_is_an_error_not_automatic():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastattn.flash_attention(q, k, v, backend="")
