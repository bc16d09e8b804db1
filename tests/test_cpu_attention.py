"""C++ CPU FlashAttention (fastattn.cpu.attention, csrc/cpu/attention.cpp) against the float64
reference.

Tolerance: tests/helpers.py (kernel error vs the float64 reference <= 2 x the error of plain
PyTorch attention in the same dtype, + atol). Dropout: the reference is given the kernel's
own keep mask (fastattn.cpu.attention.dropout_mask), so forward and backward are checked to
use one mask; that mask is checked bit for bit against the Triton backend's documented Philox
mapping. Every case also checks that rows which see no key give output 0, lse -inf and zero
dQ, and that nothing is NaN. The extension is built once per test session (cached).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
import torch

import fastattn
from fastattn.backends import BackendNotSupportedError, select
from fastattn.cpu import attention as cattn
from fastattn.options import AttentionInputs, AttentionOptions, RngState
from attention_cases import AttentionCase, attention_keep_mask, check_against_reference, make_inputs


@dataclasses.dataclass(frozen=True)
class Case(AttentionCase):
    dtype: torch.dtype = torch.float32
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None  # "h" (H,) or "bh" (B, H)
    packed: bool = False
    dead_rows: bool = False

    def _flags(self) -> tuple:
        return (*super()._flags(), ("packed", self.packed), ("dead", self.dead_rows),
                (f"win{self.window[0]}_{self.window[1]}", self.window != (-1, -1)),
                (f"cap{self.softcap}", self.softcap > 0), (f"alibi-{self.alibi}", self.alibi is not None))


def _make(case: Case):
    inputs, options, rng = make_inputs(case, "cpu", dead_rows=case.dead_rows)
    slopes = None
    if case.alibi is not None:
        shape = (case.heads,) if case.alibi == "h" else (case.batch, case.heads)
        slopes = torch.rand(shape) * 0.5
    inputs = dataclasses.replace(inputs, alibi_slopes=slopes)
    right = 0 if case.causal else case.window[1]
    options = dataclasses.replace(options, window_left=case.window[0], window_right=right, softcap=case.softcap)
    return inputs, options, rng


def _check(case: Case) -> None:
    inputs, options, rng = _make(case)
    _check_inputs(inputs, options, rng, expect_dead_rows=case.dead_rows)


def _check_inputs(inputs, options, rng, expect_dead_rows: bool = False) -> None:
    check_against_reference(cattn, inputs, options, rng, expect_dead_rows)


# --------------------------------------------------------------------------------------------
# Correctness grid: one axis at a time, then features and combinations
# --------------------------------------------------------------------------------------------
SEQLENS = [(1, 1), (7, 7), (1, 203), (113, 203), (203, 113), (300, 600)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
def test_seqlens(seqlens, causal):
    _check(Case(batch=2, seqlen_q=seqlens[0], seqlen_k=seqlens[1], causal=causal))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_long_rows(causal):
    # Rows over several 512-key forward blocks and dK / dV sums over many 128-query blocks; keys
    # growing along the sequence move the row maximum by more than the forward's lazy-max slack
    # (kLazyMaxSlack = 8) again and again, so the rescaling of stored P, sums and O is exercised.
    case = Case(batch=1, heads=1, heads_kv=1, seqlen_q=1500, seqlen_k=1700, causal=causal)
    inputs, options, rng = _make(case)
    ramp = torch.linspace(0.5, 6.0, case.seqlen_k).view(1, -1, 1, 1)
    k = (inputs.k.detach() * ramp).requires_grad_(inputs.k.requires_grad)
    _check_inputs(dataclasses.replace(inputs, k=k), options, rng)


@pytest.mark.parametrize("head_dim", [1, 8, 40, 80, 96, 128, 256])
def test_head_dims(head_dim):
    _check(Case(head_dim=head_dim, seqlen_q=113, seqlen_k=203, causal=head_dim % 3 == 0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype):
    _check(Case(dtype=dtype, heads=4, heads_kv=2, head_dim=80, causal=True))


FEATURES = [
    Case(causal=True, alignment="bottom_right", seqlen_q=131, seqlen_k=77),
    Case(causal=True, alignment="top_left", seqlen_q=131, seqlen_k=77),
    Case(causal=True, alignment="top_left"),
    Case(heads=4, heads_kv=2),
    Case(heads=3, heads_kv=1, dtype=torch.bfloat16),
    Case(packed=True, seqlen_q=131, seqlen_k=131, causal=True),
    Case(kpm=True, batch=2),
    Case(mask="bool", batch=2),
    Case(mask="float", dtype=torch.bfloat16, batch=2),
    Case(mask="float", dtype=torch.float16),
    Case(mask="float32", batch=2),
    Case(dropout_p=0.17, heads=4, heads_kv=2),
    Case(dropout_p=0.3, dtype=torch.bfloat16, causal=True, seqlen_q=203, seqlen_k=300),
    Case(window=(16, 8), seqlen_q=203, seqlen_k=300),
    Case(window=(0, -1)),
    Case(window=(-1, 0), alignment="top_left"),
    Case(window=(40, -1), causal=True, seqlen_q=300, seqlen_k=300),
    Case(window=(3, 2), alignment="top_left", seqlen_q=131, seqlen_k=77),
    Case(softcap=5.0),
    Case(softcap=2.0, dtype=torch.bfloat16, causal=True),
    Case(alibi="h", heads=4, heads_kv=1),
    Case(alibi="bh", batch=2, causal=True, alignment="top_left"),
    Case(alibi="h", softcap=10.0, window=(30, 10), kpm=True, mask="float32", dropout_p=0.1, batch=2),
    Case(heads=4, heads_kv=1, causal=True, kpm=True, mask="bool", dropout_p=0.2, dtype=torch.float16, batch=2),
]


@pytest.mark.parametrize("case", FEATURES, ids=str)
def test_features(case):
    _check(case)


DEAD = [
    Case(kpm=True, dead_rows=True, batch=2),
    Case(mask="bool", dead_rows=True),
    Case(mask="float32", dead_rows=True, dtype=torch.float32),
    Case(mask="float", dead_rows=True, dtype=torch.bfloat16, causal=True),
]


@pytest.mark.parametrize("case", DEAD, ids=str)
def test_rows_that_see_no_key(case):
    _check(case)


def test_rows_outside_the_window_see_no_key():
    # top-left alignment with Lq > Lk: queries i >= Lk + 3 have their window [i - 3, i] past the keys.
    inputs, options, rng = _make(Case(seqlen_q=131, seqlen_k=77, window=(3, 0), alignment="top_left"))
    _check_inputs(inputs, options, rng, expect_dead_rows=True)


# --------------------------------------------------------------------------------------------
# Dropout, determinism, strides
# --------------------------------------------------------------------------------------------
def test_dropout_mask_is_the_triton_mask():
    """Bit for bit the mapping documented in fastattn/triton/attention.py (numpy Philox)."""
    options = AttentionOptions(softmax_scale=0.125, dropout_p=0.3)
    rng = RngState(seed=123456789, offset=987654)
    inputs = AttentionInputs(*(torch.randn(2, n, 3, 8) for n in (37, 53, 53)))
    keep = cattn.dropout_mask(inputs, options, rng).numpy()
    p32 = float(np.float32(options.dropout_p))
    assert np.array_equal(keep, attention_keep_mask(2, 3, 37, 53, p32, rng))
    n = keep.size
    assert abs(keep.mean() - 0.7) < 5 * (0.21 / n) ** 0.5


def test_dropout_is_regenerated_not_stored():
    # Same rng: same output; different offset: different output; forward-backward pairs agree
    # with the reference given the mask (test_features).
    inputs, options, rng = _make(Case(dropout_p=0.25))
    out1, _ = cattn.forward(inputs, options, rng)
    out2, _ = cattn.forward(inputs, options, rng)
    out3, _ = cattn.forward(inputs, options, RngState(rng.seed, rng.offset + 1))
    assert torch.equal(out1, out2) and not torch.equal(out1, out3)


@pytest.mark.parametrize("case", [Case(heads=4, heads_kv=1, causal=True, kpm=True, seqlen_q=300, seqlen_k=600),
                                  Case(batch=3, heads=8, heads_kv=8, seqlen_q=200, seqlen_k=200,
                                       dtype=torch.bfloat16)], ids=str)
def test_backward_is_bitwise_reproducible_for_any_thread_count(case):
    # Key splits are chosen by shape (the first case splits its 5 key blocks over tasks).
    inputs, options, rng = _make(case)
    out, lse = cattn.forward(inputs, options, rng)
    dout = torch.randn_like(out)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            for deterministic in (False, True):
                opts = dataclasses.replace(options, deterministic=deterministic)
                results.append(cattn.backward(dout, out, lse, inputs, opts, rng))
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], grads))


def test_strided_views_are_not_copied_and_match_contiguous():
    inputs, options, rng = _make(Case(packed=True, seqlen_q=96, seqlen_k=96, heads=3, heads_kv=3))
    assert not inputs.q.is_contiguous()
    contiguous = AttentionInputs(*(t.contiguous() for t in (inputs.q, inputs.k, inputs.v)))
    out_view, lse_view = cattn.forward(inputs, options, rng)
    out_cont, lse_cont = cattn.forward(contiguous, options, rng)
    assert torch.equal(out_view, out_cont) and torch.equal(lse_view, lse_cont)


# --------------------------------------------------------------------------------------------
# Public API, selection, bad inputs
# --------------------------------------------------------------------------------------------
def test_public_api_runs_the_cpu_backend_with_autograd():
    q = torch.randn(2, 67, 4, 40, requires_grad=True)
    k = torch.randn(2, 91, 2, 40, requires_grad=True)
    v = torch.randn(2, 91, 2, 40, requires_grad=True)
    slopes = torch.rand(4)
    kwargs = dict(causal=True, window_size=(20, 0), softcap=8.0, alibi_slopes=slopes)
    out = fastattn.flash_attention(q, k, v, backend="cpu", **kwargs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = fastattn.flash_attention(*ref, backend="reference", **kwargs)
    grads64 = torch.autograd.grad(out64, ref, dout.double())
    for got, want in zip((out, *grads), (out64, *grads64)):
        assert (got.double() - want).abs().max().item() < 1e-4


def test_sdpa_drop_in_with_broadcast_mask_picks_cpu():
    q, k, v = (torch.randn(2, 4, 50, 32) for _ in range(3))
    mask = torch.randn(50, 50)
    assert select("attention", AttentionInputs(*(t.transpose(1, 2) for t in (q, k, v))),
                  AttentionOptions(softmax_scale=1.0)).name == "cpu"
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                                 attn_mask=mask.double())
    assert (out.double() - expected).abs().max().item() < 1e-5


def test_unsupported_calls_name_the_reason():
    q = torch.randn(1, 8, 2, 300)
    with pytest.raises(BackendNotSupportedError, match="head_dim 300"):
        fastattn.flash_attention(q, q, q, backend="cpu")
    q64 = torch.randn(1, 8, 2, 16, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="float64"):
        fastattn.flash_attention(q64, q64, q64, backend="cpu")


def test_op_boundary_rejects_bad_tensors():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(RuntimeError, match="head dim must be contiguous"):
        torch.ops.fastattn.cpu_attention_fwd(q.transpose(1, 3), q, q, None, None, None, 0.25, 0.0, False, 0,
                                             -1, -1, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        torch.ops.fastattn.cpu_attention_fwd(q, q, q, None, None, torch.rand(3), 0.25, 0.0, False, 0, -1, -1,
                                             0.0, 0, 0)
    with pytest.raises(ValueError, match="RngState"):
        cattn.forward(AttentionInputs(q, q, q), AttentionOptions(softmax_scale=0.25, dropout_p=0.1), None)


def test_opcheck():
    cattn.register_python_ops()
    q = torch.randn(2, 37, 4, 24)
    k = torch.randn(2, 45, 2, 24)
    v = torch.randn(2, 45, 2, 24)
    kpm = torch.rand(2, 45) > 0.2
    mask = (torch.rand(1, 4, 37, 45) > 0.3).expand(2, 4, 37, 45)
    tail = (torch.rand(4), 24 ** -0.5, 5.0, True, 8, 20, -1, 0.2, 1234, 56)
    args = (q, k, v, kpm, mask, *tail)
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_fwd.default, args)
    out, lse = torch.ops.fastattn.cpu_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, kpm, mask, *tail)
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_bwd.default, bwd_args)
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_dropout_mask.default, (1, 2, 17, 19, 0.5, 7, 8))
    # the eager path's C++ autograd node over the two (csrc/cpu/autograd.cpp)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(torch.ops.fastattn.cpu_attention_autograd.default, (*leaves, kpm, mask, *tail))


def test_second_process_builds_nothing():
    from fastattn import _build

    assert _build.load_cpu_extension() is None
    code = "from fastattn import _build; assert _build.load_cpu_extension() is None; print(_build.cpu_extension_path())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                            check=True)
    assert "building" not in result.stderr, result.stderr
    assert result.stdout.strip() == _build.cpu_extension_path()
