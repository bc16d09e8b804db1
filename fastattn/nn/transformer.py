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


class _FusedLayerMixin:
    """Helpers shared by the encoder and decoder layers (they read the torch layer's own
    submodules, so a loaded torch state_dict or a swapped-in torch layer just works)."""

    backend: Optional[str]

    def _p(self, dropout: nn.Dropout) -> float:
        return dropout.p if self.training else 0.0

    def _norm(self, x, residual, norm: nn.LayerNorm, dropout: Optional[nn.Dropout], prenorm: bool = False):
        """norm(dropout(x) + residual); with prenorm also the sum (the new residual stream)."""
        return fastattn.add_layer_norm(
            x, residual, norm.weight, norm.bias, eps=norm.eps,
            dropout_p=0.0 if dropout is None else self._p(dropout), prenorm=prenorm, backend=self.backend,
        )

    def _attend(self, attn: nn.MultiheadAttention, q, kv, attn_mask, key_padding_mask, is_causal) -> torch.Tensor:
        if isinstance(attn, MultiheadAttention):
            return attn.fused_forward(
                q, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                is_causal=is_causal, backend=self.backend,
            )
        return attn(
            q, kv, kv, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
            need_weights=False, is_causal=is_causal,
        )[0]

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        """linear2(dropout(act(linear1(x)))), fused unless the activation is a custom callable."""
        activation = fused_activation(self.activation)
        if activation is None:
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        return fastattn.feed_forward(
            x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
            activation=activation, dropout_p=self._p(self.dropout), backend=self.backend,
        )


class TransformerEncoderLayer(_FusedLayerMixin, nn.TransformerEncoderLayer):
    """Drop-in for :class:`torch.nn.TransformerEncoderLayer` (same constructor plus
    ``backend``, same parameters, state_dict and forward) built on fastattn's fused ops."""

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
        if src.is_nested:
            # nn.TransformerEncoder packs padded batches into nested tensors in inference;
            # torch's own fast path is the one that runs on those.
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        if self.norm_first:
            y = self._norm(x, None, self.norm1, None)
            a = self._attend(self.self_attn, y, y, src_mask, src_key_padding_mask, is_causal)
            y, h = self._norm(a, x, self.norm2, self.dropout1, prenorm=True)
            return h + F.dropout(self._ff(y), self._p(self.dropout2))
        x = self._norm(self._attend(self.self_attn, x, x, src_mask, src_key_padding_mask, is_causal), x, self.norm1, self.dropout1)
        return self._norm(self._ff(x), x, self.norm2, self.dropout2)


class TransformerDecoderLayer(_FusedLayerMixin, nn.TransformerDecoderLayer):
    """Drop-in for :class:`torch.nn.TransformerDecoderLayer` (same constructor plus
    ``backend``, same parameters, state_dict and forward) built on fastattn's fused ops."""

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
        x = tgt
        if self.norm_first:
            y = self._norm(x, None, self.norm1, None)
            a = self._attend(self.self_attn, y, y, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            y, h = self._norm(a, x, self.norm2, self.dropout1, prenorm=True)
            c = self._attend(self.multihead_attn, y, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            y, h = self._norm(c, h, self.norm3, self.dropout2, prenorm=True)
            return h + F.dropout(self._ff(y), self._p(self.dropout3))
        a = self._attend(self.self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        x = self._norm(a, x, self.norm1, self.dropout1)
        c = self._attend(self.multihead_attn, x, memory, memory_mask, memory_key_padding_mask, memory_is_causal)
        x = self._norm(c, x, self.norm2, self.dropout2)
        return self._norm(self._ff(x), x, self.norm3, self.dropout3)
