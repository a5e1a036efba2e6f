"""α-CROWN (docs/design.md, "Linear relaxation"): projected Adam on the lower slopes of the unstable
neurons, one per neuron and per row of every backward pass; the pre-activation bounds layer by layer
(each bound its own objective, on chunks of rows), then the margin rows; in the sound modes the slopes
are searched in float32 and every bound is computed once in the sound arithmetic with each row's best
slopes. Entry point: :func:`optimized_bound` (``crown_margins(..., method="alpha-crown")``).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import passes

LR_DECAY = 0.98  # Adam's learning rate is multiplied by this after every step


def optimized_bound(problem: passes.Problem, chain: passes.Chain, C: Tensor, rows: Tensor, steps: int, lr: float,
                    intermediate: bool, target: Optional[float],
                    search: Optional[Tuple[passes.Problem, passes.Chain]] = None) -> Tensor:
    """α-CROWN lower bounds of ``C z``: C (N, K), rows (N,) -> (N,), never below CROWN's (``chain``'s).
    ``intermediate``: the pre-activation bounds are optimized first (:func:`optimized_chain`), then
    the final slopes over them. ``search``: the problem and chain in float32 where the slopes are
    searched; the bounds are then computed in ``problem``'s arithmetic (any slopes give a sound bound)
    with the slopes of each row's best step (:class:`Keeper`)."""
    crown_bound = passes.linear_bound(problem, chain, C, rows)
    if steps == 0 or not any(r.unstable.any() for r in chain.relaxations.values()):
        return crown_bound
    open_rows = torch.ones_like(rows, dtype=torch.bool) if target is None else ~(crown_bound > target)  # NaN: open
    if not bool(open_rows.any()):
        return crown_bound
    if intermediate:
        chain = optimized_chain(problem, chain, steps, lr, rows[open_rows], None if search is None else search[0])
        search = None if search is None else (search[0], chain.cast(search[0].dtype))
    end, sizing = len(problem.ops), problem if search is None else search[0]
    values = []
    for part in passes.chunks(C.shape[0], sizing.rows(sizing.width(end), share=8)):
        def final_pass(p: passes.Problem, c: passes.Chain, slopes: passes.Slopes, picked: Optional[Tensor],
                       part: slice = part) -> Tensor:
            C_part, rows_part = (C[part], rows[part]) if picked is None else (C[part][picked], rows[part][picked])
            return passes.backward(p, c, end, C_part.to(p.dtype), rows_part, slopes)
        values.append(optimized_rows(final_pass, problem, chain, search, steps, lr, target))
    return torch.fmax(torch.cat(values), crown_bound)  # fmax: NaN (no bound) loses


def optimized_chain(problem: passes.Problem, reference: passes.Chain, steps: int, lr: float,
                    samples: Optional[Tensor] = None, search: Optional[passes.Problem] = None) -> passes.Chain:
    """α-CROWN on the pre-activation bounds, layer by layer: the bounds on the neurons unstable under
    ``reference`` at each activation, every one its own objective over the slopes of the activations
    below (fixed at their optimized bounds), optimized on chunks of rows (memory: one chunk's
    autograd graph) and intersected with ``reference``'s and with IBP from the optimized bounds of
    the activation below (:func:`passes.forwarded`). ``samples``: the indices of the samples to
    optimize (None: all; the others keep ``reference``'s bounds, intersected with the forwarded
    IBP); ``search``: the float32 problem to search in."""
    weights = problem.arithmetic.weights
    chain = passes.Chain({}, {}, dict(weights), dict(problem.arithmetic.folds(weights, 0)))
    chosen, previous = None, None
    if samples is not None:
        batch = next(iter(reference.bounds.values()))[0]
        chosen = torch.zeros(batch.shape[0], dtype=torch.bool, device=batch.device)
        chosen[samples] = True
    for i in reference.relaxations:
        lower, upper = reference.bounds[i]
        if previous is not None:  # IBP from the optimized bounds below may be tighter still
            lower, upper = passes.forwarded(problem, i, (lower, upper), previous)
        unstable = reference.relaxations[i].unstable & (lower < 0) & (upper > 0)
        if chosen is not None:
            unstable = unstable & chosen.view((-1,) + (1,) * (unstable.dim() - 1))
        if not passes.ibp_is_exact(problem.ops[:i]) and bool(unstable.any()):
            searched = None if search is None else (search, chain.cast(search.dtype))
            lower, upper = optimized_layer(problem, chain, i, lower, upper, unstable, steps, lr, searched)
        passes.extend(problem, chain, i, lower, upper)
        previous = (i, (lower, upper))
    return chain


