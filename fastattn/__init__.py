"""fastattn: fused GPU kernels for the Transformer (attention, residual+LayerNorm, FFN).

Importing fastattn compiles nothing and touches no GPU: backends are imported on first use.
"""

from fastattn._version import __version__
from fastattn.backends import BackendNotSupportedError, backends, use_backend
from fastattn.ops import (
    add_layer_norm,
    feed_forward,
    flash_attention,
    flash_attention_varlen,
    flash_attention_with_kvcache,
    rms_norm,
    scaled_dot_product_attention,
)
from fastattn.replace import replace_modules
from fastattn import models, nn  # noqa: E402  (after the ops they are built on)


__all__ = [
    "BackendNotSupportedError",
    "__version__",
    "add_layer_norm",
    "backends",
    "feed_forward",
    "flash_attention",
    "flash_attention_varlen",
    "flash_attention_with_kvcache",
    "models",
    "nn",
    "replace_modules",
    "rms_norm",
    "scaled_dot_product_attention",
    "use_backend",
]
