"""Piecewise-linear activations: ReLU and LeakyReLU (negative slope ``a`` in [0, 1]).

Interval step: both are monotone, so ``[f(c - r), f(c + r)]`` is exact. Linear relaxation over
pre-activation bounds ``[l, u]`` (docs/design.md, "Linear relaxation"): a stable neuron is exact
(slope 1 when ``l >= 0``, ``a`` when ``u <= 0``); an unstable one (``l < 0 < u``) is bounded above
by the chord ``f(l) + (u - f(l)) (h - l) / (u - l)`` (f is convex) and below by ``α h`` for any
``α ∈ [a, 1]`` (a line through the origin between the two slopes), by default 1 if ``u > -l`` else
``a`` (CROWN's adaptive choice); α-CROWN optimizes α inside that range.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..streams import Streams
from ..rounding import FLOOR, bracket, up
from ..window import Window, pixel_major, rowsum, runs
from .base import Context, Layer, register_layer


def unknown_as_infinite(l: Tensor, u: Tensor) -> Tuple[Tensor, Tensor]:
    """Pre-activation bounds with NaN (an overflow on the way) as unknown: -inf / +inf. A neuron with an
    infinite bound on the side it can cross 0 gets a NaN upper line, so every bound through it is NaN
    and discarded (the CROWN family keeps the larger of two bounds with ``fmax``), never a certificate;
    ``NaN < 0`` being False, it would otherwise be taken for a dead neuron."""
    return torch.where(l.isnan(), -float("inf"), l), torch.where(u.isnan(), float("inf"), u)


@dataclass
class Relaxation:
    """Linear bounds ``lower * h <= f(h) <= upper * h + offset`` of an activation: ``packed``
    (B, *shape, 3) holds lower, upper and offset; ``unstable`` (B, *shape) marks the neurons with
    ``l < 0 < u``; ``alpha_range`` the sound range of an unstable neuron's lower slope."""
    packed: Tensor
    unstable: Tensor
    alpha_range: Tuple[float, float]
    accumulate: Optional[torch.dtype] = None  # dtype of the offset terms' sums (None: A's)

    def __post_init__(self):
        self.planes = tuple(t.contiguous() for t in self.packed.unbind(-1))  # lower, upper, offset

    @cached_property
    def packed_pixels(self) -> Tensor:
        """``packed``'s :func:`~..window.pixel_major` copy (made once: every window step gathers from it)."""
        return pixel_major(self.packed)

    @cached_property
    def unstable_pixels(self) -> Tensor:
        return pixel_major(self.unstable)

    def _step(self, A: Tensor, lower: Tensor, upper: Tensor, offset: Tensor) -> Tuple[Tensor, Tensor]:
        """``A * (lower where A >= 0 else upper)`` (one rounding per entry: the other product is 0) and
        ``rowdot(min(A, 0), offset)`` (N,), summed in ``accumulate``: a matrix-vector product when the
        rows share one sample's offsets (N, *shape) and the sum is in A's dtype (any order of a dot
        product keeps its γ_n error bound)."""
        negative = A.clamp(max=0)
        out = negative * upper
        out.addcmul_(A.clamp(min=0), lower)
        if offset.dim() < A.dim() and self.accumulate in (None, A.dtype):
            return out, negative.reshape(A.shape[0], -1) @ offset.reshape(-1)
        return out, rowsum(negative * offset, self.accumulate)

    @classmethod
    def of(cls, l: Tensor, u: Tensor, slope: float = 0.0) -> "Relaxation":
        """The CROWN relaxation of LeakyReLU with negative slope ``slope`` (0: ReLU) over l, u (B, *shape)
        (see :func:`unknown_as_infinite` for NaN bounds)."""
        l, u = unknown_as_infinite(l, u)
        unstable = (l < 0) & (u > 0)
        stable = torch.where(l >= 0, torch.ones_like(l), torch.full_like(l, slope))
        chord = (u - slope * l) / torch.where(unstable, u - l, torch.ones_like(u))
        upper = torch.where(unstable, chord, stable)
        offset = torch.where(unstable, l * (slope - upper), torch.zeros_like(l))
        adaptive = torch.where(u > -l, torch.ones_like(l), torch.full_like(l, slope))
        lower = torch.where(unstable, adaptive, stable)
        return cls(torch.stack([lower, upper, offset], -1), unstable, (slope, 1.0))

    @classmethod
    def outward(cls, l: Tensor, u: Tensor, slope: float = 0.0) -> "Relaxation":
        """The relaxation of :meth:`of` with float32 or float64 numbers that holds exactly for the real
        negative slope ``a``: lower slopes in ``[a↑, 1]`` (``a↑``, ``a↓`` the nearest numbers of the
        dtype above and below a), a stable negative neuron between ``a↑ h`` and ``a↓ h``, and the upper
        line's offset recomputed in float64 from its slope s, ``max(f(l) - s l, f(u) - s u)``, rounded
        up (its products and differences are off by at most 2^-52 of the magnitudes, or 2^-1074 where
        they underflow, far below the ``FLOOR`` added): above f at both ends, so above the convex f on ``[l, u]``."""
        l, u = unknown_as_infinite(l, u)
        low, high = bracket(slope, l.dtype)
        unstable = (l < 0) & (u > 0)
        one, below, above = torch.ones_like(l), torch.full_like(l, low), torch.full_like(l, high)
        lower = torch.where((l >= 0) | (unstable & (u > -l)), one, above)
        chord = ((u - low * l) / torch.where(unstable, u - l, one)).clamp(low, 1.0)
        upper = torch.where(unstable, chord, torch.where(l >= 0, one, below))
        low_end, high_end, s = l.double(), u.double(), upper.double()
        f_low, f_high = F.leaky_relu(low_end, slope), F.leaky_relu(high_end, slope)
        gap = torch.maximum(f_low - s * low_end, f_high - s * high_end)
        size = f_low.abs() + (s * low_end).abs() + f_high.abs() + (s * high_end).abs()
        offset = up(gap + (2.0 ** -48 * size + FLOOR[torch.float64]), l.dtype)
        offset = torch.where(unstable, offset, torch.zeros_like(l))
        return cls(torch.stack([lower, upper, offset], -1), unstable, (high, 1.0), torch.float64)

    @property
    def lower(self) -> Tensor:
        return self.packed[..., 0]

    def back(self, A: Tensor, rows: Tensor, alpha: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """A (N, *shape) for the samples ``rows`` (N,) -> coefficients on the pre-activation (N, *shape)
        and the bias term (N,); ``alpha`` (N, *shape) replaces the lower slopes of unstable neurons."""
        steps, start = [], 0
        for sample, count in runs(rows):  # each sample's relaxation broadcast over its rows, no gather
            lower, upper, offset = (plane[sample] for plane in self.planes)
            if alpha is not None:
                lower = torch.where(self.unstable[sample], alpha[start:start + count], lower)
            steps.append(self._step(A[start:start + count], lower, upper, offset))
            start += count
        if len(steps) == 1:
            return steps[0]
        return torch.cat([A for A, _ in steps]), torch.cat([bias for _, bias in steps])

    def back_window(self, window: Window, rows: Tensor, alpha: Optional[Tensor] = None) -> Tuple[Window, Tensor]:
        """:meth:`back` on windows of a (C, H, W) map; ``alpha`` window-shaped (N, C, h, w)."""
        lower, upper, offset = window.gather(self.packed_pixels, rows).unbind(-1)
        if alpha is not None:
            lower = torch.where(window.gather(self.unstable_pixels, rows), alpha, lower)
        A, bias = self._step(window.A, lower, upper, offset)
        return window.with_A(A), bias


@register_layer
class ReLULayer(Layer):
    types = (nn.ReLU,)
    relu_epilogue = True
    activation = True

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        s = s.boxed(ctx.n_specs)
        return s.like(*ops.interval_relu(s.c, s.r, backend=ctx.backend)), None

    def operator(self, h: Tensor) -> None:
        return None

    def relaxation(self, lower: Tensor, upper: Tensor, outward: bool = False) -> Relaxation:
        return (Relaxation.outward if outward else Relaxation.of)(lower, upper)

    def image(self, lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
        return lower.relu(), upper.relu()


@register_layer
class LeakyReLULayer(Layer):
    types = (nn.LeakyReLU,)
    activation = True

    def check(self) -> None:
        slope = self.module.negative_slope
        if not 0.0 <= slope <= 1.0:
            raise ValueError(f"{self.describe()}: negative_slope must lie in [0, 1] (a convex, monotone "
                             f"activation), got {slope}")

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, None]:
        s = s.boxed(ctx.n_specs)
        points = s.c.shape[0] - s.r.shape[0]
        lower, upper = self.image(s.c[points:] - s.r, s.c[points:] + s.r)
        c = torch.cat([F.leaky_relu(s.c[:points], self.module.negative_slope), (upper + lower) / 2])
        return s.like(c, (upper - lower) / 2), None

    def operator(self, h: Tensor) -> None:
        return None

    def relaxation(self, lower: Tensor, upper: Tensor, outward: bool = False) -> Relaxation:
        return (Relaxation.outward if outward else Relaxation.of)(lower, upper, self.module.negative_slope)

    def image(self, lower: Tensor, upper: Tensor) -> Tuple[Tensor, Tensor]:
        slope = self.module.negative_slope
        return F.leaky_relu(lower, slope), F.leaky_relu(upper, slope)
