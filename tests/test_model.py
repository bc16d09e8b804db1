"""The reference Transformer: fused and naive impls share one state_dict and agree; the
synthetic task is right; the demo's training loss falls."""

import math
import re

import pytest
import torch

from fastattn.models import BOS, EOS, PAD, SyntheticTranslation, Transformer, TransformerConfig
from fastattn.models import demo
from tests.conftest import requires_cuda
from tests.helpers import assert_close_to_reference

F64 = torch.float64
TASK = SyntheticTranslation(n_words=11, min_len=2, max_len=9)


def _config(**kw):
    base = dict(
        src_vocab_size=TASK.vocab_size, tgt_vocab_size=TASK.vocab_size, max_len=TASK.max_target_len,
        n_layer=2, n_head=4, d_model=32, d_ff=48, dropout=0.0,
    )
    return TransformerConfig(**{**base, **kw})


def _pair(dtype=F64, device="cpu", **kw):
    """The fused and the naive model with the same weights."""
    fused = Transformer(_config(impl="fused", **kw)).to(device=device, dtype=dtype)
    naive = Transformer(_config(impl="naive", **kw)).to(device=device, dtype=dtype)
    assert list(fused.state_dict()) == list(naive.state_dict())
    naive.load_state_dict(fused.state_dict())
    return fused, naive


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_and_naive_agree(norm_first, activation, bias):
    fused, naive = _pair(norm_first=norm_first, activation=activation, bias=bias)
    batch = TASK.sample(5)
    assert (batch.src == PAD).any(), "the batch should hold padded sentences"
    logits_f, loss_f = fused(*batch)
    logits_n, loss_n = naive(*batch)
    assert logits_f.shape == (5, batch.tgt_in.shape[1], TASK.vocab_size)
    torch.testing.assert_close(logits_f, logits_n, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(loss_f, loss_n, rtol=1e-9, atol=1e-10)
    loss_f.backward()
    loss_n.backward()
    for (name, p_f), p_n in zip(fused.named_parameters(), naive.parameters()):
        torch.testing.assert_close(p_f.grad, p_n.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_fused_and_naive_agree_in_float32():
    fused, naive = _pair(dtype=torch.float32)
    batch = TASK.sample(6)
    ref, _ = _pair()
    ref.load_state_dict(fused.state_dict())
    expected = ref(*batch)[0]
    assert_close_to_reference(fused(*batch)[0], expected, naive(*batch)[0], "logits")


def test_padding_does_not_change_a_sentence():
    """A sentence's logits do not depend on how much padding its batch adds."""
    fused, _ = _pair()
    fused.eval()
    batch = TASK.sample(4)
    n_src = int((batch.src[0] != PAD).sum())
    n_tgt = int((batch.tgt_in[0] != PAD).sum())
    full = fused(batch.src[:1], batch.tgt_in[:1])[0][0, :n_tgt]
    trimmed = fused(batch.src[:1, :n_src], batch.tgt_in[:1, :n_tgt])[0][0]
    torch.testing.assert_close(full, trimmed, rtol=1e-9, atol=1e-10)


def test_dropout_only_in_training():
    fused, naive = _pair(dropout=0.3)
    batch = TASK.sample(4)
    fused.eval(), naive.eval()
    torch.testing.assert_close(fused(*batch)[0], naive(*batch)[0], rtol=1e-9, atol=1e-10)
    fused.train()
    train_logits = fused(*batch)[0]
    assert torch.isfinite(train_logits).all()
    assert (train_logits - naive(*batch)[0]).abs().max() > 1e-3


def test_greedy_decoding_agrees_and_stops():
    fused, naive = _pair()
    src = TASK.sample(6).src
    out_f = fused.generate(src, TASK.max_target_len, BOS, EOS)
    out_n = naive.generate(src, TASK.max_target_len, BOS, EOS)
    assert out_f.shape[0] == 6 and out_f.shape[1] <= TASK.max_target_len
    torch.testing.assert_close(out_f, out_n, rtol=0, atol=0)
    for row in out_f.tolist():  # after EOS only PAD follows
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


def test_weight_tying_and_config_errors():
    model = Transformer(_config())
    assert model.lm_head.weight is model.tgt_emb.weight
    with pytest.raises(ValueError, match="impl"):
        _config(impl="fast")
    with pytest.raises(ValueError, match="divisible"):
        _config(d_model=30, n_head=4)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, TASK.max_target_len + 1, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))


