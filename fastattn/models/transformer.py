"""The reference encoder-decoder Transformer (Vaswani et al. 2017) for machine translation.

One readable file in the style of nanoGPT. ``TransformerConfig.impl`` picks the ops:
- "fused": fastattn ops (``flash_attention``, ``add_layer_norm`` with the residual add and its
  dropout fused in, ``feed_forward``);
- "naive": plain PyTorch (matmul-softmax-matmul attention, ``x + residual`` then
  ``F.layer_norm``, Linear-act-Linear): the baseline every benchmark compares against.
Both share every parameter name, so one state_dict loads in either and gives the same outputs.

Sequences are right-padded with ``pad_id``; masks are True at real tokens (flash convention).
Greedy decoding (``generate``) runs the decoder one token per step over a KV cache per decoder
layer (:class:`fastattn.nn.KVCache`: self-attention keys/values so far, and the cross-attention
projection of the memory computed on the first step), the same tokens as re-running the whole
decoder every step (``use_cache=False``).
Shapes: B batch, S source length, T target length, C d_model, H heads, D = C // H, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.backends import get_backend
from fastattn.nn.kv_cache import KVCache
from fastattn.ops import _checks as checks

Impl = Literal["fused", "naive"]
_NAIVE_ACT = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclasses.dataclass
class TransformerConfig:
    """Hyperparameters of :class:`Transformer`; bad values raise ValueError/TypeError here.

    Arguments:
        src_vocab_size, tgt_vocab_size, max_len, n_layer, n_head, d_model, d_ff: positive
            ints; d_model % n_head == 0; max_len bounds the source and target lengths.
        dropout: in [0, 1), on embeddings, attention probabilities, residual branches and
            the feed-forward hidden layer (training only).
        norm_first: pre-norm (True) or post-norm. activation: relu, gelu, gelu_tanh or silu.
        bias: Linear and LayerNorm biases. layer_norm_eps: positive.
        pad_id: the padding token id (masked as a key, ignored by the loss).
        impl: "fused" (fastattn ops) or "naive" (plain PyTorch).
        backend: fastattn backend for impl="fused": "triton", "cuda", "reference" or None.
    """

    src_vocab_size: int = 32
    tgt_vocab_size: int = 32
    max_len: int = 64  # longest source or target sequence (sinusoid table size)
    n_layer: int = 2  # encoder layers, and decoder layers
    n_head: int = 4
    d_model: int = 64
    d_ff: int = 256
    dropout: float = 0.1
    norm_first: bool = True  # pre-norm; False: post-norm as in the paper
    activation: str = "relu"  # relu | gelu | gelu_tanh | silu
    bias: bool = True
    layer_norm_eps: float = 1e-5
    pad_id: int = 0
    impl: Impl = "fused"
    backend: Optional[str] = None  # fastattn backend for impl="fused" (None: automatic)

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "max_len", "n_layer", "n_head", "d_model", "d_ff"):
            checks.check_positive_int(name, getattr(self, name))
        checks.check_probability("dropout", self.dropout)
        checks.check_positive("layer_norm_eps", self.layer_norm_eps)
        checks.check_bool("norm_first", self.norm_first)
        checks.check_bool("bias", self.bias)
        if not (isinstance(self.pad_id, int) and 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size)):
            raise ValueError(f"pad_id must be a token id below both vocabulary sizes, got {self.pad_id!r}")
        if self.backend is not None:
            get_backend(self.backend)
        if self.impl not in ("fused", "naive"):
            raise ValueError(f"impl must be 'fused' or 'naive', got {self.impl!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.activation not in _NAIVE_ACT:
            raise ValueError(f"activation must be one of {sorted(_NAIVE_ACT)}, got {self.activation!r}")


def naive_attention(q, k, v, causal: bool, key_mask: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in plain PyTorch (the naive baseline).

    Arguments:
        q: (B, T, H, D); k, v: (B, S, H, D), q's float dtype and device.
        causal: bottom-right aligned like flash_attention.
        key_mask: (B, S) bool, True = real token, or None.
        dropout_p: on the probabilities.

    Returns (B, T, H, D) in q's dtype; a query row that sees no key gives NaN (plain softmax).
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if key_mask is not None:
        att = att.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if causal:
        t, s = att.shape[-2:]
        future = torch.ones(t, s, dtype=torch.bool, device=att.device).triu(s - t + 1)
        att = att.masked_fill(future, float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), dropout_p)
    return (att @ v).transpose(1, 2)  # (B, T, H, D)


class Attention(nn.Module):
    """Multi-head self-attention (one packed qkv projection) or cross-attention (q from x,
    packed kv from the encoder memory)."""

    def __init__(self, config: TransformerConfig, causal: bool = False, cross: bool = False):
        super().__init__()
        c = config.d_model
        self.n_head, self.causal, self.cross = config.n_head, causal, cross
        self.dropout, self.impl, self.backend = config.dropout, config.impl, config.backend
        if cross:
            self.q_proj = nn.Linear(c, c, bias=config.bias)
            self.kv_proj = nn.Linear(c, 2 * c, bias=config.bias)
        else:
            self.qkv_proj = nn.Linear(c, 3 * c, bias=config.bias)
        self.out_proj = nn.Linear(c, c, bias=config.bias)

    def forward(self, x, memory=None, key_mask=None, cache: Optional[KVCache] = None):
        # x (B, T, C); memory (B, S, C); key_mask (B, S), or (B, T) of x's tokens with a self-attention cache
        B, T, C = x.shape
        H = self.n_head
        if self.cross:
            q = self.q_proj(x).view(B, T, H, C // H)
            k = v = None
            if cache is None or not cache.filled:  # a filled cache holds the projected memory
                k, v = self.kv_proj(memory).view(B, memory.shape[1], 2, H, C // H).unbind(2)
        else:
            q, k, v = self.qkv_proj(x).view(B, T, 3, H, C // H).unbind(2)  # (B, T, H, D) views
        if cache is not None:
            return self.out_proj(self._cached(q, k, v, key_mask, cache).reshape(B, T, C))
        p = self.dropout if self.training else 0.0
        if self.impl == "fused":
            y = fastattn.flash_attention(q, k, v, causal=self.causal, key_padding_mask=key_mask, dropout_p=p, backend=self.backend)
        else:
            y = naive_attention(q, k, v, self.causal, key_mask, p)
        return self.out_proj(y.reshape(B, T, C))

    def _cached(self, q, k, v, key_mask, cache: KVCache) -> torch.Tensor:
        """One decoding step over the cache (inference): q (B, T, H, D), new k/v (B, T, H, D)
        (self) or the memory's (B, S, H, D) (cross, first step), else None -> (B, T, H, D)."""
        if self.cross and k is not None:
            cache.fill(k, v, key_mask)
        if self.impl == "fused":
            if self.cross:
                return cache.attend(q, backend=self.backend)
            return cache.attend(q, k, v, keep=key_mask, causal=self.causal, backend=self.backend)
        if not self.cross:
            if q.shape[1] != 1:
                raise ValueError(f"the naive cached path decodes one token per step, got {q.shape[1]}")
            cache.write(k, v, key_mask)
        keys, values = cache.keys_values()  # (B, max_len, H, D), valid where cache.valid_mask()
        return naive_attention(q, keys, values, False, cache.valid_mask(), 0.0)


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.fc2 = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.activation, self.dropout = config.activation, config.dropout
        self.impl, self.backend = config.impl, config.backend

    def forward(self, x):  # (B, T, C)
        p = self.dropout if self.training else 0.0
        if self.impl == "fused":
            return fastattn.feed_forward(
                x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                activation=self.activation, dropout_p=p, backend=self.backend,
            )
        return self.fc2(F.dropout(_NAIVE_ACT[self.activation](self.fc1(x)), p, self.training))


