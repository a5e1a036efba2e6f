"""Projected gradient attacks inside an input set, with exact projections.

The projection onto ``{|x' - x|_2 <= eps} ∩ [lo, hi]^d`` is exact: for a multiplier ``mu >= 0``
the minimizer of ``|p - z|^2 + mu |p - x|^2`` over the box is ``clip((z + mu x) / (1 + mu))``, and
``|p(mu) - x|`` decreases in ``mu``, so the optimal ``mu`` is found by bisection. Likewise onto
``{|x' - x|_1 <= eps} ∩ [lo, hi]^d``: with ``d = z - x`` the minimizer for a threshold ``t >= 0`` is
``x + sign(d) min(max(|d| - t, 0), room)`` (``room`` the distance to the domain's edge in that
direction), whose l1 norm decreases in ``t``. The l1 attack steps along the few coordinates of
largest gradient that can still move (sparse steepest ascent).
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..engine.rounding import round_down
from ..specs import L1Ball, L2Ball, LinfBall

Ball = Union[LinfBall, L2Ball, L1Ball]
"""An input set the attacks take."""
L1_SPARSITY = 0.01  # share of the coordinates an l1 step moves (at least one)


def _clip_domain(spec: Ball, z: Tensor) -> Tensor:
    return z if spec.domain is None else z.clamp(spec.domain[0], spec.domain[1])


def _offset_norm(spec: Ball, p: Tensor, x: Tensor) -> Tensor:
    """``|p - x|`` in the set's norm, per sample (B, 1, ..., 1), in float64 (the differences of float32
    numbers exact): whether a point of the working dtype is in the set, not whether it nearly is."""
    return (p.double() - x.double()).flatten(1).norm(p=spec.p, dim=1).view((-1,) + (1,) * (p.dim() - 1))


def _pulled_inside(spec: Ball, x: Tensor, p: Tensor, eps: Tensor) -> Tensor:
    """``p`` with each point whose float64 distance to x exceeds ``eps`` (float64; by a rounding error)
    moved towards x by a relative 2^-20 until it does not (moving towards x keeps it in the domain)."""
    for _ in range(8):
        outside = _offset_norm(spec, p, x) > eps
        if not bool(outside.any()):
            break
        p = torch.where(outside, x + (p - x) * (1 - 2.0 ** -20), p)
    return p


def _l2_norm(v: Tensor) -> Tensor:
    """Per-sample l2 norm, shaped (B, 1, ..., 1)."""
    return v.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))


@torch.no_grad()
def project(spec: Ball, x: Tensor, z: Tensor, iterations: int = 60) -> Tensor:
    """Euclidean projection of ``z`` (B, ...) onto the input set ``spec`` around ``x`` (B, ...)
    (around the set's own centre when it has one); every returned point is in the set exactly (its
    distance to x computed in float64 is at most eps, the set's eps before any rounding to x's dtype)."""
    exact = spec.per_sample_eps(x.double())
    eps = round_down(exact, x.dtype)
    x = spec.center_for(x)
    if isinstance(spec, LinfBall):  # x -+ eps rounded to nearest, then one ulp towards x: inside
        low, high = torch.nextafter(x - eps, x), torch.nextafter(x + eps, x)
        return _clip_domain(spec, torch.minimum(torch.maximum(z, low), high))
    if isinstance(spec, L1Ball):
        return _pulled_inside(spec, x, _project_l1(spec, x, z, eps, iterations), exact)
    radius = lambda mu: _l2_norm(_clip_domain(spec, (z + mu * x) / (1 + mu)) - x)  # noqa: E731
    low = torch.zeros_like(eps)
    high = torch.ones_like(eps)
    while bool((radius(high) > eps).any()):  # grow the bracket until every sample is inside
        high = torch.where(radius(high) > eps, high * 4, high)
    mu = _smallest_inside(radius, eps, low, high, iterations)
    return _pulled_inside(spec, x, _clip_domain(spec, (z + mu * x) / (1 + mu)), exact)


def _smallest_inside(norm: Callable[[Tensor], Tensor], eps: Tensor, low: Tensor, high: Tensor,
                     iterations: int) -> Tensor:
    """The smallest multiplier t in [low, high] with ``norm(t) <= eps`` (norm decreasing in t, and
    ``norm(high) <= eps``), by bisection; ``low`` where that already holds."""
    inside = norm(low) <= eps
    for _ in range(iterations):
        mid = (low + high) / 2
        too_far = norm(mid) > eps
        low, high = torch.where(too_far, mid, low), torch.where(too_far, high, mid)
    return torch.where(inside, low, high)


def _project_l1(spec: Ball, x: Tensor, z: Tensor, eps: Tensor, iterations: int) -> Tensor:
    """Exact projection onto the l1 ball of radius eps (B, 1, ..) around x intersected with the domain."""
    d = z - x
    if spec.domain is None:
        room = torch.full_like(d, float("inf"))
    else:
        room = torch.where(d > 0, spec.domain[1] - x, x - spec.domain[0]).clamp_min(0)
    step = lambda t: torch.minimum((d.abs() - t).clamp_min(0), room)  # noqa: E731
    norm = lambda t: step(t).flatten(1).sum(1).view_as(eps)  # noqa: E731
    t = _smallest_inside(norm, eps, torch.zeros_like(eps), d.abs().flatten(1).amax(1).view_as(eps), iterations)
    return x + d.sign() * step(t)


@torch.no_grad()
def random_point(spec: Ball, x: Tensor) -> Tensor:
    """A random point of the input set (uniform in the box; uniform direction and radius in the ball)."""
    eps = spec.per_sample_eps(x)
    x = spec.center_for(x)
    if isinstance(spec, LinfBall):
        return project(spec, x, x + (2 * torch.rand_like(x) - 1) * eps)
    if isinstance(spec, L1Ball):  # a Laplace direction scaled to the unit l1 sphere
        direction = torch.distributions.Laplace(0.0, 1.0).sample(x.shape).to(x)
        direction = direction / direction.flatten(1).abs().sum(1).view_as(eps).clamp_min(1e-12)
        return project(spec, x, x + direction * torch.rand_like(eps) * eps)
    direction = torch.randn_like(x)
    direction = direction / _l2_norm(direction).clamp_min(1e-12)
    radius = torch.rand_like(eps)
    return project(spec, x, x + direction * radius * eps)


def pgd(objective: Callable[[Tensor], Tensor], x: Tensor, spec: Ball, steps: int = 20,
        step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True) -> Tensor:
    """Maximize ``objective`` (points (B, ...) -> values (B,)) over the input set around ``x``.

    Steps of relative size ``step_size`` (default 2.5 / steps) times eps along the gradient's sign
    (l∞), its direction (l2) or its largest coordinates that can still move (l1), each followed by the
    exact projection. Returns the best points (B, ...).
    """
    return pgd_batched(objective, x, [spec], steps, step_size, restarts, random_start)[0]


def pgd_batched(objective: Callable[[Tensor], Tensor], x: Tensor, specs: Sequence[Ball], steps: int = 20,
                step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True,
                step_sizes: Optional[Sequence[float]] = None, decay_at: Sequence[float] = ()) -> List[Tensor]:
    """:func:`pgd` for several input sets at once: the points of all sets are stacked along the
    batch, so each step is one call of ``objective`` ((S*B, ...) -> (S*B,)) and one backward.
    ``step_sizes``: a relative step size per set (instead of ``step_size`` for all); ``decay_at``:
    fractions of ``steps`` (rounded up) from which the step is divided by 10 once more, e.g.
    ``(0.5, 0.8, 0.9)``. Returns the best points per set, each (B, ...)."""
    for spec in specs:
        if not isinstance(spec, (LinfBall, L2Ball, L1Ball)):
            raise TypeError(f"pgd needs LinfBall, L2Ball or L1Ball sets, got {type(spec).__name__}")
    relative = step_size if step_size is not None else 2.5 / max(steps, 1)
    x = x.detach()
    stack = lambda parts: torch.cat(parts)  # noqa: E731
    split = lambda t: list(t.chunk(len(specs)))  # noqa: E731
    sizes = list(step_sizes) if step_sizes is not None else [relative] * len(specs)
    alpha = [spec.per_sample_eps(x) * size for spec, size in zip(specs, sizes)]
    decays = [math.ceil(f * steps) for f in decay_at]
    best = stack([x] * len(specs)).clone()
    with torch.no_grad():
        best_value = objective(best)
    for _ in range(restarts):
        points = [random_point(spec, x) if random_start else x.clone() for spec in specs]
        for step in range(steps):
            scale = 0.1 ** sum(step >= d for d in decays)
            point = stack(points).requires_grad_(True)
            value = objective(point)
            grad, = torch.autograd.grad(value.sum(), point)
            with torch.no_grad():
                _keep_best(best, best_value, point, value)
                points = [project(spec, x, p + scale * a * _ascent(spec, g, p))
                          for spec, p, a, g in zip(specs, split(point.detach()), alpha, split(grad))]
        with torch.no_grad():
            point = stack(points)
            _keep_best(best, best_value, point, objective(point))
    return split(best)


def _ascent(spec: Ball, grad: Tensor, point: Tensor) -> Tensor:
    """The steepest-ascent direction of unit norm for the set's norm; for l1, spread over the
    coordinates of largest gradient among those the domain lets move that way."""
    if isinstance(spec, LinfBall):
        return grad.sign()
    if isinstance(spec, L2Ball):
        return grad / _l2_norm(grad).clamp_min(1e-12)
    movable = grad.abs()
    if spec.domain is not None:
        stuck = ((grad > 0) & (point >= spec.domain[1])) | ((grad < 0) & (point <= spec.domain[0]))
        movable = movable.masked_fill(stuck, 0)
    flat = movable.flatten(1)
    k = max(1, int(L1_SPARSITY * flat.shape[1]))
    threshold = flat.topk(k, dim=1).values[:, -1:].clamp_min(torch.finfo(flat.dtype).tiny)
    chosen = (flat >= threshold).to(grad.dtype)
    direction = grad.sign().flatten(1) * chosen / chosen.sum(1, keepdim=True).clamp_min(1)
    return direction.view_as(grad)


def _keep_best(best: Tensor, best_value: Tensor, point: Tensor, value: Tensor) -> None:
    better = value.detach() > best_value
    best[better] = point.detach()[better]
    best_value[better] = value.detach()[better]
