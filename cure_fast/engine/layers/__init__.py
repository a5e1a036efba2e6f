"""One bound class per layer type (see :mod:`.base`), and the map from ``torch.nn`` types to them."""
from torch import nn

from . import activation, affine, channel, pool, shape  # noqa: F401  (each module registers its layer classes)
from .base import LAYERS, Affine, Context, Layer, Operator, register_layer

__all__ = ["LAYERS", "Affine", "Context", "Layer", "Operator", "register_layer", "bound_layer"]


def bound_layer(module: nn.Module, position: str) -> Layer:
    """The bound layer of ``module`` at ``position``; a ValueError naming it when its type is not supported."""
    cls = LAYERS.get(type(module))
    if cls is None:
        names = ", ".join(sorted(t.__name__ for t in LAYERS))
        raise ValueError(f"layer {position} ({module}) is not supported by BoundedModule; supported: {names}")
    return cls(module, position)
