"""Shared attention test helpers for tests/test_triton_attention.py and
tests/test_cuda_attention.py: the case dataclass base, the input builder, the float64 cast of
the inputs and the plain-PyTorch baseline (the reference-error yardstick of tests/helpers.py)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from fastattn.options import AttentionInputs, AttentionOptions, RngState
from fastattn.reference import attention as reference
from helpers import assert_close_to_reference


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Fields common to both backends' cases; subclasses set their own defaults and may add
    flags (listed by ``_flags`` for the test id)."""

    batch: int = 1
    heads: int = 2
    heads_kv: int = 2
    seqlen_q: int = 77
    seqlen_k: int = 131
    head_dim: int = 64
    dtype: torch.dtype = torch.float16
    causal: bool = False
    alignment: str = "bottom_right"
    kpm: bool = False
    mask: Optional[str] = None  # "bool", "float" (q's dtype) or "float32"
    dropout_p: float = 0.0
    deterministic: bool = False

    def _flags(self) -> tuple:
        return (("kpm", self.kpm), ("det", self.deterministic))

    def __str__(self) -> str:
        parts = [f"b{self.batch}h{self.heads}kv{self.heads_kv}", f"{self.seqlen_q}x{self.seqlen_k}",
                 f"d{self.head_dim}", str(self.dtype).replace("torch.", "")]
        if self.causal:
            parts.append(f"causal-{self.alignment}")
        parts += [name for name, on in self._flags() if on]
        if self.mask:
            parts.append(f"mask-{self.mask}")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p}")
        return "-".join(parts)


