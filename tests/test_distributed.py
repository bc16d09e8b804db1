"""torch.distributed with fastattn: 2 CPU processes on the gloo backend (loopback only).

- DistributedDataParallel and FSDP2 (``fully_shard``) train fastattn models 3 steps and end with
  the parameters of single-process training on the same global batch: the reference
  Transformer (fastattn.models) and a torch ``nn.TransformerEncoder`` model after
  ``fastattn.replace_modules``.
- ``fastattn.parallel.ring_attention`` (sequence split over the ranks) gives the output and
  gradients of full attention, causal and not, with GQA.

All scenarios run in one spawn of 2 processes (module fixture); each test checks one of them.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastattn
import fastattn.nn as fnn
from fastattn.models import Transformer, TransformerConfig
from fastattn.parallel import ring_attention
from tests.helpers import assert_close_to_reference

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
    # The blocks return (x, h) views; the test never modifies them in place.
    pytest.mark.filterwarnings("ignore:FSDP2-wrapped module"),
]

WORLD = 2
STEPS = 3
LR = 0.1
F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


# --------------------------------------------------------------------------------------------
# Models, batches and the training loop, shared by the workers and the single-process run
# --------------------------------------------------------------------------------------------
class TorchEncoderLM(nn.Module):
    """A causal language model out of torch.nn layers, for ``fastattn.replace_modules``."""

    def __init__(self, vocab=29, d_model=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, 4, 48, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids, targets):  # (B, T) each -> mean next-token loss
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=self.emb.weight.dtype)
        x = self.encoder(self.emb(ids), mask=mask, is_causal=True)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _reference_transformer() -> nn.Module:
    cfg = TransformerConfig(
        src_vocab_size=29, tgt_vocab_size=29, max_len=16, n_layer=1, n_head=4, d_model=32, d_ff=48, dropout=0.0,
    )
    return Transformer(cfg)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and in the single-process run
    model = _reference_transformer() if kind == "reference" else TorchEncoderLM()
    model = fastattn.replace_modules(model.to(F64))
    if kind == "torch":
        assert type(model.encoder.layers[0]) is fnn.TransformerEncoderLayer
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, Transformer):
        return [*model.encoder, *model.decoder]
    return list(model.encoder.layers)


def _batches(kind: str) -> list[tuple[torch.Tensor, ...]]:
    """STEPS global batches of 4 rows; no target is padding, so every rank's mean loss has the
    same token count and the mean of the rank gradients is the global batch's gradient."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        if kind == "reference":
            src = torch.randint(1, 29, (4, 9), generator=gen)
            src[1, 6:] = 0  # padded sources: key padding masks in the encoder and cross-attention
            src[3, 4:] = 0
            tgt = torch.randint(1, 29, (4, 7), generator=gen)
            batches.append((src, tgt, torch.randint(1, 29, (4, 7), generator=gen)))
        else:
            ids = torch.randint(0, 29, (4, 8), generator=gen)
            batches.append((ids, torch.randint(0, 29, (4, 8), generator=gen)))
    return batches


def _loss(model, batch):
    if len(batch) == 3:
        src, tgt, targets = batch
        return model(src, tgt, targets)[1]
    return model(*batch)