class AddNorm(nn.Module):
    """``h = residual + dropout(x); y = LayerNorm(h)``. Returns y (post-norm) or (y, h)
    (pre-norm: h is the residual stream carried to the next sublayer)."""

    def __init__(self, config: TransformerConfig, prenorm: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.d_model)) if config.bias else None
        self.eps, self.prenorm, self.dropout = config.layer_norm_eps, prenorm, config.dropout
        self.impl, self.backend = config.impl, config.backend

    def forward(self, x, residual=None):  # (B, T, C) each
        p = self.dropout if self.training else 0.0
        if self.impl == "fused":
            return fastattn.add_layer_norm(
                x, residual, self.weight, self.bias, eps=self.eps, dropout_p=p, prenorm=self.prenorm, backend=self.backend
            )
        h = F.dropout(x, p, self.training)
        if residual is not None:
            h = h + residual
        y = F.layer_norm(h, h.shape[-1:], self.weight, self.bias, self.eps)
        return (y, h) if self.prenorm else y


class EncoderBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.ln_1, self.attn = AddNorm(config, config.norm_first), Attention(config)
        self.ln_2, self.mlp = AddNorm(config, config.norm_first), MLP(config)

    def forward(self, x, h, src_mask):
        if self.norm_first:  # x: last sublayer's output, h: residual stream; h += dropout(x) is fused with the norm
            y, h = self.ln_1(x, h)
            x = self.attn(y, key_mask=src_mask)
            y, h = self.ln_2(x, h)
            x = self.mlp(y)
            return x, h
        x = self.ln_1(self.attn(x, key_mask=src_mask), x)  # post-norm: x = LN(x + dropout(sublayer(x)))
        x = self.ln_2(self.mlp(x), x)
        return x, None


