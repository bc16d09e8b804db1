"""Public ops: validation, the one shared autograd layer per op (a pair of torch custom ops,
``torch.ops.fastattn.<op>_forward`` / ``<op>_backward``), and dispatch to a backend."""

from fastattn.ops.attention import flash_attention, flash_attention_varlen, scaled_dot_product_attention
from fastattn.ops.ffn import feed_forward
from fastattn.ops.kvcache import flash_attention_with_kvcache
from fastattn.ops.norm import add_layer_norm, rms_norm

__all__ = [
    "add_layer_norm",
    "feed_forward",
    "flash_attention",
    "flash_attention_varlen",
    "flash_attention_with_kvcache",
    "rms_norm",
    "scaled_dot_product_attention",
]
