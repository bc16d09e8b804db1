"""The eager fast path (fastattn/ops/_custom_op.py): plain eager calls skip the custom ops and
make the same backend calls through each op's own ``torch.autograd.Function``. It must give
bit-identical outputs and gradients to the custom-op path, dropout masks included (the same
seed draws), on every backend that runs here, and anything that traces must still see the
custom ops.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
from fastattn.backends import backends
from fastattn.ops import _custom_op

_AVAILABLE = {b.name for b in backends() if b.available}
#: (backend, dtype) pairs that run on this machine (the cpu backend runs fp16 / bf16 / fp32).
CASES = [
    (name, dtype) for name, dtypes in (("reference", (torch.float32, torch.float64)), ("cpu", (torch.float32,)))
    if name in _AVAILABLE for dtype in dtypes
]


#: The autograd node each op's eager path records, per backend: the ops' Python Functions, or
#: the cpu backend's C++ nodes (csrc/cpu/autograd.cpp).
EAGER_NODES = {
    "reference": {"_AttentionEagerBackward", "_NormEagerBackward", "_FeedForwardEagerBackward"},
    "cpu": {f"torch::autograd::CppNode<fastattn_cpu::(anonymous namespace)::{node}>"
            for node in ("AttentionNode", "NormNode", "FfnNode")},
}
_ALL_EAGER_NODES = set().union(*EAGER_NODES.values())


class _Passthrough(TorchFunctionMode):
    """A torch-function mode that changes nothing but is not a device context: calls inside
    it take the custom ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _DispatchPassthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _inputs(dtype):
    """Leaves for one call of each op: attention (B, L, H, D) with GQA and a padding mask,
    norm (B, L, C) with a residual, FFN weights (swiglu)."""
    b, lq, lk, h, hkv, d, c, ff = 2, 7, 9, 4, 2, 16, 24, 20
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    key_padding_mask = torch.rand(b, lk, generator=g) > 0.2
    return dict(
        q=randn(b, lq, h, d), k=randn(b, lk, hkv, d), v=randn(b, lk, hkv, d), key_padding_mask=key_padding_mask,
        x=randn(b, lq, c), residual=randn(b, lq, c), weight=randn(c), bias=randn(c),
        w1=randn(2 * ff, c), b1=randn(2 * ff), w2=randn(c, ff), b2=randn(c),
    )


def _calls(t, backend):
    """Each op with dropout, as (output, its grad_fn's name)."""
    attn = fastattn.flash_attention(t["q"], t["k"], t["v"], causal=True, key_padding_mask=t["key_padding_mask"],
                                    dropout_p=0.3, backend=backend)
    sdpa = fastattn.scaled_dot_product_attention(
        t["q"].transpose(1, 2), t["k"].transpose(1, 2), t["v"].transpose(1, 2), dropout_p=0.2, is_causal=True,
        enable_gqa=True, backend=backend,
    ).transpose(1, 2)
    y, h = fastattn.add_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], dropout_p=0.25, prenorm=True,
                                   backend=backend)
    rms = fastattn.rms_norm(t["x"], None, t["weight"], backend=backend)  # h is x: no residual, no dropout
    ffn = fastattn.feed_forward(y, t["w1"], t["b1"], t["w2"], t["b2"], activation="swiglu", dropout_p=0.2,
                                backend=backend)
    return [attn, sdpa, y, h, rms, ffn]


def _run(dtype, backend, mode=None):
    tensors = _inputs(dtype)
    torch.manual_seed(11)
    if mode is None:
        outs = _calls(tensors, backend)
    else:
        with mode:
            outs = _calls(tensors, backend)
    loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum() for o in outs)
    loss.backward()
    grads = {name: t.grad for name, t in tensors.items() if t.requires_grad}
    return outs, grads


