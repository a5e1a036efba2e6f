"""Sound bounds for the CROWN family in float32 or float64: a rigorous bound on every rounding error,
subtracted from the bound (docs/design.md, "Sound bounds").

With u the unit roundoff of the working dtype (``2^-24`` for float32, ``2^-53`` for float64) and
``γ_n = n u / (1 - n u)``, a dot product of n terms is off by at most ``γ_n`` times the dot product of
the absolute values, whatever the order of summation (blocked, pairwise, FMA: GEMM-based matrix
products and convolutions; Winograd and FFT convolutions are not covered, so
:func:`~..ops.policy.strict` turns TF32 and cuDNN off and keeps subnormal numbers), plus ``n η / 2``
for the products that underflow (η the dtype's smallest subnormal).
The CROWN family keeps a lower bound ``q >= A h + a`` on its quantity ``q``; every step that changes
``A`` or ``a`` lowers ``a`` by the most it can have lost, ``rowdot(|A|, w)`` with A the coefficients
before the step and one weight tensor ``w`` per layer and sample (rounded up, shared by every row):

- linear layer ``W h + b`` on inputs ``|h| <= m``: ``w = γ_{f+2} |W| m + e_n |b|`` (f the fan-out of
  the transposed product; the bias term is summed in float64 from runs of 32 products in the working
  dtype, ``e_n = γ_33 + 2 γ'_n`` with γ' of float64, n the entries of a row of A; in float64 it is
  one dot product, or per-channel sums then one, in any order: off by at most γ'_n <= e_n), plus
  ``|W* - W| m + |b* - b|`` where the coefficients round real ones ``W*, b*`` (per-channel affines:
  derived in float64 from the layer's parameters, off by at most 2^-47 of their terms, then rounded
  to the working dtype);
- activation (slopes in [0, 1]): ``w = u m + e_n |offset|`` (the products ``A s``, exact where s is 0
  or 1, and the offset term);
- a run of per-channel affines and identities and the layer below it: one weight on the run's top map,
  as ``|A|`` grows by at most ``(1 + u) |scale|`` through each (:meth:`Sound.folds`);
- ``rowdot(|A|, w)`` itself is summed in the working dtype and divided by ``1 - γ_d``; in float64 the
  coarser ``sum(|A|) max(w)`` (no gather of w; the penalties are ~1e-14 of the bound there);
- underflow: once per pass, ``2 η`` times the sum over the layers of ``(f + 1) sum(m) + 5 d`` (d the
  entries of the layer's input; :func:`_products`), and ``eps sqrt(2 d η)`` for the l2 norm of the
  input coefficients.

The scalars (``a``, penalties, concretization) are float64; each float64 sum is lowered by
``2^-38`` times the sum of its terms' magnitudes (plus 2^-100 for underflow), more than its rounding
error (:func:`combine`). Intermediate bounds are sound intervals in the working dtype (:class:`Sound`):
IBP with a widened radius, the exact first layer under an l2 / l1 ball in float64, conversions
rounded outwards; relaxations hold exactly for their slopes and offsets (``Relaxation.outward``).
"""
from __future__ import annotations

import math
from typing import Dict, FrozenSet, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .window import BLOCK, Window, runs

Interval = Tuple[Tensor, Tensor]
UNIT = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}  # unit roundoff
ETA = {torch.float32: 2.0 ** -149, torch.float64: 2.0 ** -1074}  # smallest positive number
SLACK64 = 2.0 ** -38  # float64 sums: relative to the sum of the magnitudes of the terms
NUDGE = 1.0 + 2.0 ** -40  # over-approximates a constant computed in Python (float64)
TINY = 2.0 ** -100  # covers the absolute errors of underflow in a float64 sum of scalars
# Bounds rounded outwards move at least this far from 0, so that they, and their products with the
# next layers' weights, are normal numbers: subnormal operands (a dead ReLU's [0, 0] rounded outwards
# by one ulp) slow CPU arithmetic down 50x and more (60% of a robustly trained cnn3's sound CROWN
# time). float32: 12 bits above its smallest normal number, small enough that IBP through three
# layers of weight 2^80 from a real value of 2^-148 stays finite.
FLOOR = {torch.float32: 2.0 ** -114, torch.float64: 2.0 ** -900}


def unit(dtype: torch.dtype) -> float:
    """The unit roundoff of float32 or float64."""
    if dtype not in UNIT:
        raise ValueError(f"sound bounds compute in float32 or float64, not {dtype}")
    return UNIT[dtype]


