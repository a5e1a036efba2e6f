"""One bound class per layer type (see :mod:`.base`), and the map from ``torch.nn`` types to them."""
from torch import nn
from torch.nn.utils import parametrize

from . import activation, affine, channel, pool, shape  # noqa: F401  (each module registers its layer classes)
from .base import LAYERS, Affine, Context, Layer, Operator, register_layer

__all__ = ["LAYERS", "Affine", "Context", "Layer", "Operator", "register_layer", "bound_layer"]


def bound_layer(module: nn.Module, position: str) -> Layer:
    """The bound layer of ``module`` at ``position``; a ValueError naming it when its type is not supported."""
    kind = type(module)
    if parametrize.is_parametrized(module):  # torch's Parametrized<Type>: the layer's own forward, computed weights
        kind = kind.__bases__[0]
    cls = LAYERS.get(kind)
    if cls is None:
        names = ", ".join(sorted(t.__name__ for t in LAYERS))
        raise ValueError(f"layer {position} ({module}) is not supported by BoundedModule; supported: {names}")
    return cls(module, position)