def optimized_layer(problem: passes.Problem, chain: passes.Chain, i: int, lower: Tensor, upper: Tensor,
                    unstable: Tensor, steps: int, lr: float,
                    search: Optional[Tuple[passes.Problem, passes.Chain]]) -> Tuple[Tensor, Tensor]:
    """The bounds ``lower``, ``upper`` (B, *shape) on the input of activation i, those of the neurons
    ``unstable`` (B, *shape) bool replaced by their α-CROWN bounds where tighter
    (:func:`passes.crown_bounds` with optimized slopes). A row stops once its bound makes the neuron
    stable (target 0)."""
    def optimized(neurons: Tensor, signs: Tensor, rows: Tensor) -> Tensor:
        def unit_pass(p: passes.Problem, c: passes.Chain, slopes: passes.Slopes, picked: Optional[Tensor]) -> Tensor:
            n, s, r = (neurons, signs, rows) if picked is None else (neurons[picked], signs[picked], rows[picked])
            return passes.unit_bound(p, c, i, n, s.to(p.dtype), r, slopes)
        return optimized_rows(unit_pass, problem, chain, search, steps, lr, target=0.0)
    sizing = problem if search is None else search[0]
    return passes.crown_bounds(problem, chain, i, lower, upper, unstable=unstable, solve=optimized,
                               chunk_rows=sizing.rows(sizing.width(i, unit=True), share=8))


def optimized_rows(bound, problem: passes.Problem, chain: passes.Chain,
                   search: Optional[Tuple[passes.Problem, passes.Chain]], steps: int, lr: float,
                   target: Optional[float]) -> Tensor:
    """The best bound per row (N,) of ``bound(problem, chain, slopes, picked)`` (the rows ``picked``,
    indices, or all for None) over α-CROWN's steps; with ``search``, the slopes are searched there
    and the bound computed in ``problem``'s arithmetic, in one pass, with the slopes of each row's best
    step. The rows whose search passed ``target`` but whose bound did not (the rounding allowance) are
    searched again from their kept slopes, to the target plus twice that gap."""
    if search is None:
        return optimize(lambda slopes: bound(problem, chain, slopes, None), steps, lr, target)[0]
    _, keeper = optimize(lambda slopes: bound(*search, slopes, None), steps, lr, target, keep=True)
    value = passes.no_nan(bound(problem, chain, keeper.best.frozen(problem.dtype), None))
    if target is None:
        return value
    gap = keeper.value - value  # not finite: no bound, no gap to close
    short = ((keeper.value > target) & ~(value > target) & gap.isfinite()).nonzero()[:, 0]
    if short.numel() == 0:
        return value
    _, again = optimize(lambda slopes: bound(*search, slopes, short), steps, lr, target + 2 * gap[short],
                        keep=True, start=keeper.best.resumed(short))
    again_value = passes.no_nan(bound(problem, chain, again.best.frozen(problem.dtype), short))
    value[short] = torch.fmax(value[short], again_value)
    return value


def optimize(bound, steps: int, lr: float, target: Union[None, float, Tensor] = None,
             keep: bool = False, start: Optional[passes.Slopes] = None) -> Tuple[Tensor, Optional["Keeper"]]:
    """Projected Adam on the lower slopes α of the unstable neurons in the passes of ``bound(slopes)``
    (N,), one per neuron and row, starting from ``start`` or else the relaxations' own (the first step
    is CROWN's). Returns the best bound per row and (``keep``) the slopes of the rows' best steps.
    ``target`` (a number, or one per row): a row whose bound is above it leaves the objective; all
    above it: stop."""
    slopes = passes.Slopes() if start is None else start
    keeper = Keeper(slopes, target) if keep else None
    best, optimizer, schedule = None, None, None
    for step in range(steps + 1):
        training = step < steps
        with torch.set_grad_enabled(training):
            value = bound(slopes)
            if training and slopes.table:
                open_rows = 1.0 if best is None or target is None else (best <= target).to(value.dtype)
                (-(value * open_rows).sum()).backward()
        value = value.detach()
        best = value if best is None else torch.fmax(best, value)  # NaN: no bound
        if keeper is not None:
            keeper.update(value)
        if not slopes.table or (target is not None and bool((best > target).all())):
            break  # no slope in these passes, or every row above the target
        if training:
            if optimizer is None:
                optimizer = torch.optim.Adam(slopes.parameters(), lr=lr)
                schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, LR_DECAY)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            slopes.clamp()
    return best, keeper


class Keeper:
    """Each row's slopes at its best step so far (bounds capped at ``target``), in one table: a row's
    bound depends on its own slopes only (the first dimension of every slope tensor is the row)."""

    def __init__(self, slopes: passes.Slopes, target: Union[None, float, Tensor]):
        self.slopes, self.target = slopes, target
        self.score, self.value, self.best = None, None, None

    def update(self, value: Tensor) -> None:
        """Record the bounds ``value`` (N,) of this step's slopes (``self.value``: each row's bound at
        its kept step, uncapped)."""
        value = torch.where(value.isnan(), -float("inf"), value)  # NaN (no bound): any later step is better
        capped = value if self.target is None else torch.minimum(value, torch.as_tensor(self.target).to(value))
        better = torch.ones_like(capped, dtype=torch.bool) if self.score is None else capped > self.score
        if not bool(better.any()):
            return
        self.score = capped if self.score is None else torch.where(better, capped, self.score)
        self.value = value if self.value is None else torch.where(better, value, self.value)
        if self.best is None:
            self.best = self.slopes.frozen()
            return
        for key, (alpha, _, _) in self.slopes.table.items():
            self.best.table[key][0][better] = alpha.detach()[better]
