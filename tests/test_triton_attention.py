"""Triton FlashAttention (fastattn.triton.attention) against the float64 reference.

Runs the kernels on the GPU when there is one, else on CPU tensors through the Triton
interpreter (tests/conftest.py). Tolerance: tests/helpers.py (kernel error vs the float64
reference <= 2 x the error of plain PyTorch attention in the same dtype, + atol). Dropout: the
reference is given the kernel's own keep mask (fastattn.triton.attention.dropout_mask).

The grid is lean on purpose (the interpreter is slow): one axis at a time around a base case,
then a few combinations. Every case also checks that rows which see no key give output 0,
lse -inf and zero dQ, and that nothing is NaN.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import fastattn
from fastattn.options import AttentionInputs, AttentionOptions, RngState
from fastattn.reference import attention as reference
from fastattn.triton import attention as tattn
from attention_cases import AttentionCase, attention_keep_mask, check_against_reference, make_inputs
from conftest import requires_cuda


@dataclasses.dataclass(frozen=True)
class Case(AttentionCase):
    heads_kv: int = 2
    seqlen_q: int = 77
    seqlen_k: int = 131


def _make(case: Case, device: str):
    return make_inputs(case, device)


def _run_triton(inputs, options, rng, dout=None):
    out, lse = tattn.forward(inputs, options, rng)
    if dout is None:
        dout = torch.randn_like(out)
    grads = tattn.backward(dout, out, lse, inputs, options, rng)
    return out, lse, dout, grads


def _check(case: Case, device: str, expect_dead_rows: bool = False) -> None:
    inputs, options, rng = _make(case, device)
    _check_inputs(inputs, options, rng, expect_dead_rows)


def _check_inputs(inputs, options, rng, expect_dead_rows: bool = False) -> None:
    check_against_reference(tattn, inputs, options, rng, expect_dead_rows)


# --------------------------------------------------------------------------------------------
# Correctness grid: one axis at a time, then combinations
# --------------------------------------------------------------------------------------------
SEQLENS = [(1, 1), (113, 203), (128, 217), (256, 128)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
def test_seqlens(seqlens, causal, device):
    _check(Case(batch=2, seqlen_q=seqlens[0], seqlen_k=seqlens[1], causal=causal), device)


def test_long_sequence(device):
    _check(Case(heads=1, heads_kv=1, seqlen_q=1023, seqlen_k=1024, causal=True), device)


@pytest.mark.parametrize("head_dim", [8, 40, 64, 80, 128, 256])
def test_head_dims(head_dim, device):
    _check(Case(head_dim=head_dim, dtype=torch.bfloat16), device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes(dtype, device):
    _check(Case(dtype=dtype, heads=4, heads_kv=2, head_dim=80, causal=True), device)


FEATURES = [
    Case(causal=True, alignment="bottom_right", seqlen_q=131, seqlen_k=77),
    Case(causal=True, alignment="top_left", seqlen_q=131, seqlen_k=77),
    Case(causal=True, alignment="top_left"),
    Case(heads=4, heads_kv=2),
    Case(heads=3, heads_kv=1, dtype=torch.bfloat16),
    Case(kpm=True),
    Case(mask="bool"),
    Case(mask="float", dtype=torch.bfloat16),
    Case(mask="float32", dtype=torch.float32),
    Case(dropout_p=0.17),
    Case(dropout_p=0.3, deterministic=True, dtype=torch.float32),
    Case(deterministic=True, heads=4, heads_kv=1),
]


@pytest.mark.parametrize("case", FEATURES, ids=str)
def test_features(case, device):
    _check(case, device)


COMBINATIONS = [
    Case(batch=2, heads=4, heads_kv=2, causal=True, alignment="top_left", kpm=True, dropout_p=0.2,
         dtype=torch.bfloat16),
    Case(heads=3, heads_kv=1, causal=True, mask="float", dropout_p=0.1, deterministic=True, seqlen_q=150,
         seqlen_k=97, head_dim=40),
    Case(heads=4, heads_kv=2, causal=True, kpm=True, mask="bool", head_dim=96, dtype=torch.float32),
    Case(heads=2, heads_kv=1, kpm=True, mask="float32", dropout_p=0.25, seqlen_q=64, seqlen_k=64, head_dim=128),
    # D=256: the backward splits the head dim over two programs per block (interpreter config).
    Case(heads=2, heads_kv=1, causal=True, kpm=True, mask="bool", dropout_p=0.2, seqlen_q=45, seqlen_k=70,
         head_dim=256, dtype=torch.bfloat16),
    Case(heads=2, heads_kv=1, causal=True, seqlen_q=40, seqlen_k=50, head_dim=256, dtype=torch.float32),
]


@pytest.mark.parametrize("case", COMBINATIONS, ids=str)
def test_combinations(case, device):
    _check(case, device)


# --------------------------------------------------------------------------------------------
# Rows that see no key: output 0, lse -inf, zero gradients, never NaN
# --------------------------------------------------------------------------------------------
def test_causal_rows_before_the_first_key(device):
    # Bottom-right alignment with Lq > Lk: the first Lq - Lk queries see nothing.
    _check(Case(heads=4, heads_kv=2, causal=True, seqlen_q=150, seqlen_k=40), device, expect_dead_rows=True)


def test_padding_mask_all_false_for_one_batch_element(device):
    case = Case(batch=3, heads=2, heads_kv=1, kpm=True, dropout_p=0.1, causal=True, seqlen_q=70, seqlen_k=90)
    inputs, options, rng = _make(case, device)
    kpm = inputs.key_padding_mask.clone()
    kpm[1] = False
    inputs = dataclasses.replace(inputs, key_padding_mask=kpm)
    _check_inputs(inputs, options, rng, expect_dead_rows=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_float_mask_rows_all_neg_inf(dtype, device):
    case = Case(mask="float", dtype=dtype, seqlen_q=45, seqlen_k=70)
    inputs, options, rng = _make(case, device)
    bias = inputs.attn_mask.contiguous()
    bias[:, :, 3] = float("-inf")
    bias[0, 1, 40:] = float("-inf")
    inputs = dataclasses.replace(inputs, attn_mask=bias)
    _check_inputs(inputs, options, rng, expect_dead_rows=True)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------
def _dropout_case(device, **kw):
    return _make(Case(dropout_p=0.3, batch=2, heads=2, heads_kv=1, seqlen_q=67, seqlen_k=90, causal=True, **kw), device)


def test_dropout_same_seed_same_result(device):
    inputs, options, rng = _dropout_case(device, deterministic=True)
    out1, lse1, dout, grads1 = _run_triton(inputs, options, rng)
    out2, lse2, _, grads2 = _run_triton(inputs, options, RngState(rng.seed, rng.offset), dout)
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


def test_dropout_different_seed_or_offset_differs(device):
    inputs, options, rng = _dropout_case(device)
    out = tattn.forward(inputs, options, rng)[0]
    for other in (RngState(rng.seed ^ 1, rng.offset), RngState(rng.seed, rng.offset + 1)):
        assert not torch.equal(out, tattn.forward(inputs, options, other)[0])
        assert not torch.equal(tattn.dropout_mask(inputs, options, rng), tattn.dropout_mask(inputs, options, other))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(p, device):
    inputs, _, rng = _dropout_case(device)
    options = AttentionOptions(softmax_scale=0.125, dropout_p=p)
    keep = tattn.dropout_mask(inputs, options, rng)
    assert keep.shape == (inputs.batch, inputs.nheads, inputs.seqlen_q, inputs.seqlen_k) and keep.dtype == torch.bool
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    # Independent streams per (batch, head): no two heads share a mask.
    flat = keep.flatten(0, 1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(len(flat)) for j in range(i))


def test_dropout_mask_matches_the_documented_philox_mapping(device):
    """keep(b, h, i, j) = word 2 * ((i // 8) % 2) + (j // 8) % 2 of Philox(seed; gj, gi,
    b * H + h, offset) with gi = (i // 16) * 8 + i % 8, as a uniform >= p (module docstring)."""
    inputs, options, rng = _dropout_case(device)
    keep = tattn.dropout_mask(inputs, options, rng).cpu().numpy()
    b, h, lq, lk = keep.shape
    assert np.array_equal(keep, attention_keep_mask(b, h, lq, lk, options.dropout_p, rng))


def test_dropout_mask_is_a_function_of_the_indices(device):
    """keep(b, h, i, j) depends on (seed, offset, b, h, i, j) only, not on the problem size."""
    inputs, options, rng = _dropout_case(device)
    small = AttentionInputs(inputs.q[:, :40], inputs.k[:, :50], inputs.v[:, :50])
    assert torch.equal(tattn.dropout_mask(small, options, rng), tattn.dropout_mask(inputs, options, rng)[:, :, :40, :50])


# --------------------------------------------------------------------------------------------
# Determinism, strides, public API
# --------------------------------------------------------------------------------------------
def test_backward_is_bitwise_reproducible(device):
    # No atomics: deterministic=True and the default give the same bits, run after run.
    inputs, options, rng = _make(Case(heads=4, heads_kv=1, causal=True, kpm=True), device)
    out, lse, dout, grads1 = _run_triton(inputs, options, rng)
    for deterministic in (True, False):
        opts = dataclasses.replace(options, deterministic=deterministic)
        grads2 = tattn.backward(dout, out, lse, inputs, opts, rng)
        for g1, g2 in zip(grads1, grads2):
            assert torch.equal(g1, g2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_packed_qkv_views(dtype, device):
    b, l, h, d = 2, 75, 3, 40
    qkv = torch.randn(b, l, 3, h, d, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)  # strided views, no copy
    assert not q.is_contiguous()
    options = AttentionOptions(softmax_scale=d ** -0.5, causal=True, dropout_p=0.1, deterministic=True)
    rng = RngState.draw()
    packed = AttentionInputs(q, k, v)
    dout = torch.randn(b, h, l, d, device=device, dtype=dtype).transpose(1, 2)  # non-contiguous gradient too
    out, lse, _, grads = _run_triton(packed, options, rng, dout)
    dense = AttentionInputs(q.contiguous(), k.contiguous(), v.contiguous())
    out_d, lse_d, _, grads_d = _run_triton(dense, options, rng, dout.contiguous())
    assert out.is_contiguous() and all(g.is_contiguous() for g in grads)
    assert torch.equal(out, out_d) and torch.equal(lse, lse_d)
    for g, g_d in zip(grads, grads_d):
        assert torch.equal(g, g_d)
    _check_inputs(packed, options, rng)


def test_public_api_autograd(device):
    b, lq, lk, h, hkv, d = 2, 37, 51, 4, 2, 32
    q = torch.randn(b, lq, h, d, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(b, lk, hkv, d, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(b, lk, hkv, d, device=device, dtype=torch.float16, requires_grad=True)
    kpm = torch.rand(b, lk, device=device) > 0.2
    results = {}
    for backend in ("triton", "reference"):
        out, lse = fastattn.flash_attention(q, k, v, causal=True, key_padding_mask=kpm, return_lse=True, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results[backend] = (out, lse, grads)
    (out_t, lse_t, grads_t), (out_r, lse_r, grads_r) = results["triton"], results["reference"]
    torch.testing.assert_close(out_t, out_r, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse_t, lse_r, rtol=1e-4, atol=1e-4)
    for gt, gr in zip(grads_t, grads_r):
        torch.testing.assert_close(gt, gr, rtol=1e-2, atol=1e-2)

    # SDPA layout (N, H, L, E), top-left causal, additive mask broadcast over the batch.
    qs, ks, vs = (t.detach().transpose(1, 2).repeat_interleave(h // t.shape[2], dim=1) for t in (q, k, v))
    bias = torch.randn(h, lq, lk, device=device, dtype=torch.float16)
    sdpa = {
        backend: fastattn.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias, backend=backend)
        for backend in ("triton", "reference")
    }
    torch.testing.assert_close(sdpa["triton"], sdpa["reference"], rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------
# GPU only: 128k-token sequences and tensors past 2^31 elements (int64 offsets)
# --------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("seqlens", [(16, 131072), (131072, 16)], ids=["lk128k", "lq128k"])
def test_max_seqlen_gpu(seqlens, device):
    _check(Case(batch=1, heads=2, heads_kv=1, seqlen_q=seqlens[0], seqlen_k=seqlens[1], head_dim=64,
                dtype=torch.bfloat16, causal=seqlens[0] < seqlens[1]), device)


@requires_cuda
def test_int64_offsets_gpu(device):
    b, lq, lk, h, d = 1, 131072, 16, 128, 128  # q, out and dq hold 2^31 elements each
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    q = torch.randn(b, lq, h, d, device=device, dtype=torch.float16)
    k = torch.randn(b, lk, h, d, device=device, dtype=torch.float16)
    v = torch.randn(b, lk, h, d, device=device, dtype=torch.float16)
    options = AttentionOptions(softmax_scale=d ** -0.5, deterministic=True)
    inputs = AttentionInputs(q, k, v)
    out, lse = tattn.forward(inputs, options, None)
    dout = torch.randn_like(out)
    dq, dk, dv = tattn.backward(dout, out, lse, inputs, options, None)
    # The last head's rows sit past 2^31 elements: check that head against the reference.
    last = AttentionInputs(q[:, :, -1:].double(), k[:, :, -1:].double(), v[:, :, -1:].double())
    out64, lse64 = reference.forward(last, options, None)
    grads64 = reference.backward(dout[:, :, -1:].double(), out64, lse64, last, options, None)
    torch.testing.assert_close(out[:, :, -1:].double(), out64, rtol=0, atol=5e-3)
    torch.testing.assert_close(lse[:, -1:].double(), lse64.double(), rtol=0, atol=1e-3)
    for grad, grad64 in zip((dq, dk, dv), grads64):
        scale = grad64.abs().max().item()
        torch.testing.assert_close(grad[:, :, -1:].double(), grad64, rtol=0, atol=5e-3 * scale)