class DecoderBlock(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm_first = config.norm_first
        self.ln_1, self.self_attn = AddNorm(config, config.norm_first), Attention(config, causal=True)
        self.ln_2, self.cross_attn = AddNorm(config, config.norm_first), Attention(config, cross=True)
        self.ln_3, self.mlp = AddNorm(config, config.norm_first), MLP(config)

    def forward(self, x, h, memory, tgt_mask, src_mask, caches: Optional[tuple[KVCache, KVCache]] = None):
        self_cache, cross_cache = caches if caches is not None else (None, None)
        if self.norm_first:
            y, h = self.ln_1(x, h)
            x = self.self_attn(y, key_mask=tgt_mask, cache=self_cache)
            y, h = self.ln_2(x, h)
            x = self.cross_attn(y, memory, key_mask=src_mask, cache=cross_cache)
            y, h = self.ln_3(x, h)
            x = self.mlp(y)
            return x, h
        x = self.ln_1(self.self_attn(x, key_mask=tgt_mask, cache=self_cache), x)
        x = self.ln_2(self.cross_attn(x, memory, key_mask=src_mask, cache=cross_cache), x)
        x = self.ln_3(self.mlp(x), x)
        return x, None


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """(length, channels) fixed sinusoidal position encodings."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, channels, 2, dtype=torch.float32) * (-math.log(10000.0) / channels))
    table = torch.zeros(length, channels)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: channels // 2])
    return table


class Transformer(nn.Module):
    """Encoder-decoder Transformer with tied target embedding and output head.

    Arguments:
        config: a :class:`TransformerConfig` (its ``impl`` picks fused or naive ops).

    forward(src, tgt, targets=None): src (B, S) and tgt (B, T) int64 token ids (right-padded
    with pad_id, S and T at most max_len), targets (B, T) int64 or None. Returns logits
    (B, T, tgt_vocab_size) in the parameters' dtype and the mean cross-entropy (float32
    scalar) or None.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        c = config.d_model
        self.src_emb = nn.Embedding(config.src_vocab_size, c)
        self.tgt_emb = nn.Embedding(config.tgt_vocab_size, c)
        self.register_buffer("pos", sinusoids(config.max_len, c), persistent=False)
        self.encoder = nn.ModuleList([EncoderBlock(config) for _ in range(config.n_layer)])
        self.decoder = nn.ModuleList([DecoderBlock(config) for _ in range(config.n_layer)])
        # pre-norm ends each stack with the final residual add and a LayerNorm
        self.enc_ln = AddNorm(config, prenorm=False) if config.norm_first else None
        self.dec_ln = AddNorm(config, prenorm=False) if config.norm_first else None
        self.lm_head = nn.Linear(c, config.tgt_vocab_size, bias=False)
        self.lm_head.weight = self.tgt_emb.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.lm_head:
            return  # tied to tgt_emb, initialized there
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.d_model**-0.5)

    def _embed(self, emb: nn.Embedding, idx: torch.Tensor, start: int = 0) -> torch.Tensor:  # (B, T) -> (B, T, C)
        T = idx.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"sequence length {start + T} is above config.max_len={self.config.max_len}")
        x = emb(idx) * math.sqrt(self.config.d_model) + self.pos[start:start + T].to(emb.weight.dtype)
        # pre-norm fuses the embedding dropout into the first norm's residual add
        return x if self.config.norm_first else F.dropout(x, self.config.dropout, self.training)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """src (B, S) token ids -> memory (B, S, C)."""
        src_mask = src != self.config.pad_id  # (B, S)
        x, h = self._embed(self.src_emb, src), None
        for block in self.encoder:
            x, h = block(x, h, src_mask)
        return self.enc_ln(x, h) if self.enc_ln is not None else x

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """tgt (B, T) ids, memory (B, S, C), src (B, S) ids -> logits (B, T, V)."""
        tgt_mask, src_mask = tgt != self.config.pad_id, src != self.config.pad_id
        x, h = self._embed(self.tgt_emb, tgt), None
        for block in self.decoder:
            x, h = block(x, h, memory, tgt_mask, src_mask)
        x = self.dec_ln(x, h) if self.dec_ln is not None else x
        return self.lm_head(x)

    def forward(self, src, tgt, targets=None):
        """src (B, S), tgt (B, T) decoder inputs (BOS + target), targets (B, T) (target + EOS,
        pad_id where ignored) -> logits (B, T, V), mean cross-entropy loss or None."""
        logits = self.decode(tgt, self.encode(src), src)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=self.config.pad_id)
        return logits, loss

    def new_caches(self, batch: int, max_steps: int, src_len: int, block_size: Optional[int] = None) -> list:
        """Empty caches for :meth:`decode_step`, one (self-attention, cross-attention) pair per
        decoder layer: room for max_steps target tokens and src_len memory positions, in the
        parameters' dtype and device; paged with ``block_size`` blocks, else contiguous."""
        c, weight = self.config, self.tgt_emb.weight
        shape = dict(nheads_kv=c.n_head, head_dim=c.d_model // c.n_head, dtype=weight.dtype, device=weight.device,
                     block_size=block_size)
        return [
            (KVCache(batch, max_steps, **shape), KVCache(batch, src_len, cross=True, **shape))
            for _ in self.decoder
        ]

    def decode_step(self, token: torch.Tensor, step: int, memory: torch.Tensor, src: torch.Tensor, caches: list) -> torch.Tensor:
        """The decoder on one new target token per sequence, attending over the caches (which it
        extends): token (B, 1) ids at position ``step``, memory (B, S, C), src (B, S) ids ->
        logits (B, V), equal to ``decode(all tokens so far, ...)[:, -1]``. Inference only."""
        tgt_mask, src_mask = token != self.config.pad_id, src != self.config.pad_id
        x, h = self._embed(self.tgt_emb, token, start=step), None
        for block, block_caches in zip(self.decoder, caches):
            x, h = block(x, h, memory, tgt_mask, src_mask, caches=block_caches)
        x = self.dec_ln(x, h) if self.dec_ln is not None else x
        return self.lm_head(x[:, -1])

    @torch.no_grad()
    def generate(
        self, src: torch.Tensor, max_new_tokens: int, bos_id: int, eos_id: int, *,
        use_cache: bool = True, block_size: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy decoding: (B, S) source ids -> (B, <= max_new_tokens) ids, each row ending
        with eos_id when it was produced, then pad_id. ``use_cache``: one token per step over
        KV caches (paged with ``block_size``), else the whole decoder re-run every step (the
        same tokens, slower)."""
        checks.check_positive_int("max_new_tokens", max_new_tokens)
        checks.check_bool("use_cache", use_cache)
        memory = self.encode(src)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
        caches = self.new_caches(src.shape[0], max_new_tokens, src.shape[1], block_size) if use_cache else None
        for step in range(max_new_tokens):
            if use_cache:
                logits = self.decode_step(out[:, -1:], step, memory, src, caches)
            else:
                logits = self.decode(out, memory, src)[:, -1]
            nxt = logits.argmax(-1).masked_fill(done, self.config.pad_id)  # (B,)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        return out[:, 1:]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