def gamma(n: int, dtype: torch.dtype) -> float:
    """``γ_n = n u / (1 - n u)`` of ``dtype``, rounded up; a ValueError when ``n u >= 0.1``."""
    nu = n * unit(dtype)
    if nu >= 0.1:
        hint = "; use sound='fp64'" if dtype == torch.float32 else ""
        raise ValueError(f"a sum of {n} terms is too long for useful {str(dtype)[6:]} error bounds{hint}")
    return nu / (1.0 - nu) * NUDGE


def grow(n: int, dtype: torch.dtype) -> float:
    """:func:`~.window.rowsum` (float64) of n products of non-negative numbers in ``dtype`` times this
    is >= the exact sum."""
    return inflate(BLOCK + 1, dtype) * (1 + 2 * gamma(n, torch.float64))


def summed(n: int, dtype: torch.dtype) -> float:
    """The relative error bound of :func:`~.window.rowsum` (float64) of n products in ``dtype``."""
    return gamma(BLOCK + 1, dtype) + 2 * gamma(n, torch.float64)


def inflate(n: int, dtype: torch.dtype) -> float:
    """``1 / (1 - γ_n)``: a sum in ``dtype`` of n non-negative products times this is >= the exact sum."""
    return NUDGE / (1.0 - gamma(n, dtype))


def round_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in ``dtype``, rounded towards -inf."""
    if t.dtype == dtype:
        return t
    low = t.to(dtype)
    return torch.where(low.to(t.dtype) > t, torch.nextafter(low, torch.full_like(low, -float("inf"))), low)


def down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor in ``dtype`` <= the exact result of the one float64 operation that gave t (a relative
    error of 2^-53, or half the smallest float64 where it underflowed), lowered by ``FLOOR`` as well
    (lost in the rounding once |t| is far above it): a bound of 0 becomes about -FLOOR, not minus the
    smallest subnormal number."""
    t = t.double()
    low = t - t.abs() * 2.0 ** -50 - FLOOR[dtype]
    return round_down(torch.nextafter(low, torch.full_like(low, -float("inf"))), dtype)


