"""What the ops' torch custom ops share: options as a schema string, the per-call state tensor,
placeholders for absent outputs, and the output rules of ``torch.library.custom_op``.

Each public op is a pair of custom ops in the ``fastattn`` namespace, ``<op>_forward`` and
``<op>_backward`` (see fastattn/ops/<op>.py), wired together by ``register_autograd`` and given
``register_fake`` shape functions. torch.compile and torch.export then see one opaque node per
call, forward and backward, with no graph break. A schema carries only tensors and scalars, so:

- Options (a frozen dataclass of Python scalars) travel as one canonical string
  ``"name=repr(value), ..."``. :func:`encode_options` is plain Python that dynamo traces, so
  the string is a graph constant; :func:`decode_options` rebuilds the dataclass inside the op
  (cached per string). Both read the dataclass's fields, so a new scalar field needs no change.
- The backend is chosen inside the forward op, at run time, by ``backends.select`` from the
  requested name (an empty string: the automatic choice, ``use_backend`` or
  ``FASTATTN_BACKEND``), because a ContextVar cannot be read while dynamo traces; a compiled
  graph therefore honours ``use_backend`` at each call, as eager code does, and needs no guard.
- Dropout's :class:`RngState` is drawn by its own op, ``fastattn::dropout_seed``, called just
  before the forward op, from torch's default CPU generator as eager always did. The compiler
  may reorder independent ops (inductor does), which would hand the draws to other calls; so
  each draw also increments one shared counter tensor (a mutated argument), which chains the
  draws in program order. Compiled and eager runs with the same seed thus draw the same masks.
  (The forward op itself cannot mutate: a mutating custom op cannot have an autograd formula.
  Eager code skips the op and makes the same draw directly.)
- The chosen backend (its index in ``registered_names()``) and the RngState leave the forward op
  as one int64 CPU tensor, the *call state* ``(backend, seed, offset)``, saved for backward.

Plain eager calls skip the custom ops (:func:`is_plain_eager`): the round trips through a
custom op, its registered autograd and the schema plumbing (options string, call-state tensor,
placeholders) cost more than a small kernel on a CPU. Each op has a ``torch.autograd.Function``
for them that makes the same backend calls (:func:`run_on`, :func:`backward_on`) with the
decoded options and chosen backend kept on ctx; a backend whose op module has an
``eager_plan`` (the cpu backend: one C++ autograd node per call, csrc/cpu/autograd.cpp)
takes the eager call itself (:func:`eager_forward`). Whatever traces (torch.compile,
torch.export, fake / functional tensors, tensor subclasses, functorch transforms,
``torch.jit.trace``) still sees the custom ops.

Eager plans: a backend's eager call, prepared once for a call signature, is remembered under a
key of everything validation and selection read (:func:`plan_key`); a public function whose
key has a plan calls it directly (a model repeats a few signatures, and on a CPU the Python
checks cost as much as a small kernel). ``backends.forget_selections`` forgets the plans with
the selections.
"""

from __future__ import annotations

import array
import ast
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import torch
from torch.utils._device import DeviceContext

from fastattn.backends import (  # noqa: F401  (find_plan: for the ops)
    Backend, find_plan, get_backend, registered_names, remember_plan, requested_backend, select,
    triton_interpret_enabled,
)
from fastattn.ops._amp import call_without_autocast
from fastattn.options import RngState, seed_offset

# --------------------------------------------------------------------------------------------
# Options <-> schema string
# --------------------------------------------------------------------------------------------
def encode_options(options) -> str:
    """``"name=repr(value), ..."`` over the dataclass's fields, in declaration order. Eager
    calls reuse the string of an equal options object (a training loop repeats a few)."""
    if torch.compiler.is_compiling():  # traced: the string becomes a graph constant
        return _encode(options)
    text = _ENCODED.get(options)
    if text is None:
        if len(_ENCODED) >= _CACHE_SIZE:
            _ENCODED.clear()
        text = _ENCODED[options] = _encode(options)
    return text


def _encode(options) -> str:
    return ", ".join(f"{field.name}={getattr(options, field.name)!r}" for field in dataclasses.fields(options))


