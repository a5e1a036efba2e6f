"""Linear relaxation bounds (the CROWN family) on the margins of a :class:`~cure_fast.BoundedModule`.

Backward linear bound propagation (docs/design.md, "Linear relaxation (CROWN family)") through the
eval-mode network: a linear lower bound ``A h + a`` on the quantity of interest is pushed from the
output back to the input, exactly through every linear layer (Linear, Conv2d, AvgPool2d, BatchNorm and
Normalize as per-channel affines, Flatten; Identity and eval-mode Dropout are identities), and through
every ReLU by a linear relaxation over its pre-activation bounds ``[l, u]``: a stable ReLU is exact
(slope 1 or 0); an unstable one (``l < 0 < u``) is bounded above by ``u (h - l) / (u - l)`` and
below by ``α h``, ``α ∈ [0, 1]``. The bound is then minimized over the input set (pixel space, the
Normalize layer being part of the network):

- ``LinfBall``: ``A c - |A| r + a`` over the domain-clipped box ``[max(x-eps, lo), min(x+eps, hi)]``;
- ``L2Ball``: ``A x - eps |A|_2 + a`` (the dual norm); ``L1Ball``: ``A x - eps |A|_∞ + a``; with a
  domain also the box bound over ``[max(x-eps, lo), min(x+eps, hi)]``, keeping the larger (both are
  sound).

Methods (``method=``):

- ``"crown-ibp"``: the pre-activation bounds of every ReLU are IBP's (``BoundedModule.propagate``);
  one backward pass from the specification with the adaptive lower slope ``α = 1 if u > -l else 0``.
- ``"crown"``: ReLU by ReLU, in order, the pre-activation bounds are computed by CROWN itself: a
  backward pass from that layer with rows ``+e_i`` and ``-e_i`` per neuron, using the relaxations of
  the earlier ReLUs, intersected with IBP (propagated from the earlier, tightened bounds). Only
  neurons unstable under the IBP bounds get rows: a stable neuron's relaxation is already exact. Where
  a pre-activation is the image of the input set under one Linear/Conv2d and per-channel affines, the
  IBP bound is already exact (interval hull, or dual norm for l2 / l1) and is kept. Then the final
  pass as in CROWN-IBP. Tighter intermediate bounds need not give a tighter final bound (they change
  the adaptive slopes), so the pass also computes pure CROWN's bound for every neuron IBP leaves
  unstable and records, per sample, the first ReLU whose relaxation the intersection changed. For the
  samples where it changed one, pure CROWN (the same passes without the intersection, from the ReLU
  after that one) is run too and the final bound is the larger of the two: never looser than pure
  CROWN. Elsewhere the relaxations are pure CROWN's and nothing more runs (on a briefly trained cnn5:
  every sample; 2.4x faster). With ``target`` (the cascade: 0), pure CROWN runs only for the samples
  not yet above it.
- ``"alpha-crown"`` (α-CROWN): the lower slopes α of every ReLU are optimized by projected Adam
  (``alpha_steps`` steps, learning rate ``alpha_lr`` decaying by 2% a step, clamped to the sound range
  after each) from CROWN's choice, one per unstable neuron *and per row of every backward pass*. With
  ``alpha_intermediate`` (the default) the pre-activation bounds come first, layer by layer: at each
  ReLU, the lower and upper bound of every neuron unstable under CROWN is its own objective over the
  slopes of the ReLUs below (their bounds fixed at the optimized values), on chunks of rows (the
  autograd graph of one chunk at a time: the memory of a CROWN pass), a row stopping once its neuron
  is stable, each bound intersected with CROWN's. Then the margin rows: the objective is the sum of
  their bounds. The best bound seen per row is kept, the result is at least CROWN's and compared with
  pure CROWN's (every bound of every step is sound, whatever the slopes).
  ``alpha_intermediate=False``: CROWN's pre-activation bounds, final slopes only.
  ``target=0`` (what the certification cascade uses): a row leaves the objective once its
  bound is above 0, and the optimization stops when every row is (certified); samples whose CROWN
  bound is already above it are not optimized. In the sound modes the slopes are searched in plain
  float32 arithmetic (a float32 copy of the model, from the sound CROWN's relaxations: any slopes in
  range give a sound bound) and each bound is computed once in the sound arithmetic with every row's
  slopes from its best step (bounds capped at ``target``), the float64 search's bounds within 5e-8
  on small nets.

Every method returns the elementwise maximum of its bound and IBP's folded margin (both are sound);
where both are NaN (an overflow to infinity on the way), the margin is -inf: no certificate.

**Sound modes** (``sound=``): ``True`` or ``"fp64"`` (the default): the bounds are computed in float64
for a float64 copy of the model and the inputs; ``"fp32"``: in float32 for a float32 model. Both lower
every bound by a rigorous bound on every rounding error (:mod:`.rounding`, docs/design.md "Sound
bounds"): a certificate for the network with the model's weights in real arithmetic (BatchNorm and
Normalize as the real functions of their parameters). Plain float64 would not be one: large cancelling weights (a bias of
1e20 that absorbs the input term, then subtracted) make it optimistic by far more than its 1e-16.
The result is returned in the input's dtype, rounded downwards. With ``sound=False`` the bounds are
computed in the model's own dtype and backend (faster, not a certificate: rounding may make them
optimistic).

Cost: a backward pass from one neuron of a convolutional layer runs on its receptive field only (a
window of every feature map) until it reaches the input or a layer that mixes positions (Linear,
AvgPool2d). Backward passes run over chunks of rows sized to the pass (its widest window, or map):
on a GPU as many as fit ``A`` in 256 MiB (α-CROWN an eighth of that: it keeps α, its optimizer state
and the autograd graph per row), on the CPU in 2 MiB (a core's L2 cache: chained elementwise steps
on a chunk then run from the cache; 1.6x faster than large chunks on cnn5); ``max_rows`` caps them.

>>> margins = crown_margins(BoundedModule(model.eval()), x, y, LinfBall(2 / 255), method="crown")
>>> certified = (margins > 0).sum(1) == margins.shape[1] - 1
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..specs import Ball, L1Ball, L2Ball, LinfBall
from . import heap, passes, rounding
from .inputs import InputSet, SoundInputSet
from .layers import Layer, Operator
from .passes import Interval
from .rounding import round_down

BoundedModule = nn.Module  # annotations only: the engine's BoundedModule calls into this module, not back

Spec = Union[LinfBall, L2Ball, L1Ball]

METHODS = ("crown-ibp", "crown", "alpha-crown")
ALPHA_LR_DECAY = 0.98


def _operators(layers: List[Layer], x: Tensor) -> Tuple[List[Optional[Operator]], List[torch.Size]]:
    """The operator of every layer (None for an activation), and the per-sample shape of every
    layer's input, then of the output. Runs the modules on a copy of x (some work in place)."""
    ops, h, shapes = [], x.clone(), [x.shape[1:]]
    for layer in layers:
        ops.append(layer.operator(h))
        h = layer.module(h)
        shapes.append(h.shape[1:])
    return ops, shapes