def up(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor in ``dtype`` >= the exact result of the one float64 operation that gave t (and raised
    by ``FLOOR``, as :func:`down` lowers)."""
    return -down(-t.double(), dtype)


def bracket(value: float, dtype: torch.dtype = torch.float32) -> Tuple[float, float]:
    """The largest number of ``dtype`` <= value and the smallest >= value."""
    exact = torch.tensor(value, dtype=torch.float64)
    near = exact.to(dtype)
    low = near if near.double() <= exact else torch.nextafter(near, torch.tensor(-float("inf"), dtype=dtype))
    high = near if near.double() >= exact else torch.nextafter(near, torch.tensor(float("inf"), dtype=dtype))
    return float(low), float(high)


def combine(*terms: Optional[Tensor]) -> Tensor:
    """A lower bound of the exact sum of the float64 terms (None skipped), float64 rounding included."""
    terms = [t for t in terms if t is not None]
    total, size = terms[0], terms[0].abs()
    for t in terms[1:]:
        total, size = total + t, size + t.abs()
    return total - (SLACK64 * size + TINY)


def penalty(A: Union[Tensor, Window], weights: Tensor, rows: Tensor) -> Tensor:
    """An upper bound (float64, (N,)) of ``rowdot(|A|, weights of each row's sample)``, summed in A's
    dtype (in float64: ``sum(|A|)`` times the sample's largest weight); A (N, ...) or windows of a
    (C, H, W) map, weights (B, ...) like a sample of A's map."""
    if weights.dtype == torch.float64:  # u = 2^-53: the coarser sum|A| max(w) costs no gather
        A = A.A if isinstance(A, Window) else A
        sums = torch.linalg.vector_norm(A.flatten(1), 1, dim=1) * weights.flatten(1).amax(1)[rows]
    elif isinstance(A, Window):
        w, A = A.take(weights, rows), A.A
        sums = torch.linalg.vecdot(A.abs().flatten(1), w.flatten(1))
    else:  # a matrix-vector product per run of rows of one sample
        groups = runs(rows)
        sums = torch.cat([part.abs().flatten(1) @ weights[b].flatten()
                          for part, (b, _) in zip(A.split([n for _, n in groups]), groups)])
    return sums.double() * inflate(A[0].numel(), A.dtype)


def centre_radius(lower: Tensor, upper: Tensor) -> Interval:
    """``(c, r)`` in lower's dtype with ``[c - r, c + r]`` containing ``[lower, upper]``."""
    lo, hi = lower.double(), upper.double()
    c = ((lo + hi) / 2).to(lower.dtype)
    return c, up(torch.maximum(hi - c.double(), c.double() - lo), lower.dtype)


def outward(c: Tensor, r: Tensor) -> Interval:
    """``(lower, upper)`` in c's dtype containing ``[c - r, c + r]``."""
    return down(c.double() - r.double(), c.dtype), up(c.double() + r.double(), c.dtype)


class Arithmetic:
    """The working dtype's rounding ignored (``sound=False``, and α-CROWN's search): the steps of the
    CROWN family as plain tensor operations, no penalty."""
    sound = False

    def __init__(self, layers, ops):
        self.layers, self.ops = layers, ops
        self.weights: Dict[int, Tensor] = {}

    def zeros(self, like: Tensor, rows: Tensor) -> Tensor:
        """The initial bias of the rows of A (N, ...) of the samples ``rows`` (N,)."""
        return like.new_zeros(like.shape[0])

    def add(self, bias: Tensor, term: Optional[Tensor], before, weights: Optional[Tensor], rows: Tensor) -> Tensor:
        """``bias`` after a backward step that added ``term`` (N,) or None to it; ``before`` the
        coefficients the step started from, ``weights`` the step's error weights (sound mode)."""
        return bias if term is None else bias + term

    def relaxation(self, layer, lower: Tensor, upper: Tensor):
        return layer.relaxation(lower, upper)

    def chain_weights(self, i: int, lower: Tensor, upper: Tensor, relaxation) -> Dict[int, Tensor]:
        """Error weights of activation ``i`` and of the linear layers after it (sound mode)."""
        return {}

    def folds(self, weights: Dict[int, Tensor], start: int) -> Dict[int, Tuple[Tensor, FrozenSet[int]]]:
        """Error weights charged at once for several linear layers from ``start`` on (sound mode)."""
        return {}

    def forward(self, start: int, end: int, bounds: Interval) -> Interval:
        """IBP from the bounds on the input of activation ``start - 1`` through it and the linear
        layers ``start .. end - 1``."""
        lower, upper = self.layers[start - 1].image(*bounds)
        c, r = (upper + lower) / 2, (upper - lower) / 2
        for op in self.ops[start:end]:
            c, r = op.interval(c, r)
        return c - r, c + r


def _elementwise(op) -> bool:
    """Whether a layer multiplies each entry by a number (per-channel affine, identity, dropout)."""
    return op is not None and op.local and op.ibp == "neutral"


def _products(op, lower: Tensor, upper: Tensor) -> Tensor:
    """``(f + 1) sum(m) + 5 d`` (B,) float64 for a layer whose input (B, d entries) lies in [lower, upper],
    m = max(|lower|, |upper|), f the products per entry of the transposed step (1 for an activation,
    0 for a reshape): a bound on the products of a backward pass through it (and of the penalty,
    bias, offset and concretization sums on its input) times the absolute value they multiply."""
    fan = 1 if op is None else 0 if op.exact else op.fan_out
    m = torch.maximum(lower.abs(), upper.abs()).double().flatten(1).sum(1)
    return (fan + 1) * m + 5 * lower[0].numel()


class SoundPropagation:
    """Sound interval bounds on the input of every layer, then on the output
    (``BoundedModule.propagate``'s interface as the CROWN family uses it; no margins: they come
    from a backward pass over ``boxes`` at the layer ``spec_start``)."""
    margins = None

    def __init__(self, bounds: List[Interval], spec_start: int):
        self.bounds, self.spec_start = bounds, spec_start

    def input_bounds(self, spec: int, layer: int) -> Interval:
        return self.bounds[layer]


class Sound(Arithmetic):
    """Sound arithmetic in float32 or float64 (module docstring): penalties for every backward step,
    sound IBP; the bias and offset terms are summed in float64."""
    sound = True

    def __init__(self, layers, ops, dtype: torch.dtype):
        super().__init__(layers, ops)
        self.dtype, self.u, self.eta = dtype, unit(dtype), ETA[dtype]
        for op in ops:
            if op is not None:
                op.accumulate = torch.float64

    def zeros(self, like, rows):
        """Minus the bound on the underflow errors of a pass (:meth:`propagate`)."""
        return -self.underflow[rows]

    def add(self, bias, term, before, weights, rows):
        if term is None and weights is None:
            return bias
        return combine(bias, None if term is None else term.double(),
                       None if weights is None else -penalty(before, weights, rows))

    def relaxation(self, layer, lower, upper):
        return layer.relaxation(lower, upper, outward=True)

    def propagate(self, box: Interval, ball, spec_start: int) -> SoundPropagation:
        """Sound IBP from the input ``box`` (c, r) in the working dtype and, for an l2 / l1 ball,
        ``ball`` = (centre, eps, p) float64 (exact through the first affine layer); records the error
        weights of every linear layer from these bounds, and ``underflow`` (B,) float64: a bound on
        the errors of the products that underflow in any one backward pass."""
        c, r = box
        l2_eps = None
        if ball is not None:
            centre, eps, p = ball
            ball = (centre, torch.zeros_like(centre), torch.ones_like(centre), eps, p)
            l2_eps = eps if p == 2 else None
        bounds, products = [], 0
        for i, op in enumerate(self.ops):
            bounds.append(outward(c, r))
            products = products + _products(op, *bounds[-1])
            if op is None:
                c, r = self._activation(self.layers[i], *bounds[-1])
                ball = None
                continue
            self.weights[i] = self._op_weights(op, *bounds[-1])
            lower, upper = outward(*self._interval(op, c, r))
            if ball is not None and op.ibp == "affine":
                low, high = self._dual(op, ball)
                lower, upper = torch.fmax(lower, low), torch.fmin(upper, high)  # NaN (overflow) loses
                upper = torch.maximum(upper, lower)
            ball = self._neutral(op, ball) if ball is not None and op.ibp == "neutral" else None
            c, r = centre_radius(lower, upper)
        bounds.append(outward(c, r))
        self.ibp = bounds
        self.underflow = self._underflow(products + 5 * c[0].numel(), box[0][0].numel(), l2_eps)
        return SoundPropagation(bounds, spec_start)

    def _underflow(self, products: Tensor, d: int, l2_eps: Optional[Tensor]) -> Tensor:
        """A bound (B,) float64 on the errors of underflowing products in a backward pass: each product
        of the working dtype is off by at most η / 2 where it underflows (``products`` counts them,
        weighted by the values they multiply); the l2 norm of the input coefficients (a sum of d
        squares) by at most ``sqrt(d η / 2)``, times eps."""
        bound = products * (2 * self.eta * NUDGE) + self.eta
        if l2_eps is not None:
            bound = bound + l2_eps * (math.sqrt(2 * d * self.eta) * NUDGE)
        return bound

    def chain_weights(self, i, lower, upper, relaxation):
        weights = {i: self._activation_weights(lower, upper, relaxation)}
        c, r = self._activation(self.layers[i], lower, upper)
        for j in range(i + 1, len(self.ops)):
            op = self.ops[j]
            if op is None:
                break
            low, high = outward(c, r)
            low, high = torch.fmax(low, self.ibp[j][0]), torch.fmin(high, self.ibp[j][1])
            high = torch.maximum(low, high)
            weights[j] = self._op_weights(op, low, high)
            c, r = self._interval(op, *centre_radius(low, high))
        return weights

    def folds(self, weights, start):
        """The runs of per-channel affines and identities among the linear layers from ``start`` to
        the next activation, each with the layer below it, charged at the run's top: after a
        per-channel affine ``|A| <= (1 + u) |scale| |A|``, so a run costs one gather and sum."""
        end = next((j for j in range(start, len(self.ops)) if self.ops[j] is None), len(self.ops))
        folds, j = {}, end - 1
        while j >= start:
            if not _elementwise(self.ops[j]):
                j -= 1
                continue
            ones = torch.ones_like(self.ibp[j + 1][0][:1])  # |scale| in the dtype the backward step uses
            total, factor, folded, top = torch.zeros_like(self.ibp[j + 1][0]).double(), ones.double(), [], j
            while True:
                if weights.get(j) is not None:
                    total = total + factor * weights[j].double()
                folded.append(j)
                if j == start or not _elementwise(self.ops[j]):
                    break
                factor = factor * self.ops[j].magnitude(ones, bias=False).double() * (1 + self.u)
                j -= 1
            if len(folded) > 1:
                folds[top] = (up(total * NUDGE, self.dtype), frozenset(folded[1:]))
            j -= 1
        return folds

    def forward(self, start, end, bounds):
        """The steps of :meth:`propagate` (the same bounds from the same bounds)."""
        c, r = self._activation(self.layers[start - 1], *bounds)
        for op in self.ops[start:end]:
            c, r = centre_radius(*outward(*self._interval(op, c, r)))
        return outward(c, r)

    def _activation(self, layer, lower: Tensor, upper: Tensor) -> Interval:
        """(c, r) containing the activation's image of [lower, upper] (its image in float64, exact for
        ReLU, one rounding for LeakyReLU)."""
        low, high = layer.image(lower.double(), upper.double())
        return centre_radius(down(low, self.dtype), up(high, self.dtype))

    def _interval(self, op, c: Tensor, r: Tensor) -> Interval:
        """The interval step ``c' = fl(W c + b)``, ``r' = fl(|W| r)`` with the radius widened to
        ``(r' + γ_{n+1} fl(|W||c| + |b|)) / (1 - γ_{n+1}) + 2 (n + 1) η`` (n the fan-in), plus
        ``|W* - W| (|c| + r) + |b* - b|`` for rounded coefficients: contains the exact image of
        ``[c - r, c + r]``."""
        c_out, r_out = op.interval(c, r)
        if op.exact:
            return c_out, r_out
        n = op.fan_in + 1
        g = inflate(n, self.dtype)
        underflow = max(2 * n * self.eta, FLOOR[torch.float64])  # a normal float64: subnormal operands are slow
        radius = r_out.double() * g + op.magnitude(c.abs()).double() * (gamma(n, self.dtype) * g) + underflow
        deviation = op.deviation(c.abs().double() + r.double())
        if deviation is not None:
            radius = radius + deviation
        return c_out, up(radius * NUDGE, self.dtype)

    def _op_weights(self, op, lower: Tensor, upper: Tensor) -> Optional[Tensor]:
        """The error weights of a linear layer whose input lies in [lower, upper] (module docstring)."""
        if op.exact:
            return None
        m = torch.maximum(lower.abs(), upper.abs())
        weight = op.magnitude(m, bias=False)
        bias = op.magnitude(torch.zeros_like(m), bias=True).double()  # |b| on the output map
        entries = weight[0].numel()
        scale = gamma(op.fan_out + 2, self.dtype) * inflate(op.fan_in + 1, self.dtype)
        w = weight.double() * scale + bias * summed(entries, self.dtype)
        deviation = op.deviation(m.double())
        if deviation is not None:
            w = w + deviation
        return up(w * NUDGE, self.dtype)

    def _activation_weights(self, lower: Tensor, upper: Tensor, relaxation) -> Tensor:
        """``u m + (γ_33 + 2 γ'_n) |offset|`` (:func:`summed`: the offset terms' products are added in
        runs of 32, then in float64; in float64 they may be one dot product, whose γ'_n is below it):
        m >= |h| on [lower, upper]; the first term only where a slope is not 0 or 1 (products with
        those are exact)."""
        slopes, offset = relaxation.packed[..., :2], relaxation.packed[..., 2]
        exact = ((slopes == 0) | (slopes == 1)).all(-1) & ~relaxation.unstable
        m = torch.maximum(lower.abs(), upper.abs()).double()
        entries = lower[0].numel()
        w = torch.where(exact, 0.0, m * self.u) + offset.abs().double() * summed(entries, self.dtype)
        return torch.where(w == 0, 0.0, up(w * NUDGE, self.dtype))  # 0: no rounding (up would give FLOOR)

    def _dual(self, op, ball) -> Interval:
        """Bounds of the first affine layer over the ball, computed in float64: centre ``W x + b``,
        radius ``eps |W_i ⊙ axes|_dual + |W| ρ`` (x ± ρ the centre after the per-channel layers before
        it), widened by twice the float64 γ of the fan-in, and for underflow by ``(n + 4) η'`` and
        ``eps sqrt(n η')`` (η' of float64, n the fan-in)."""
        x, rho, axes, eps, p = ball
        c, radius = op.dual(x, eps, axes, p)
        spread = op.magnitude(rho, bias=False)
        n = op.fan_in + 4
        g = 2.0 * n * 2.0 ** -53
        floor = (max(n * ETA[torch.float64], FLOOR[torch.float64])
                 + eps.view((-1,) + (1,) * (c.dim() - 1)) * math.sqrt(n * ETA[torch.float64]) * NUDGE)
        radius = radius + spread + g * (op.magnitude(x.abs()) + radius + spread) + floor
        return down(c - radius, self.dtype), up(c + radius, self.dtype)

    @staticmethod
    def _neutral(op, ball):
        """The ball through a per-channel affine or reshape, in float64: centre ± ρ and axes >= |scale|."""
        x, rho, axes, eps, p = ball
        x_out, rho_out = op.interval(x, rho)
        axes = op.magnitude(axes, bias=False)
        if not op.exact:
            rho_out = (rho_out + 2.0 ** -50 * op.magnitude(x.abs()) + FLOOR[torch.float64]) * (1 + 2.0 ** -50)
            derivation = op.derivation_error(x.abs() + rho)  # float64 coefficients that round real ones
            if derivation is not None:
                rho_out = rho_out + derivation
            axes = axes * (1 + 2.0 ** -44)  # |real scale| <= (1 + 2^-47) |scale|, and this product's rounding
        return x_out, rho_out, axes, eps, p
