"""AvgPool2d: linear with non-negative weights, so exact on ``(c, r)`` separately."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..streams import Interval, Streams
from .base import Context, Layer, Operator, register_layer


@register_layer
class AvgPool2dLayer(Layer):
    types = (nn.AvgPool2d,)

    def check(self) -> None:
        divisor = self.module.divisor_override
        if divisor is not None and divisor <= 0:
            raise ValueError(f"{self.describe()}: divisor_override must be positive (the radius is pooled with "
                             f"the same weights, which must be non-negative), got {divisor}")

    def check_input(self, c: Tensor) -> None:
        self.expect(c.dim() == 4, "(C, H, W)", c)

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        s = s.boxed(ctx.n_specs)
        return s.like(self.module(s.c), self.module(s.r)), None

    def operator(self, h: Tensor) -> Operator:
        return PoolOperator(self.module, h.shape[1:])


class PoolOperator(Operator):
    """An AvgPool2d layer (linear with non-negative weights)."""

    def __init__(self, module: nn.AvgPool2d, in_shape: torch.Size):
        self.module, self.in_shape = module, in_shape
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        self.fan_in = kernel[0] * kernel[1]  # a sum, and a division by the divisor
        self.fan_out = math.prod(-(-k // s) for k, s in zip(kernel, stride))  # the windows an input lies in

    def back(self, A: Tensor) -> Tuple[Tensor, None]:
        """A (N, C, H', W') -> the transposed pooling of A (N, C, H, W)."""
        m = self.module
        like = A.new_empty(1).expand((A.shape[0],) + tuple(self.in_shape))
        return torch.ops.aten.avg_pool2d_backward(A, like, _pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                                                  m.ceil_mode, m.count_include_pad, m.divisor_override), None

    def interval(self, c: Tensor, r: Tensor) -> Interval:
        return self.module(c), self.module(r)

    def magnitude(self, m: Tensor, bias: bool = True) -> Tensor:
        return self.module(m)
