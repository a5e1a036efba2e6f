"""The CURE reference code's own procedures, reproduced for ``sabr_l2_set="reference"``; the
correct counterparts are the defaults (see docs/reproduction.md).

The reference's l2 attack for SABR's small sets differs from a projected gradient ascent in the
l2 ball in three ways, all reproduced here:

* its random start adds the random offset twice (each time clipped to the l∞ box of radius eps₂);
* each step computes the offset from x of the stepped point, scales it into the l2 ball, and then
  adds that offset to the *current point* (not to x), clipping to the l∞ box of radius eps₂ around
  x: the points can leave the l2 ball, up to the l∞ box of radius eps₂;
* the step is ``step_size * max((hi - lo) / 2)`` (the largest half-width of the clipped box in the
  batch), divided by 10 at ceil(50 %), ceil(80 %), ceil(90 %) of the steps, along the l2-normalized
  gradient of the cross-entropy; the kept point is the last misclassified point if any, else the
  one of largest loss, and the attack stops once every sample is misclassified.

The small set is then an l∞ box of radius ``lambda₂ · eps₂`` (1e-5 · eps₂ in every CURE script)
around that point, moved inside the l∞ box of radius eps₂ around x.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..specs import LinfBall

DECAY_AT = (0.5, 0.8, 0.9)


def _norm(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1).view((-1,) + (1,) * (v.dim() - 1))


def l2_attack(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, step_size: float = 0.2,
              decay_at: Sequence[float] = DECAY_AT) -> Tensor:
    """The reference code's l2 attack (module docstring): points (B, ...), inside the l∞ box of
    radius ``eps`` around x clipped to [0, 1] but not necessarily in the l2 ball."""
    x = x.detach()
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    scale = ((hi - lo) / 2).max()
    decays = [math.ceil(f * steps) for f in decay_at]
    delta = torch.randn_like(x)
    delta = delta * torch.rand_like(_norm(delta)) / _norm(delta) * eps
    point = torch.minimum(torch.maximum(torch.minimum(torch.maximum(x + delta, lo), hi) + delta, lo), hi)
    best, best_loss = x.clone(), torch.full((len(x),), -math.inf, device=x.device)
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for i in range(steps + 1):
        point = point.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(point)
            found |= out.detach().argmax(1) != y
            best[found] = point.detach()[found]
            if bool(found.all()) or i == steps:
                break
            loss = F.cross_entropy(out, y, reduction="none")
            grad, = torch.autograd.grad(loss.sum(), point)
        with torch.no_grad():
            improved = loss.detach() > best_loss
            best_loss[improved] = loss.detach()[improved]
            best[improved] = point.detach()[improved]
            grad = grad / (_norm(grad) + 1e-10)
            size = step_size * 0.1 ** sum(i >= d for d in decays)
            offset = point + size * scale * grad - x
            offset = offset * (eps / _norm(offset)).clamp(max=1.0)
            point = torch.minimum(torch.maximum(point + offset, lo), hi)
    return best.detach()


def small_box(x: Tensor, point: Tensor, eps: float, radius: float) -> LinfBall:
    """The l∞ box of ``radius`` around ``point``, its centre clipped into the l∞ box of radius eps
    around x (the reference's shift; no check that the small box fits)."""
    lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    return LinfBall(radius, center=torch.minimum(torch.maximum(point, lo + radius), hi - radius))
