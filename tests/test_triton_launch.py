"""Launch-level guards of the Triton kernels, checked without a GPU: the device a launch runs
on, per-call random arguments never specialized, the FFN tuning key bucketed, the attention
grid's axis limits, and dropout refused under CUDA graph capture."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastattn
from fastattn.backends import BackendNotSupportedError, triton_interpret_enabled
from fastattn.options import FeedForwardInputs, FeedForwardOptions, RngState
from fastattn.triton import attention as triton_attention
from fastattn.triton import ffn as triton_ffn
from fastattn.triton import norm as triton_norm

requires_triton_backend = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpret_enabled()),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 for the triton backend",
)


def _unspecialized(kernel) -> set[str]:
    """Arguments a kernel never specializes on (a JITFunction, or the interpreter's wrapper)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    return set(kernel.kwargs.get("do_not_specialize") or ())


def _launched_kernels(module):
    return {
        name: obj for name, obj in vars(module).items()
        if name.endswith("_kernel") and hasattr(obj, "arg_names")
    }


@pytest.mark.parametrize("module", [triton_attention, triton_norm, triton_ffn], ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_random_arguments_are_never_specialized(module):
    """seed / offset are new at every call: a kernel specialized on them (== 1, % 16) would
    compile again at random moments."""
    with_dropout = {n: k for n, k in _launched_kernels(module).items() if "seed" in k.arg_names}
    assert with_dropout, f"no kernel with a seed in {module.__name__}"
    for name, kernel in with_dropout.items():
        offset = "rng_offset" if "rng_offset" in kernel.arg_names else "offset"
        assert {"seed", offset} <= _unspecialized(kernel), name


# --------------------------------------------------------------------------------------------
# FFN: device guard and tuning key
# --------------------------------------------------------------------------------------------
def _ffn_inputs(rows, d_model=16, d_ff=32, dtype=torch.float32):
    return FeedForwardInputs(
        x=torch.randn(rows, d_model, dtype=dtype),
        w1=torch.randn(d_ff, d_model, dtype=dtype) / 4,
        b1=torch.randn(d_ff, dtype=dtype),
        w2=torch.randn(d_model, d_ff, dtype=dtype) / 4,
        b2=torch.randn(d_model, dtype=dtype),
    )


def test_ffn_on_device_picks_the_tensors_gpu():
    class OnGpu1:
        device = torch.device("cuda", 1)

    guard = triton_ffn._on_device(OnGpu1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(triton_ffn._on_device(torch.empty(1)), contextlib.nullcontext)


@requires_triton_backend
def test_ffn_launches_run_inside_the_device_guard(monkeypatch):
    inside = []
    launched = []

    @contextlib.contextmanager
    def guard(t):
        inside.append(t.device)
        yield
        inside.pop()

    monkeypatch.setattr(triton_ffn, "_on_device", guard)
    for name in ("_launch_fwd", "_launch_matmul", "_launch_dz", "_bias_grad"):
        original = getattr(triton_ffn, name)

        def checked(*args, _original=original, _name=name, **kwargs):
            assert inside, f"{_name} launched outside the device guard"
            launched.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_ffn, name, checked)
    inputs = _ffn_inputs(5)
    options = FeedForwardOptions(activation="gelu", dropout_p=0.25, recompute=True)
    rng = RngState(seed=3, offset=7)
    y, z = triton_ffn.forward(inputs, options, rng)
    triton_ffn.backward(torch.randn_like(y), z, inputs, options, rng)
    assert {"_launch_fwd", "_launch_matmul", "_launch_dz", "_bias_grad"} <= set(launched)
    launched.clear()
    assert triton_ffn.dropout_mask(inputs, options, rng).shape == (5, 32)
    assert not inside


@pytest.mark.parametrize("kernel, family", [("fwd", "fwd"), ("dz", "dz"), ("matmul", "matmul")])
def test_ffn_tuning_key_buckets_the_token_count(monkeypatch, kernel, family):
    """The autotuner's key holds the token count rounded up to a power of two, so 5, 7 and 8
    tokens share one tuned choice and 9 gets the next."""
    tuner = triton_ffn._tuned(kernel, None, 4, family)
    keys = []

    def record(*args, grid=None, **kwargs):
        named = dict(zip(tuner.arg_names, args), **kwargs)
        keys.append(tuple(named[k] for k in tuner.keys))

    monkeypatch.setattr(tuner, "run", record)
    monkeypatch.setattr(triton_ffn, "_tuned", lambda *a: tuner)
    options = FeedForwardOptions(activation="relu")
    for rows in (5, 7, 8, 9):
        inputs = _ffn_inputs(rows)
        if kernel == "fwd":
            triton_ffn._launch_fwd(inputs, options, None, torch.empty(rows, 32), torch.empty(rows, 32))
        elif kernel == "dz":
            dy = torch.empty(rows, 16)
            z = torch.empty(rows, 32)
            triton_ffn._launch_dz(dy, z, torch.empty_like(z), torch.empty_like(z), inputs, options, None)
        else:  # a token-count M (dx) and a token-count K (dw1)
            dz = torch.empty(rows, 32)
            triton_ffn._launch_matmul(dz, inputs.w1, torch.empty(rows, 16), options)
            triton_ffn._launch_matmul(dz.t(), inputs.x, torch.empty(32, 16), options)
    series_per_call = [keys[0::2], keys[1::2]] if kernel == "matmul" else [keys]
    for series in series_per_call:
        assert series[0] == series[1] == series[2] != series[3], series


# --------------------------------------------------------------------------------------------
# Attention grid limits
# --------------------------------------------------------------------------------------------
@requires_triton_backend
@pytest.mark.parametrize("what, shape", [("batch", (65536, 1, 1, 8)), ("nheads", (1, 1, 65536, 8))])
def test_attention_grid_axis_limits_are_reasons(what, shape):
    q = torch.empty(1, 1, 1, 8).expand(shape)  # stride-0 views: no memory
    with pytest.raises(BackendNotSupportedError, match=f"{what} 65536 is above 65535"):
        fastattn.flash_attention(q, q, q, backend="triton")
    q_ok = torch.empty(1, 1, 1, 8).expand(65535, 1, 1, 8)
    from fastattn.options import AttentionInputs, AttentionOptions

    assert triton_attention.not_supported_reasons(AttentionInputs(q_ok, q_ok, q_ok), AttentionOptions(softmax_scale=1.0)) == []


# --------------------------------------------------------------------------------------------
# Dropout and CUDA graph capture
# --------------------------------------------------------------------------------------------
def _capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("op", ["attention", "norm", "ffn"])
def test_dropout_under_cuda_graph_capture_raises(monkeypatch, op):
    x = torch.randn(2, 5, 2, 8)
    w1, w2 = torch.randn(32, 8), torch.randn(8, 16)
    calls = {
        "attention": lambda p: fastattn.flash_attention(x, x, x, dropout_p=p, backend="reference"),
        "norm": lambda p: fastattn.add_layer_norm(x, x, dropout_p=p, backend="reference"),
        "ffn": lambda p: fastattn.feed_forward(x, w1, None, w2, None, activation="swiglu", dropout_p=p, backend="reference"),
    }
    _capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA graph.*reuse one dropout mask"):
        calls[op](0.1)
    assert torch.isfinite(calls[op](0.0)).all()  # no dropout: nothing is drawn, capture is fine
