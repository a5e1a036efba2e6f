"""Linear and Conv2d: ``c' = W c + b``, ``r' = |W| r`` (exact hull), the exact first layer under an
l2 or l1 ball (dual norm), and CROWN's backward step (dense, and on windows for convolutions)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..streams import Interval, Streams, intersect
from ..window import Window, rowsum
from .base import Affine, Context, Layer, Operator, register_layer


class _AffineLayer(Layer):
    """A layer ``W h + b`` that mixes features: its interval op takes a channel affine and a ReLU as epilogue."""
    fuses = "affine"

    def interval(self, c: Tensor, r: Tensor, ctx: Context, affine: Optional[Affine] = None,
                 relu: bool = False) -> Interval:
        raise NotImplementedError

    def dual(self, x: Tensor, eps: Tensor, scale: Optional[Tensor], p: float, ctx: Context) -> Interval:
        """Exact bounds over ``{x + eps * scale ⊙ u : |u|_p <= 1}`` (p = 2 or 1) by the dual norm."""
        raise NotImplementedError

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        out = s.like(*self.interval(s.c, s.r, ctx))
        if not s.balls:
            return out, None
        balls = {}
        for k, (eps, j, p) in s.balls.items():
            ball = self.dual(s.point(j), eps, s.scale, p, ctx)
            balls[k] = intersect(ball, out.block(k)) if k in out.order else ball
        return out.resolved(ctx.n_specs, balls), None

    def fused(self, s: Streams, ctx: Context, affine: Optional[Affine], relu: bool) -> Streams:
        return s.like(*self.interval(s.c, s.r, ctx, affine, relu))

    @staticmethod
    def _epilogue(ctx: Context, affine: Optional[Affine], relu: bool) -> dict:
        scale, shift = affine if affine is not None else (None, None)
        return dict(scale=scale, shift=shift, relu=relu, backend=ctx.backend, precision=ctx.precision)


@register_layer
class LinearLayer(_AffineLayer):
    types = (nn.Linear,)

    def check_input(self, c: Tensor) -> None:
        features = self.module.in_features
        self.expect(c.dim() >= 2 and c.shape[-1] == features, f"(..., {features})", c)

    def interval(self, c, r, ctx, affine=None, relu=False) -> Interval:
        m = self.module
        return ops.interval_linear(c, r, m.weight, m.bias, **self._epilogue(ctx, affine, relu))

    def dual(self, x, eps, scale, p, ctx) -> Interval:
        m = self.module
        if p == 1:
            return ops.l1_linear(x, eps, m.weight, m.bias, scale, precision=ctx.precision)
        return ops.l2_linear(x, eps, m.weight, m.bias, scale, backend=ctx.backend, precision=ctx.precision)

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        if s.balls and s.c.dim() != 2:  # on (B, L, F) inputs the ball is bounded by its box
            s = s.boxed(ctx.n_specs)
        return super().step(s, ctx)

    def operator(self, h: Tensor) -> Operator:
        return DenseOperator(self.module, h.shape[1:])


@register_layer
class Conv2dLayer(_AffineLayer):
    types = (nn.Conv2d,)

    def check(self) -> None:
        if self.module.padding_mode != "zeros":
            raise ValueError(f"{self.describe()}: only padding_mode='zeros' is supported")

    def check_input(self, c: Tensor) -> None:
        channels = self.module.in_channels
        self.expect(c.dim() == 4 and c.shape[1] == channels, f"({channels}, H, W)", c)

    def _geometry(self) -> tuple:
        m = self.module
        return m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups

    def interval(self, c, r, ctx, affine=None, relu=False) -> Interval:
        return ops.interval_conv2d(c, r, *self._geometry(), **self._epilogue(ctx, affine, relu))

    def dual(self, x, eps, scale, p, ctx) -> Interval:
        if p == 1:
            return ops.l1_conv2d(x, eps, *self._geometry(), scale, precision=ctx.precision)
        return ops.l2_conv2d(x, eps, *self._geometry(), scale, backend=ctx.backend, precision=ctx.precision)

    def operator(self, h: Tensor) -> Operator:
        return ConvOperator(self.module, h.shape[1:])


class DenseOperator(Operator):
    """A Linear layer ``h W^T + b`` (on the last dimension)."""

    def __init__(self, module: nn.Linear, in_shape: torch.Size):
        self.weight = module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()
        self.in_shape = in_shape
        self.ibp = "affine" if len(in_shape) == 1 else "inexact"
        self.fan_out, self.fan_in = self.weight.shape

    def back(self, A: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        if self.bias is None:
            bias = None
        elif self.accumulate in (None, A.dtype):  # dot products over the last dimension, then the rest
            bias = (A @ self.bias).reshape(A.shape[0], -1).sum(1)
        else:
            bias = rowsum(A * self.bias, self.accumulate)
        return A @ self.weight, bias

    def interval(self, c: Tensor, r: Tensor) -> Interval:
        return ops.interval_linear_ref(c, r, self.weight, self.bias)

    def magnitude(self, m: Tensor, bias: bool = True) -> Tensor:
        b = self.bias.abs().to(m.dtype) if bias and self.bias is not None else None
        return F.linear(m, self.weight.abs().to(m.dtype), b)

    def dual(self, x: Tensor, eps: Tensor, axes: Tensor, p: float) -> Interval:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return (ops.l1_linear_ref if p == 1 else ops.l2_linear_ref)(x, eps, self.weight.to(x.dtype), bias, axes)


def int_padding(module: nn.Conv2d) -> Tuple[int, int]:
    """The padding of a Conv2d as two ints ('valid' and symmetric 'same' converted)."""
    if not isinstance(module.padding, str):
        return module.padding
    if module.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
    if any(t % 2 for t in total):
        raise ValueError(f"{module}: padding='same' with an asymmetric padding is not supported by crown_margins "
                         f"and preactivation_bounds (any method); BoundedModule.propagate's IBP supports it")
    return tuple(t // 2 for t in total)


FEW_CHANNELS = 4


def transposes_by_taps(A: Tensor) -> bool:
    """Whether the transposed convolutions of A go through :meth:`ConvOperator._add_taps`: on CUDA with cuDNN
    off (the sound modes), where torch's own runs one matrix product per row of A."""
    return A.is_cuda and not torch._C._get_cudnn_enabled()


