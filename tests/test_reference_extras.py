"""Reference backend, flash-attn 2 extras (window, softcap, ALiBi): against autograd through an
explicit float64 formula written independently of fastattn/reference/attention.py
(tests/attention_extras_cases.py)."""

import pytest
import torch

import fastattn
from attention_extras_cases import explicit_attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (3, 2), (0, -1), (-1, 0)])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("lq,lk", [(7, 11), (11, 7)])
def test_reference_extras_match_explicit_formula(causal, window, softcap, alibi, lq, lk):
    q = torch.randn(2, lq, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, lk, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, lk, 2, 16, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(4) if alibi else None
    out = fastattn.flash_attention(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                   alibi_slopes=slopes, backend="reference")
    expected, _ = explicit_attention(q, k, v, causal=causal, window=window, softcap=softcap, slopes=slopes)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *got), (expected, *want)):
        assert (a - b).abs().max().item() < 1e-10, name


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"window_size": 3}, TypeError, "window_size must be a pair"),
        ({"window_size": (-2, 0)}, ValueError, r"window_size\[0\] must be >= -1"),
        ({"window_size": (1, 2.0)}, TypeError, r"window_size\[1\] must be an int"),
        ({"softcap": -1.0}, ValueError, "softcap must be a finite float >= 0"),
        ({"softcap": "x"}, TypeError, "softcap must be a float"),
        ({"alibi_slopes": torch.rand(3)}, ValueError, "alibi_slopes must have shape"),
        ({"alibi_slopes": torch.rand(4, dtype=torch.float64)}, TypeError, "alibi_slopes must have dtype"),
    ],
)
def test_extras_bad_arguments(kwargs, error, match):
    q = torch.randn(1, 3, 4, 8)
    k = v = torch.randn(1, 3, 2, 8)
    with pytest.raises(error, match=match):
        fastattn.flash_attention(q, k, v, **kwargs)
