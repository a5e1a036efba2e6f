"""Input sets: the perturbations an adversary may apply to a batch of inputs.

An input set is described once (its norm, radius and domain) and instantiated per batch by
`BoundedModule`. ``eps`` is a float or a per-sample tensor of shape ``(B,)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Tuple, Union

import torch
from torch import Tensor

Eps = Union[float, Tensor]
Domain = Optional[Tuple[float, float]]


def _check_domain(domain: Domain) -> Domain:
    if domain is None:
        return None
    if isinstance(domain, (str, bytes)):
        raise ValueError(f"domain must be a pair (low, high) or None, got {domain!r}")
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise ValueError(f"domain must be a pair (low, high) or None, got {domain!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"domain must be finite with low < high, got {domain!r}")
    return (lo, hi)


def _check_eps(eps: Eps) -> Eps:
    if isinstance(eps, Tensor):
        if eps.dim() > 1:
            raise ValueError(f"eps must be a float or a per-sample tensor of shape (B,), got shape {tuple(eps.shape)}")
        if not eps.is_floating_point():
            raise ValueError(f"eps must be a floating tensor, got dtype {eps.dtype}")
        if torch.isnan(eps).any() or (eps < 0).any() or torch.isinf(eps).any():
            raise ValueError("eps must be finite and non-negative")
        return eps.detach()
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"eps must be a float or a tensor, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and non-negative, got {eps}")
    return eps


@dataclass(frozen=True, eq=False)
class Ball:
    """An input set: a norm ball of radius ``eps`` (float or (B,)) around each input, intersected with
    ``domain``. ``p`` is the norm; ``exact_first_layer`` says whether the first affine layer bounds it
    exactly by the dual norm (l2, l1) instead of through its bounding box (l∞, where they agree)."""
    p: ClassVar[float] = math.inf
    exact_first_layer: ClassVar[bool] = False

    eps: Eps
    domain: Domain = (0.0, 1.0)
    center: Optional[Tensor] = None

    def __post_init__(self):
        object.__setattr__(self, "eps", _check_eps(self.eps))
        object.__setattr__(self, "domain", _check_domain(self.domain))
        if self.center is not None:
            if not isinstance(self.center, Tensor) or not self.center.is_floating_point():
                raise ValueError(f"{self.name}: center must be a floating tensor shaped like the input")
            object.__setattr__(self, "center", self.center.detach())

    def center_for(self, x: Tensor) -> Tensor:
        """The centre of the set for inputs x (B, ...): ``center`` when given, else x itself."""
        if self.center is None:
            return x
        if self.center.shape != x.shape:
            raise ValueError(f"{self.name}: center has shape {tuple(self.center.shape)} but the input has {tuple(x.shape)}")
        if self.center.numel():
            low, high = (float(v) for v in torch.aminmax(self.center))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{self.name}: center contains NaN or Inf; give finite centres")
            if self.domain is not None and (low < self.domain[0] or high > self.domain[1]):
                raise ValueError(f"{self.name}: center values span [{low:g}, {high:g}], outside the domain "
                                 f"{self.domain}; give a center inside the domain (or domain=None)")
        return self.center.to(device=x.device, dtype=x.dtype)

    def per_sample_eps(self, x: Tensor) -> Tensor:
        """``eps`` as a tensor of shape ``(B, 1, ..., 1)`` broadcastable against ``x`` (B, ...)."""
        eps = self.eps
        if isinstance(eps, Tensor):
            if eps.dim() == 1 and eps.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: eps has {eps.shape[0]} entries but the batch has {x.shape[0]} samples")
            eps = eps.to(device=x.device, dtype=x.dtype)
        else:
            eps = torch.tensor(eps, device=x.device, dtype=x.dtype)
        if not bool(torch.isfinite(eps).all()):
            raise ValueError(f"{self.name}: eps {self.eps if not isinstance(self.eps, Tensor) else 'tensor'} overflows "
                             f"the input's dtype {str(x.dtype)[6:]} (largest {torch.finfo(x.dtype).max:.3g})")
        return eps.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], *([1] * (x.dim() - 1)))

    def domain_box(self, x: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """The l∞ box of radius eps around x intersected with the domain, as (centre, radius); each like x.

        ``None`` for an l2 or l1 ball without a domain (the box would not bound it more tightly than
        the exact first layer does).
        """
        if self.domain is None and self.exact_first_layer:
            return None
        eps = self.per_sample_eps(x)
        centre = self.center_for(x)
        lower, upper = centre - eps, centre + eps
        if self.domain is not None:
            lower = lower.clamp(min=self.domain[0])
            upper = upper.clamp(max=self.domain[1])
        return (upper + lower) / 2, (upper - lower) / 2

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        eps = f"tensor{tuple(self.eps.shape)}" if isinstance(self.eps, Tensor) else f"{self.eps:g}"
        centre = "" if self.center is None else ", center=tensor"
        return f"{self.name}(eps={eps}, domain={self.domain}{centre})"


class LinfBall(Ball):
    """The l∞ ball ``{x' : |x' - x|_∞ <= eps} ∩ domain``: the box ``[max(x-eps, lo), min(x+eps, hi)]``.

    Args:
        eps: radius, a float or a per-sample tensor of shape ``(B,)``.
        domain: ``(lo, hi)`` bounds of valid inputs (pixel space), or ``None`` for no bounds.
        center: optional centres (B, ...) of the set; by default the input itself (small-box
            training bounds a small set around a point other than the natural input).
    """

    p = math.inf


class L2Ball(Ball):
    """The l2 ball ``{x' : |x' - x|_2 <= eps}`` (∩ domain when ``domain`` is given).

    The first affine layer is bounded exactly through the dual norm (docs/design.md); where a
    domain is given, the domain box's bound is intersected with it.

    Args:
        eps: radius, a float or a per-sample tensor of shape ``(B,)``.
        domain: ``(lo, hi)`` bounds of valid inputs (pixel space), or ``None``.
        center: optional centres (B, ...) of the ball; by default the input itself.
    """

    p = 2.0
    exact_first_layer = True


class L1Ball(Ball):
    """The l1 ball ``{x' : |x' - x|_1 <= eps}`` (∩ domain when ``domain`` is given).

    The first affine layer is bounded exactly through the dual (l∞) norm of the weight rows
    (docs/design.md); where a domain is given, the domain box's bound is intersected with it.

    Args:
        eps: radius, a float or a per-sample tensor of shape ``(B,)``.
        domain: ``(lo, hi)`` bounds of valid inputs (pixel space), or ``None``.
        center: optional centres (B, ...) of the ball; by default the input itself.
    """

    p = 1.0
    exact_first_layer = True


def contains(spec: Ball, x: Tensor, points: Tensor, tol: float = 0.0) -> Tensor:
    """Whether each of ``points`` (B, ...) lies in the input set around ``x`` (B, ...) (around its own
    centre when it has one), in float64: the set of the spec's own eps, not of eps rounded to x's dtype;
    returns (B,) bool."""
    eps = spec.per_sample_eps(x.double()).reshape(-1)
    delta = (points.double() - spec.center_for(x).double()).flatten(1)
    norm = delta.norm(p=spec.p, dim=1)
    inside = norm <= eps + tol
    if spec.domain is not None:
        flat = points.flatten(1)
        inside &= (flat >= spec.domain[0] - tol).all(1) & (flat <= spec.domain[1] + tol).all(1)
    return inside
