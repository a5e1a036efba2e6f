"""What a training step computes for one batch: the input sets to train on (IBP eps sets, PGD points,
SABR's small sets) and the loss, as a module (:class:`Objective`) that DistributedDataParallel can wrap."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TrainConfig, make_spec
from ..engine import BoundedModule
from ..engine.shrink import ShrinkBox
from ..specs import LinfBall
from . import objectives, reference
from .attacks import pgd_batched, project

REFERENCE_STEP = {"inf": 0.5, "2": 0.2}
"""pgd_schedule="reference": the step relative to eps per norm (then x0.1 at 50 / 80 / 90 % of the steps)."""


class Objective(nn.Module):
    """The loss of one batch, as a module so that DistributedDataParallel can wrap it.

    ``forward(x, y, specs, natural, regularizer_weight, assignment)``: natural training when ``natural``
    (gradient projection's natural epochs); without ``specs`` (eps = 0) the natural loss plus the l1
    penalty, plus with ``reg_zero_eps_box`` the warm-up regularizer on that box; otherwise the robust
    loss over ``specs`` (one per norm of ``config.norms``, in that order; propagated with the shrinking
    box when ``shrink_ratio`` is set), combined as configured (``assignment``: each sample's norm for
    ``combine="random"``), mixed with the natural loss, plus bound alignment, plus the warm-up
    regularizer weighted by ``regularizer_weight`` (``reg_lambda * (1 - eps / eps_max)``), plus the l1
    penalty. Returns (loss, logits, margins).
    """

    def __init__(self, model: nn.Module, config: TrainConfig):
        super().__init__()
        self.model = model
        self.bounded = BoundedModule(model, backend=config.backend)
        self.config = config
        self.shrink = shrink_box(config)

    def forward(self, x: Tensor, y: Tensor, specs: Sequence, natural: bool = False, regularizer_weight: float = 0.0,
                assignment: Optional[Tensor] = None):
        cfg = self.config
        if natural:
            logits = self.model(x)
            return F.cross_entropy(logits, y), logits, []
        if not specs:
            return self._zero_eps(x, y, regularizer_weight)
        if cfg.method == "pgd":
            logits = self.model(torch.cat(specs))
            per_norm = [F.cross_entropy(z, y, reduction="none") for z in logits.chunk(len(specs))]
            return objectives.combine(per_norm, cfg.combine, cfg.alpha, assignment), logits[: len(y)], []
        out = self.bounded.propagate(x, specs, y, shrink=self.shrink)
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
        return loss + self._l1(), out.logits, out.margins

    def _zero_eps(self, x: Tensor, y: Tensor, regularizer_weight: float):
        """A step at eps = 0: the natural loss and the l1 penalty; with ``reg_zero_eps_box`` and a
        positive weight also the warm-up regularizer on an l∞ box of that radius around x (one
        propagation, whose natural stream gives the logits), as the reference code's first epoch."""
        cfg = self.config
        if regularizer_weight > 0 and cfg.reg_zero_eps_box is not None and self.bounded.first_affine is not None:
            out = self.bounded.propagate(x, [LinfBall(cfg.reg_zero_eps_box)])
            reg = objectives.warmup_regularizer(out, 0, self.bounded.first_affine, cfg.reg_tol)
            logits, extra = out.logits, regularizer_weight * reg
        else:
            logits, extra = self.model(x), 0.0
        return F.cross_entropy(logits, y) + extra + self._l1(), logits, []

    def _l1(self):
        cfg = self.config
        return cfg.l1_penalty * objectives.l1_norm(self.model) if cfg.l1_penalty > 0 else 0.0


def shrink_box(config: TrainConfig) -> Optional[ShrinkBox]:
    """The shrinking box of a config (training only, unsound: :mod:`cure_fast.engine.shrink`): the
    sets of ``shrink_norms`` among the trained ``norms``; None when ``shrink_ratio`` is null."""
    if config.shrink_ratio is None:
        return None
    chosen = tuple(k for k, norm in enumerate(config.norms) if norm in config.shrink_norms)
    return ShrinkBox(config.shrink_ratio, config.shrink_method, config.shrink_relu_state, chosen) if chosen else None


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
