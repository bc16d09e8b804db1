"""CPU decoding over a KV cache (csrc/cpu/attention_kvcache.cpp):
``torch.ops.fastattn.cpu_attention_kvcache_fwd``.

Split-KV (flash-decoding): one task per (sequence, kv head, chunk of keys) under one
``at::parallel_for`` (threads follow ``torch.get_num_threads()``), so one long sequence uses
every thread; a task processes its kv head's whole query group (GQA) so each K / V row is read
once per group; chunks are combined by logsumexp from fp32 scratch. Contiguous caches (with
optional ``cache_batch_idx``) and paged caches (``block_table``; entries past a sequence's last
block are never read). Causal / window masks are bottom-right aligned per sequence; softcap
and ALiBi as in :mod:`fastattn.cpu.attention`. fp32 accumulation; fp16 / bf16 / fp32 inputs.
"""

from __future__ import annotations

import functools

import torch

from fastattn.cpu import ensure_loaded
from fastattn.options import AttentionOptions, KVCacheInputs


def forward(inputs: KVCacheInputs, options: AttentionOptions, *, chunk_size: int = 0):
    """out (B, Lq, H, D) in q's dtype, lse (B, H, Lq) fp32 (-inf and output 0 for queries that
    see no key). chunk_size: keys per split-KV task (0: chosen from the shapes and the thread
    count; tests force small chunks to exercise the combine)."""
    ensure_loaded()
    return torch.ops.fastattn.cpu_attention_kvcache_fwd(
        inputs.q,  # (B, Lq, H, D)
        inputs.k_cache,  # (B_cache, L, Hkv, D) or paged (num_blocks, block_size, Hkv, D)
        inputs.v_cache,
        inputs.cache_seqlens,  # (B,) int32, new tokens included
        inputs.block_table,  # (B, max_blocks) int32 or None
        inputs.cache_batch_idx,  # (B,) int32 or None
        inputs.alibi_slopes,  # (H,) or (B, H) fp32 or None
        options.softmax_scale,
        float(options.softcap),
        options.causal,
        int(options.window_left),
        int(options.window_right),
        chunk_size,
    )


def append(inputs: KVCacheInputs, k: torch.Tensor, v: torch.Tensor) -> None:
    """Writes k, v (B, Lnew, Hkv, D) into the caches in place at positions cache_seqlens[b] +
    (0..Lnew-1) of sequence b (inputs.cache_seqlens: the lengths before the append), as
    fastattn/ops/kvcache.py's shared ``_append`` does, in one C++ call."""
    ensure_loaded()
    torch.ops.fastattn.cpu_attention_kvcache_append(
        inputs.k_cache, inputs.v_cache, k, v, inputs.cache_seqlens, inputs.block_table, inputs.cache_batch_idx,
    )


def _kvcache_fake(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, alibi_slopes, *scalars):
    b, lq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, lq), dtype=torch.float32)


def _append_fake(k_cache, v_cache, k, v, cache_seqlens, block_table, cache_batch_idx):
    return None


@functools.lru_cache(maxsize=None)
def register_python_ops() -> None:
    """Fake kernel of the kvcache op (torch.compile, opcheck); called by fastattn.cpu.attention."""
    torch.library.register_fake("fastattn::cpu_attention_kvcache_fwd")(_kvcache_fake)
    torch.library.register_fake("fastattn::cpu_attention_kvcache_append")(_append_fake)
