"""Integrations with other libraries. Each submodule imports its library only when imported
itself, so ``import fastattn`` never needs them:

- :mod:`fastattn.integrations.transformers`: Hugging Face transformers
  (``attn_implementation="fastattn"``, fused norms and SwiGLU MLPs).
"""
