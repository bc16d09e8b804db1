"""Drop-in ``torch.nn`` modules running fastattn's fused ops.

``MultiheadAttention``, ``LayerNorm``, ``RMSNorm``, ``TransformerEncoderLayer`` and
``TransformerDecoderLayer`` subclass the torch classes of the same names: same constructor
arguments and defaults (plus a keyword-only ``backend``), same parameter names and state_dict
keys, same forward signature and results. ``AddLayerNorm`` (residual + dropout + LayerNorm) and
``FeedForward`` are fastattn's own. To convert an existing model use
:func:`fastattn.replace_modules`. ``KVCache`` holds one attention layer's keys and values
for incremental decoding (``MultiheadAttention(..., kv_cache=cache)``).
"""

from fastattn.nn.attention import MultiheadAttention
from fastattn.nn.kv_cache import KVCache
from fastattn.nn.ffn import FeedForward
from fastattn.nn.norm import AddLayerNorm, LayerNorm, RMSNorm
from fastattn.nn.transformer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "AddLayerNorm",
    "FeedForward",
    "KVCache",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "TransformerDecoderLayer",
    "TransformerEncoderLayer",
]
