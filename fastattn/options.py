"""Options and inputs handed from the public functions to the backends.

Every backend primitive receives one ``*Inputs`` (tensors, already validated) and one
``*Options`` (a frozen dataclass of Python scalars), plus an optional :class:`RngState` when
dropout is active. Keeping these small and shared is what lets a new backend touch one file
per op and nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

CausalAlignment = Literal["bottom_right", "top_left"]
NormKind = Literal["layer", "rms"]
Activation = Literal["relu", "gelu", "gelu_tanh", "silu", "swiglu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu", "gelu_tanh", "silu", "swiglu")


@dataclasses.dataclass(frozen=True)
class RngState:
    """Dropout randomness: drawn once per forward from torch's default generator, saved for
    backward so the mask is regenerated, never stored. ``seed`` and ``offset`` fit in 31 bits."""

    seed: int
    offset: int

    @staticmethod
    def draw() -> "RngState":
        """A fresh (seed, offset); RuntimeError while a CUDA graph is being captured."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            # The pair is a host-side constant baked into the captured launches, so every
            # replay would apply the same dropout mask.
            raise RuntimeError(
                "fastattn dropout cannot be captured in a CUDA graph: its seed and offset are drawn "
                "on the host, so every replay would reuse one dropout mask. Capture with dropout_p=0 "
                "(e.g. model.eval()), or run the steps with dropout outside the graph."
            )
        # The CPU generator is seeded by torch.manual_seed too, and reading it never syncs a GPU.
        seed, offset = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64).tolist()
        return RngState(seed=int(seed), offset=int(offset))