@pytest.mark.parametrize(
    "kw,error,fragment",
    [
        (dict(n_head=0), ValueError, "n_head must be a positive int"),
        (dict(d_model=-32), ValueError, "d_model must be a positive int"),
        (dict(n_layer=2.0), TypeError, "n_layer must be a positive int"),
        (dict(max_len=0), ValueError, "max_len must be a positive int"),
        (dict(dropout=1.0), ValueError, "dropout must be in [0, 1)"),
        (dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps must be a positive"),
        (dict(pad_id=TASK.vocab_size), ValueError, "pad_id"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
    ],
)
def test_config_rejects_bad_values_by_name(kw, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        _config(**kw)


def test_synthetic_task_batches():
    gen = torch.Generator().manual_seed(3)
    batch = TASK.sample(32, gen)
    table = TASK.dictionary()
    assert sorted(table[3:].tolist()) == list(range(3, TASK.vocab_size))
    assert (batch.tgt_in[:, 0] == BOS).all()
    for src, tgt_in, tgt_out in zip(batch.src.tolist(), batch.tgt_in.tolist(), batch.tgt_out.tolist()):
        words = [w for w in src if w != PAD]
        assert TASK.min_len <= len(words) <= TASK.max_len
        assert src[: len(words)] == words  # right padding
        expected = [table[w].item() for w in reversed(words)]
        assert TASK.translate(src) == expected
        assert tgt_in[1: len(words) + 1] == expected
        assert tgt_out[: len(words) + 1] == expected + [EOS]
        assert set(tgt_out[len(words) + 1:]) <= {PAD}
    lengths = (batch.src != PAD).sum(1)
    assert lengths.min() < lengths.max(), "a batch mixes sentence lengths"
    assert TASK.to_text([3, 4, 5, EOS, 6]) == "a b c"
    assert TASK.to_text([3, 4], target=True) == "A B"


def test_demo_loss_falls(capsys):
    result = demo.run([
        "--steps", "40", "--batch-size", "32", "--d-model", "32", "--d-ff", "64", "--n-layer", "1",
        "--lr", "1e-2", "--log-every", "20", "--examples", "2", "--device", "cpu", "--min-len", "2", "--max-len", "5",
    ])
    printed = capsys.readouterr().out
    uniform = math.log(SyntheticTranslation().vocab_size)  # the loss of guessing
    for impl in ("fused", "naive"):
        losses = result.losses[impl]
        assert len(losses) == 40
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.8 * first and last < uniform - 0.3, f"{impl}: loss {first:.3f} -> {last:.3f}"
        assert 0.0 <= result.accuracy[impl] <= 1.0 and result.ms_per_step[impl] > 0
    # same start, same batches, no dropout: the two implementations track each other
    for lf, ln in zip(result.losses["fused"], result.losses["naive"]):
        assert abs(lf - ln) < 1e-2 * max(1.0, ln)
    assert "greedy translations" in printed and "ms/step" in printed
    assert len(result.examples) == 2
    # greedy decoding timed both ways in the same run, both times printed
    assert "re-run decoder ms" in printed and "KV cache ms" in printed
    for impl in ("fused", "naive"):
        assert result.decode_ms[impl]["cached"] > 0 and result.decode_ms[impl]["recompute"] > 0
        assert result.decode_agreement[impl] == 256


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--device", "gpu0"], "--device must be"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--n-head", "3"], "d_model (64) must be divisible by n_head (3)"),
        (["--backend", "tpu"], "backend must be one of"),
    ],
)
def test_demo_bad_arguments_exit_with_a_message(argv, fragment):
    """Bad options end the command with a message naming them, not a traceback."""
    with pytest.raises(SystemExit, match=re.escape(fragment)):
        demo.run(["--steps", "1", *argv])


def test_demo_cli_entry_point(capsys):
    assert demo.main(["--steps", "2", "--impl", "naive", "--d-model", "16", "--n-head", "2", "--examples", "1", "--device", "cpu"]) == 0
    assert "naive" in capsys.readouterr().out


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_first", [True, False])
def test_fused_and_naive_agree_on_gpu(dtype, norm_first):
    fused, naive = _pair(dtype=dtype, device="cuda", norm_first=norm_first, d_model=128, d_ff=256)
    ref = Transformer(_config(impl="naive", norm_first=norm_first, d_model=128, d_ff=256)).to("cuda", F64)
    ref.load_state_dict(fused.state_dict())
    batch = [t.cuda() for t in TASK.sample(8)]
    assert_close_to_reference(fused(*batch)[0], ref(*batch)[0], naive(*batch)[0], "logits", atol_scale=10.0)
