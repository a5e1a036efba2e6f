"""Per-channel affine layers (BatchNorm1d/2d, Normalize): ``c' = g c + h``, ``r' = |g| r``.

In train mode BatchNorm normalizes every stream with the natural stream's batch statistics and
updates its running statistics once per call, as ``module(x)`` would; in eval mode it uses the
running statistics (docs/design.md, "Per-channel affine layers"). An l2 ball passes through
exactly: its axes are scaled by ``|g|``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ... import ops
from ...nn import Normalize
from ..streams import Interval, Streams
from ..window import Window
from .base import Affine, Context, Layer, Operator, register_layer

DERIVATION = 2.0 ** -47  # the float64 derivation of a per-channel affine, relative to its terms


class _ChannelLayer(Layer):
    fuses = "channel"

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, Affine]:
        scale, shift = self.affine(s.natural(), ctx)
        c, r = ops.interval_affine(s.c, s.r, scale, shift, backend=ctx.backend)
        axes = s.scale
        if s.balls:
            channel = scale.abs().view((1, -1) + (1,) * (s.c.dim() - 2))
            axes = channel if axes is None else axes * channel
        return s.like(c, r, axes), (scale, shift)

    def fused(self, s: Streams, ctx: Context, affine: Optional[Affine], relu: bool) -> Streams:
        return s.like(*ops.interval_affine(s.c, s.r, *affine, relu=relu, backend=ctx.backend))

    def operator(self, h: Tensor) -> Operator:
        scale, shift = self.affine(h[:1].double(), Context("torch", "ieee", 0))
        return ChannelOperator(scale, shift, h.dtype, self.affine_error(scale))

    def affine_error(self, scale: Tensor) -> Tuple[Tensor, Tensor]:
        """Bounds (C,) on how far the float64 ``(scale, shift)`` of :meth:`affine` (eval mode) are from
        the real numbers the layer's parameters define: a few roundings each, so ``2^-47`` of the
        magnitudes of the terms."""
        raise NotImplementedError


@register_layer
class BatchNormLayer(_ChannelLayer):
    types = (nn.BatchNorm1d, nn.BatchNorm2d)

    def check_input(self, c: Tensor) -> None:
        n = self.module.num_features
        if isinstance(self.module, nn.BatchNorm2d):
            self.expect(c.dim() == 4 and c.shape[1] == n, f"({n}, H, W)", c)
        else:
            self.expect(c.dim() in (2, 3) and c.shape[1] == n, f"({n}[, L])", c)

    def affine(self, natural: Tensor, ctx: Context) -> Affine:
        """(scale, shift) (C,); train mode: the natural stream's statistics (running ones updated once)."""
        bn = self.module
        if bn.training or bn.running_mean is None:
            count = natural.numel() // natural.shape[1]
            if bn.training and count <= 1:
                raise ValueError(f"{bn}: expected more than 1 value per channel when training, got input of "
                                 f"shape {tuple(natural.shape)}")
            mean, var = ops.batch_norm_stats(natural, backend=ctx.backend)
            if bn.training and bn.track_running_stats:
                _update_running_stats(bn, mean.detach(), var.detach() * count / (count - 1))
        else:
            mean, var = bn.running_mean.to(natural.dtype), bn.running_var.to(natural.dtype)
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
            return scale, bn.bias - mean * scale
        return scale, -mean * scale

    def affine_error(self, scale: Tensor) -> Tuple[Tensor, Tensor]:
        bn = self.module
        bias = bn.bias.detach().double().abs() if bn.affine else 0.0
        return DERIVATION * scale.abs(), DERIVATION * (bias + bn.running_mean.double().abs() * scale.abs())

    def folds_into(self, head: Layer, s: Streams) -> bool:
        bn, weight = self.module, head.module.weight
        matching = nn.BatchNorm2d if isinstance(head.module, nn.Conv2d) else nn.BatchNorm1d
        return (type(bn) is matching and not bn.training and bn.running_mean is not None
                and bn.num_features == weight.shape[0] and (matching is nn.BatchNorm2d or s.c.dim() == 2))

    def follows_spec(self) -> bool:
        return isinstance(self.module, nn.BatchNorm1d)

    def check_certifiable(self) -> None:
        if self.module.training:
            raise ValueError(f"{self.describe()} is in training mode; certificates are of the eval-mode network: "
                             f"call model.eval() first")
        if self.module.running_mean is None:
            raise ValueError(f"{self.describe()} has no running statistics, so its eval-mode output depends "
                             f"on the batch and cannot be certified")