#: Options objects (frozen dataclasses, hashable) -> their strings; cleared when full.
_ENCODED: dict = {}
_CACHE_SIZE = 1024


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except ValueError:  # repr of a non-finite float: inf, -inf, nan
        return float(ast.unparse(node))


@functools.lru_cache(maxsize=None)
def decode_options(cls: type, text: str):
    """The ``cls`` instance that :func:`encode_options` turned into ``text``."""
    call = ast.parse(f"_({text})", mode="eval").body
    return cls(**{keyword.arg: _literal(keyword.value) for keyword in call.keywords})


# --------------------------------------------------------------------------------------------
# Backend request and call state
# --------------------------------------------------------------------------------------------
def backend_request(backend: Optional[str]) -> str:
    """The schema's ``backend`` string: a checked name, or "" for the automatic choice (a
    TypeError / ValueError for a bad name comes here, before any op runs)."""
    if backend is None:
        return ""
    return get_backend(backend).name


def _draw() -> torch.Tensor:
    rng = RngState.draw()
    return torch.tensor([rng.seed, rng.offset], dtype=torch.int64)


#: How many dropout seeds were drawn: the argument every draw mutates, to keep draw order.
_DRAWS = torch.zeros((), dtype=torch.int64)


# nondeterministic_seeded: never merged with another draw or recomputed by the compiler
@torch.library.custom_op("fastattn::dropout_seed", mutates_args=("draws",), tags=(torch.Tag.nondeterministic_seeded,))
def _dropout_seed(draws: torch.Tensor) -> torch.Tensor:
    """(2,) int64 CPU: a dropout RngState (seed, offset) drawn from torch's default CPU
    generator; ``draws`` (a () int64 CPU counter) is incremented."""
    draws.add_(1)
    return _draw()


@_dropout_seed.register_fake
def _dropout_seed_fake(draws):
    return torch.empty((2,), dtype=torch.int64, device="cpu")


def draw_rng(dropout_p: float) -> Optional[torch.Tensor]:
    """The forward op's ``rng`` argument: a fresh (seed, offset) with dropout, else None.
    Eager code draws directly (the same draw, without an op call's overhead)."""
    if dropout_p == 0:
        return None
    return _dropout_seed(_DRAWS) if torch.compiler.is_compiling() else _draw()


def call_state(backend: Backend, rng: Optional[RngState]) -> torch.Tensor:
    """(3,) int64 on the CPU: backend index, dropout seed, offset (0, 0 without dropout).
    Built over an int64 array (``torch.tensor`` of a list costs several times more per call)."""
    seed, offset = seed_offset(rng)
    return torch.frombuffer(array.array("q", (registered_names().index(backend.name), seed, offset)), dtype=torch.int64)


def call_state_fake() -> torch.Tensor:
    return torch.empty((3,), dtype=torch.int64, device="cpu")


def unpack_call_state(state: torch.Tensor, dropout: bool) -> tuple[Backend, Optional[RngState]]:
    index, seed, offset = state.tolist()
    return get_backend(registered_names()[index]), RngState(seed, offset) if dropout else None


# --------------------------------------------------------------------------------------------
# The op bodies' common part
# --------------------------------------------------------------------------------------------
def forward_on(op: str, inputs, opts, backend: Optional[str], rng: Optional[RngState]):
    """Select the backend (``backend``: a requested name or None) and run its forward with
    autocast off. Returns (result, chosen backend). Both paths' forward (the op body, the eager
    Function) run through here."""
    chosen = select(op, inputs, opts, backend or None)
    return run_on(chosen, op, inputs, opts, rng), chosen


def run_on(chosen: Backend, op: str, inputs, opts, rng: Optional[RngState]):
    """``chosen.forward(op, inputs, opts, rng)`` with autocast off."""
    return call_without_autocast(inputs.device, chosen.forward, op, inputs, opts, rng)