def _eager_nodes(outs):
    """The eager-path autograd nodes among the outputs' grad_fns and their inputs' grad_fns."""
    names = {o.grad_fn.name() for o in outs if o.grad_fn} | {
        fn.name() for o in outs for fn, _ in (o.grad_fn.next_functions if o.grad_fn else ()) if fn is not None
    }
    return names & _ALL_EAGER_NODES


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_eager_path_is_bit_identical_to_the_custom_ops(backend, dtype):
    eager_outs, eager_grads = _run(dtype, backend)
    op_outs, op_grads = _run(dtype, backend, mode=_Passthrough())
    assert _eager_nodes(eager_outs) == EAGER_NODES[backend]
    assert not _eager_nodes(op_outs), "the custom ops must run under a torch-function mode"
    for i, (e, o) in enumerate(zip(eager_outs, op_outs, strict=True)):
        assert torch.equal(e, o), f"output {i} differs"
    for name in eager_grads:
        assert torch.equal(eager_grads[name], op_grads[name]), f"grad of {name} differs"


@pytest.mark.parametrize(("backend", "dtype"), CASES)
def test_inference_calls_skip_autograd_with_the_same_results(backend, dtype):
    """Without grad (no_grad, or no input requiring grad) the eager path calls the backend's
    forward directly: the same outputs, bit for bit, and nothing recorded."""
    tensors = _inputs(dtype)
    torch.manual_seed(11)
    expected = _calls(tensors, backend)
    torch.manual_seed(11)
    with torch.no_grad():
        got = _calls(tensors, backend)
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert g.grad_fn is None and not g.requires_grad
        assert torch.equal(e, g), f"output {i} differs"


def test_dropout_masks_follow_the_seed_on_the_eager_path():
    tensors = _inputs(torch.float32)
    torch.manual_seed(5)
    first = _calls(tensors, None)
    torch.manual_seed(5)
    again = _calls(tensors, None)
    other = _calls(tensors, None)  # the generator moved on: new draws
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_tracing_contexts_take_the_custom_ops():
    x = torch.randn(3, 8)
    args = (x, None, None, None, "", "", None)
    assert _custom_op.is_plain_eager(args)
    with torch.device("cpu"):  # a device context is not tracing
        assert _custom_op.is_plain_eager(args)
    with _Passthrough():
        assert not _custom_op.is_plain_eager(args)
    with _DispatchPassthrough():
        assert not _custom_op.is_plain_eager(args)
    with torch._subclasses.FakeTensorMode() as fake_mode:
        fake = fake_mode.from_tensor(x)
    assert not _custom_op.is_plain_eager((fake,)), "a tensor subclass takes the custom op"
    seen = []
    torch.func.vmap(lambda t: seen.append(_custom_op.is_plain_eager((t,))) or t)(x)
    assert seen == [False]

    def compiled_probe(t):
        seen.append(_custom_op.is_plain_eager((t,)))
        return t + 1

    torch.compile(compiled_probe, backend="eager", fullgraph=False)(x)
    assert seen[-1] is False


