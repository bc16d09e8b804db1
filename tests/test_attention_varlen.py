"""flash_attention_varlen on the reference backend: the shared cases of
tests/attention_extras_cases.py against the explicit float64 formula (output, lse, every
gradient), equality with per-sequence flash_attention calls, dropout self-consistency (and a
float64 gradcheck with the dropout seed fixed), and the validation of cu_seqlens / max_seqlen
before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.reference import attention as ref_attention
from attention_extras_cases import (
    VARLEN_CASES,
    VARLEN_DROPOUT_CASES,
    VarlenCase,
    check_varlen,
    check_varlen_dropout,
    check_varlen_matches_per_sequence,
    make_varlen,
)


@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_matches_explicit_formula(case):
    check_varlen(case, "reference", "cpu")


@pytest.mark.parametrize("case", [VARLEN_CASES[i] for i in (1, 5, 7)], ids=str)
def test_varlen_equals_per_sequence_calls(case):
    check_varlen_matches_per_sequence(case, "reference", "cpu")


@pytest.mark.parametrize("case", VARLEN_DROPOUT_CASES, ids=str)
def test_varlen_dropout_self_consistent(case):
    check_varlen_dropout(case, "reference", "cpu")


def test_varlen_dropout_gradcheck_float64():
    """With the seed fixed the dropout mask is fixed, so autograd's gradients must match finite
    differences of the forward: backward regenerates forward's mask."""
    args = make_varlen(VarlenCase(seqlens_q=(3, 1, 4), seqlens_k=(5, 2, 0), heads=2, heads_kv=1, head_dim=8,
                                  causal=True, softcap=3.0, alibi="bh", dropout_p=0.3), "cpu")
    rest = {name: value for name, value in args.items() if name not in ("q", "k", "v")}

    def run(q, k, v):
        torch.manual_seed(99)
        return fastattn.flash_attention_varlen(q, k, v, **rest, backend="reference")

    assert torch.autograd.gradcheck(run, (args["q"], args["k"], args["v"]))


def test_varlen_under_autocast_runs_in_the_autocast_dtype():
    args = make_varlen(VarlenCase(seqlens_q=(7, 1), head_dim=16, dtype=torch.float32), "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastattn.flash_attention_varlen(**args, backend="reference")
    assert out.dtype == torch.bfloat16 and out.shape == args["q"].shape
    out.float().sum().backward()
    assert args["q"].grad.dtype == torch.float32


def _cu(*offsets, dtype=torch.int32):
    return torch.tensor(offsets, dtype=dtype)


def _base_args() -> dict:
    """3 sequences: q lengths (3, 0, 4), k lengths (2, 3, 4)."""
    return dict(q=torch.randn(7, 4, 8), k=torch.randn(9, 2, 8), v=torch.randn(9, 2, 8),
                cu_seqlens_q=_cu(0, 3, 3, 7), cu_seqlens_k=_cu(0, 2, 5, 9), max_seqlen_q=4, max_seqlen_k=4)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"cu_seqlens_q": _cu(0, 3, 3, 7, dtype=torch.int64)}, TypeError, "cu_seqlens_q must have dtype torch.int32"),
        ({"cu_seqlens_k": [0, 2, 5, 9]}, TypeError, "cu_seqlens_k must be a torch.Tensor"),
        ({"cu_seqlens_k": _cu(0, 2, 5, 9)[None]}, ValueError, "cu_seqlens_k must be 1-D"),
        ({"cu_seqlens_q": _cu(0)}, ValueError, r"cu_seqlens_q must be 1-D \(batch \+ 1,\) with batch >= 1"),
        ({"cu_seqlens_k": _cu(0, 5, 9)}, ValueError, "cu_seqlens_k must have cu_seqlens_q's shape"),
        ({"cu_seqlens_q": _cu(1, 3, 3, 7)}, ValueError, "cu_seqlens_q must start at 0"),
        ({"cu_seqlens_k": _cu(0, 5, 2, 9)}, ValueError, r"cu_seqlens_k must be non-decreasing .*\[2\] = 2"),
        ({"cu_seqlens_q": _cu(0, 3, 3, 6)}, ValueError, r"cu_seqlens_q\[-1\] \(6\) must equal the number of packed"),
        ({"cu_seqlens_k": _cu(0, 2, 5, 10)}, ValueError, r"cu_seqlens_k\[-1\] \(10\) must equal"),
        ({"max_seqlen_q": 3}, ValueError, r"max_seqlen_q \(3\) must be >= the longest sequence in cu_seqlens_q \(4\)"),
        ({"max_seqlen_k": 4.0}, TypeError, "max_seqlen_k must be an int"),
        ({"q": torch.randn(1, 7, 4, 8)}, ValueError, "q must be 3-D"),
        ({"k": torch.randn(9, 3, 8), "v": torch.randn(9, 3, 8)}, ValueError, "must be a multiple of"),
        ({"v": torch.randn(9, 2, 4)}, ValueError, "v must have shape"),
        ({"k": torch.randn(9, 2, 8, dtype=torch.float64)}, TypeError, "k must have the same dtype as q"),
        ({"alibi_slopes": torch.rand(4, 4)}, ValueError, r"alibi_slopes must have shape .* \(batch, nheads\) = \(3, 4\)"),
        ({"window_size": (-3, 0)}, ValueError, r"window_size\[0\] must be >= -1"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
    ],
)
def test_varlen_rejects_bad_arguments_before_any_kernel(monkeypatch, overrides, error, match):
    def kernel_ran(*args, **kwargs):
        raise AssertionError("validation must reject the call before any kernel runs")

    monkeypatch.setattr(ref_attention, "forward", kernel_ran)
    with pytest.raises(error, match=match):
        fastattn.flash_attention_varlen(**{**_base_args(), **overrides}, backend="reference")


def test_varlen_accepts_larger_max_seqlen_and_empty_sequences():
    args = _base_args()
    out, lse = fastattn.flash_attention_varlen(**{**args, "max_seqlen_q": 100, "max_seqlen_k": 100},
                                               return_lse=True, backend="reference")
    assert torch.equal(out, fastattn.flash_attention_varlen(**args, backend="reference"))
    assert lse.shape == (4, 7)
