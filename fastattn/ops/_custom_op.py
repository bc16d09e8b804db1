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
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from typing import Optional, Sequence

import torch

from fastattn.backends import Backend, get_backend, registered_names, select
from fastattn.ops._amp import autocast_off
from fastattn.options import RngState

# --------------------------------------------------------------------------------------------
# Options <-> schema string
# --------------------------------------------------------------------------------------------
def encode_options(options) -> str:
    """``"name=repr(value), ..."`` over the dataclass's fields, in declaration order."""
    return ", ".join(f"{field.name}={getattr(options, field.name)!r}" for field in dataclasses.fields(options))


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
    """(3,) int64 on the CPU: backend index, dropout seed, offset (0, 0 without dropout)."""
    seed, offset = (rng.seed, rng.offset) if rng is not None else (0, 0)
    return torch.tensor([registered_names().index(backend.name), seed, offset], dtype=torch.int64)


def call_state_fake() -> torch.Tensor:
    return torch.empty((3,), dtype=torch.int64, device="cpu")


def unpack_call_state(state: torch.Tensor, dropout: bool) -> tuple[Backend, Optional[RngState]]:
    index, seed, offset = state.tolist()
    return get_backend(registered_names()[index]), RngState(seed, offset) if dropout else None


# --------------------------------------------------------------------------------------------
# The op bodies' common part
# --------------------------------------------------------------------------------------------
def run_forward(op: str, inputs, options_type: type, options: str, backend: str, rng: Optional[torch.Tensor]):
    """Inside a forward op: decode the options, select the backend, run its forward with
    autocast off (``rng``: :func:`draw_rng`'s tensor). Returns (result, options, call state)."""
    opts = decode_options(options_type, options)
    chosen = select(op, inputs, opts, backend or None)
    rng = None if rng is None else RngState(*rng.tolist())
    with autocast_off(inputs.device):
        result = chosen.forward(op, inputs, opts, rng)
    return result, opts, call_state(chosen, rng)


def run_backward(op: str, state: torch.Tensor, inputs, opts, *args):
    """Inside a backward op: the forward's backend's ``backward(*args, inputs, opts, rng)``."""
    chosen, rng = unpack_call_state(state, opts.dropout_p > 0)
    with autocast_off(inputs.device):
        return chosen.backward(op, *args, inputs, opts, rng)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
def absent(like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The placeholder returned for an output that does not exist in this call (a schema
    cannot return None): empty, on ``like``'s device."""
    return like.new_empty((0,), dtype=dtype)


def stand_in(shape: Sequence[int], dtype: Optional[torch.dtype], device: torch.device) -> Optional[torch.Tensor]:
    """A zero-stride tensor of this shape and dtype (None without a dtype), for a backward
    primitive that reads only the shape and dtype of a forward input whose data is not saved."""
    if dtype is None:
        return None
    return torch.empty(1, dtype=dtype, device=device).expand(shape)


def finalize(outputs: Sequence[torch.Tensor], inputs: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Contiguous outputs (what the fake functions promise) that alias no input and no other
    output, as custom ops require: a backend may hand back a view, or one tensor twice (the
    reference norm's dx and dresidual without dropout), which is then copied."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel() > 0}
    result = []
    for t in outputs:
        t = t.contiguous()
        if t.numel() > 0:
            if t.untyped_storage().data_ptr() in taken:
                t = t.clone()
            taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)
