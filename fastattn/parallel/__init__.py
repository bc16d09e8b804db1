"""Multi-device building blocks on top of fastattn's ops (torch.distributed).

- :func:`ring_attention`: context-parallel attention over a sequence split across ranks.
"""

from fastattn.parallel.ring_attention import ring_attention

__all__ = ["ring_attention"]