def _specification(y: Tensor, classes: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Rows ``e_y - e_j`` for every sample and every ``j != y``: C (B*(K-1), K), their samples
    (B*(K-1),), and the mask (B, K) of the entries ``j != y``."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    mask = torch.ones(y.shape[0], classes, dtype=torch.bool, device=y.device).scatter(1, y[:, None], False)
    C = (eye[y][:, None, :] - eye[None])[mask]
    return C, mask.nonzero()[:, 0], mask


def _optimized_bound(problem: passes.Problem, chain: passes.Chain, C: Tensor, rows: Tensor, steps: int, lr: float,
                     intermediate: bool, target: Optional[float],
                     search: Optional[Tuple[passes.Problem, passes.Chain]] = None) -> Tensor:
    """α-CROWN lower bounds of ``C z``: C (N, K), rows (N,) -> (N,), never below CROWN's (``chain``'s).
    ``intermediate``: the pre-activation bounds are optimized first (:func:`_optimized_chain`), then
    the final slopes over them. ``search``: the problem and chain in float32 where the slopes are
    searched; the bounds are then computed in ``problem``'s arithmetic (any slopes give a sound bound)
    with the slopes of each row's best step (:class:`_Keeper`)."""
    if steps == 0 or not any(r.unstable.any() for r in chain.relaxations.values()):
        return passes.linear_bound(problem, chain, C, rows)
    crown_bound = passes.linear_bound(problem, chain, C, rows)
    open_rows = torch.ones_like(rows, dtype=torch.bool) if target is None else ~(crown_bound > target)  # NaN: open
    if not bool(open_rows.any()):
        return crown_bound
    if intermediate:
        chain = _optimized_chain(problem, chain, steps, lr, rows[open_rows], None if search is None else search[0])
        search = None if search is None else (search[0], chain.cast(search[0].dtype))
    end, sizing = len(problem.ops), problem if search is None else search[0]
    values = []
    for part in passes.chunks(C.shape[0], sizing.rows(sizing.width(end), share=8)):
        def final_pass(p: passes.Problem, c: passes.Chain, slopes: passes.Slopes, picked: Optional[Tensor],
                       part: slice = part) -> Tensor:
            C_part, rows_part = (C[part], rows[part]) if picked is None else (C[part][picked], rows[part][picked])
            return passes.backward(p, c, end, C_part.to(p.dtype), rows_part, slopes)
        values.append(_optimized_rows(final_pass, problem, chain, search, steps, lr, target))
    return torch.fmax(torch.cat(values), crown_bound)  # fmax: NaN (no bound) loses


def _optimized_chain(problem: passes.Problem, reference: passes.Chain, steps: int, lr: float,
                     samples: Optional[Tensor] = None, search: Optional[passes.Problem] = None) -> passes.Chain:
    """α-CROWN on the pre-activation bounds, layer by layer: the bounds on the neurons unstable under
    ``reference`` at each activation, every one its own objective over the slopes of the activations
    below (fixed at their optimized bounds), optimized on chunks of rows (memory: one chunk's
    autograd graph) and intersected with ``reference``'s and with IBP from the optimized bounds of
    the activation below (:func:`passes.forwarded`). ``samples``: the indices of the samples to
    optimize (None: all; the others keep ``reference``'s bounds); ``search``: the float32 problem to
    search in."""
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
            lower, upper = _optimized_layer(problem, chain, i, lower, upper, unstable, steps, lr, searched)
        passes.extend(problem, chain, i, lower, upper)
        previous = (i, (lower, upper))
    return chain


def _optimized_layer(problem: passes.Problem, chain: passes.Chain, i: int, lower: Tensor, upper: Tensor,
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
        return _optimized_rows(unit_pass, problem, chain, search, steps, lr, target=0.0)
    sizing = problem if search is None else search[0]
    return passes.crown_bounds(problem, chain, i, lower, upper, unstable=unstable, solve=optimized,
                               chunk_rows=sizing.rows(sizing.width(i, unit=True), share=8))


def _optimized_rows(bound, problem: passes.Problem, chain: passes.Chain,
                    search: Optional[Tuple[passes.Problem, passes.Chain]], steps: int, lr: float,
                    target: Optional[float]) -> Tensor:
    """The best bound per row (N,) of ``bound(problem, chain, slopes, picked)`` (the rows ``picked``,
    indices, or all for None) over α-CROWN's steps; with ``search``, the slopes are searched there
    and the bound computed in ``problem``'s arithmetic, in one pass, with the slopes of each row's best
    step. The rows whose search passed ``target`` but whose bound did not (the rounding allowance) are
    searched again from their kept slopes, to the target plus twice that gap."""
    if search is None:
        return _optimize(lambda slopes: bound(problem, chain, slopes, None), steps, lr, target)[0]
    _, keeper = _optimize(lambda slopes: bound(*search, slopes, None), steps, lr, target, keep=True)
    value = _no_nan(bound(problem, chain, keeper.best.frozen(problem.dtype), None))
    short = ((keeper.value > target) & ~(value > target)).nonzero()[:, 0] if target is not None else []
    if len(short) == 0:
        return value
    raised = target + 2 * (keeper.value - value)[short]
    _, again = _optimize(lambda slopes: bound(*search, slopes, short), steps, lr, raised, keep=True,
                         start=keeper.best.resumed(short))
    value[short] = torch.fmax(value[short], _no_nan(bound(problem, chain, again.best.frozen(problem.dtype), short)))
    return value


def _optimize(bound, steps: int, lr: float, target: Union[None, float, Tensor] = None,
              keep: bool = False, start: Optional[passes.Slopes] = None) -> Tuple[Tensor, Optional["_Keeper"]]:
    """Projected Adam on the lower slopes α of the unstable neurons in the passes of ``bound(slopes)``
    (N,), one per neuron and row, starting from ``start`` or else the relaxations' own (the first step
    is CROWN's). Returns the best bound per row and (``keep``) the slopes of the rows' best steps.
    ``target`` (a number, or one per row): a row whose bound is above it leaves the objective; all
    above it: stop."""
    slopes = passes.Slopes() if start is None else start
    keeper = _Keeper(slopes, target) if keep else None
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
            keeper.update(value, step)
        if not slopes.table or (target is not None and bool((best > target).all())):
            break  # no slope in these passes, or every row above the target
        if training:
            if optimizer is None:
                optimizer = torch.optim.Adam(slopes.parameters(), lr=lr)
                schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, ALPHA_LR_DECAY)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            slopes.clamp()
    return best, keeper


class _Keeper:
    """Each row's slopes at its best step so far (bounds capped at ``target``), in one table: a row's
    bound depends on its own slopes only (the first dimension of every slope tensor is the row)."""

    def __init__(self, slopes: passes.Slopes, target: Union[None, float, Tensor]):
        self.slopes, self.target = slopes, target
        self.score, self.value, self.best_step, self.best = None, None, None, None

    def update(self, value: Tensor, step: int) -> None:
        """Record the bounds ``value`` (N,) of this step's slopes (``self.value``: each row's bound at
        its kept step, uncapped)."""
        value = torch.where(value.isnan(), -float("inf"), value)  # NaN (no bound): any later step is better
        capped = value if self.target is None else torch.minimum(value, torch.as_tensor(self.target).to(value))
        better = torch.ones_like(capped, dtype=torch.bool) if self.score is None else capped > self.score
        if not bool(better.any()):
            return
        self.score = capped if self.score is None else torch.where(better, capped, self.score)
        self.value = value if self.value is None else torch.where(better, value, self.value)
        self.best_step = torch.where(better, step, step if self.best_step is None else self.best_step)
        if self.best is None:
            self.best = self.slopes.frozen()
            return
        for key, (alpha, _, _) in self.slopes.table.items():
            self.best.table[key][0][better] = alpha.detach()[better]


def _with_pure_crown(problem: passes.Problem, chain: passes.Chain, C: Tensor, rows: Tensor, values: Tensor,
                     target: Optional[float]) -> Tensor:
    """The larger of ``values`` (N,) and pure CROWN's bounds of ``C z``, for the samples whose
    relaxations the intersection with IBP changed and with a row at most ``target`` (None: any row)."""
    open_rows = torch.ones_like(rows, dtype=torch.bool) if target is None else values <= target
    samples = torch.zeros_like(chain.diverged, dtype=torch.bool)
    samples[rows[open_rows]] = True
    samples &= chain.diverged < len(problem.ops)
    if not bool(samples.any()):
        return values
    open_rows = samples[rows]
    pure = passes.relaxations(problem, crown=True, intersect=False, reuse=chain, samples=samples)
    values = values.clone()
    values[open_rows] = torch.fmax(values[open_rows], passes.linear_bound(problem, pure, C[open_rows], rows[open_rows]))
    return values


def _no_nan(values: Tensor) -> Tensor:
    """NaN bounds (an overflow on the way: no information) as -inf."""
    return torch.where(values.isnan(), -float("inf"), values)


def _mode(sound: Union[bool, str]) -> Optional[str]:
    """``sound`` as "fp64", "fp32" or None (the model's dtype, not a certificate)."""
    if sound is True or sound == "fp64":
        return "fp64"
    if sound is False or sound == "fp32":
        return None if sound is False else "fp32"
    raise ValueError(f"sound must be True, False, 'fp64' or 'fp32', got {sound!r}")


def _floating(model: nn.Module) -> List[Tensor]:
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model, or a copy in ``dtype`` when some floating tensor is in another."""
    return model if all(t.dtype == dtype for t in _floating(model)) else copy.deepcopy(model).to(dtype)


def _float32(model: nn.Module) -> nn.Module:
    """The model, or a float32 copy when its floating tensors are all float32 numbers."""
    if not all(torch.equal(t.float().to(t.dtype), t) for t in _floating(model)):
        raise ValueError("sound='fp32' certifies a network with float32 weights; this model has weights that "
                         "float32 cannot represent exactly: use sound='fp64'")
    return _in_dtype(model, torch.float32)


def _problem(bounded: BoundedModule, x: Tensor, y: Optional[Tensor], spec: Spec, sound: Union[bool, str],
             max_rows: Optional[int]) -> passes.Problem:
    if not (callable(getattr(bounded, "propagate", None)) and hasattr(bounded, "layers")):
        raise TypeError(f"expected a BoundedModule, got {type(bounded).__name__}")
    if not isinstance(spec, Ball):
        raise TypeError(f"spec must be a LinfBall, L2Ball or L1Ball, got {type(spec).__name__}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    for layer in bounded.layers:
        layer.check_certifiable()
    given, mode = x, _mode(sound)
    if mode is not None:
        model = _float32(bounded.model) if mode == "fp32" else _in_dtype(bounded.model, torch.float64)
        bounded = type(bounded)(model, backend="torch", precision="ieee")
        x = x.float() if mode == "fp32" else x.double()
    propagation = bounded.propagate(x, [spec], y)  # in the sound modes: the checks of the inputs only
    ops, shapes = _operators(bounded.layers, x)
    chunk = passes.MEMORY_BYTES if x.is_cuda else passes.CACHE_BYTES
    if not x.is_cuda:
        heap.keep_freed()
    if mode is None:
        arithmetic = rounding.Arithmetic(bounded.layers, ops)
        return passes.Problem(bounded.layers, ops, shapes, InputSet(spec, x), propagation, max_rows, chunk, arithmetic,
                              x.dtype)
    inputs = SoundInputSet(spec, given, x.dtype)
    arithmetic = rounding.Sound(bounded.layers, ops, x.dtype)
    spec_start = len(ops) if bounded.spec_layer is None else bounded.spec_layer
    propagation = arithmetic.propagate(inputs.box, inputs.ball, spec_start)
    return passes.Problem(bounded.layers, ops, shapes, inputs, propagation, max_rows, chunk, arithmetic, x.dtype)


def _float32_search(bounded: BoundedModule, x: Tensor, y: Tensor, spec: Spec, max_rows: Optional[int],
                    chain: passes.Chain) -> Tuple[passes.Problem, passes.Chain]:
    """α-CROWN's float32 search: the problem for a float32 copy of the model (plain arithmetic), and
    ``chain`` in float32 (its unstable neurons, so that the passes are those of ``chain``'s problem)."""
    search = type(bounded)(_in_dtype(bounded.model, torch.float32), backend="torch", precision="ieee")
    return _problem(search, x.float(), y, spec, False, max_rows), chain.cast(torch.float32)


def _fits_float32(bounded: BoundedModule, x: Tensor, spec: Spec) -> bool:
    """Whether the model, the inputs and eps are within float32's range (α-CROWN's float32 search; else
    the slopes are searched in the sound arithmetic itself)."""
    limit = torch.finfo(torch.float32).max
    eps = spec.eps.abs().max() if isinstance(spec.eps, Tensor) else spec.eps
    tensors = [x] + _floating(bounded.model) + ([] if spec.center is None else [spec.center])
    return float(eps) < limit and all(float(t.abs().max()) < limit for t in tensors if t.numel())


def _ibp_margins(problem: passes.Problem, chain: passes.Chain, C: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
    """IBP's margins off the labels (N,): the folded last layer (sound modes: a backward pass from the
    layer the specification folds into, over its input's sound interval)."""
    if problem.propagation.margins is not None:
        return problem.propagation.margins[0][mask]
    return passes.linear_bound(problem, chain, C, rows, start=problem.propagation.spec_start)


@torch.no_grad()
def crown_margins(bounded: BoundedModule, x: Tensor, y: Tensor, spec: Spec, method: str = "crown",
                  alpha_steps: int = 20, alpha_lr: float = 0.5, sound: Union[bool, str] = True,
                  max_rows: Optional[int] = None, alpha_intermediate: bool = True,
                  target: Optional[float] = None) -> Tensor:
    """Lower bounds on the margins ``z_y - z_j`` over ``spec`` around x by a CROWN-family method.

    Args:
        bounded: the network; BatchNorm and Dropout layers must be in eval mode.
        x: inputs (B, ...), inside the spec's domain.
        y: labels (B,) int.
        spec: a LinfBall, L2Ball or L1Ball (float or per-sample (B,) eps).
        method: ``"crown-ibp"``, ``"crown"`` or ``"alpha-crown"`` (see the module docstring), or
            ``"ibp"`` (IBP's margins in the ``sound`` mode).
        alpha_steps: Adam steps of α-CROWN.
        alpha_lr: Adam's initial learning rate in α-CROWN (decayed by ``ALPHA_LR_DECAY`` per step).
        sound: ``True`` / ``"fp64"``: float64, ``"fp32"``: float32 (a float32 model), each with a
            rigorous bound on every rounding error (a certificate); ``False``: the model's dtype (not
            a certificate).
        max_rows: rows per backward pass (memory); None for the default budget.
        alpha_intermediate: α-CROWN also optimizes the pre-activation bounds, layer by layer (about
            ``alpha_steps`` CROWN passes; tighter); False: the final pass only.
        target: the bound a margin row needs (0: enough to certify; None: the tightest bound):
            α-CROWN stops optimizing a row once above it, and stops when every row is; the pure-CROWN
            passes (``"crown"``, ``"alpha-crown"``) run only for the samples with a row not above it.
    Returns:
        (B, K) in x's dtype, exactly 0 at ``j = y``; every entry off ``y`` > 0 certifies the sample.
    """
    if method not in ("ibp",) + METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of ibp, {', '.join(METHODS)}")
    if isinstance(alpha_steps, bool) or not isinstance(alpha_steps, int) or alpha_steps < 0:
        raise ValueError(f"alpha_steps must be a non-negative int, got {alpha_steps!r}")
    with rounding.strict(_mode(sound) is not None):
        problem = _problem(bounded, x, y, spec, sound, max_rows)
        chain = passes.relaxations(problem, crown=method in ("crown", "alpha-crown"))
        C, rows, mask = _specification(y.long(), problem.shapes[-1][0], problem.dtype)
        if len(C) == 0:  # one class: no margin to bound
            return x.new_zeros(mask.shape)
        if method == "ibp":
            values = C.new_full(rows.shape, -float("inf"))
        elif method == "alpha-crown":
            search = (_float32_search(bounded, x, y, spec, max_rows, chain)
                      if _mode(sound) is not None and _fits_float32(bounded, x, spec) else None)
            values = _optimized_bound(problem, chain, C, rows, alpha_steps, alpha_lr, alpha_intermediate, target,
                                      search)
        else:
            values = passes.linear_bound(problem, chain, C, rows)
        values = torch.fmax(values, _ibp_margins(problem, chain, C, rows, mask))  # fmax: NaN (overflow) loses
        if method in ("crown", "alpha-crown"):  # never looser than pure CROWN
            values = _with_pure_crown(problem, chain, C, rows, values, target)
    margins = values.new_zeros(mask.shape)
    margins[mask] = _no_nan(values)
    return round_down(margins, x.dtype)


@torch.no_grad()
def preactivation_bounds(bounded: BoundedModule, x: Tensor, spec: Spec, method: str = "crown",
                         sound: Union[bool, str] = True, max_rows: Optional[int] = None) -> List[Interval]:
    """Bounds ``(lower, upper)`` on the input of every ReLU, in order, each (B, *shape) in x's dtype
    (rounded outwards), as the CROWN-family methods use them (``sound`` as in :func:`crown_margins`).

    ``method``: ``"crown-ibp"`` (IBP's bounds), ``"crown"`` or ``"alpha-crown"`` (CROWN's bounds).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    with rounding.strict(_mode(sound) is not None):
        problem = _problem(bounded, x, None, spec, sound, max_rows)
        bounds = passes.relaxations(problem, crown=method != "crown-ibp").bounds
    return [(round_down(lower, x.dtype), -round_down(-upper, x.dtype)) for lower, upper in bounds.values()]