def test_eager_backward_is_not_differentiable_like_the_backward_op():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = fastattn.add_layer_norm(x, None, None, None)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
    with _Passthrough():
        y = fastattn.add_layer_norm(x, None, None, None)
    (g,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()


@pytest.mark.skipif("cpu" not in _AVAILABLE, reason="the cpu backend did not build")
def test_cpu_nodes_are_not_differentiable_twice():
    """The C++ nodes behave like @once_differentiable: first-order gradients under create_graph,
    an error when those are differentiated."""
    t = _inputs(torch.float32)
    outs = _calls(t, "cpu")
    loss = sum((o * o).sum() for o in outs)
    leaves = [t["q"], t["x"], t["residual"], t["weight"], t["w1"]]
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    for name, grad in zip(("q", "x", "residual", "weight", "w1"), first):
        assert grad.requires_grad, name
        with pytest.raises(RuntimeError, match="once_differentiable"):
            grad.sum().backward(retain_graph=True)


# --------------------------------------------------------------------------------------------
# Eager plans: a repeated call skips validation and selection, and nothing else
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif("cpu" not in _AVAILABLE, reason="the cpu backend did not build")
def test_repeated_calls_take_the_plan_with_the_same_results(monkeypatch):
    from fastattn.ops import attention, ffn, norm

    t = _inputs(torch.float32)
    torch.manual_seed(11)
    first = _calls(t, None)
    validated = []
    for module, name in ((attention, "_validate_flash"), (norm, "_validate"), (ffn, "_validate")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: validated.append(_n) or _f(*a, **k))
    torch.manual_seed(11)
    again = _calls(t, None)
    assert validated == [], "flash_attention, add_layer_norm, rms_norm and feed_forward repeat a planned call"
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.skipif("cpu" not in _AVAILABLE, reason="the cpu backend did not build")
@pytest.mark.parametrize("bad", ["prenorm", "window", "alibi_grad", "dropout", "kpm_dtype"])
def test_a_plan_never_admits_an_argument_validation_rejects(bad):
    """Each bad call equals a good, planned one in value (True == 1, -1.0 == -1) or in shape
    and dtype: the plan's key tells them apart, and validation raises."""
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    q = torch.randn(2, 5, 4, 8, requires_grad=True)
    kpm = torch.ones(2, 5, dtype=torch.bool)
    slopes = torch.rand(4)
    for _ in range(2):  # the second call runs on the plan
        fastattn.add_layer_norm(x, r, prenorm=True)
        fastattn.flash_attention(q, q, q, key_padding_mask=kpm, alibi_slopes=slopes, window_size=(-1, -1))
    if bad == "prenorm":
        with pytest.raises(TypeError, match="prenorm"):
            fastattn.add_layer_norm(x, r, prenorm=1)
    elif bad == "window":
        with pytest.raises(TypeError, match=r"window_size\[0\]"):
            fastattn.flash_attention(q, q, q, key_padding_mask=kpm, alibi_slopes=slopes, window_size=(-1.0, -1))
    elif bad == "alibi_grad":
        with pytest.raises(ValueError, match="alibi_slopes must not require grad"):
            fastattn.flash_attention(q, q, q, key_padding_mask=kpm, alibi_slopes=slopes.clone().requires_grad_(),
                                     window_size=(-1, -1))
    elif bad == "dropout":
        with pytest.raises(ValueError, match="dropout_p"):
            fastattn.add_layer_norm(x, r, prenorm=True, dropout_p=1.5)
    else:
        with pytest.raises(TypeError, match="key_padding_mask"):
            fastattn.flash_attention(q, q, q, key_padding_mask=kpm.float(), alibi_slopes=slopes,
                                     window_size=(-1, -1))


@pytest.mark.skipif("cpu" not in _AVAILABLE, reason="the cpu backend did not build")
def test_a_plan_follows_the_backend_request_and_autocast(monkeypatch):
    q = torch.randn(2, 5, 4, 8, requires_grad=True)
    x = torch.randn(3, 16, requires_grad=True)
    for _ in range(2):
        assert "AttentionNode" in fastattn.flash_attention(q, q, q).grad_fn.name()
        assert "NormNode" in fastattn.add_layer_norm(x).grad_fn.name()
    with fastattn.use_backend("reference"):
        assert fastattn.flash_attention(q, q, q).grad_fn.name() == "_AttentionEagerBackward"
    monkeypatch.setenv("FASTATTN_BACKEND", "reference")
    assert fastattn.add_layer_norm(x).grad_fn.name() == "_NormEagerBackward"
    monkeypatch.delenv("FASTATTN_BACKEND")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastattn.flash_attention(q, q, q).dtype == torch.bfloat16
    assert "AttentionNode" in fastattn.flash_attention(q, q, q).grad_fn.name()


@pytest.mark.skipif("cpu" not in _AVAILABLE, reason="the cpu backend did not build")
def test_arguments_that_make_no_plan_key_take_the_full_path():
    """An unhashable argument (window_size as a list) is served without a plan; a tensor
    without strides (sparse) is never keyed, so validation names it even after a planned
    call of the same shape."""
    q = torch.randn(2, 5, 4, 8)
    planned = [fastattn.flash_attention(q, q, q, window_size=(2, 1)) for _ in range(2)]
    listed = [fastattn.flash_attention(q, q, q, window_size=[2, 1]) for _ in range(2)]
    assert all(torch.equal(planned[0], out) for out in planned + listed)
    x = torch.randn(6, 16)
    for _ in range(2):
        fastattn.add_layer_norm(x)
    with pytest.raises(TypeError, match="x must be a dense"):
        fastattn.add_layer_norm(x.to_sparse())