class ConvOperator(Operator):
    """A Conv2d layer; its transpose is the gradient of the convolution with respect to its input."""
    local = True
    ibp = "affine"

    def __init__(self, module: nn.Conv2d, in_shape: torch.Size):
        self.weight = module.weight.detach()
        self.bias = None if module.bias is None else module.bias.detach()
        self.stride, self.dilation, self.groups = module.stride, module.dilation, module.groups
        self.padding = int_padding(module)
        self.in_shape = in_shape
        self.fan_in = self.weight[0].numel()
        # an input pixel meets ceil(k gcd(s, d) / s) taps per dimension of each output channel of its group
        taps = [-(-k * math.gcd(s, d) // s) for k, s, d in zip(self.weight.shape[2:], self.stride, self.dilation)]
        self.fan_out = self.weight.shape[0] // self.groups * taps[0] * taps[1]

    def back(self, A: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """A (N, O, H', W') -> the transposed convolution of A (N, C, H, W), bias term (N,) or None."""
        bias = None if self.bias is None else self.channel_term(A, self.bias)
        if self.groups == 1 and transposes_by_taps(A):  # the window form, cropped to the map
            full, (height, width) = self._transpose_window(A), self.in_shape[1:]
            top, left = self.padding
            out = A.new_zeros((A.shape[0],) + tuple(self.in_shape))
            rows, cols = min(height, full.shape[2] - top), min(width, full.shape[3] - left)
            out[:, :, :rows, :cols] = full[:, :, top:top + rows, left:left + cols]
            return out, bias
        size = (A.shape[0],) + tuple(self.in_shape)
        return torch.nn.grad.conv2d_input(size, self.weight, A, self.stride, self.padding, self.dilation,
                                          self.groups), bias

    def back_window(self, window: Window) -> Tuple[Window, Optional[Tensor]]:
        """The transposed convolution of each row's window: the window grows by the receptive field;
        the positions that fall outside the input map (the zero padding) are cleared."""
        A = window.A
        bias = None if self.bias is None else self.channel_term(A, self.bias)
        A = self._transpose_window(A)
        top = window.top * self.stride[0] - self.padding[0]
        left = window.left * self.stride[1] - self.padding[1]
        grown = Window(A, top, left)
        return grown.with_A(A.mul_(grown.inside(*self.in_shape[1:]))), bias  # A is this step's own tensor

    def _transpose_window(self, A: Tensor) -> Tensor:
        """The transposed convolution (no padding) of windows A (N, O, h, w). A one-pixel window (a pass
        from one neuron) is a weighted sum of the weight's slices: one matrix product; onto at most
        ``FEW_CHANNELS`` channels (a first layer) a matrix product then the sum of the overlapping
        taps (``fold``); else ``conv_transpose2d`` (on the CPU: 10x and 1.1-3x faster, resp.); on CUDA with
        cuDNN off, whatever the channels, the matrix product then :meth:`_add_taps`."""
        (n, o, h, w), weight = A.shape, self.weight
        if self.groups == 1 and (h, w) == (1, 1) and self.dilation == (1, 1):
            return (A.reshape(n, o) @ weight.reshape(o, -1)).view((n,) + weight.shape[1:])
        if self.groups == 1 and (transposes_by_taps(A) or weight.shape[1] <= FEW_CHANNELS):
            taps = torch.matmul(weight.reshape(o, -1).t(), A.reshape(n, o, h * w))  # (N, C k k, h w)
            if transposes_by_taps(A):
                return self._add_taps(taps, h, w)
            return F.fold(taps, self.window_size(h, w), weight.shape[2:], self.dilation, 0, self.stride)
        return F.conv_transpose2d(A, weight, None, self.stride, 0, 0, self.groups, self.dilation)

    def _add_taps(self, taps: Tensor, h: int, w: int) -> Tensor:
        """The sum of the overlapping taps (N, C k k, h w) of an (h, w) window by a strided addition per tap
        (what ``fold`` sums, as additions over every row at once): tap (i, j) of input pixel p lands on
        ``p s + (i, j) d``."""
        c, kh, kw = self.weight.shape[1:]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        taps = taps.view(taps.shape[0], c, kh, kw, h, w)
        out = taps.new_zeros((taps.shape[0], c) + self.window_size(h, w))
        for i in range(kh):
            for j in range(kw):
                out[:, :, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (w - 1) + 1:sw] += taps[:, :, i, j]
        return out

    def window_size(self, height: int, width: int) -> Tuple[int, int]:
        k, s, d = self.weight.shape[2:], self.stride, self.dilation
        return (height - 1) * s[0] + d[0] * (k[0] - 1) + 1, (width - 1) * s[1] + d[1] * (k[1] - 1) + 1

    def interval(self, c: Tensor, r: Tensor) -> Interval:
        return ops.interval_conv2d_ref(c, r, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                       self.groups)

    def magnitude(self, m: Tensor, bias: bool = True) -> Tensor:
        b = self.bias.abs().to(m.dtype) if bias and self.bias is not None else None
        return F.conv2d(m, self.weight.abs().to(m.dtype), b, self.stride, self.padding, self.dilation, self.groups)

    def dual(self, x: Tensor, eps: Tensor, axes: Tensor, p: float) -> Interval:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        ref = ops.l1_conv2d_ref if p == 1 else ops.l2_conv2d_ref
        return ref(x, eps, self.weight.to(x.dtype), bias, self.stride, self.padding, self.dilation, self.groups, axes)
