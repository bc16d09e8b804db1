"""Backend registry: declarative capabilities, selection order, forcing, and error messages."""

import pytest
import torch

import fastattn
from fastattn.backends import BackendNotSupportedError, get_backend, select
from fastattn.backends.capabilities import AttentionCapabilities, HALF_DTYPES
from fastattn.options import AttentionInputs, AttentionOptions


def _inputs(dtype=torch.float32, d=8, h=2, hkv=2):
    return AttentionInputs(*(torch.randn(1, 4, n, d, dtype=dtype) for n in (h, hkv, hkv)))


def test_backends_lists_every_backend_with_reasons():
    statuses = {s.name: s for s in fastattn.backends()}
    assert list(statuses) == ["cuda", "triton", "cpu", "reference"]
    assert statuses["reference"].available and statuses["reference"].ops == ("attention", "norm", "ffn")
    for status in statuses.values():
        assert status.available or status.reasons, f"{status.name} unavailable without a reason"
    if not torch.cuda.is_available():
        assert not statuses["cuda"].available


def test_capabilities_give_reasons():
    caps = AttentionCapabilities(dtypes=HALF_DTYPES, max_head_dim=64, dropout=False, gqa=False)
    reasons = caps.not_supported_reasons(
        _inputs(d=80, h=4, hkv=2), AttentionOptions(softmax_scale=1.0, dropout_p=0.1)
    )
    text = "; ".join(reasons)
    assert "dtype float32 is not supported" in text
    assert "head_dim 80" in text and "dropout" in text and "grouped-query" in text


def test_auto_selection_on_cpu_is_cpu_for_attention():
    # The C++ cpu backend first for CPU tensors; float64 (not in its dtypes) stays on reference.
    assert select("attention", _inputs(), AttentionOptions(softmax_scale=1.0)).name == "cpu"
    assert select("attention", _inputs(torch.float64), AttentionOptions(softmax_scale=1.0)).name == "reference"


def test_forcing_an_unavailable_backend_lists_why():
    with pytest.raises(BackendNotSupportedError, match="backend 'cuda' cannot run attention"):
        select("attention", _inputs(), AttentionOptions(softmax_scale=1.0), backend="cuda")
    assert issubclass(BackendNotSupportedError, ValueError)


def test_use_backend_context_and_environment(monkeypatch):
    q, k, v = (torch.randn(1, 3, 2, 8) for _ in range(3))
    calls = []
    reference = get_backend("reference")
    original = reference.forward

    def spy(op, *args):
        calls.append(op)
        return original(op, *args)

    monkeypatch.setattr(reference, "forward", spy)
    with fastattn.use_backend("reference"):
        fastattn.flash_attention(q, k, v)
    assert calls == ["attention"]
    with fastattn.use_backend("cuda"), pytest.raises(BackendNotSupportedError):
        fastattn.flash_attention(q, k, v)
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError, match="'cuda'"):
        fastattn.flash_attention(q, k, v)
    # The argument wins over the environment.
    fastattn.flash_attention(q, k, v, backend="reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        with fastattn.use_backend("nope"):
            pass


def test_import_is_free_of_side_effects():
    import subprocess
    import sys

    code = (
        "import sys, fastattn; "
        "assert 'triton' not in sys.modules, 'triton imported at import time'; "
        "assert 'fastattn.bench' not in sys.modules; "
        "assert not {'fastattn._build', 'fastattn.cuda', 'fastattn.triton'} & set(sys.modules), 'a backend imported'; "
        "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialized at import time'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""}, check=False)
    assert out.stdout.strip() == "ok", out.stderr
