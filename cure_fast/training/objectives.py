"""Losses of certified training: robust cross-entropy from margins, the IBP warm-up regularizers,
the CURE multi-norm combinations, bound alignment and gradient projection."""
from __future__ import annotations

import math
import warnings
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..engine import Propagation


def robust_logits(margins: Tensor) -> Tensor:
    """Worst-case logits ``[0, -m]`` from margin lower bounds m (B, K) (0 at the label)."""
    return -margins


def robust_ce(margins: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy of the worst-case logits, (B,): an upper bound on the loss over the set."""
    return F.cross_entropy(robust_logits(margins), y, reduction="none")


def certified(margins: Tensor, y: Tensor) -> Tensor:
    """(B,) bool: every margin off the label is positive."""
    return (margins.scatter(1, y[:, None], 1.0) > 0).all(1)


def combine(losses: Sequence[Tensor], mode: str, alpha: float, assignment: Tensor = None) -> Tensor:
    """Mean over the batch of per-sample losses (B,) of one or two norms (l∞ first).

    joint: ``(1 - alpha) L_inf + alpha L_2``; max: per-sample ``max(L_inf, L_2)``; random: each
    sample's loss of the norm ``assignment`` (B,) {0, 1} gives it (disjoint split).
    """
    if len(losses) == 1:
        return losses[0].mean()
    if mode == "joint":
        return (1 - alpha) * losses[0].mean() + alpha * losses[1].mean()
    if mode == "max":
        return torch.maximum(losses[0], losses[1]).mean()
    if mode == "random" and assignment.dim() == 2:  # two independent halves (masks (2, B)), as the reference:
        chosen = torch.cat([losses[0][assignment[0]], losses[1][assignment[1]]])  # the mean over both
        return chosen.mean()
    if mode == "random":
        return torch.where(assignment.bool(), losses[1], losses[0]).mean()
    raise ValueError(f"unknown combination {mode!r}")


def alignment(margins_ref: Tensor, margins_other: Tensor, y: Tensor, detach: bool = True) -> Tensor:
    """Bound alignment: ``KL(p_ref || p_other)`` between the softmax of the two norms' robust logits,
    averaged over the samples certified for the reference norm (the reference is the fixed target;
    ``detach=False``: as the CURE reference code, the gradient flows into the target too)."""
    mask = certified(margins_ref, y)
    if not mask.any():
        return margins_other.new_zeros(())
    target = robust_logits(margins_ref[mask])
    target = F.log_softmax(target.detach() if detach else target, dim=1)
    log_p = F.log_softmax(robust_logits(margins_other[mask]), dim=1)
    return F.kl_div(log_p, target, reduction="batchmean", log_target=True)


def l1_norm(model: nn.Module) -> Tensor:
    """Sum of |p| over every parameter (biases and BatchNorm's included, as the reference code)."""
    return sum(p.abs().sum() for p in model.parameters())


def warmup_regularizer(prop: Propagation, spec: int, first_affine: int, tol: float) -> Tensor:
    """The IBP warm-up regularizers of Shi et al. (2021), tightness + ReLU balance, averaged over ReLUs.

    Tightness: ``relu(tol - r_in / r_i) / tol`` with r_in the mean radius at the input of the first
    affine layer and r_i at the input of ReLU i. Balance: the ratios of the mean and the variance
    of the active to the inactive centres, folded into [0, 1], each ``relu(tol - ratio) / tol``.
    ``prop``: a propagation with every layer's bounds, ``spec`` the index of its input set,
    ``first_affine`` the index (among the model's layers) of the first Linear / Conv2d, which
    ``BoundedModule.first_affine`` holds.
    """
    lower, upper = prop.input_bounds(spec, first_affine)
    input_radius = ((upper - lower) / 2).mean()
    total, count = input_radius.new_zeros(()), 0
    for lower, upper in prop.preactivation_bounds(spec):
        centre, radius = (upper + lower) / 2, ((upper - lower) / 2).mean()
        total = total + F.relu(tol - input_radius / radius.clamp_min(1e-12)) / tol
        active, inactive = (lower > 0).to(centre.dtype), (upper < 0).to(centre.dtype)
        spread = (centre - centre.mean()).square()
        mean_ratio = _fold((centre * active).mean() / -(centre * inactive).mean())
        var_ratio = _fold((spread * active).sum() / (spread * inactive).sum())
        balance = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if torch.isfinite(balance):
            total = total + balance
        count += 1
    return total / max(count, 1)


def _fold(ratio: Tensor) -> Tensor:
    """min(ratio, 1 / ratio): 1 when balanced, towards 0 when not."""
    return torch.minimum(ratio, 1 / ratio.clamp_min(1e-12))


def ibp_init(model: nn.Module) -> None:
    """IBP initialization (Shi et al. 2021): weights ~ N(0, sqrt(2 pi) / fan_in), biases 0, for every
    Linear / Conv2d but the last, which keeps its default initialization. A parametrized weight
    (``torch.nn.utils.parametrize``: computed, not set) keeps its own initialization, with a warning."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            if parametrize.is_parametrized(layer, "weight"):
                warnings.warn(f"ibp_init leaves the parametrized weight of {layer} as it is (set ibp_init=false "
                              f"to silence this)")
                continue
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2 * math.pi) / fan_in)
            if layer.bias is not None:
                layer.bias.zero_()


def gradient_projection(theta0: Dict[str, Tensor], certified_params: Dict[str, Tensor],
                        natural_params: Dict[str, Tensor], beta: float) -> Dict[str, Tensor]:
    """Per tensor: ``theta0 + (1 - beta) d_ct + 1[cos > 0] beta cos d_nt`` with ``d = theta - theta0``
    and cos the cosine between the flattened certified and natural updates."""
    merged = {}
    for name, start in theta0.items():
        d_ct, d_nt = certified_params[name] - start, natural_params[name] - start
        cos = F.cosine_similarity(d_ct.flatten(), d_nt.flatten(), dim=0, eps=1e-12)
        merged[name] = start + (1 - beta) * d_ct + (cos > 0).to(cos.dtype) * beta * cos * d_nt
    return merged


def eps_ramp(step: int, start: int, end: int, eps: float, mid: float = 0.25, power: float = 4.0) -> float:
    """The smoothed eps schedule of Shi et al. (2021), by training step: 0 until ``start``, then
    ``a (t - start)^power`` for the first ``mid`` of the ramp, then linear to ``eps`` at ``end``, with
    a continuous slope at the switch."""
    if step <= start:
        return 0.0
    if step >= end:
        return eps
    switch = start + (end - start) * mid
    a = eps / ((switch - start) ** (power - 1) * (power * (end - switch) + (switch - start)))
    if step <= switch:
        return a * (step - start) ** power
    at_switch = a * (switch - start) ** power
    return at_switch + (eps - at_switch) * (step - switch) / (end - switch)


def eps_exp_ramp(step: int, start: int, end: int, eps: float, mid: float = 0.25, power: float = 4.0) -> float:
    """The reference code's eps schedule (SABR's ``--eps_scheduler_mode exp``, after auto_LiRPA), by
    training step: 0 before ``start``; from there ``a (step - o)^power`` with ``o = start - 1`` up to
    the switch ``s = o + floor((end - o) mid)``, then linear to ``eps`` at ``end``, with a continuous
    slope at s: ``a = eps / ((end - s) power (s - o)^(power - 1) + (s - o)^power)``. Where s = o (a ramp
    of under 1 / mid steps) it is linear from o."""
    if step < start:
        return 0.0
    if step >= end:
        return eps
    origin = start - 1
    switch = origin + int((end - origin) * mid)
    if switch == origin:
        return eps * (step - origin) / (end - origin)
    base = (switch - origin) ** (power - 1)
    a = eps / ((end - switch) * power * base + (switch - origin) * base)
    if step <= switch:
        return a * (step - origin) ** power
    at_switch = a * (switch - origin) ** power
    return min(at_switch + (eps - at_switch) * (step - switch) / (end - switch), eps)


def eps_linear_ramp(step: int, start: int, end: int, eps: float) -> float:
    """Linear by training step: 0 until ``start``, ``eps`` from ``end`` (the reference's ``linear`` mode)."""
    if step <= start:
        return 0.0
    return eps if step >= end else eps * (step - start) / (end - start)


EPS_SCHEDULES = {"smooth": eps_ramp, "exp": eps_exp_ramp, "linear": eps_linear_ramp}
"""``eps_schedule`` -> ``f(step, start, end, eps)``: the training eps at a step."""
