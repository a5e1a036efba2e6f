"""One bound class per layer type (see :mod:`.base`), and the map from ``torch.nn`` types to them."""
from typing import Optional

from torch import nn
from torch.nn.utils import parametrize

from . import activation, affine, channel, pool, shape  # noqa: F401  (each module registers its layer classes)
from .base import LAYERS, Affine, Context, Layer, Operator, register_layer

__all__ = ["LAYERS", "Affine", "Context", "Layer", "Operator", "register_layer", "bound_layer", "own_call",
           "CALL_METHODS", "parametrized_base"]


CALL_METHODS = ("forward", "__call__", "_call_impl", "_wrapped_call_impl", "__iter__")
"""What decides a module's output when it is called: a class or instance defining one of these runs
something other than its torch base class's forward."""


def own_call(kind: type, base: type) -> Optional[str]:
    """``Class.method`` for the first of :data:`CALL_METHODS` that a class from ``kind`` up to ``base``
    (excluded) defines, or None: then ``kind`` runs as ``base`` does."""
    for cls in kind.__mro__:
        if cls is base:
            return None
        found = next((name for name in CALL_METHODS if name in vars(cls)), None)
        if found is not None:
            return f"{cls.__name__}.{found}"
    return None


def parametrized_base(module: nn.Module) -> Optional[type]:
    """The layer type under torch's ``Parametrized<Type>`` class of a parametrized module (computed
    weights, the type's own forward), or None."""
    kind = type(module)
    if not parametrize.is_parametrized(module):
        return None
    base = kind.__bases__[0]
    return base if kind.__name__ == f"Parametrized{base.__name__}" and own_call(kind, base) is None else None


def bound_layer(module: nn.Module, position: str) -> Layer:
    """The bound layer of ``module`` at ``position``; a ValueError naming it when its type is not supported."""
    cls = LAYERS.get(parametrized_base(module) or type(module))
    if cls is None:
        names = ", ".join(sorted(t.__name__ for t in LAYERS))
        raise ValueError(f"layer {position} ({module}) is not supported by BoundedModule; supported: {names}")
    return cls(module, position)
