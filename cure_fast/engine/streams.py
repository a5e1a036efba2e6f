"""The stacked streams of one propagation: the natural input and every input set, along the batch.

Centres of every stream go through a layer's weights together, radii through their absolute
values (docs/design.md, "Several input sets in one pass"). An l2 ball stays exact (a centre, an eps
and ellipsoid axes) until the first affine layer resolves it by the dual norm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

Interval = Tuple[Tensor, Tensor]


def intersect(a: Interval, b: Interval) -> Interval:
    """Intersection of two intervals ``(c, r)`` that both contain the same set."""
    lower = torch.maximum(a[0] - a[1], b[0] - b[1])
    upper = torch.minimum(a[0] + a[1], b[0] + b[1])
    return (upper + lower) / 2, (upper - lower).clamp_min(0) / 2


def lower_upper(interval: Interval) -> Interval:
    """``(c, r)`` -> ``(c - r, c + r)``."""
    c, r = interval
    return c - r, c + r


class Pending(NamedTuple):
    """An l2 or l1 ball still exact: radius ``eps`` (B,), the point block of its centre, its norm ``p``."""
    eps: Tensor
    point: int
    p: float


@dataclass
class Streams:
    """Stacked streams along the batch, B rows per block: ``c`` holds ``points`` point blocks (the
    natural input first, then the centres of l2 balls that have their own centre) followed by one
    block per interval spec (in ``order``); ``r`` holds the radii of the interval blocks. ``balls``
    maps each l2 / l1 spec that is still exact (before the first affine layer) to its
    :class:`Pending` description; its axes are ``eps * scale``."""
    c: Tensor
    r: Tensor
    order: List[int]
    balls: Dict[int, Pending] = field(default_factory=dict)
    scale: Optional[Tensor] = None  # (1 or B, *feature shape) or None for identity
    points: int = 1

    @property
    def batch(self) -> int:
        return self.c.shape[0] // (self.points + len(self.order))

    def point(self, j: int) -> Tensor:
        return self.c[self.batch * j: self.batch * (j + 1)]

    def natural(self) -> Tensor:
        return self.point(0)

    def intervals(self) -> Tensor:
        """The centres of all interval blocks."""
        return self.c[self.batch * self.points:]

    def block(self, k: int) -> Interval:
        B, i = self.batch, self.order.index(k)
        return self.c[B * (self.points + i): B * (self.points + i + 1)], self.r[B * i: B * (i + 1)]

    def ball_box(self, k: int) -> Interval:
        """Bounding box of pending ball ``k`` (intersected with its domain box when it has one)."""
        eps, j, _ = self.balls[k]
        centre = self.point(j)
        axes = eps.view((-1,) + (1,) * (centre.dim() - 1))
        axes = axes if self.scale is None else axes * self.scale.abs()
        box = (centre, axes.expand_as(centre))
        return intersect(box, self.block(k)) if k in self.order else box

    def resolved(self, n_specs: int, ball_bounds: Dict[int, Interval]) -> "Streams":
        """All specs as interval blocks in spec order, pending balls replaced by ``ball_bounds``."""
        blocks = [ball_bounds[k] if k in ball_bounds else self.block(k) for k in range(n_specs)]
        c = torch.cat([self.natural()] + [b[0] for b in blocks])
        r = torch.cat([b[1] for b in blocks]) if blocks else c[:0]
        return Streams(c, r, list(range(n_specs)))

    def boxed(self, n_specs: int) -> "Streams":
        """The streams with every pending ball replaced by its bounding box (for a layer that does
        not map an ellipsoid to an ellipsoid, or for recording bounds)."""
        if not self.balls:
            return self
        return self.resolved(n_specs, {k: self.ball_box(k) for k in self.balls})

    def like(self, c: Tensor, r: Tensor, scale: Optional[Tensor] = None) -> "Streams":
        """Streams with the same layout and pending balls, new tensors."""
        return Streams(c, r, self.order, self.balls, scale, self.points)


class Lazy:
    """A state inside a fused group of layers, computed from the group's input only when asked for."""

    def __init__(self, compute: Callable[[], Streams]):
        self._compute, self._value = compute, None

    def get(self) -> Streams:
        if self._value is None:
            self._value = self._compute()
        return self._value
