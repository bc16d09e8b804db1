"""``KVCache``: preallocated keys and values of one attention layer for incremental decoding.

Two layouts, as ``fastattn.flash_attention_with_kvcache`` reads them:
- contiguous: ``k``/``v`` (B, max_len, Hkv, D), sequence b in row b;
- paged: ``k``/``v`` (num_blocks, block_size, Hkv, D) plus ``block_table`` (B, blocks per
  sequence) int32. The blocks are interleaved across sequences (sequence b's j-th block is
  block ``j * B + b``), so no sequence's cache is one contiguous slab (as in a paged server).
``lengths`` (B,) int32 counts the valid positions of each sequence; positions at and past it
hold stale (finite) values that are never used.

A cross-attention cache (``cross=True``) holds the projected encoder memory: filled once, on
the first step, and read on every step after.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class KVCache:
    """Keys and values of one attention layer, appended one step at a time.

    Arguments:
        batch, max_len, nheads_kv, head_dim: positive ints; max_len is each sequence's capacity.
        dtype, device: of the k/v buffers (the attention's q dtype and device).
        block_size: None for a contiguous cache, else a positive int: a paged cache of
            ``ceil(max_len / block_size)`` blocks per sequence.
        cross: True for a cross-attention cache (filled once with the projected memory).

    Attributes:
        k, v: (B, max_len, Hkv, D) contiguous or (num_blocks, block_size, Hkv, D) paged.
        block_table: (B, blocks per sequence) int32, or None (contiguous).
        lengths: (B,) int32 valid positions per sequence.
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        nheads_kv: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device=None,
        block_size: Optional[int] = None,
        cross: bool = False,
    ) -> None:
        for name, value in (("batch", batch), ("max_len", max_len), ("nheads_kv", nheads_kv), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be None (contiguous) or a positive int, got {block_size!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.max_len, self.cross = max_len, bool(cross)
        self.block_size = block_size
        if block_size is None:
            shape = (batch, max_len, nheads_kv, head_dim)
            self.block_table = None
        else:
            per_seq = math.ceil(max_len / block_size)
            shape = (batch * per_seq, block_size, nheads_kv, head_dim)
            blocks = torch.arange(per_seq * batch, dtype=torch.int32, device=device)
            self.block_table = blocks.view(per_seq, batch).t().contiguous()  # (B, per_seq): block j*B + b
        # zeros, not empty: a masked stale slot must stay finite for matmul-based readers (0 * NaN = NaN)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)
        self.filled = False  # a cross-attention cache holds its memory

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def is_paged(self) -> bool:
        return self.block_table is not None

    def reset(self) -> None:
        """Forget every sequence (the buffers are kept)."""
        self.lengths.zero_()
        self.filled = False

    def check_room(self, new: int) -> None:
        """ValueError when appending ``new`` positions would overflow some sequence."""
        longest = int(self.lengths.max()) + new if self.batch else new
        if longest > self.max_len:
            raise ValueError(f"the KV cache holds max_len={self.max_len} positions per sequence; appending {new} "
                             f"to the longest ({longest - new}) would need {longest}")

    def _slots(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) int64 positions -> the (B, L) indices of dims 0 and 1 of k/v holding them."""
        rows = torch.arange(self.batch, device=positions.device)[:, None].expand_as(positions)
        if self.block_table is None:
            return rows, positions
        blocks = self.block_table.long().gather(1, positions // self.block_size)
        return blocks, positions % self.block_size

    def write(self, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """Store new keys/values after each sequence's valid prefix and advance ``lengths``;
        with ``keep`` (B, L) bool only the kept tokens, packed in order.

        k, v: (B, L, Hkv, D) in the cache's dtype.
        """
        b, length = k.shape[:2]
        self.check_room(length)
        step = torch.ones(b, length, dtype=torch.long, device=k.device) if keep is None else keep.long()
        offsets = torch.cumsum(step, dim=1) - step  # (B, L): rank of each kept token in its row
        positions = self.lengths.long()[:, None] + offsets
        kept = step.bool()
        dim0, dim1 = self._slots(positions.masked_fill(~kept, 0))
        self.k[dim0[kept], dim1[kept]] = k[kept]
        self.v[dim0[kept], dim1[kept]] = v[kept]
        self.lengths += step.sum(1).to(torch.int32)

    def fill(self, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        """A cross-attention cache's one write: replace its contents with k, v (B, S, Hkv, D),
        only the kept (B, S) keys, packed (attention without positions ignores key order)."""
        self.reset()
        self.write(k, v, keep)
        self.filled = True

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's first max_len positions, (B, max_len, Hkv, D) each (the valid part
        is ``[:lengths[b]]``): views of a contiguous cache, gathered copies of a paged one."""
        if self.block_table is None:
            return self.k, self.v
        positions = torch.arange(self.max_len, device=self.k.device)[None].expand(self.batch, -1)
        dim0, dim1 = self._slots(positions)
        return self.k[dim0, dim1], self.v[dim0, dim1]

    def valid_mask(self) -> torch.Tensor:
        """(B, max_len) bool, True at each sequence's valid positions."""
        return torch.arange(self.max_len, device=self.lengths.device)[None] < self.lengths[:, None]

    def attend(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor] = None,
        v: Optional[torch.Tensor] = None,
        *,
        keep: Optional[torch.Tensor] = None,
        causal: bool = False,
        softmax_scale: Optional[float] = None,
        backend: Optional[str] = None,
    ) -> torch.Tensor:
        """Append the new keys/values (if any) and attend q over each sequence's valid prefix
        with ``fastattn.flash_attention_with_kvcache`` (inference only).

        Arguments:
            q: (B, Lq, H, D), the cache's dtype and device; H a multiple of Hkv.
            k, v: (B, L, Hkv, D) new keys/values, or None (attend over the cache as it is).
            keep: (B, L) bool, True at the new tokens that are real keys; a padding token is
                not stored (its own query still attends over the sequence's real keys).
            causal: bottom-right aligned; with padding among the new tokens only Lq = 1.
        Returns (B, Lq, H, D).
        """
        import fastattn

        common = dict(block_table=self.block_table, softmax_scale=softmax_scale, backend=backend)
        if k is not None and (keep is None or bool(keep.all())):
            self.check_room(k.shape[1])
            out = fastattn.flash_attention_with_kvcache(
                q, self.k, self.v, k, v, cache_seqlens=self.lengths, causal=causal, **common
            )
            self.lengths += k.shape[1]
            return out
        if k is not None:
            if causal and q.shape[1] > 1:
                raise ValueError("a causal step over the KV cache with padded new tokens (key_padding_mask) "
                                 "must have one query per sequence; append the padded prompt one token at a time")
            self.write(k, v, keep)  # only the real tokens: later queries never see the padding
            causal = False  # one query per sequence sees every stored key
        return fastattn.flash_attention_with_kvcache(
            q, self.k, self.v, cache_seqlens=self.lengths, causal=causal, **common
        )