def eager_forward(op: str, inputs, opts, backend: str, rng: Optional[RngState], key: Optional[tuple], *args):
    """A plain eager call on the chosen backend's eager plan (Backend.eager_plan: its autograd
    node, if any, is recorded below Python), remembered under ``key`` (:func:`plan_key`, or
    None when the plan cannot take the caller's own arguments) for the next call like it.
    Returns (the plan's result or None, the chosen backend); on None the caller runs the
    chosen backend's forward itself, through its autograd.Function when grads are needed."""
    chosen = select(op, inputs, opts, backend or None)
    plan = chosen.eager_plan(op, inputs, opts)
    if plan is None:
        return None, chosen
    remember_plan(key, plan)
    return plan(*args, rng), chosen


def plan_key(op: str, scalars: tuple, tensors: tuple) -> Optional[tuple]:
    """The key of a public call's eager plan: everything validation and selection read of it,
    i.e. the op, its scalar arguments and their types, each tensor argument's class, dtype,
    device, shape, strides and requires_grad, the backend request in force (``use_backend``,
    FASTATTN_BACKEND) and TRITON_INTERPRET. A call whose key has a plan (:func:`find_plan`)
    passed validation and selection before, with the same outcome, and skips both. None when
    an argument makes no key (not a plain strided tensor, or unhashable): that call takes the
    full path, which names any problem."""
    if torch.compiler.is_compiling():  # traced calls take the custom ops
        return None
    tensor_keys = []
    for t in tensors:
        if t is None:
            tensor_keys.append(None)
        elif type(t) in _PLAIN_TENSORS and t.layout == torch.strided and not t.is_nested:
            tensor_keys.append((type(t), t.dtype, t.device, t.shape, t.stride(), t.requires_grad))
        else:  # not a tensor, a subclass, or no strides (sparse, nested): validation decides
            return None
    key = (op, scalars, tuple(map(_type_key, scalars)), tuple(tensor_keys), requested_backend(),
           triton_interpret_enabled())
    try:
        hash(key)
    except TypeError:  # an unhashable scalar argument (window_size as a list): not remembered
        return None
    return key


def _type_key(value) -> object:
    """A scalar's type; a tuple's element types (window_size=(-1.0, -1) is rejected where
    (-1, -1), equal to it, is not)."""
    return tuple(map(type, value)) if type(value) is tuple else type(value)


def backward_on(chosen: Backend, op: str, inputs, opts, rng: Optional[RngState], *args):
    """``chosen.backward(op, *args, inputs, opts, rng)`` with autocast off (both paths)."""
    return call_without_autocast(inputs.device, chosen.backward, op, *args, inputs, opts, rng)


def run_forward(op: str, inputs, options_type: type, options: str, backend: str, rng: Optional[torch.Tensor]):
    """Inside a forward op: decode the options, then :func:`forward_on` (``rng``:
    :func:`draw_rng`'s tensor). Returns (result, options, call state)."""
    opts = decode_options(options_type, options)
    rng = None if rng is None else RngState(*rng.tolist())
    result, chosen = forward_on(op, inputs, opts, backend, rng)
    return result, opts, call_state(chosen, rng)


