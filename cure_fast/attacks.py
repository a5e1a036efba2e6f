"""Projected gradient attacks inside an input set, with exact projections.

The projection onto ``{|x' - x|_2 <= eps} ∩ [lo, hi]^d`` is exact: for a multiplier ``mu >= 0``
the minimizer of ``|p - z|^2 + mu |p - x|^2`` over the box is ``clip((z + mu x) / (1 + mu))``, and
``|p(mu) - x|`` decreases in ``mu``, so the optimal ``mu`` is found by bisection.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .specs import L2Ball, LinfBall, _Ball


def _clip_domain(spec: _Ball, z: Tensor) -> Tensor:
    return z if spec.domain is None else z.clamp(spec.domain[0], spec.domain[1])


def _l2_norm(v: Tensor) -> Tensor:
    """Per-sample l2 norm, shaped (B, 1, ..., 1)."""
    return v.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))


@torch.no_grad()
def project(spec: _Ball, x: Tensor, z: Tensor, iterations: int = 60) -> Tensor:
    """Euclidean projection of ``z`` (B, ...) onto the input set ``spec`` around ``x`` (B, ...)."""
    eps = spec.per_sample_eps(x)
    if isinstance(spec, LinfBall):
        return _clip_domain(spec, torch.minimum(torch.maximum(z, x - eps), x + eps))
    radius = lambda mu: _l2_norm(_clip_domain(spec, (z + mu * x) / (1 + mu)) - x)  # noqa: E731
    low = torch.zeros_like(eps)
    high = torch.ones_like(eps)
    while bool((radius(high) > eps).any()):  # grow the bracket until every sample is inside
        high = torch.where(radius(high) > eps, high * 4, high)
    inside = radius(low) <= eps
    for _ in range(iterations):
        mid = (low + high) / 2
        too_far = radius(mid) > eps
        low, high = torch.where(too_far, mid, low), torch.where(too_far, high, mid)
    mu = torch.where(inside, torch.zeros_like(high), high)
    return _clip_domain(spec, (z + mu * x) / (1 + mu))


@torch.no_grad()
def random_point(spec: _Ball, x: Tensor) -> Tensor:
    """A random point of the input set (uniform in the box; uniform direction and radius in the ball)."""
    eps = spec.per_sample_eps(x)
    if isinstance(spec, LinfBall):
        return project(spec, x, x + (2 * torch.rand_like(x) - 1) * eps)
    direction = torch.randn_like(x)
    direction = direction / _l2_norm(direction).clamp_min(1e-12)
    radius = torch.rand_like(eps)
    return project(spec, x, x + direction * radius * eps)


def pgd(objective: Callable[[Tensor], Tensor], x: Tensor, spec: _Ball, steps: int = 20,
        step_size: Optional[float] = None, restarts: int = 1, random_start: bool = True) -> Tensor:
    """Maximize ``objective`` (points (B, ...) -> values (B,)) over the input set around ``x``.

    Steps of relative size ``step_size`` (default 2.5 / steps) times eps along the gradient's sign
    (l∞) or direction (l2), each followed by the exact projection. Returns the best points (B, ...).
    """
    if not isinstance(spec, (LinfBall, L2Ball)):
        raise TypeError(f"pgd needs a LinfBall or L2Ball, got {type(spec).__name__}")
    alpha = spec.per_sample_eps(x) * (step_size if step_size is not None else 2.5 / max(steps, 1))
    x = x.detach()
    best = x.clone()
    with torch.no_grad():
        best_value = objective(best)
    for _ in range(restarts):
        point = random_point(spec, x) if random_start else x.clone()
        for _ in range(steps):
            point.requires_grad_(True)
            value = objective(point)
            grad, = torch.autograd.grad(value.sum(), point)
            with torch.no_grad():
                _keep_best(best, best_value, point, value)
                step = grad.sign() if isinstance(spec, LinfBall) else grad / _l2_norm(grad).clamp_min(1e-12)
                point = project(spec, x, point + alpha * step)
        with torch.no_grad():
            _keep_best(best, best_value, point, objective(point))
    return best


def _keep_best(best: Tensor, best_value: Tensor, point: Tensor, value: Tensor) -> None:
    better = value.detach() > best_value
    best[better] = point.detach()[better]
    best_value[better] = value.detach()[better]