@torch.no_grad()
def _update_running_stats(bn: nn.Module, mean: Tensor, unbiased_var: Tensor) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased_var.to(bn.running_var.dtype), momentum)


@register_layer
class NormalizeLayer(_ChannelLayer):
    types = (Normalize,)

    def affine(self, natural: Tensor, ctx: Context) -> Affine:
        return self.module.channel_affine(natural)

    def affine_error(self, scale: Tensor) -> Tuple[Tensor, Tensor]:
        return DERIVATION * scale.abs(), DERIVATION * self.module.mean.double().abs() * scale.abs()

    def follows_spec(self) -> bool:
        return True


class ChannelOperator(Operator):
    """A per-channel affine ``h * scale + shift`` (eval-mode BatchNorm, Normalize); channels on dim 1.

    ``scale``, ``shift`` as derived in float64 from the layer's parameters, off from the real ones by
    at most ``error`` (C,) each; used in ``dtype``: the interval step and :meth:`magnitude` take the
    derived ones for float64 inputs; :meth:`deviation` covers both roundings."""
    local = True
    ibp = "neutral"
    fan_in = fan_out = 1

    def __init__(self, scale: Tensor, shift: Tensor, dtype: Optional[torch.dtype] = None,
                 error: Optional[Tuple[Tensor, Tensor]] = None):
        self.derived = (scale.detach(), shift.detach())
        self.scale, self.shift = (t.to(dtype or scale.dtype) for t in self.derived)
        self.error = error

    def _coefficients(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        return self.derived if dtype == self.derived[0].dtype else (self.scale.to(dtype), self.shift.to(dtype))

    def back(self, A: Tensor) -> Tuple[Tensor, Tensor]:
        """A (N, C, ...) -> ``A * scale`` (N, C, ...), bias term (N,)."""
        bias = self.channel_term(A, self.shift)
        return A * self.scale.view((1, -1) + (1,) * (A.dim() - 2)), bias

    def back_window(self, window: Window) -> Tuple[Window, Tensor]:
        A, bias = self.back(window.A)
        return window.with_A(A), bias

    def interval(self, c: Tensor, r: Tensor) -> Interval:
        return ops.interval_affine_ref(c, r, *self._coefficients(c.dtype))

    def magnitude(self, m: Tensor, bias: bool = True) -> Tensor:
        scale, shift = self._coefficients(m.dtype)
        shape = (1, -1) + (1,) * (m.dim() - 2)
        out = m * scale.abs().view(shape)
        return out + shift.abs().view(shape) if bias else out

    def deviation(self, m: Tensor) -> Tensor:
        (scale, shift), shape = self.derived, (1, -1) + (1,) * (m.dim() - 2)
        scale_error = (scale.double() - self.scale.double()).abs().view(shape)
        shift_error = (shift.double() - self.shift.double()).abs().view(shape)
        rounded = (m.double() * scale_error + shift_error) * (1 + 2.0 ** -50)
        derivation = self.derivation_error(m)
        return rounded if derivation is None else rounded + derivation

    def derivation_error(self, m: Tensor) -> Optional[Tensor]:
        if self.error is None:
            return None
        shape = (1, -1) + (1,) * (m.dim() - 2)
        return (m.double() * self.error[0].view(shape) + self.error[1].view(shape)) * (1 + 2.0 ** -50)
