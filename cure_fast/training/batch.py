"""What a training step computes for one batch: the input sets to train on (IBP eps sets, PGD points,
SABR's small sets) and the loss, as a module (:class:`Objective`) that DistributedDataParallel can wrap."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrainConfig, make_spec
from ..engine import BoundedModule
from ..specs import LinfBall
from . import objectives, reference
from .attacks import pgd_batched, project

REFERENCE_STEP = {"inf": 0.5, "2": 0.2}
"""pgd_schedule="reference": the step relative to eps per norm (then x0.1 at 50 / 80 / 90 % of the steps)."""


class Objective(nn.Module):
    """The loss of one batch, as a module so that DistributedDataParallel can wrap it.

    ``forward(x, y, specs, natural, ramp)``: natural training when ``natural``; otherwise the
    robust loss over ``specs`` (one per trained norm, l∞ first), combined as configured, mixed with
    the natural loss, plus bound alignment, plus the warm-up regularizer weighted by ``ramp`` (the
    regularizer's weight ``reg_lambda * (1 - eps / eps_max)``). Returns (loss, logits, margins).
    """

    def __init__(self, model: nn.Module, config: TrainConfig):
        super().__init__()
        self.model = model
        self.bounded = BoundedModule(model, backend=config.backend)
        self.config = config

    def forward(self, x: Tensor, y: Tensor, specs: Sequence, natural: bool = False, regularizer_weight: float = 0.0,
                assignment: Optional[Tensor] = None):
        cfg = self.config
        if natural or not specs:
            logits = self.model(x)
            return F.cross_entropy(logits, y), logits, []
        if cfg.method == "pgd":
            logits = self.model(torch.cat(specs))
            per_norm = [F.cross_entropy(z, y, reduction="none") for z in logits.chunk(len(specs))]
            return objectives.combine(per_norm, cfg.combine, cfg.alpha, assignment), logits[: len(y)], []
        out = self.bounded.propagate(x, specs, y)
        per_norm = [objectives.robust_ce(m, y) for m in out.margins]
        robust = objectives.combine(per_norm, cfg.combine, cfg.alpha, assignment)
        loss = (1 - cfg.natural_weight) * robust + cfg.natural_weight * F.cross_entropy(out.logits, y)
        if cfg.align_lambda > 0:
            ref = cfg.norms.index(cfg.align_reference)
            loss = loss + cfg.align_lambda * objectives.alignment(out.margins[ref], out.margins[1 - ref], y,
                                                                  detach=cfg.align_target == "detached")
        if regularizer_weight > 0 and self.bounded.first_affine is not None:
            placed = range(len(specs)) if cfg.reg_placement == "ours" else [len(specs) - 1]
            reg = sum(objectives.warmup_regularizer(out, k, self.bounded.first_affine, cfg.reg_tol) for k in placed)
            loss = loss + regularizer_weight * reg / len(placed)
        if cfg.l1_penalty > 0:
            loss = loss + cfg.l1_penalty * objectives.l1_norm(self.model)
        return loss, out.logits, out.margins


def training_sets(config: TrainConfig, model: nn.Module, x: Tensor, y: Tensor, eps: Dict[str, float]) -> List:
    """What to train on for a batch: the eps sets (IBP), PGD points (PGD, all norms attacked in one
    batched attack), or SABR's small sets around the PGD points."""
    if config.method == "ibp":
        return [make_spec(n, eps[n]) for n in config.norms]
    own = config.method == "sabr" and config.sabr_l2_set == "reference"
    attacked = [n for n in config.norms if not (own and n == "2")]
    sets = [make_spec(n, eps[n]) for n in attacked]
    schedule = {} if config.pgd_schedule == "constant" else dict(
        step_sizes=[REFERENCE_STEP[n] for n in attacked], decay_at=reference.DECAY_AT)
    model.eval()
    try:
        objective = lambda p: F.cross_entropy(model(p), y.repeat(len(sets)), reduction="none")  # noqa: E731
        found = pgd_batched(objective, x, sets, steps=config.pgd_steps, restarts=config.pgd_restarts,
                            **schedule) if sets else []
        points = dict(zip(attacked, found))
        if own and "2" in config.norms:
            points["2"] = reference.l2_attack(model, x, y, eps["2"], config.pgd_steps, REFERENCE_STEP["2"])
    finally:
        model.train()
    if config.method == "pgd":
        return [points[n] for n in config.norms]
    return [small_set(config, x, norm, eps[norm], points[norm]) for norm in config.norms]


def small_set(config: TrainConfig, x: Tensor, norm: str, eps: float, point: Tensor):
    """SABR: a set of radius ``lambda * eps`` (lambda of the norm, :meth:`TrainConfig.small_ratio`)
    around the attack point, shifted to lie in the eps set around x (for l2 with
    ``sabr_l2_set="box"``: the l∞ box of that radius around the point; ``"reference"``: the
    reference code's box, :mod:`cure_fast.training.reference`)."""
    small = config.small_ratio(norm) * eps
    if norm == "inf":
        lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        fits = lower + small <= upper - small
        centre = torch.where(fits, torch.minimum(torch.maximum(point, lower + small), upper - small),
                             (lower + upper) / 2)
        return LinfBall(small, center=centre)
    if config.sabr_l2_set == "box":
        return LinfBall(small, center=point)
    if config.sabr_l2_set == "reference":
        return reference.small_box(x, point, eps, small)
    return make_spec("2", small, center=project(make_spec("2", eps - small), x, point))