def seed_offset(rng: Optional[RngState]) -> tuple[int, int]:
    """(seed, offset) of a dropout draw as the kernels' scalar arguments; (0, 0) without one."""
    return (0, 0) if rng is None else (rng.seed, rng.offset)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """causal_alignment: "bottom_right" (flash_attention: query i sees key j iff
    j <= i + seqlen_k - seqlen_q) or "top_left" (SDPA: j <= i)."""

    softmax_scale: float
    causal: bool = False
    causal_alignment: CausalAlignment = "bottom_right"
    dropout_p: float = 0.0
    deterministic: bool = False
    #: Sliding window (flash-attn's window_size): query i sees key j iff
    #: ``i + shift - window_left <= j <= i + shift + window_right`` with ``shift = Lk - Lq``
    #: (bottom_right) or 0 (top_left), per sequence; -1 = unbounded on that side. causal=True
    #: forces ``window_right = 0`` (done by the public functions).
    window_left: int = -1
    window_right: int = -1
    #: Logit soft-capping: ``s = softcap * tanh(softmax_scale * q.k / softcap)`` when > 0.
    softcap: float = 0.0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """Validated attention tensors in the flash layout. Strides are arbitrary except that the
    last dimension of q, k, v is contiguous (stride 1); no copies are made for views.

    q:                (B, Lq, H, D)    fp16 / bf16 / fp32 / fp64
    k, v:             (B, Lk, Hkv, D)  same dtype and device as q, H % Hkv == 0
    key_padding_mask: (B, Lk) bool, True = real token; or None
    attn_mask:        (B, H, Lq, Lk) bool (True = takes part) or float (added to the scaled
                      scores, same dtype as q or fp32); broadcast dims have stride 0; or None
    alibi_slopes:     (H,) or (B, H) fp32: bias ``-slope * |i + shift - j|`` added to the scaled
                      (and soft-capped) scores, shift as for the window; or None

    Variable-length (packed) batches, ``cu_seqlens_q`` given: q is (total_q, H, D), k and v are
    (total_k, Hkv, D); sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v (int32 (B+1,), validated: starts at 0,
    non-decreasing, ends at total); ``max_seqlen_q/k`` bound the lengths. Masks are None there.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0

    def tensors(self) -> tuple[Optional[torch.Tensor], ...]:
        """The tensor fields in declaration order (q, k, v, key_padding_mask, attn_mask,
        alibi_slopes, cu_seqlens_q, cu_seqlens_k): ``AttentionInputs(*tensors, max_seqlen_q,
        max_seqlen_k)`` rebuilds the inputs."""
        return (self.q, self.k, self.v, self.key_padding_mask, self.attn_mask, self.alibi_slopes,
                self.cu_seqlens_q, self.cu_seqlens_k)

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1 if self.is_varlen else self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        return self.max_seqlen_q if self.is_varlen else self.q.shape[1]

    @property
    def seqlen_k(self) -> int:
        return self.max_seqlen_k if self.is_varlen else self.k.shape[1]

    @property
    def nheads(self) -> int:
        return self.q.shape[-2]

    @property
    def nheads_kv(self) -> int:
        return self.k.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device


@dataclasses.dataclass(frozen=True)
class KVCacheInputs:
    """Validated tensors of one decoding step over a KV cache (inference only, no autograd).
    The new keys/values are already appended to the cache (by the public function), so the
    backend attends q over the first ``cache_seqlens[b]`` positions of sequence b's cache.

    q:             (B, Lq, H, D)                fp16 / bf16 / fp32 / fp64
    k_cache, v_cache: contiguous cache (B_cache, Lcache, Hkv, D), sequence b in row
                   ``cache_batch_idx[b]`` (or b); or paged (num_blocks, block_size, Hkv, D),
                   when ``block_table`` is given; q's dtype and device
    cache_seqlens: (B,) int32, valid length of each sequence's cache (new tokens included)
    block_table:   (B, max_blocks_per_seq) int32, the cache blocks of sequence b in order; or None
    cache_batch_idx: (B,) int32 rows of a contiguous cache; or None (row b)
    alibi_slopes:  (H,) or (B, H) fp32, or None

    Causal and window masks are aligned bottom-right per sequence: query i of sequence b is at
    absolute position ``cache_seqlens[b] - Lq + i``.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    block_table: Optional[torch.Tensor] = None
    cache_batch_idx: Optional[torch.Tensor] = None
    alibi_slopes: Optional[torch.Tensor] = None

    @property
    def is_paged(self) -> bool:
        return self.block_table is not None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def seqlen_q(self) -> int:
        return self.q.shape[1]

    @property
    def nheads(self) -> int:
        return self.q.shape[2]

    @property
    def nheads_kv(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def max_seqlen_k(self) -> int:
        """Capacity of one sequence's cache (an upper bound of cache_seqlens)."""
        if self.is_paged:
            return self.block_table.shape[1] * self.k_cache.shape[1]
        return self.k_cache.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device


# --------------------------------------------------------------------------------------------
# Residual + LayerNorm / RMSNorm
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NormOptions:
    kind: NormKind = "layer"
    eps: float = 1e-5
    dropout_p: float = 0.0
    prenorm: bool = False
    residual_in_fp32: bool = False


@dataclasses.dataclass(frozen=True)
class NormInputs:
    """Validated norm tensors, flattened to rows. ``h = dropout(x) + residual``,
    ``y = norm(h) * weight + bias``.

    x:        (M, N)  fp16 / bf16 / fp32 / fp64, last dim contiguous
    residual: (M, N)  any float dtype, or None
    weight:   (N,)    or None (no scale)
    bias:     (N,)    or None (no shift; always None for RMSNorm)
    """

    x: torch.Tensor
    residual: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def hidden(self) -> int:
        return self.x.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device


def residual_out_dtype(inputs: NormInputs, options: NormOptions) -> torch.dtype:
    """dtype of h (the new residual stream): fp32 if asked, else the residual's, else x's."""
    if options.residual_in_fp32:
        return torch.float32 if inputs.x.dtype != torch.float64 else torch.float64
    return inputs.residual.dtype if inputs.residual is not None else inputs.x.dtype


@dataclasses.dataclass(frozen=True)
class NormForwardResult:
    """y: (M, N) x's dtype; h: (M, N) residual_out_dtype (may alias x when there is no
    residual and no dropout); mean: (M,) fp32 (None for RMSNorm); rstd: (M,) fp32."""

    y: torch.Tensor
    h: torch.Tensor
    mean: Optional[torch.Tensor]
    rstd: torch.Tensor


@dataclasses.dataclass(frozen=True)
class NormGrads:
    """dx: (M, N) x's dtype; dresidual: (M, N) residual's dtype or None;
    dweight, dbias: (N,) their parameter's dtype or None."""

    dx: torch.Tensor
    dresidual: Optional[torch.Tensor]
    dweight: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]


# --------------------------------------------------------------------------------------------
# Feed-forward
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FeedForwardOptions:
    """recompute: save only x and recompute the pre-activation in backward (activation
    checkpointing; saves M * d_hidden elements). allow_tf32: fp32 GEMMs may use tf32, copied
    from ``torch.backends.cuda.matmul.allow_tf32`` at call time."""

    activation: Activation = "gelu"
    dropout_p: float = 0.0
    recompute: bool = False
    allow_tf32: bool = False


@dataclasses.dataclass(frozen=True)
class FeedForwardInputs:
    """Validated FFN tensors, flattened to rows. ``z = x @ w1.T + b1``;
    ``a = act(z)`` (swiglu: ``silu(z[:, :F]) * z[:, F:]``); ``y = dropout(a) @ w2.T + b2``.

    x:  (M, d_model)   fp16 / bf16 / fp32 / fp64, last dim contiguous
    w1: (d_hidden, d_model), d_hidden = F (or 2F for swiglu: rows [gate; up])
    b1: (d_hidden,) or None
    w2: (d_out, F)
    b2: (d_out,) or None
    """

    x: torch.Tensor
    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device


@dataclasses.dataclass(frozen=True)
class FeedForwardGrads:
    dx: torch.Tensor
    dw1: torch.Tensor
    db1: Optional[torch.Tensor]
    dw2: torch.Tensor
    db2: Optional[torch.Tensor]