def run_backward(op: str, state: torch.Tensor, inputs, opts, *args):
    """Inside a backward op: the forward's backend's backward (:func:`backward_on`)."""
    chosen, rng = unpack_call_state(state, opts.dropout_p > 0)
    return backward_on(chosen, op, inputs, opts, rng, *args)


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether an eager call must record autograd (grad mode on and some input requires grad);
    without, the eager path calls the backend's forward directly, not through a Function."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_rng(dropout_p: float) -> Optional[RngState]:
    """The eager path's dropout draw: the same draw as :func:`draw_rng`, without the tensor."""
    return RngState.draw() if dropout_p > 0 else None


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def absent(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The placeholder returned for an output that does not exist in this call (a schema
    cannot return None): empty, on ``like``'s device."""
    return like.new_empty((0,), dtype=dtype)


def stand_in(shape: Sequence[int], dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch.Tensor]:
    """A zero-stride tensor of this shape and dtype (None without a dtype), for a backward
    primitive that reads only the shape and dtype of a forward input whose data is not saved.
    Read-only by contract, so one per (shape, dtype, device) is reused across calls."""
    if dtype is None:
        return None
    key = (tuple(shape), dtype, device)
    tensor = _STAND_INS.get(key)
    if tensor is None:
        if len(_STAND_INS) >= _CACHE_SIZE:
            _STAND_INS.clear()
        tensor = _STAND_INS[key] = torch.empty(1, dtype=dtype, device=device).expand(shape)
    return tensor


_STAND_INS: dict = {}


def finalize(outputs: Sequence[torch.Tensor], inputs: Sequence) -> tuple[torch.Tensor, ...]:
    """Contiguous outputs (what the fake functions promise) that alias no input (tensors among
    ``inputs``) and no other output, as custom ops require: a backend may hand back a view, or
    one tensor twice (the norms' dx and dresidual without dropout), which is then copied.
    Only the custom ops need this: the eager path returns what the body returned (autograd
    handles shared and aliased outputs, as for torch's own ``x + residual``)."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.numel() > 0}
    result = []
    for t in outputs:
        t = t.contiguous()
        if t.numel() > 0:
            if t.untyped_storage().data_ptr() in taken:
                t = t.clone()
            taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)


# --------------------------------------------------------------------------------------------
# Op pairs: the two custom ops of an op, and their eager stand-in
# --------------------------------------------------------------------------------------------
#: Exact types that take the eager path; subclasses (FakeTensor, FunctionalTensor, DTensor, a
#: user's) take the custom op, which they know how to trace or dispatch.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _only_device_modes() -> bool:
    """No torch-function mode but ``torch.set_default_device`` / ``with device:`` contexts
    (export's non-strict tracer and user modes must see the custom op)."""
    return all(isinstance(mode, DeviceContext) for mode in torch.overrides._get_current_function_mode_stack())


def is_plain_eager(args: Sequence) -> bool:
    """True when a call with these arguments runs in plain eager code: nothing is compiling,
    exporting or tracing it (dynamo, jit.trace), no dispatch mode (fake, functional, proxy,
    FlopCounter) or functorch transform is active, and every tensor is a plain tensor or
    Parameter. Only then may the custom op be skipped."""
    if (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or torch._C._get_tracing_state() is not None
        or (torch._C._is_torch_function_mode_enabled() and not _only_device_modes())
    ):
        return False
    return all(type(a) in _PLAIN_TENSORS for a in args if isinstance(a, torch.Tensor))


def _finalized(body: Callable) -> Callable:
    """The custom op's function: ``body`` with :func:`finalize` on its outputs (same
    signature, from which the schema is inferred)."""

    @functools.wraps(body)
    def op(*args):
        return finalize(body(*args), args)

    return op


class OpPair:
    """An op's forward and backward custom ops, joined by ``register_autograd``. What traces
    (and whatever :func:`is_plain_eager` rejects) calls ``forward_op``; plain eager calls take
    the op's own ``torch.autograd.Function`` (``_<Op>Eager`` in fastattn/ops/<op>.py), which
    runs the same backend calls (:func:`forward_on` / :func:`backward_on`) without the schema
    plumbing: bit for bit the same results (tests/test_eager_path.py).

    Arguments:
        forward_name, backward_name: the ops' qualified names ("fastattn::...").
        forward_body, backward_body: the ops' implementations (annotated: the schema is
            inferred from them).
        forward_fake, backward_fake: the ops' ``register_fake`` functions (output shapes).
        setup_context: ``(ctx, inputs, output)`` as for ``register_autograd``.
        backward_rule: ``(ctx, backward, *grads) -> grads of the forward's inputs``; it calls
            ``backward`` (the backward op) for the gradients.
    """

    def __init__(
        self,
        forward_name: str,
        forward_body: Callable,
        backward_name: str,
        backward_body: Callable,
        *,
        forward_fake: Callable,
        backward_fake: Callable,
        setup_context: Callable,
        backward_rule: Callable,
    ) -> None:
        self.forward_op = torch.library.custom_op(forward_name, _finalized(forward_body), mutates_args=())
        self.backward_op = torch.library.custom_op(backward_name, _finalized(backward_body), mutates_args=())
        self.forward_op.register_fake(forward_fake)
        self.backward_op.register_fake(backward_fake)
        self.backward_rule = backward_rule
        self.forward_op.register_autograd(self._backward_with_op, setup_context=setup_context)

    def _backward_with_op(self, ctx, *grads):
        return self.backward_rule(ctx, self.backward_op, *grads)
