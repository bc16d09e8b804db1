"""Context-parallel (ring) attention: each rank holds one contiguous slice of the sequence.

Rank r holds queries, keys and values of positions ``[r * L, (r + 1) * L)``. The key/value
slices travel around the ring (rank r sends to r + 1) while each rank attends its queries to
the slice it holds, so no rank ever stores more than two slices or the full score matrix:

forward, block s (the keys of rank s):  out_s, lse_s = flash_attention(q, k_s, v_s, return_lse=True)
    merged by logsumexp:  lse = log(sum_s exp(lse_s));  out = sum_s exp(lse_s - lse) * out_s
backward, block s, with the GLOBAL out and the weight w_s = exp(lse_s - lse) of the block:
    dq, dk_s, dv_s = backend.backward(w_s * dout, out, lse_s, (q, k_s, v_s))
    which is the standard ring backward (P = exp(S - lse), D = rowsum(dout * out)) written so
    that the block's own lse normalizes it: exp(S - lse) = w_s * exp(S - lse_s) and
    rowsum(w_s dout * out) = w_s D, so every backend's primitive (the reference one
    recomputes its block lse instead of reading it) gives the global gradient. dk_s and dv_s
    accumulate in float32 on the ring and arrive back at their owner after a full turn.

Causal attention is over the global sequence (queries and keys share positions): block s < r
is fully visible to rank r, block r is causal, blocks s > r are skipped.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

import fastattn
from fastattn.backends import Backend, select
from fastattn.ops import _checks as checks
from fastattn.options import AttentionInputs, AttentionOptions


class _RingExchange:
    """Starts sending ``send`` to the next rank and receiving the previous rank's tensor of the
    same shape; :meth:`wait` returns it. Compute placed between the two overlaps the transfer.
    Exchanges in flight at the same time need distinct tags."""

    def __init__(self, send: torch.Tensor, group, tag: int = 0) -> None:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.recv = torch.empty_like(send)
        self.requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, send, dist.get_global_rank(group, (rank + 1) % world), group, tag),
            dist.P2POp(dist.irecv, self.recv, dist.get_global_rank(group, (rank - 1) % world), group, tag),
        ])

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.recv


def _block_options(options: AttentionOptions, source: int, rank: int) -> Optional[AttentionOptions]:
    """Options for the keys of rank ``source`` seen by the queries of ``rank`` (None: skipped)."""
    if not options.causal:
        return options
    if source > rank:
        return None
    return AttentionOptions(softmax_scale=options.softmax_scale, causal=source == rank)


def _merge(out, lse, block_out, block_lse):
    """Logsumexp merge. out (B, L, H, D) float32, lse (B, H, L) float32; rows no block has
    seen yet (lse -inf) take the block as it is."""
    new_lse = torch.logaddexp(lse, block_lse)
    seen = ~torch.isneginf(new_lse)
    old_w = torch.where(seen, torch.exp(lse - new_lse), 0.0).transpose(1, 2)[..., None]  # (B, L, H, 1)
    new_w = torch.where(seen, torch.exp(block_lse - new_lse), 0.0).transpose(1, 2)[..., None]
    return out * old_w + block_out.float() * new_w, new_lse


class RingAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options: AttentionOptions, backends: dict, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)  # (B, L, H, D)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)  # (B, H, L)
        block_lses = {}
        kv = torch.stack([k, v])  # (2, B, Lk, Hkv, D): one message per step
        for step in range(world):
            source = (rank - step) % world
            exchange = _RingExchange(kv, group) if step + 1 < world else None
            block = _block_options(options, source, rank)
            if block is not None:
                block_out, block_lse = fastattn.flash_attention(
                    q, kv[0], kv[1], causal=block.causal, softmax_scale=block.softmax_scale,
                    return_lse=True, backend=backends[block.causal].name,
                )
                out, lse = _merge(out, lse, block_out, block_lse)
                block_lses[source] = block_lse
            if exchange is not None:
                kv = exchange.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, *(block_lses[s] for s in sorted(block_lses)))
        ctx.sources = sorted(block_lses)
        ctx.options, ctx.backends, ctx.group = options, backends, group
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, *saved_lses = ctx.saved_tensors
        block_lses = dict(zip(ctx.sources, saved_lses))
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=k.device)  # travels with its block
        for step in range(world):
            source = (rank - step) % world
            exchange = _RingExchange(kv, group) if step + 1 < world else None
            block = _block_options(ctx.options, source, rank)
            if block is not None:
                block_lse = block_lses[source]
                weight = torch.where(torch.isneginf(lse), 0.0, torch.exp(block_lse - lse))  # (B, H, L)
                scaled_dout = (dout.float() * weight.transpose(1, 2)[..., None]).to(dout.dtype)
                inputs = AttentionInputs(q, kv[0], kv[1])
                dq_s, dk_s, dv_s = ctx.backends[block.causal].backward(
                    "attention", scaled_dout, out, block_lse, inputs, block, None
                )
                dq += dq_s.float()
                dkv[0] += dk_s.float()
                dkv[1] += dv_s.float()
            if world > 1:  # after the last step: our own block's total
                dkv = _RingExchange(dkv, group, tag=1).wait()
            if exchange is not None:
                kv = exchange.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group`` (context parallelism).

    Every rank calls it with its own slice; rank r's slice is positions
    ``[r * L, (r + 1) * L)`` of the global sequence. The result and the gradients equal those of
    ``flash_attention`` on the concatenated sequence, sliced the same way.

    Arguments:
        q: (batch, L, nheads, headdim), this rank's queries; float16 / bfloat16 / float32
            (float64 on the reference backend).
        k, v: (batch, Lk, nheads_kv, headdim), this rank's keys and values, q's dtype and
            device, ``nheads % nheads_kv == 0``; ``Lk == L`` when causal. Every rank must pass
            the same shapes.
        causal: causal over the global sequence (query position i sees key positions <= i).
        softmax_scale: a positive float, default ``1 / sqrt(headdim)``.
        group: the process group holding the sequence (default: the world).
        backend: fastattn backend for the per-block attention, None for automatic.

    Returns:
        out: (batch, L, nheads, headdim) in q's dtype, this rank's slice of the output. There
        is no dropout or padding mask: every query row sees at least one key.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ring_attention needs an initialized torch.distributed process group")
    # Checked before any message is posted: a rank failing later would leave its peers waiting.
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.check_tensor(name, t)
        checks.check_ndim(name, t, 4, "(batch, seqlen, nheads, headdim)")
        checks.check_float_dtype(name, t)
        checks.check_same_dtype(name, t, "q", q)
        checks.check_same_device(name, t, "q", q)
    checks.check_bool("causal", causal)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"k must be (batch={q.shape[0]}, Lk, nheads_kv dividing {q.shape[2]}, headdim={q.shape[3]}), got {tuple(k.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if causal and k.shape[1] != q.shape[1]:
        raise ValueError(f"causal ring attention needs equal local lengths, got q {q.shape[1]} and k {k.shape[1]}")
    scale = 1.0 / q.shape[-1] ** 0.5 if softmax_scale is None else checks.check_positive("softmax_scale", softmax_scale)
    group = dist.group.WORLD if group is None else group
    options = AttentionOptions(softmax_scale=scale, causal=causal)
    inputs = AttentionInputs(q, k, v)
    backends: dict[bool, Backend] = {
        flag: select("attention", inputs, AttentionOptions(softmax_scale=scale, causal=flag), backend)
        for flag in ({False, True} if causal else {False})
    }
    return RingAttentionFunction.apply(q, k, v, options, backends, group)


__all__ = ["RingAttentionFunction", "ring_attention"]
