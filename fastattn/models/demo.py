"""``fastattn demo``: train the reference Transformer on the synthetic translation task, the
fused (fastattn ops) and naive (plain PyTorch) implementations side by side.

Both models start from the same weights and see the same batches, so their losses should
track each other; the demo prints the losses, greedy translations from both, their accuracy
and the time per training step. Greedy decoding runs twice per model, over KV caches (one token
per step) and re-running the whole decoder each step: the demo checks they give the same tokens
and prints both times, and which backend served the fused ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from fastattn.cli import resolve_device
from fastattn.models.data import BOS, EOS, SyntheticTranslation
from fastattn.models.transformer import Transformer, TransformerConfig

IMPLS = ("fused", "naive")


@dataclasses.dataclass
class DemoResult:
    losses: dict[str, list[float]]  # per impl, one per step
    accuracy: dict[str, float]  # exact-match greedy translations on held-out sentences
    ms_per_step: dict[str, float]  # mean training step time after the first steps
    decode_ms: dict[str, dict[str, float]]  # per impl: {"cached": ms, "recompute": ms} greedy decoding of the test set
    decode_agreement: dict[str, int]  # per impl: test sentences decoded to the same tokens both ways
    examples: list[tuple[str, str, dict[str, str]]]  # (source, reference, {impl: output})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastattn demo",
        description="Train the reference encoder-decoder Transformer on a synthetic translation task "
        "(reverse a sentence and translate each word through a fixed dictionary), fused vs naive.",
    )
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--steps", type=int, default=300, help="training steps per implementation (default 300)")
    parser.add_argument("--device", default=default_device, help=f"torch device (default {default_device})")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=2, help="encoder layers (and decoder layers)")
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--post-norm", action="store_true", help="post-norm layers (the paper's); default pre-norm")
    parser.add_argument("--min-len", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=10)
    parser.add_argument("--impl", choices=(*IMPLS, "both"), default="both")
    parser.add_argument("--backend", default=None, help="fastattn backend for the fused model (default automatic)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--examples", type=int, default=4, help="greedy translations to print")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads for torch during the demo (default 1: the model is tiny, and more threads "
        "only contend on a busy machine); 0 keeps torch's setting",
    )
    return parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _lr(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 10% of steps, then linear decay to 10% of the peak."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (1.0 - 0.9 * (step - warmup) / max(1, steps - warmup))


def run(argv: Optional[Sequence[str]] = None) -> DemoResult:
    """Parse the demo's arguments, train, evaluate, print; returns the numbers printed."""
    args = build_parser().parse_args(argv)
    try:
        for option in ("steps", "batch_size", "log_every"):
            if getattr(args, option) < 1:
                raise ValueError(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
        device = resolve_device(args.device)
        task = SyntheticTranslation(min_len=args.min_len, max_len=args.max_len)
        config = TransformerConfig(
            src_vocab_size=task.vocab_size, tgt_vocab_size=task.vocab_size, max_len=task.max_target_len,
            n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model, d_ff=args.d_ff,
            dropout=args.dropout, norm_first=not args.post_norm, backend=args.backend,
        )
    except (ValueError, TypeError) as err:
        raise SystemExit(f"fastattn demo: {err}") from None
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _train_and_report(args, device, task, config)
    finally:
        torch.set_num_threads(threads)


def _train_and_report(
    args: argparse.Namespace, device: torch.device, task: SyntheticTranslation, config: TransformerConfig
) -> DemoResult:
    impls = IMPLS if args.impl == "both" else (args.impl,)
    torch.manual_seed(args.seed)
    models = {impl: Transformer(dataclasses.replace(config, impl=impl)).to(device) for impl in impls}
    first = models[impls[0]]
    for model in models.values():
        model.load_state_dict(first.state_dict())  # identical start
    optimizers = {
        impl: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
        for impl, m in models.items()
    }
    print(
        f"fastattn demo: {first.num_parameters():,} parameters, {'post' if args.post_norm else 'pre'}-norm, "
        f"{args.steps} steps x batch {args.batch_size} on {device} ({', '.join(impls)})"
    )

    data_gen = torch.Generator().manual_seed(args.seed + 1)
    losses: dict[str, list[float]] = {impl: [] for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True)
    for step in bar:
        batch = task.sample(args.batch_size, data_gen, device)
        lr = _lr(step, args.steps, args.lr)
        for impl, model in models.items():
            for group in optimizers[impl].param_groups:
                group["lr"] = lr
            model.train()
            _sync(device)
            start = time.perf_counter()
            _, loss = model(batch.src, batch.tgt_in, batch.tgt_out)
            optimizers[impl].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[impl].step()
            _sync(device)
            times[impl].append(time.perf_counter() - start)
            losses[impl].append(loss.item())
        bar.set_postfix({impl: f"{losses[impl][-1]:.3f}" for impl in impls})
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            bar.write(f"step {step + 1:5d}  " + "  ".join(f"{impl} loss {losses[impl][-1]:.4f}" for impl in impls))
    bar.close()

    test_gen = torch.Generator().manual_seed(args.seed + 2)
    test = task.sample(256, test_gen, device)
    references = [task.translate(row) for row in test.src.tolist()]
    outputs: dict[str, list[list[int]]] = {}
    accuracy: dict[str, float] = {}
    decode_ms: dict[str, dict[str, float]] = {}
    agree: dict[str, int] = {}
    for impl, model in models.items():
        model.eval()
        preds, decode_ms[impl] = {}, {}
        for label, use_cache in (("recompute", False), ("cached", True)):
            model.generate(test.src[:2], task.max_target_len, BOS, EOS, use_cache=use_cache)  # warm-up
            _sync(device)
            start = time.perf_counter()
            preds[label] = model.generate(test.src, task.max_target_len, BOS, EOS, use_cache=use_cache)
            _sync(device)
            decode_ms[impl][label] = 1e3 * (time.perf_counter() - start)
        # equal but for a float near-tie between two tokens, which the two orders of summation may break differently
        agree[impl] = sum(a == b for a, b in zip(preds["cached"].tolist(), preds["recompute"].tolist()))
        outputs[impl] = [task.strip(row) for row in preds["cached"].tolist()]
        accuracy[impl] = sum(o == r for o, r in zip(outputs[impl], references)) / len(references)

    examples = []
    for i in range(min(args.examples, len(references))):
        src_text = task.to_text(test.src[i].tolist())
        ref_text = task.to_text(references[i], target=True)
        examples.append((src_text, ref_text, {impl: task.to_text(outputs[impl][i], target=True) for impl in impls}))
    print("\ngreedy translations (held-out sentences):")
    for src_text, ref_text, outs in examples:
        print(f"  source     {src_text}\n  reference  {ref_text}")
        for impl, text in outs.items():
            mark = "ok" if text == ref_text else "wrong"
            print(f"  {impl:<10} {text}   [{mark}]")
        print()

    skip = min(5, args.steps - 1)  # the first steps include allocator and lazy-init warmup
    ms = {impl: 1e3 * sum(t[skip:]) / len(t[skip:]) for impl, t in times.items()}
    print(f"{'impl':<8}{'first loss':>12}{'last loss':>12}{'accuracy':>10}{'ms/step':>10}")
    for impl in impls:
        print(f"{impl:<8}{losses[impl][0]:>12.4f}{losses[impl][-1]:>12.4f}{accuracy[impl]:>10.1%}{ms[impl]:>10.2f}")
    print(f"\ngreedy decoding of {len(references)} held-out sentences, re-running the decoder every step vs KV cache:")
    print(f"{'impl':<8}{'re-run decoder ms':>19}{'KV cache ms':>13}{'speedup':>9}{'same tokens':>13}")
    for impl in impls:
        d = decode_ms[impl]
        print(f"{impl:<8}{d['recompute']:>19.1f}{d['cached']:>13.1f}{d['recompute'] / d['cached']:>8.2f}x"
              f"{agree[impl]:>8d}/{len(references)}")
    if "fused" in impls:
        print(f"(fused ops on {device.type}: {serving_backends(device)})")
    return DemoResult(losses=losses, accuracy=accuracy, ms_per_step=ms, decode_ms=decode_ms, decode_agreement=agree, examples=examples)


def serving_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Which backend ``backend=None`` picks for each op on ``device`` (small float inputs)."""
    from fastattn.backends import select
    from fastattn.options import (AttentionInputs, AttentionOptions, FeedForwardInputs, FeedForwardOptions,
                                  NormInputs, NormOptions)

    def t(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    chosen = {
        "attention": select("attention", AttentionInputs(t(1, 4, 2, 8), t(1, 4, 2, 8), t(1, 4, 2, 8)),
                            AttentionOptions(softmax_scale=1.0)),
        "norm": select("norm", NormInputs(t(4, 8), t(4, 8), t(8), t(8)), NormOptions()),
        "ffn": select("ffn", FeedForwardInputs(t(4, 8), t(16, 8), t(16), t(8, 16), t(8)), FeedForwardOptions()),
    }
    return ", ".join(f"{op} -> {backend.name}" for op, backend in chosen.items())


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0
