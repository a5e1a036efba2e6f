"""The input set of every sample, for minimizing linear functions ``A x + bias`` over it (the
concretization of the CROWN family, docs/design.md "Linear relaxation" and "Sound bounds").

- box ``[c - r, c + r]``: ``A c - |A| r``;
- l2 / l1 ball around x: ``A x - eps |A|_dual`` (l2, l∞), and with a domain also the box bound over
  the domain-clipped box, keeping the larger (both are sound).

:class:`InputSet` computes in the working dtype and ignores its rounding; :class:`SoundInputSet` in
float32 or float64 with every rounding error bounded: an outward-rounded box, eps rounded up, the dot
products with A summed in float64 from runs of 32 products in the working dtype and lowered by
``(γ_33 + 2 γ'_d) rowdot(|A|, |x|)`` (γ' of float64), the l2 norm of the rows grown likewise.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .rounding import Interval, bracket, centre_radius, combine, down, grow, summed, up
from .window import Window, rowdot, rowsum


def _parts(A: Union[Tensor, Window], values: Tensor, rows: Tensor):
    """A (N, d) and the per-sample values of its rows on the same d entries, one (N, d) tensor per part."""
    if isinstance(A, Window):
        values, A = A.take(values, rows), A.A
    else:
        values = values[rows]
    return A.flatten(1), values.flatten(1, -2).unbind(-1)


class InputSet:
    """The input set of every sample in the working dtype."""

    def __init__(self, spec, x: Tensor):
        box = spec.domain_box(x)
        self.dual, self.boxed = spec.exact_first_layer, box is not None
        self.p = spec.p
        parts = ([spec.center_for(x)] if self.dual else []) + (list(box) if self.boxed else [])
        self.values = torch.stack(parts, -1)  # (B, *input shape, parts): [ball centre], [box centre, box radius]
        self.eps = spec.per_sample_eps(x).reshape(-1)

    def minimum(self, A: Union[Tensor, Window], bias: Tensor, rows: Tensor) -> Tensor:
        """Lower bound of ``A x + bias`` over the set of sample ``rows`` (N,): A (N, *input shape) or windows
        of a (C, H, W) input, bias (N,) -> (N,)."""
        A, parts = _parts(A, self.values, rows)
        bound = None
        if self.dual:  # the dual norm: l2 for l2, l∞ for l1
            dual = A.norm(dim=1) if self.p == 2 else A.abs().amax(1)
            bound = rowdot(A, parts[0]) - self.eps[rows] * dual
        if self.boxed:
            boxed = rowdot(A, parts[-2]) - rowdot(A.abs(), parts[-1])
            bound = boxed if bound is None else torch.fmax(bound, boxed)  # NaN (overflow) loses
        return bound + bias


class SoundInputSet:
    """The input set of every sample, numbers of the working dtype with sound rounding; the bounds
    are float64.

    ``box``: ``(c, r)`` in the working dtype containing the set (the domain-clipped box, or without a
    domain the box of radius eps); ``ball``: ``(centre, eps, p)`` in float64, exactly as given, for an
    l2 / l1 ball (None for a box). The dot products with A (:func:`~.window.rowsum` of products in
    float64) are off by at most ``e rowdot(|A|, |x|)``, ``e = summed(d)``: ``values`` holds per sample
    [ball centre, e |centre|], [c, r + e |c|].
    """

    def __init__(self, spec=None, x: Optional[Tensor] = None, dtype: torch.dtype = torch.float32,
                 box: Optional[Interval] = None):
        if spec is None:  # a box given as (lower, upper) in the working dtype
            self.dual, self.boxed, self.ball, self.box = False, True, None, centre_radius(*box)
            dtype = box[0].dtype
        else:
            self.dual, self.boxed = spec.exact_first_layer, spec.domain is not None or not spec.exact_first_layer
            self.p = spec.p
            x = x.double()
            centre = spec.center_for(x)
            eps = spec.per_sample_eps(x)
            lower, upper = down(centre - eps, dtype), up(centre + eps, dtype)
            if spec.domain is not None:
                lower = lower.clamp(min=bracket(spec.domain[0], dtype)[0])
                upper = upper.clamp(max=bracket(spec.domain[1], dtype)[1])
            self.box = centre_radius(lower, upper)
            self.ball = (centre, eps.reshape(-1), self.p) if self.dual else None
        parts, d = [], self.box[0][0].numel()
        if self.dual:  # the ball around the rounded centre, eps grown by the centre's rounding
            centre, eps, p = self.ball
            point = centre.to(dtype)
            off = (centre - point.double()).flatten(1).norm(p=p, dim=1) * (1 + (d + 3) * 2.0 ** -52)
            self.eps = up(eps + off, dtype).double()
            parts += [point, up(point.abs().double() * summed(d, dtype), dtype)]
        if self.boxed:
            c, r = self.box
            parts += [c, up(r.double() + c.abs().double() * summed(d, dtype), dtype)]
        self.values = torch.stack(parts, -1)

    def minimum(self, A: Union[Tensor, Window], bias: Tensor, rows: Tensor) -> Tensor:
        """A lower bound (float64) of ``A x + bias`` over the set of sample ``rows`` (N,), bias float64 (N,)."""
        A, parts = _parts(A, self.values, rows)
        size = grow(A.shape[1], A.dtype)
        bound = None
        if self.dual:
            if self.p == 2:  # |A|_2 from float32 squares summed in float64, grown by their relative error
                square = _dot(A, A)
                positive = square > 0  # a zero gradient at 0 (α-CROWN)
                dual = torch.where(positive, square, 1.0).sqrt() * positive * (size * (1 + 2.0 ** -52))
            else:
                dual = A.abs().amax(1).double()
            bound = combine(_dot(A, parts[0]), -self.eps[rows] * dual, -_dot(A.abs(), parts[1]) * size)
        if self.boxed:
            boxed = combine(_dot(A, parts[-2]), -_dot(A.abs(), parts[-1]) * size)
            bound = boxed if bound is None else torch.fmax(bound, boxed)  # NaN (overflow) loses
        return combine(bound, bias)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of a, b (N, d) -> (N,) float64, off by at most ``summed(d)`` times the dot
    product of the absolute values (and the underflow of the products)."""
    return rowsum(a * b, torch.float64)
