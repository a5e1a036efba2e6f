"""Layers that move values without changing them: Flatten, Identity, Dropout (a random per-sample
mask in train mode, shared by every stream; the identity in eval mode)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from ..streams import Interval, Streams
from ..window import Window
from .base import Context, Layer, Operator, register_layer


class _ShapeLayer(Layer):
    def follows_spec(self) -> bool:
        return True

    def operator(self, h: Tensor) -> Operator:
        return ShapeOperator(self.module, h.shape[1:])


@register_layer
class FlattenLayer(_ShapeLayer):
    types = (nn.Flatten,)

    def check(self) -> None:
        if self.module.start_dim == 0:
            raise ValueError(f"{self.describe()}: Flatten must keep the batch dimension (start_dim >= 1)")

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        flatten, axes = self.module, None
        if s.scale is not None:
            axes = flatten(s.scale.expand((s.scale.shape[0],) + s.c.shape[1:]))
        return s.like(flatten(s.c), flatten(s.r), axes), None


@register_layer
class IdentityLayer(_ShapeLayer):
    types = (nn.Identity,)

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        return s, None


@register_layer
class DropoutLayer(_ShapeLayer):
    types = (nn.Dropout,)

    def is_random(self) -> bool:
        return self.module.training and self.module.p > 0

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        if not self.is_random():
            return s, None
        p, natural = self.module.p, s.natural()
        mask = torch.zeros_like(natural) if p >= 1 else torch.empty_like(natural).bernoulli_(1 - p) / (1 - p)
        c = (s.c.view((-1,) + natural.shape) * mask).view_as(s.c)
        r = (s.r.view((-1,) + natural.shape) * mask).view_as(s.r) if s.r.shape[0] else s.r
        axes = None if not s.balls else (mask if s.scale is None else s.scale * mask)
        return s.like(c, r, axes), None

    def check_certifiable(self) -> None:
        if self.module.training:
            raise ValueError(f"{self.describe()} is in training mode; certificates are of the eval-mode network: "
                             f"call model.eval() first")


class ShapeOperator(Operator):
    """Flatten, Identity or eval-mode Dropout: a reshape (possibly to the same shape)."""
    ibp = "neutral"
    exact = True

    def __init__(self, module: nn.Module, in_shape: torch.Size):
        self.module, self.in_shape = module, in_shape
        self.local = not isinstance(module, nn.Flatten)

    def back(self, A: Tensor) -> Tuple[Tensor, None]:
        return A.reshape((A.shape[0],) + tuple(self.in_shape)), None

    def back_window(self, window: Window) -> Tuple[Window, None]:
        return window, None

    def interval(self, c: Tensor, r: Tensor) -> Interval:
        return self.module(c), self.module(r)

    def magnitude(self, m: Tensor, bias: bool = True) -> Tensor:
        return self.module(m)
