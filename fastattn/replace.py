"""``replace_modules``: convert the torch.nn attention / norm / Transformer layers of a model to
their fastattn drop-ins, in place.

Each matching module becomes an instance of the fastattn subclass by a class swap, so it stays
the very same object with the very same Parameters and buffers: an optimizer built before the
call keeps working, hooks stay attached, and other references to the module see the change.
Only modules whose type is exactly the torch class are converted; user subclasses of them may
override ``forward`` and are left alone (their torch children are still converted).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastattn import nn as fnn
from fastattn.backends import get_backend

_DROP_INS = {
    nn.MultiheadAttention: fnn.MultiheadAttention,
    nn.LayerNorm: fnn.LayerNorm,
    nn.RMSNorm: fnn.RMSNorm,
    nn.TransformerEncoderLayer: fnn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer: fnn.TransformerDecoderLayer,
}
_FASTATTN_MODULES = (
    fnn.MultiheadAttention, fnn.LayerNorm, fnn.RMSNorm, fnn.FeedForward,
    fnn.TransformerEncoderLayer, fnn.TransformerDecoderLayer,
)


def replace_modules(model: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Swap ``torch.nn.MultiheadAttention``, ``LayerNorm``, ``RMSNorm``,
    ``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` modules in ``model`` (also
    ``model`` itself, and those inside ``nn.Transformer`` / ``nn.TransformerEncoder`` / user
    models) for the fastattn ones, in place, keeping the same Parameter objects.

    Arguments:
        model: any ``torch.nn.Module`` (it may itself be one of the classes above); its
            parameters keep their dtype and device, and the converted modules accept the same
            inputs (shapes, dtypes, masks) as before.
        backend: "triton", "cuda", "reference" or None (automatic) for the converted modules;
            when given, it is also set on fastattn modules already in the model.

    Returns:
        ``model`` itself. A user subclass of a torch class, or a module torch wrapped (a
        parametrization), is left as it is; a fused layer calls a submodule the user replaced
        or hooked instead of fusing it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        get_backend(backend)  # an unknown name fails here, not at the first forward
    for module in list(model.modules()):
        drop_in = _DROP_INS.get(type(module))
        if drop_in is not None:
            drop_in.from_torch(module, backend)
        elif backend is not None and isinstance(module, _FASTATTN_MODULES):
            module.backend = backend
    return model


__all__ = ["replace_modules"]
