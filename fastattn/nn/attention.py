"""``fastattn.nn.MultiheadAttention``: a drop-in for ``torch.nn.MultiheadAttention``.

Subclassing keeps the constructor, parameter names and state_dict keys identical. The forward
projects q, k, v in the caller's layout, takes (B, L, H, D) views of them (no copies) and runs
``fastattn.flash_attention`` (no mask, or a bool key padding mask only) or
``fastattn.scaled_dot_product_attention`` (any other mask), then the output projection.
``need_weights=True`` needs the probabilities themselves, so it runs torch's own path, as do
nested or empty inputs and a mask that requires grad. With ``kv_cache=`` (a
:class:`fastattn.nn.KVCache`) the forward is one incremental decoding step over the cache,
through ``fastattn.flash_attention_with_kvcache``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.nn.kv_cache import KVCache


def _check_mask_dtype(name: str, mask: Optional[torch.Tensor]) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point (as in torch), got {mask.dtype}")


def _learned(*masks: Optional[torch.Tensor]) -> bool:
    """A float mask that requires grad (a learned bias): only torch's path computes its gradient."""
    return any(m is not None and m.requires_grad for m in masks)


def _float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch's convention for a bool mask (True = ignored) as an additive float mask."""
    if mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _pad_keys(mask: Optional[torch.Tensor], extra: int) -> Optional[torch.Tensor]:
    """Let every query see the ``extra`` keys appended by add_bias_kv / add_zero_attn."""
    if mask is None or extra == 0:
        return mask
    return F.pad(mask, (0, extra), value=False if mask.dtype == torch.bool else 0.0)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` running fastattn's fused attention.

    Same constructor (plus ``backend``), parameters, state_dict and forward contract. Masks
    follow torch: a bool ``attn_mask``/``key_padding_mask`` is True where attention is NOT
    allowed; a float one is added to the scores. Dropout applies only in training.
    ``need_weights=True`` (torch's default) returns the weights through torch's own unfused
    path; pass ``need_weights=False`` for the fused one (the Transformer layers do).
    A query row that may see no key gets 0 from the attention (out_proj's bias after it).

    Arguments:
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
            batch_first, device, dtype: as in torch; head dim = embed_dim // num_heads.
        backend: "triton", "cuda", "reference" or None (automatic).

    forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    is_causal), as in torch:
        query: (L, N, E) (or (N, L, E) with batch_first, or (L, E) unbatched), the module's
            dtype; key: (S, N, kdim); value: (S, N, vdim).
        key_padding_mask: (N, S) (or (S,)) bool (True = ignored) or float (added).
        attn_mask: (L, S) or (N * num_heads, L, S), bool (True = not allowed) or float (added).
            A float mask that requires grad (a learned bias) runs torch's unfused path, which
            computes its gradient.
        is_causal: a hint that attn_mask is the causal mask (attn_mask is still required).
        kv_cache: keyword-only, a :class:`fastattn.nn.KVCache` (from :meth:`new_kv_cache`) for
            incremental decoding (inference; see :meth:`cached_forward`), or None (torch's
            contract).
    Returns (attn_output like query, weights (N, L, S) with need_weights else None).
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
            device=device, dtype=dtype,
        )
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, backend: Optional[str] = None) -> "MultiheadAttention":
        """Turn ``module`` into this class in place (same object, same Parameters)."""
        module.__class__ = cls
        module.backend = backend
        return module

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_cache: Optional[KVCache] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if kv_cache is not None:
            if need_weights:
                raise ValueError("need_weights=True is not available with kv_cache: the fused decoding kernel "
                                 "never forms the weights; pass need_weights=False")
            return self.cached_forward(
                query, key, value, kv_cache, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                is_causal=is_causal, backend=self.backend,
            ), None
        unfused = need_weights or any(t.is_nested or t.numel() == 0 for t in (query, key, value))
        if unfused or _learned(attn_mask, key_padding_mask):
            # The weights are the probabilities themselves, which a fused kernel never stores;
            # nested tensors are torch's own fast path's; an empty batch has nothing to fuse; a
            # mask that requires grad needs the gradient fastattn's kernels do not compute.
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )
        out = self.fused_forward(
            query, key, value, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            is_causal=is_causal, backend=self.backend,
        )
        return out, None

    # ----------------------------------------------------------------------------------------
    def fused_forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """The attention output alone (forward with ``need_weights=False``); the Transformer
        layers call it with their own ``backend``."""
        if _learned(attn_mask, key_padding_mask):
            return super().forward(
                query, key, value, key_padding_mask=key_padding_mask, need_weights=False,
                attn_mask=attn_mask, is_causal=is_causal,
            )[0]
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention). "
                "You may use nn.Transformer.generate_square_subsequent_mask to create this mask."
            )

        q, k, v = self._in_projection(query, key, value)  # caller's layout, last dim E
        q, k, v = (self._to_blhd(t, batched) for t in (q, k, v))  # (B, L, H, D) views
        bsz, tgt_len, src_len = q.shape[0], q.shape[1], k.shape[1]
        k, v = self._extra_keys(k, v)
        extra = k.shape[1] - src_len

        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, src_len):
            raise ValueError(
                f"key_padding_mask must have shape (N, S) = {(bsz, src_len)}, got {tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * self.num_heads, tgt_len, src_len)
            if tuple(attn_mask.shape) != expected:
                raise ValueError(f"attn_mask must have shape {expected}, got {tuple(attn_mask.shape)}")

        # torch's rule: the is_causal hint replaces attn_mask unless a key padding mask must be
        # merged into it, in which case the (causal) attn_mask itself is used.
        if is_causal and key_padding_mask is None:
            attn_mask = None
        else:
            is_causal = False
        if (
            attn_mask is not None and key_padding_mask is not None
            and attn_mask.dtype != key_padding_mask.dtype
        ):
            warnings.warn(
                "Support for mismatched key_padding_mask and attn_mask is deprecated. "
                "Use same type for both instead.",
                stacklevel=3,
            )
        dropout_p = self.dropout if self.training else 0.0
        attn_mask = _pad_keys(attn_mask, extra)
        key_padding_mask = _pad_keys(key_padding_mask, extra)

        if attn_mask is None and (key_padding_mask is None or key_padding_mask.dtype == torch.bool):
            out = self._flash(q, k, v, key_padding_mask, is_causal, dropout_p, backend)
        else:
            mask = self._merged_sdpa_mask(attn_mask, key_padding_mask, bsz, q.dtype)
            out = fastattn.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                dropout_p=dropout_p, is_causal=is_causal, backend=backend,
            ).transpose(1, 2)  # (B, Lq, H, D)

        return self._out_projection(out, batched)

    def _out_projection(self, out: torch.Tensor, batched: bool) -> torch.Tensor:
        """(B, L, H, D) attention output -> the caller's layout, through out_proj."""
        bsz, tgt_len = out.shape[:2]
        if not batched:
            out = out[0].reshape(tgt_len, self.embed_dim)
        elif self.batch_first:
            out = out.reshape(bsz, tgt_len, self.embed_dim)
        else:
            out = out.transpose(0, 1).reshape(tgt_len, bsz, self.embed_dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias)

    # ----------------------------------------------------------------------------------------
    # Incremental decoding over a KV cache
    # ----------------------------------------------------------------------------------------
    def new_kv_cache(
        self, batch: int, max_len: int, *, block_size: Optional[int] = None, cross: bool = False
    ) -> KVCache:
        """An empty :class:`KVCache` sized for this module (num_heads heads of head_dim, its
        dtype and device): ``cross=True`` for cross-attention over a fixed memory of at most
        max_len keys; ``block_size`` for a paged cache."""
        weight = self.out_proj.weight
        return KVCache(batch, max_len, self.num_heads, self.head_dim, dtype=weight.dtype, device=weight.device,
                       block_size=block_size, cross=cross)

    def cached_forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor],
        value: Optional[torch.Tensor],
        kv_cache: KVCache,
        *,
        key_padding_mask: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """One decoding step over ``kv_cache`` with ``fastattn.flash_attention_with_kvcache``;
        the same output as the full forward over every step so far (inference only: under
        torch.no_grad() or torch.inference_mode(); no dropout).

        Self-attention (``kv_cache.cross`` False): key/value are the new step's tokens; their
        projections are appended to the cache and query attends over the sequence so far,
        ``is_causal`` (no attn_mask needed) aligned bottom-right. ``key_padding_mask`` (N, L)
        marks new tokens that are padding: they are never stored, so later steps do not see
        them (several new tokens with padding and is_causal: not supported).
        Cross-attention (``kv_cache.cross`` True): the first call projects key/value (the
        memory, (S, N, kdim)) into the cache, its ``key_padding_mask`` (N, S) deciding which
        keys are stored; later calls reuse them (key/value and key_padding_mask unused, may be
        None).

        Arguments:
            query: (L, N, E) (or (N, L, E) with batch_first, (L, E) unbatched).
            key, value: (L or S, N, kdim / vdim) like query's layout, or None (filled cross cache).
            kv_cache: built for this module (:meth:`new_kv_cache`) with N sequences.
            key_padding_mask: bool, True = padding (torch's convention), or None.
            attn_mask: must be None (the cache has its own masking: lengths and is_causal).
        Returns the attention output like query.
        """
        if not isinstance(kv_cache, KVCache):
            raise TypeError(f"kv_cache must be a fastattn.nn.KVCache, got {type(kv_cache).__name__}")
        if attn_mask is not None:
            raise ValueError("attn_mask is not supported with kv_cache: use is_causal (bottom-right aligned) "
                             "and key_padding_mask")
        if self.bias_k is not None or self.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported with kv_cache")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            raise ValueError("incremental decoding with kv_cache is inference-only (no gradient through the "
                             "cache): call it under torch.no_grad() or torch.inference_mode()")
        if query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise ValueError(f"query must be (L, E) or 3-D with last dim embed_dim={self.embed_dim}, "
                             f"got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        fill = not kv_cache.cross or not kv_cache.filled
        if fill:
            if key is None or value is None:
                raise ValueError("key and value are required: the KV cache is a self-attention cache or an "
                                 "unfilled cross-attention cache")
            self._check_inputs(query, key, value, key_padding_mask, None)
            _check_mask_dtype("key_padding_mask", key_padding_mask)
            if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be bool with kv_cache, got {key_padding_mask.dtype}")
        if kv_cache.cross:
            q = self._to_blhd(self._project(query, 0), batched)  # (B, Lq, H, D)
            k = v = None
            if fill:
                k = self._to_blhd(self._project(key, 1), batched)  # (B, S, H, D)
                v = self._to_blhd(self._project(value, 2), batched)
        else:
            q, k, v = (self._to_blhd(t, batched) for t in self._in_projection(query, key, value))
        if kv_cache.batch != q.shape[0]:
            raise ValueError(f"kv_cache holds {kv_cache.batch} sequences, the query batch is {q.shape[0]}")
        keep = None
        if fill and key_padding_mask is not None:
            keep = ~(key_padding_mask if batched else key_padding_mask.unsqueeze(0))  # (B, L)
            if tuple(keep.shape) != tuple(k.shape[:2]):
                raise ValueError(f"key_padding_mask must have shape (N, S) = {tuple(k.shape[:2])} (the new keys), "
                                 f"got {tuple(key_padding_mask.shape)}")
        if not kv_cache.cross:
            out = kv_cache.attend(q, k, v, keep=keep, causal=is_causal, backend=backend)
        else:
            if fill:
                kv_cache.fill(k, v, keep)
            out = kv_cache.attend(q, backend=backend)
        return self._out_projection(out, batched)

    def _project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """x through the q (0), k (1) or v (2) input projection, caller's layout, last dim E."""
        e = self.embed_dim
        b = None if self.in_proj_bias is None else self.in_proj_bias[which * e:(which + 1) * e]
        if not self._qkv_same_embed_dim:
            return F.linear(x, (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)[which], b)
        return F.linear(x, self.in_proj_weight[which * e:(which + 1) * e], b)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"key and value must be {query.dim()}-D like query, got {key.dim()}-D and {value.dim()}-D"
            )
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise ValueError(
                f"key_padding_mask must be {query.dim() - 1}-D for {query.dim()}-D query, "
                f"got {key_padding_mask.dim()}-D"
            )
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got {query.shape[-1]}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key's sequence and batch dims {tuple(key.shape[:-1])} must match value's {tuple(value.shape[:-1])}"
            )
        batch_dim = 0 if self.batch_first else 1
        if query.dim() == 3 and key.shape[batch_dim] != query.shape[batch_dim]:
            raise ValueError(f"key's batch size ({key.shape[batch_dim]}) must equal query's ({query.shape[batch_dim]})")
        for name, t, dim in (("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != dim:
                raise ValueError(f"{name}'s last dim must be {name[0]}dim={dim}, got {t.shape[-1]}")
        return query.dim() == 3

    def _in_projection(self, query, key, value):
        """q, k, v projected to embed_dim, in the caller's layout (the packed self-attention
        case is one GEMM; its three outputs are views of it)."""
        e = self.embed_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (
                F.linear(query, self.q_proj_weight, bq),
                F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv),
            )
        if key is value and query is key:
            return F.linear(query, w, b).unflatten(-1, (3, e)).unbind(-2)
        if key is value:
            w_q, w_kv = w.split([e, 2 * e])
            b_q, b_kv = (None, None) if b is None else b.split([e, 2 * e])
            k, v = F.linear(key, w_kv, b_kv).unflatten(-1, (2, e)).unbind(-2)
            return F.linear(query, w_q, b_q), k, v
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        w_q, w_k, w_v = w.chunk(3)
        return F.linear(query, w_q, bq), F.linear(key, w_k, bk), F.linear(value, w_v, bv)

    def _to_blhd(self, t: torch.Tensor, batched: bool) -> torch.Tensor:
        """(L, E) / (L, B, E) / (B, L, E) -> (B, L, H, D) view."""
        t = t.unflatten(-1, (self.num_heads, self.head_dim))
        if not batched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def _extra_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the learned bias key/value and the all-zero key/value, as torch does."""
        bsz, h, d = k.shape[0], self.num_heads, self.head_dim
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.view(1, 1, h, d).expand(bsz, 1, h, d)], dim=1)
            v = torch.cat([v, self.bias_v.view(1, 1, h, d).expand(bsz, 1, h, d)], dim=1)
        elif self.bias_k is not None or self.bias_v is not None:
            raise ValueError("bias_k and bias_v must be both set or both None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, 1, h, d)], dim=1)
            v = torch.cat([v, v.new_zeros(bsz, 1, h, d)], dim=1)
        return k, v

    def _flash(self, q, k, v, key_padding_mask, is_causal, dropout_p, backend) -> torch.Tensor:
        keep = None if key_padding_mask is None else ~key_padding_mask
        if is_causal and q.shape[1] != k.shape[1]:
            # torch's causal mask is top-left aligned; flash_attention's is bottom-right.
            return fastattn.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                dropout_p=dropout_p, is_causal=True, backend=backend,
            ).transpose(1, 2)
        return fastattn.flash_attention(
            q, k, v, causal=is_causal, key_padding_mask=keep, dropout_p=dropout_p, backend=backend
        )

    def _merged_sdpa_mask(self, attn_mask, key_padding_mask, bsz, dtype) -> Optional[torch.Tensor]:
        """One mask broadcastable to (B, H, Lq, Lk) in fastattn's convention: bool True =
        takes part (when both masks are bool), else float, added to the scores."""
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unflatten(0, (bsz, self.num_heads))  # (B, H, Lq, Lk)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        masks = [m for m in (attn_mask, key_padding_mask) if m is not None]
        if all(m.dtype == torch.bool for m in masks):
            keep = ~masks[0]
            return keep if len(masks) == 1 else keep & ~masks[1]
        merged = _float_mask(masks[0], dtype)
        return merged if len(masks) == 1 else merged + _float_mask(masks[1], dtype)
