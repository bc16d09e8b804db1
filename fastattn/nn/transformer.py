"""Drop-ins for ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``.

Each sublayer's residual add, its dropout and the LayerNorm run as one ``add_layer_norm``; the
FFN is one ``feed_forward``; attention goes through :class:`fastattn.nn.MultiheadAttention`.
Post-norm (torch's default):  ``x = norm(x + dropout(sublayer(x)))``  -> ``add_layer_norm``.
Pre-norm (``norm_first``):    ``x = x + dropout(sublayer(norm(x)))`` -> the add is fused with
the *next* sublayer's norm (``prenorm=True`` returns the normalized y and the new stream h);
only the last add of the layer is a plain add.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.ffn import fused_activation
from fastattn.nn.norm import LayerNorm


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def _plain(module, *classes: type) -> bool:
    """True when ``module`` is exactly one of ``classes`` and has no hooks of its own: only then
    may a fused op stand in for calling it (a user's subclass, replacement or hook must run)."""
    return type(module) in classes and not _hooked(module)


class _FusedLayerMixin:
    """Helpers shared by the encoder and decoder layers. They read the torch layer's own
    submodules, so a loaded torch state_dict or a swapped-in torch layer just works; a
    submodule the user replaced or hooked is called as torch would call it, unfused."""

    backend: Optional[str]

    @staticmethod
    def _p(dropout: nn.Dropout) -> float:
        """The probability torch's call of this dropout module would use (its own mode)."""
        return dropout.p if dropout.training else 0.0

    def _norm(self, x, residual, norm: nn.Module, dropout: Optional[nn.Module], prenorm: bool = False):
        """norm(dropout(x) + residual); with prenorm also the sum (the new residual stream)."""
        fusable = _plain(norm, nn.LayerNorm, LayerNorm) and len(norm.normalized_shape) == 1
        if fusable and (dropout is None or _plain(dropout, nn.Dropout)):
            return fastattn.add_layer_norm(
                x, residual, norm.weight, norm.bias, eps=norm.eps,
                dropout_p=0.0 if dropout is None else self._p(dropout), prenorm=prenorm, backend=self.backend,
            )
        h = x if dropout is None else dropout(x)
        h = h if residual is None else residual + h
        return (norm(h), h) if prenorm else norm(h)

    def _attend(self, attn: nn.Module, q, kv, attn_mask, key_padding_mask, is_causal) -> torch.Tensor:
        if _plain(attn, MultiheadAttention):
            return attn.fused_forward(
                q, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                is_causal=is_causal, backend=self.backend,
            )
        return attn(
            q, kv, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=False, is_causal=is_causal,
        )[0]

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        """linear2(dropout(act(linear1(x)))), fused unless the activation is a custom callable
        or a submodule is not the plain torch one."""
        activation = fused_activation(self.activation)
        plain = _plain(self.linear1, nn.Linear) and _plain(self.linear2, nn.Linear) and _plain(self.dropout, nn.Dropout)
        if isinstance(self.activation, nn.Module) and _hooked(self.activation):
            plain = False
        if activation is None or not plain:
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        return fastattn.feed_forward(
            x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
            activation=activation, dropout_p=self._p(self.dropout), backend=self.backend,
        )


class TransformerEncoderLayer(_FusedLayerMixin, nn.TransformerEncoderLayer):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer` (same constructor plus
    ``backend``, same parameters, state_dict and forward) built on fastattn's fused ops.

    Arguments:
        d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
            norm_first, bias, device, dtype: as in torch (an activation other than relu,
            gelu, gelu-tanh or silu runs the feed-forward unfused).
        backend: "triton", "cuda", "reference" or None (automatic).

    forward(src, src_mask, src_key_padding_mask, is_causal): src (S, N, E) (or (N, S, E) with
    batch_first, or (S, E)) in the layer's dtype; masks as in
    :class:`fastattn.nn.MultiheadAttention`. Returns src's shape and dtype.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
            layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
            device=device, dtype=dtype,
        )
        MultiheadAttention.from_torch(self.self_attn, backend)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.TransformerEncoderLayer, backend: Optional[str] = None) -> "TransformerEncoderLayer":
        """Turn ``module`` (and its attention) into fastattn's in place, same Parameters."""
        module.__class__ = cls
        module.backend = backend
        if type(module.self_attn) is nn.MultiheadAttention:
            MultiheadAttention.from_torch(module.self_attn, backend)
        return module

    def forward(
        self,
        src: torch.Tensor,
        src_mask: Optional[torch.Tensor] = None,
        src_key_padding_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if src.is_nested or src.numel() == 0:
            # nn.TransformerEncoder packs padded batches into nested tensors in inference;
            # torch's own fast path is the one that runs on those. An empty batch has nothing
            # to fuse.
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            y = self._norm(x, None, self.norm1, None)
            a = self._attend(self.self_attn, y, y, src_mask, src_key_padding_mask, is_causal)
            y, h = self._norm(a, x, self.norm2, self.dropout1, prenorm=True)
            return h + self.dropout2(self._ff(y))
        x = self._norm(self._attend(self.self_attn, x, x, src_mask, src_key_padding_mask, is_causal), x, self.norm1, self.dropout1)
        return self._norm(self._ff(x), x, self.norm2, self.dropout2)


class TransformerDecoderLayer(_FusedLayerMixin, nn.TransformerDecoderLayer):
    """Drop-in for :class:`torch.nn.TransformerDecoderLayer` (same constructor plus
    ``backend``, same parameters, state_dict and forward) built on fastattn's fused ops.

    Arguments:
        d_model, nhead, dim_feedforward, dropout, activation, layer_norm_eps, batch_first,
            norm_first, bias, device, dtype, backend: as in :class:`TransformerEncoderLayer`.

    forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
    tgt_is_causal, memory_is_causal): tgt (T, N, E), memory (S, N, E) (batch first with
    batch_first; (T, E) and (S, E) unbatched); masks as in
    :class:`fastattn.nn.MultiheadAttention`. Returns tgt's shape and dtype.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation=F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
            layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
            device=device, dtype=dtype,
        )
        MultiheadAttention.from_torch(self.self_attn, backend)
        MultiheadAttention.from_torch(self.multihead_attn, backend)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.TransformerDecoderLayer, backend: Optional[str] = None) -> "TransformerDecoderLayer":
        """Turn ``module`` (and its attentions) into fastattn's in place, same Parameters."""
        module.__class__ = cls
        module.backend = backend
        for attn in (module.self_attn, module.multihead_attn):
            if type(attn) is nn.MultiheadAttention:
                MultiheadAttention.from_torch(attn, backend)
        return module

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: Optional[torch.Tensor] = None,
        memory_mask: Optional[torch.Tensor] = None,
        tgt_key_padding_mask: Optional[torch.Tensor] = None,
        memory_key_padding_mask: Optional[torch.Tensor] = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        if tgt.numel() == 0 or memory.numel() == 0:  # an empty batch: nothing to fuse
            return super().forward(
                tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                tgt_is_causal, memory_is_causal,
            )
        x = tgt
        if self.norm_first:
            y = self._norm(x, None, self.norm1, None)
            a = self._attend(self.self_attn, y, y, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            y, h = self._norm(a, x, self.norm2, self.dropout1, prenorm=True)
            c = self._attend(self.multihead_attn, y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            y, h = self._norm(c, h, self.norm3, self.dropout2, prenorm=True)
            return h + self.dropout3(self._ff(y))
        a = self._attend(self.self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = self._norm(a, x, self.norm1, self.dropout1)
        c = self._attend(self.multihead_attn, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x = self._norm(c, x, self.norm2, self.dropout2)
        return self._norm(self._ff(x), x, self.norm3, self.dropout3)
