"""The reference encoder-decoder Transformer (fused or naive ops), its synthetic translation
task, and the ``fastattn demo`` training entry point (:mod:`fastattn.models.demo`)."""

from fastattn.models.data import BOS, EOS, PAD, Batch, SyntheticTranslation
from fastattn.models.transformer import Transformer, TransformerConfig, naive_attention

__all__ = ["BOS", "EOS", "PAD", "Batch", "SyntheticTranslation", "Transformer", "TransformerConfig", "naive_attention"]