def make_inputs(case: AttentionCase, device: str, *, dead_rows: bool = False):
    """q, k, v (strided views of one packed (B, L, 3, H, D) tensor when ``case.packed``),
    key_padding_mask, attn_mask, AttentionOptions and RngState for ``case``.

    dead_rows: force rows that see no key: with kpm every query row of batch 0, with a bool
    mask one query row (3) all False, with a float mask one fully -inf row (2)."""
    b, h, hkv, lq, lk, d = case.batch, case.heads, case.heads_kv, case.seqlen_q, case.seqlen_k, case.head_dim
    if getattr(case, "packed", False):
        assert h == hkv and lq == lk
        qkv = torch.randn(b, lq, 3, h, d, device=device, dtype=case.dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = torch.randn(b, lq, h, d, device=device, dtype=case.dtype)
        k = torch.randn(b, lk, hkv, d, device=device, dtype=case.dtype)
        v = torch.randn(b, lk, hkv, d, device=device, dtype=case.dtype)
    kpm = None
    if case.kpm:
        kpm = torch.rand(b, lk, device=device) > 0.25
        if dead_rows:
            kpm[0] = False  # every query row of batch 0 sees no key
    attn_mask = None
    if case.mask == "bool":
        # Broadcast over heads (stride 0 on that dim).
        attn_mask = torch.rand(b, 1, lq, lk, device=device) > 0.3
        if dead_rows:
            attn_mask[:, :, min(3, lq - 1)] = False  # one query row sees no key
        attn_mask = attn_mask.expand(b, h, lq, lk)
    elif case.mask in ("float", "float32"):
        # Broadcast over the batch; some -inf entries (and, with dead_rows, one fully -inf row).
        bias = torch.randn(1, h, lq, lk, device=device)
        bias = bias.masked_fill(torch.rand_like(bias) < 0.1, float("-inf"))
        if dead_rows:
            bias[:, :, min(2, lq - 1)] = float("-inf")
        attn_mask = bias.to(torch.float32 if case.mask == "float32" else case.dtype).expand(b, h, lq, lk)
    options = AttentionOptions(
        softmax_scale=d ** -0.5,
        causal=case.causal,
        causal_alignment=case.alignment,
        dropout_p=case.dropout_p,
        deterministic=case.deterministic,
    )
    rng = RngState.draw() if case.dropout_p > 0 else None
    return AttentionInputs(q, k, v, kpm, attn_mask), options, rng


def to64(inputs: AttentionInputs) -> AttentionInputs:
    mask = inputs.attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return AttentionInputs(inputs.q.double(), inputs.k.double(), inputs.v.double(), inputs.key_padding_mask, mask)


def philox4x32_10(c0, c1, c2, c3, seed: int):
    """Philox4x32-10 (Salmon et al. 2011) on uint64 numpy arrays of 32-bit counters, key =
    (low, high) 32-bit halves of ``seed``: the generator behind tl.philox."""
    mask32 = np.uint64(0xFFFFFFFF)
    a, b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        p0, p1 = b * c2, a * c0  # < 2^64: exact in uint64
        c0, c1, c2, c3 = ((p0 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p0 & mask32,
                          (p1 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p1 & mask32)
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def attention_keep_mask(batch: int, heads: int, seqlen_q: int, seqlen_k: int, p: float, rng: RngState) -> np.ndarray:
    """bool (B, H, Lq, Lk) keep mask of fastattn/triton/attention.py's documented mapping:
    word 2 * ((i // 8) % 2) + (j // 8) % 2 of Philox(seed; gj, gi, b * H + h, offset) with
    gi = (i // 16) * 8 + i % 8, as tl.uint_to_uniform_float, kept iff >= p."""
    bi, hi, i, j = np.meshgrid(np.arange(batch), np.arange(heads), np.arange(seqlen_q), np.arange(seqlen_k),
                               indexing="ij")

    def group(x):
        return ((x // 16) * 8 + x % 8).astype(np.uint64)

    words = philox4x32_10(group(j), group(i), (bi * heads + hi).astype(np.uint64),
                          np.full(i.shape, rng.offset, np.uint64), rng.seed)
    word = np.choose(2 * ((i // 8) % 2) + (j // 8) % 2, words).astype(np.uint32).view(np.int32)
    # tl.uint_to_uniform_float: non-negative int32 (negatives mirrored by ~x) times 2^-31, in fp32.
    uniform = np.where(word < 0, ~word, word).astype(np.float32) * np.float32(4.6566127342e-10)
    return uniform >= np.float32(p)


def baseline(inputs: AttentionInputs, options: AttentionOptions, keep: Optional[torch.Tensor], dout: torch.Tensor):
    """Plain PyTorch attention in the inputs' dtype (matmul, softmax, matmul; autograd).
    Returns out, lse (fp32 of the low-precision scores) and (dq, dk, dv)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    group = inputs.nheads // inputs.nheads_kv
    qt = q.transpose(1, 2)
    kt = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = torch.matmul(qt, kt.transpose(-1, -2)) * options.softmax_scale
    if options.softcap > 0:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    bias = reference.alibi_bias(inputs, options, scores.dtype)
    if bias is not None:
        scores = scores + bias
    if inputs.attn_mask is not None and inputs.attn_mask.dtype != torch.bool:
        scores = scores + inputs.attn_mask.to(scores.dtype)
    allowed = reference.allowed_mask(inputs, options)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if keep is not None:
        probs = probs * keep.to(probs.dtype) / (1.0 - options.dropout_p)
    out = torch.matmul(probs, vt).transpose(1, 2)
    out.backward(dout)
    lse = torch.logsumexp(scores.detach().float(), dim=-1)
    return out.detach(), lse, (q.grad, k.grad, v.grad)


def check_against_reference(module, inputs: AttentionInputs, options: AttentionOptions, rng,
                            expect_dead_rows: bool = False) -> None:
    """Runs ``module.forward`` / ``backward`` (a backend's attention module, which also offers
    ``dropout_mask``) and checks out, lse and every gradient against the float64 reference
    given the backend's own keep mask, with the 2x-baseline rule; rows that see no key must
    give output 0, lse -inf and dQ 0."""
    out, lse = module.forward(inputs, options, rng)
    dout = torch.randn_like(out)
    dq, dk, dv = module.backward(dout, out, lse, inputs, options, rng)
    keep = module.dropout_mask(inputs, options, rng) if options.dropout_p > 0 else None
    inputs64 = to64(inputs)
    out64, lse64 = reference.forward(inputs64, options, rng, dropout_mask=keep)
    grads64 = reference.backward(dout.double(), out64, lse64, inputs64, options, rng, dropout_mask=keep)
    base_out, base_lse, base_grads = baseline(inputs, options, keep, dout)

    assert out.dtype == inputs.dtype and lse.dtype == torch.float32
    assert lse.shape == (inputs.batch, inputs.nheads, inputs.seqlen_q)
    assert_close_to_reference(out, out64, base_out, "out")
    dead = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), dead), "lse is -inf exactly on the rows that see no key"
    assert not torch.isnan(lse).any()
    live = ~dead
    assert_close_to_reference(lse[live], lse64[live].double(), base_lse[live], "lse")
    for name, grad, like, grad64, base in zip(("dq", "dk", "dv"), (dq, dk, dv), (inputs.q, inputs.k, inputs.v),
                                              grads64, base_grads):
        assert grad.dtype == like.dtype and grad.shape == like.shape, name
        assert_close_to_reference(grad, grad64, base, name)
    if expect_dead_rows:
        assert dead.any(), "the case was meant to have rows that see no key"
    dead_rows = dead.transpose(1, 2)  # (B, Lq, H)
    assert (out[dead_rows] == 0).all() and (dq[dead_rows] == 0).all()
