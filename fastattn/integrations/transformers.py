"""Hugging Face transformers integration (an optional dependency: ``pip install 'fastattn[hf]'``).

- :func:`register` adds ``"fastattn"`` to ``transformers.AttentionInterface`` (and its mask
  builder to ``AttentionMaskInterface``), so any model whose attention goes through that
  interface (Llama, GPT-2, BERT, BART, Marian, Mistral, Qwen, ...) runs fastattn attention with
  ``AutoModel.from_config(cfg, attn_implementation="fastattn")`` or
  ``model.set_attn_implementation("fastattn")``.
- :func:`fuse_norms_and_mlps` converts a model's norms, SwiGLU MLPs and BERT-style
  "dense + dropout + residual + LayerNorm" blocks to fastattn ops, in place, keeping the same
  Parameter objects.

Importing this module does not import transformers; the two functions do.
"""

from __future__ import annotations

import functools
import warnings
from types import CodeType
from typing import Callable, Optional

import torch
from torch import nn

import fastattn
from fastattn import nn as fnn
from fastattn.backends import get_backend

ATTN_IMPLEMENTATION = "fastattn"
_INSTALL_HINT = "pip install 'fastattn[hf]' (or pip install transformers)"

#: keyword arguments some models pass that fastattn's kernels do not compute, with why.
_UNSUPPORTED_KWARGS = {
    "softcap": "logit soft-capping (Gemma 2)",
    "s_aux": "attention sinks (gpt-oss)",
    "position_bias": "a learned additive position bias (T5): fastattn computes no gradient for a mask",
}


def _transformers_interfaces():
    """(AttentionInterface, AttentionMaskInterface, sdpa_mask), or ImportError saying what to install."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as err:
        raise ImportError(
            "fastattn.integrations.transformers needs transformers with AttentionInterface and "
            f"AttentionMaskInterface (transformers >= 5 is tested): {_INSTALL_HINT}. ({err})"
        ) from err
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    *,
    backend: Optional[str] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An attention function with the contract of transformers' ``sdpa_attention_forward``.

    Arguments:
        module: the calling attention module; its ``is_causal`` is the default for is_causal.
        query: (batch, nheads, seqlen_q, headdim).
        key, value: (batch, nheads_kv, seqlen_k, headdim), nheads % nheads_kv == 0 (GQA runs
            on the kv heads as they are, no repeat_kv copy).
        attention_mask: (batch or 1, 1 or nheads, seqlen_q, seqlen_k) bool (True = takes part)
            or float (added to the scaled scores), or None.
        dropout: attention-probability dropout (the model passes 0.0 in eval).
        scaling: softmax scale, None for 1 / sqrt(headdim).
        is_causal: top-left causal mask, used as transformers' SDPA path does: only without
            an attention_mask and with seqlen_q > 1.
        backend: fastattn backend, None for automatic (``fastattn.use_backend`` also applies).

    Returns:
        (out (batch, seqlen_q, nheads, headdim) in query's dtype, None): the output is a view
        of the kernel's output, no copy. Attention weights are never materialized.
    """
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='fastattn' does not support {name} ({what}); use 'sdpa' or 'eager'")
    if kwargs.get("output_attentions", False):
        warnings.warn("attn_implementation='fastattn' never materializes attention weights; they are returned as None", stacklevel=2)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len = query.shape[2]
    is_causal = bool(is_causal) and q_len > 1 and attention_mask is None
    if is_causal and key.shape[2] > q_len:
        # The empty tail of a static cache at prefill: top-left causal never sees it (as SDPA).
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = fastattn.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal,
        scale=scaling, enable_gqa=True, backend=backend,
    )  # (B, H, Lq, D), a transposed view of a (B, Lq, H, D) buffer
    return out.transpose(1, 2), None


def register(name: str = ATTN_IMPLEMENTATION, *, backend: Optional[str] = None) -> str:
    """Register fastattn's attention with transformers under ``name``.

    Arguments:
        name: the ``attn_implementation`` string to register (default "fastattn").
        backend: "triton", "cuda", "reference" or None (automatic) for every call made
            through this name.

    Returns:
        ``name``. Masks for it are built as for "sdpa" (4-D bool, True = takes part, or None
        when ``is_causal`` alone describes them). Registering again replaces the entry.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if backend is not None:
        get_backend(backend)
    attention_interface, mask_interface, sdpa_mask = _transformers_interfaces()
    function = attention_forward if backend is None else functools.partial(attention_forward, backend=backend)
    attention_interface.register(name, function)
    mask_interface.register(name, sdpa_mask)
    return name


# --------------------------------------------------------------------------------------------
# Norms and MLPs
# --------------------------------------------------------------------------------------------
class FusedSwiGLUMLP(nn.Module):
    """What a Llama-style MLP (``down(silu(gate(x)) * up(x))``) becomes: one
    ``fastattn.feed_forward(..., activation="swiglu")`` with ``w1 = [gate; up]``.

    The module keeps its ``gate_proj``, ``up_proj`` and ``down_proj`` Linears (same
    Parameters, same state_dict keys); w1 is concatenated at each call (2 * F * C elements,
    small next to the activations of a batch), so optimizers and checkpoints see no change.
    forward(x): (..., hidden) -> (..., hidden), x's dtype.
    """

    backend: Optional[str]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        w1 = torch.cat([gate.weight, up.weight])  # (2F, C): rows [gate; up]
        b1 = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        return fastattn.feed_forward(x, w1, b1, down.weight, down.bias, activation="swiglu", backend=self.backend)


class FusedDenseAddLayerNorm(nn.Module):
    """What a BERT-style output block (``LayerNorm(dropout(dense(h)) + input_tensor)``)
    becomes: the Linear, then one ``fastattn.add_layer_norm`` with the dropout and the residual
    add fused in. Keeps ``dense``, ``dropout`` and ``LayerNorm`` submodules and Parameters.
    forward(hidden_states (..., in), input_tensor (..., hidden)) -> (..., hidden).
    """

    backend: Optional[str]

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        norm = self.LayerNorm
        return fastattn.add_layer_norm(
            self.dense(hidden_states), input_tensor, norm.weight, norm.bias, eps=norm.eps,
            dropout_p=self.dropout.p if self.training else 0.0, backend=self.backend,
        )


def _same_code(function: Callable, reference: Callable) -> bool:
    """True when two functions compile to the same instructions, constants and names, i.e.
    transformers copied the reference's code (its "Copied from" / modular convention)."""
    a: CodeType = function.__code__
    b: CodeType = reference.__code__
    return (a.co_code, a.co_consts, a.co_names, a.co_varnames) == (b.co_code, b.co_consts, b.co_names, b.co_varnames)