def _train(model, batches, rows: slice) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = _loss(model, tuple(t[rows] for t in batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _full_state(model) -> dict[str, torch.Tensor]:
    state = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[name.removeprefix("module.")] = full.detach().clone()
    return state


# --------------------------------------------------------------------------------------------
# Worker scenarios (run on every rank)
# --------------------------------------------------------------------------------------------
def _rows(rank: int) -> slice:
    return slice(2 * rank, 2 * rank + 2)


def _train_ddp(rank, kind):
    model = torch.nn.parallel.DistributedDataParallel(_model(kind))
    losses = _train(model, _batches(kind), _rows(rank))
    return {"losses": losses, "state": _full_state(model)}


def _train_fsdp2(rank, kind):
    from torch.distributed.fsdp import fully_shard

    model = _model(kind)
    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    losses = _train(model, _batches(kind), _rows(rank))
    return {"losses": losses, "state": _full_state(model)}


def _ring_inputs(dtype, causal):
    gen = torch.Generator().manual_seed(2 + causal)
    b, length, h, hkv, d = 2, 2 * 5, 4, 2, 8
    q = torch.randn(b, length, h, d, generator=gen, dtype=F64)
    k = torch.randn(b, length, hkv, d, generator=gen, dtype=F64)
    v = torch.randn(b, length, hkv, d, generator=gen, dtype=F64)
    dout = torch.randn(b, length, h, d, generator=gen, dtype=F64)
    return tuple(t.to(dtype) for t in (q, k, v, dout))


def _ring(rank, dtype, causal):
    q, k, v, dout = _ring_inputs(dtype, causal)
    local = slice(rank * 5, rank * 5 + 5)
    q, k, v = (t[:, local].clone().requires_grad_() for t in (q, k, v))
    out = ring_attention(q, k, v, causal=causal, softmax_scale=0.3)
    out.backward(dout[:, local])
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


SCENARIOS = {
    "ddp-reference": lambda rank: _train_ddp(rank, "reference"),
    "ddp-torch": lambda rank: _train_ddp(rank, "torch"),
    "fsdp2-reference": lambda rank: _train_fsdp2(rank, "reference"),
    "fsdp2-torch": lambda rank: _train_fsdp2(rank, "torch"),
    **{
        f"ring-{'causal' if causal else 'full'}-{str(dtype).removeprefix('torch.')}": (
            lambda rank, dtype=dtype, causal=causal: _ring(rank, dtype, causal)
        )
        for causal in (False, True)
        for dtype in (torch.float32, F64)
    },
}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {name: scenario(rank) for name, scenario in SCENARIOS.items()}
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["reference", "torch"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_data_parallel_training_matches_single_process(ranks, wrapper, kind):
    model = _model(kind)
    batches = _batches(kind)
    losses = _train(model, batches, slice(None))
    expected = _full_state(model)
    for rank_result in ranks:
        state = rank_result[f"{wrapper}-{kind}"]["state"]
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, **TIGHT, msg=f"{wrapper} {kind}: {name}")
    # The global batch's loss is the mean of the ranks' losses (equal token counts); the
    # reference Transformer takes its cross-entropy in float32.
    rank_losses = torch.tensor([r[f"{wrapper}-{kind}"]["losses"] for r in ranks], dtype=F64)
    torch.testing.assert_close(rank_losses.mean(0), torch.tensor(losses, dtype=F64), rtol=1e-6, atol=1e-7)
    assert losses[-1] != losses[0]  # the weights really moved


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ring_attention_matches_full_attention(ranks, causal, dtype):
    name = f"ring-{'causal' if causal else 'full'}-{str(dtype).removeprefix('torch.')}"
    got = {key: torch.cat([r[name][key] for r in ranks], dim=1) for key in ("out", "dq", "dk", "dv")}

    def full(dt):
        q, k, v, dout = (t.to(dt) for t in _ring_inputs(dtype, causal))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out = fastattn.flash_attention(q, k, v, causal=causal, softmax_scale=0.3)
        out.backward(dout)
        return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}

    oracle = full(F64)
    baseline = full(dtype)
    for key, value in got.items():
        assert value.dtype == dtype
        if dtype == F64:
            # flash_attention's lse is float32 for every dtype, and the blocks are merged with
            # it: float64 runs agree to float32's precision, not float64's.
            torch.testing.assert_close(value, oracle[key], rtol=1e-6, atol=1e-6, msg=f"ring {key}")
        else:
            assert_close_to_reference(value, oracle[key], baseline[key], f"ring {key}")


def test_ring_attention_needs_a_process_group():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        ring_attention(q, q, q)


@pytest.fixture
def single_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "k_shape, dtype, error, fragment",
    [
        ((1, 6, 2, 8), F64, ValueError, "equal local lengths"),
        ((1, 4, 3, 8), F64, ValueError, "nheads_kv dividing 4"),
        ((1, 4, 2, 8), torch.float32, TypeError, "dtype"),
    ],
)
def test_ring_attention_checks_inputs_before_communicating(single_rank_group, k_shape, dtype, error, fragment):
    q = torch.randn(1, 4, 4, 8, dtype=F64)
    k = torch.randn(k_shape, dtype=dtype)
    with pytest.raises(error, match=fragment):
        ring_attention(q, k, k, causal=True)


def test_ring_attention_on_one_rank_is_flash_attention(single_rank_group):
    q = torch.randn(2, 7, 4, 8, dtype=F64, requires_grad=True)
    k = torch.randn(2, 7, 2, 8, dtype=F64, requires_grad=True)
    out = ring_attention(q, k, k, causal=True)
    expected = fastattn.flash_attention(q, k, k, causal=True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        torch.autograd.grad(out.sum(), (q, k)), torch.autograd.grad(expected.sum(), (q, k)), rtol=1e-6, atol=1e-6
    )
