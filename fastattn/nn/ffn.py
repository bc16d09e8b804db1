"""``fastattn.nn.FeedForward``: ``linear2(dropout(act(linear1(x))))`` as one fused op.

The parameter names (``linear1``, ``linear2``) are those of ``torch.nn.TransformerEncoderLayer``
so the feed-forward weights of a torch layer load as they are.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

import fastattn
from fastattn.ops import _checks as checks
from fastattn.options import ACTIVATIONS


def fused_activation(activation: Union[str, Callable]) -> Optional[str]:
    """fastattn's name for a torch activation (string, function or module), or None when the
    fused FFN cannot compute it (the caller then runs it unfused). Modules match by exact
    type: a user's subclass may compute something else."""
    if isinstance(activation, str):
        return activation if activation in ACTIVATIONS else None
    if activation is F.relu or type(activation) is nn.ReLU:
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if type(activation) is nn.GELU:
        return "gelu" if activation.approximate == "none" else "gelu_tanh"
    if activation is F.silu or type(activation) is nn.SiLU:
        return "silu"
    return None


class FeedForward(nn.Module):
    """Position-wise feed-forward: ``y = linear2(dropout(act(linear1(x))))``.

    Arguments:
        d_model: input features. dim_feedforward: hidden features F.
        d_out: output features (default d_model).
        activation: "relu", "gelu", "gelu_tanh", "silu" or "swiglu" (linear1 then has 2F
            outputs, rows [gate; up]).
        dropout: on the activation, in training only.
        recompute: recompute the pre-activation in backward instead of saving it.
        backend: "triton", "cuda", "reference" or None (automatic).
    forward(x): (..., d_model) -> (..., d_out).
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int,
        d_out: Optional[int] = None,
        *,
        activation: str = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
        recompute: bool = False,
        device=None,
        dtype=None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        checks.check_bool("recompute", recompute)
        factory = {"device": device, "dtype": dtype}
        hidden = 2 * dim_feedforward if activation == "swiglu" else dim_feedforward
        self.linear1 = nn.Linear(d_model, hidden, bias=bias, **factory)
        self.linear2 = nn.Linear(dim_feedforward, d_model if d_out is None else d_out, bias=bias, **factory)
        self.activation = activation
        self.dropout = checks.check_probability("dropout", dropout)
        self.recompute = recompute
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fastattn.feed_forward(
            x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
            activation=self.activation, dropout_p=self.dropout if self.training else 0.0,
            recompute=self.recompute, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout={self.dropout}, recompute={self.recompute}"