def _forward_is(module: nn.Module, reference: Callable) -> bool:
    forward = getattr(type(module), "forward", None)
    return forward is not None and hasattr(forward, "__code__") and _same_code(forward, reference)


def _is_silu(act: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return type(act) in (nn.SiLU, SiLUActivation)


def _plain_linears(*modules: nn.Module) -> bool:
    return all(type(m) is nn.Linear for m in modules)


def _convert_llama_rms_norm(module: nn.Module, backend: Optional[str]) -> bool:
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1 and isinstance(eps, float)):
        return False
    module.normalized_shape = (weight.shape[0],)
    module.eps = eps
    module.elementwise_affine = True
    fnn.RMSNorm.from_torch(module, backend)
    return True


def _convert_swiglu_mlp(module: nn.Module, backend: Optional[str]) -> bool:
    gate, up, down = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if not (_plain_linears(gate, up, down) and _is_silu(module.act_fn)) or (gate.bias is None) != (up.bias is None):
        return False
    module.__class__ = FusedSwiGLUMLP
    module.backend = backend
    return True


def _convert_dense_add_layer_norm(module: nn.Module, backend: Optional[str]) -> bool:
    norm, dropout = getattr(module, "LayerNorm", None), getattr(module, "dropout", None)
    if type(norm) not in (nn.LayerNorm, fnn.LayerNorm) or len(norm.normalized_shape) != 1 or type(dropout) is not nn.Dropout:
        return False
    module.__class__ = FusedDenseAddLayerNorm
    module.backend = backend
    return True


def fuse_norms_and_mlps(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Convert, in place, the parts of a transformers model that fastattn fuses:

    - ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` -> ``fastattn.nn.LayerNorm`` / ``RMSNorm``;
    - Llama-style RMSNorms (any class whose forward is ``LlamaRMSNorm``'s code: Llama,
      Mistral, Qwen2/3, Mixtral, ...) -> ``fastattn.nn.RMSNorm``;
    - Llama-style MLPs (``LlamaMLP``'s code with a SiLU activation and plain Linears) ->
      :class:`FusedSwiGLUMLP` (``fastattn.feed_forward`` with swiglu);
    - BERT-style output blocks (``BertSelfOutput``'s code: dense, dropout, LayerNorm of the
      sum with the residual) -> :class:`FusedDenseAddLayerNorm` (``fastattn.add_layer_norm``).

    Each module changes class in place (same object, same Parameters, buffers, hooks and
    state_dict keys), so an optimizer built before the call keeps working. Matching is by
    code, not by name: a variant with another formula (Gemma's ``1 + weight``) is left alone.

    Arguments:
        model: a ``torch.nn.Module`` (typically a ``transformers.PreTrainedModel``).
        backend: "triton", "cuda", "reference" or None (automatic) for the converted modules.

    Returns:
        ``model``. Outputs keep each input's dtype (a Llama RMSNorm with a float32 weight and
        a bfloat16 input returns float32; the fused one returns bfloat16).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        get_backend(backend)
    try:
        from transformers.models.bert.modeling_bert import BertSelfOutput
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
    except ImportError as err:
        raise ImportError(f"fuse_norms_and_mlps needs transformers: {_INSTALL_HINT}. ({err})") from err
    converters = (
        (LlamaRMSNorm.forward, _convert_llama_rms_norm),
        (LlamaMLP.forward, _convert_swiglu_mlp),
        (BertSelfOutput.forward, _convert_dense_add_layer_norm),
    )
    for module in list(model.modules()):
        if type(module) is nn.LayerNorm:
            fnn.LayerNorm.from_torch(module, backend)
        elif type(module) is nn.RMSNorm:
            fnn.RMSNorm.from_torch(module, backend)
        else:
            for reference, convert in converters:
                if _forward_is(module, reference) and convert(module, backend):
                    break
    return model


__all__ = [
    "ATTN_IMPLEMENTATION",
    "FusedDenseAddLayerNorm",
    "FusedSwiGLUMLP",
    "attention_forward",
    "fuse_norms_and_mlps",
    "register",
]
