"""Backward linear bound passes of the CROWN family (docs/design.md, "Linear relaxation"): the
problem (layers, operators, input set, IBP), the chain of activation relaxations and their
pre-activation bounds, passes over dense coefficients and over windows, and α-CROWN's slopes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple, Union

import torch
from torch import Tensor

from . import rounding
from .inputs import InputSet, SoundInputSet
from .layers import Layer, Operator
from .layers.activation import Relaxation
from .rounding import round_down
from .window import Window

Interval = Tuple[Tensor, Tensor]

MEMORY_BYTES = 2 ** 28  # the most bytes of coefficients one chunk of rows holds (GPU)
CACHE_BYTES = 2 ** 21  # on the CPU: a chunk's coefficients stay in a core's L2 cache (measured fastest)


@dataclass
class Problem:
    """The network's layers and operators, the input set and the IBP propagation, in the working dtype."""
    layers: List[Layer]
    ops: List[Optional[Operator]]
    shapes: List[torch.Size]
    inputs: Union[InputSet, SoundInputSet]
    propagation: object  # a BoundedModule's Propagation, or a rounding.SoundPropagation
    max_rows: Optional[int]  # the caller's cap on the rows of one pass (None: none)
    chunk_bytes: int  # the most bytes of coefficients a chunk of rows holds at one step of a pass
    arithmetic: rounding.Arithmetic
    dtype: torch.dtype  # the working dtype

    def rows(self, width: int, share: int = 1) -> int:
        """Rows per chunk of a pass whose rows hold at most ``width`` coefficients each, with
        ``share`` times less room (α-CROWN keeps its autograd graph)."""
        budget = min(self.chunk_bytes, MEMORY_BYTES // share)
        fit = max(1, budget // (width * self.dtype.itemsize))
        return fit if self.max_rows is None else min(fit, self.max_rows)

    def width(self, end: int, unit: bool = False) -> int:
        """The most coefficients of one row in a backward pass from the output of layer ``end - 1``:
        on the whole maps, or (``unit``) on the windows of one of its neurons until a layer that
        mixes positions (:func:`window_backward`)."""
        shape = self.shapes[end]
        if not unit or len(shape) != 3:
            return max(s.numel() for s in self.shapes[:end + 1])
        widest, height, width = shape[0], 1, 1
        while end > 0 and (self.ops[end - 1] is None or self.ops[end - 1].local):
            if self.ops[end - 1] is not None:
                height, width = self.ops[end - 1].window_size(height, width)
            widest, end = max(widest, self.shapes[end - 1][0] * height * width), end - 1
        return widest if end == 0 else max(widest, max(s.numel() for s in self.shapes[:end + 1]))


@dataclass
class Chain:
    """The relaxation of every activation and its pre-activation bounds, keyed by layer index;
    ``weights``: the error weights of every layer (the sound modes, :mod:`.rounding`); ``folds``:
    per layer, the weights of it and of the layers below it that a pass through it charges at once,
    and those layers. CROWN intersected with IBP also records, per sample, ``diverged`` (B,): the
    first activation whose relaxation differs from pure CROWN's (``len(ops)``: none), and ``pure``:
    pure CROWN's bounds on the input of activation i, for the samples not diverged before i."""
    relaxations: Dict[int, Relaxation]
    bounds: Dict[int, Interval]
    weights: Dict[int, Tensor] = field(default_factory=dict)
    folds: Dict[int, Tuple[Tensor, FrozenSet[int]]] = field(default_factory=dict)
    diverged: Optional[Tensor] = None
    pure: Dict[int, Interval] = field(default_factory=dict)

    def cast(self, dtype: torch.dtype) -> "Chain":
        """The relaxations and bounds in ``dtype``, without error weights (a search, not a bound)."""
        relaxations = {i: Relaxation(r.packed.to(dtype), r.unstable, r.alpha_range)
                       for i, r in self.relaxations.items()}
        return Chain(relaxations, {i: (l.to(dtype), u.to(dtype)) for i, (l, u) in self.bounds.items()})


class Slopes:
    """α-CROWN's lower slopes of the unstable neurons of one chunk of rows, one tensor per activation
    its passes step through: (N, *shape) on a dense step, window-shaped (N, C, h, w) on a window step,
    with the samples (N,) of its rows. A tensor is made on first use from the relaxation's own slopes
    (so the first pass is CROWN's). A ``fixed`` table (:meth:`frozen`) makes none: an activation it
    lacks, or other rows, is an error."""

    def __init__(self, table: Optional[Dict[int, Tuple[Tensor, Tuple[float, float], Tensor]]] = None,
                 fixed: bool = False):
        self.table = {} if table is None else table
        self.fixed = fixed

    def dense(self, i: int, relaxation: Relaxation, rows: Tensor) -> Tensor:
        return self._get(i, relaxation, rows, lambda: relaxation.lower[rows])

    def window(self, i: int, relaxation: Relaxation, window: Window, rows: Tensor) -> Tensor:
        return self._get(i, relaxation, rows, lambda: window.take(relaxation.lower, rows))

    def _get(self, i: int, relaxation: Relaxation, rows: Tensor, initial) -> Tensor:
        if self.fixed and (i not in self.table or not torch.equal(self.table[i][2], rows)):
            raise RuntimeError(f"α-CROWN: no slopes for these rows at activation {i} (the passes differ from the "
                               f"search's)")
        if i not in self.table:
            self.table[i] = (initial().detach().clone().requires_grad_(True), relaxation.alpha_range, rows)
        return self.table[i][0]

    def parameters(self) -> List[Tensor]:
        return [alpha for alpha, _, _ in self.table.values()]

    @torch.no_grad()
    def clamp(self) -> None:
        """Each slope back into its activation's sound range."""
        for alpha, (low, high), _ in self.table.values():
            alpha.clamp_(low, high)

    def resumed(self, picked: Tensor) -> "Slopes":
        """The slopes of the rows ``picked`` (indices), to optimize further (new tensors that require
        a gradient)."""
        return Slopes({key: (alpha.detach()[picked].requires_grad_(True), bounds, rows[picked])
                       for key, (alpha, bounds, rows) in self.table.items()})

    def frozen(self, dtype: Optional[torch.dtype] = None) -> "Slopes":
        """A copy of these slopes in ``dtype`` (None: their own), fixed (no gradient), each clamped into
        its sound range again in ``dtype``: a search in float32 rounds the bounds of the range (a
        LeakyReLU's 0.01 becomes a float32 number below 0.01, a slope under which the lower line is
        above the activation)."""
        table = {key: (alpha.detach().to(dtype or alpha.dtype, copy=True).clamp_(*bounds), bounds, rows)
                 for key, (alpha, bounds, rows) in self.table.items()}
        return Slopes(table, fixed=True)


def as_chain(chain: Union[Chain, Dict[int, Relaxation]], problem: "Problem") -> Chain:
    """A chain, or a plain dict of relaxations (no error weights: working-dtype arithmetic only)."""
    if isinstance(chain, Chain):
        return chain
    if problem.arithmetic.sound:
        raise TypeError("a sound bound needs the relaxations' Chain (it holds their error weights), not a dict")
    return Chain(chain, {})


def _charge(chain: Chain, i: int, skip: FrozenSet[int]) -> Tuple[Optional[Tensor], FrozenSet[int]]:
    """The error weights charged at step i of a backward pass, and the steps below already charged."""
    if i in chain.folds:
        weights, folded = chain.folds[i]
        return weights, skip | folded
    return (None if i in skip else chain.weights.get(i)), skip


def backward(problem: Problem, chain: Chain, end: int, A: Tensor, rows: Tensor,
             slopes: Optional[Slopes] = None, bias: Optional[Tensor] = None, start: int = 0,
             skip: FrozenSet[int] = frozenset()) -> Tensor:
    """Lower bounds of ``A h + bias`` over the input set, h the output of layer ``end - 1``; with
    ``start > 0`` over the interval bounds on the input of layer ``start`` instead.

    A (N, *shape of h), rows (N,) the sample of each row, bias (N,) or None -> (N,); ``slopes``: the
    lower slopes of unstable neurons (α-CROWN; None: the relaxations' own); ``skip``: steps whose
    errors are already charged.
    """
    arithmetic, chain = problem.arithmetic, as_chain(chain, problem)
    bias = arithmetic.zeros(A, rows) if bias is None else bias
    for i in reversed(range(start, end)):
        before = A
        if problem.ops[i] is None:
            relaxation = chain.relaxations[i]
            A, term = relaxation.back(A, rows, None if slopes is None else slopes.dense(i, relaxation, rows))
        else:
            A, term = problem.ops[i].back(A)
        weights, skip = _charge(chain, i, skip)
        bias = arithmetic.add(bias, term, before, weights, rows)
    inputs = problem.inputs if start == 0 else SoundInputSet(box=problem.propagation.input_bounds(0, start))
    return inputs.minimum(A, bias, rows)


def window_backward(problem: Problem, chain: Chain, end: int, window: Window, rows: Tensor,
                    slopes: Optional[Slopes] = None) -> Tensor:
    """Lower bounds of the window coefficients times the output of layer ``end - 1`` (a (C, H, W) map)
    over the input set: windows through the local layers (convolutions, per-channel affines, ReLUs,
    identities), then whole maps from the first other layer on. rows (N,) -> (N,)."""
    bias, skip = problem.arithmetic.zeros(window.A, rows), frozenset()
    height, width = problem.shapes[end][1:]
    while end > 0 and (problem.ops[end - 1] is None or problem.ops[end - 1].local):
        op, before = problem.ops[end - 1], window
        if op is None:
            relaxation = chain.relaxations[end - 1]
            alpha = None if slopes is None else slopes.window(end - 1, relaxation, window, rows)
            window, term = relaxation.back_window(window, rows, alpha)
        else:
            window, term = op.back_window(window)
        height, width = problem.shapes[end - 1][1:]  # the layer's input map
        weights, skip = _charge(chain, end - 1, skip)
        bias = problem.arithmetic.add(bias, term, before, weights, rows)
        end -= 1
    if end == 0:
        return problem.inputs.minimum(window, bias, rows)
    return backward(problem, chain, end, window.dense(height, width), rows, slopes, bias=bias, skip=skip)


def chunks(n: int, size: int) -> List[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def ibp_is_exact(ops: List[Optional[Operator]]) -> bool:
    """Whether IBP's bounds after these layers are exact: one Linear on a flat input or Conv2d, and
    otherwise per-channel affines and reshapes (no activation, no pooling)."""
    kinds = ["inexact" if op is None else op.ibp for op in ops]
    return "inexact" not in kinds and kinds.count("affine") <= 1


def unit_bound(problem: Problem, chain: Chain, end: int, neurons: Tensor, signs: Tensor, rows: Tensor,
               slopes: Optional[Slopes] = None) -> Tensor:
    """Lower bounds of ``sign * h[neuron]`` for the neurons (N,) of the output h of layer ``end - 1``,
    signs (N,) ±1, of samples rows (N,) -> (N,); on windows when h is a (C, H, W) map."""
    shape, chain = problem.shapes[end], as_chain(chain, problem)
    n = neurons.shape[0]
    if len(shape) == 3:
        _, height, width = shape
        A = signs.new_zeros(n, shape[0], 1, 1)
        A[torch.arange(n, device=A.device), neurons // (height * width), 0, 0] = signs
        window = Window(A, (neurons // width) % height, neurons % width)
        return window_backward(problem, chain, end, window, rows, slopes)
    A = signs.new_zeros(n, shape.numel())
    A[torch.arange(n, device=A.device), neurons] = signs
    return backward(problem, chain, end, A.view((n,) + shape), rows, slopes)


UnitSolver = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``solve(neurons, signs, rows)``: lower bounds (N,) of ``sign * h[neuron]`` for one chunk of rows."""


def crown_values(problem: Problem, chain: Chain, end: int, marked: Tensor, solve: Optional[UnitSolver] = None,
                 chunk_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """CROWN's lower and upper bounds (N,) on the neurons ``marked`` (B, *shape) bool of the output of
    layer ``end - 1``, and their flat indices ``(sample, neuron)`` (N,) each. ``solve``: how a chunk of
    rows is bounded (default: one pass, :func:`unit_bound`; α-CROWN: optimized slopes); ``chunk_rows``:
    rows per chunk (default: sized to the pass)."""
    sample, neuron = marked.flatten(1).nonzero(as_tuple=True)
    count = sample.numel()
    rows, neurons = sample.repeat(2), neuron.repeat(2)
    ones = torch.ones(count, dtype=problem.dtype, device=marked.device)
    signs = torch.cat([ones, -ones])
    solve = solve or (lambda n, s, r: unit_bound(problem, chain, end, n, s, r))
    size = chunk_rows or problem.rows(problem.width(end, unit=True))
    values = [solve(neurons[part], signs[part], rows[part]) for part in chunks(2 * count, size)]
    values = round_down(torch.cat(values), problem.dtype) if values else ones.new_zeros(0)
    return sample, neuron, values[:count], -values[count:]


def _replaced(bounds: Interval, sample: Tensor, neuron: Tensor, low: Tensor, high: Tensor) -> Interval:
    """``bounds`` (B, *shape) with the entries at the flat indices ``(sample, neuron)`` set to low, high."""
    l, u = (b.flatten(1).clone() for b in bounds)
    l[sample, neuron], u[sample, neuron] = low, high
    return l.view_as(bounds[0]), torch.maximum(u, l).view_as(bounds[1])


def crown_bounds(problem: Problem, chain: Chain, end: int, lower: Tensor, upper: Tensor, intersect: bool = True,
                 unstable: Optional[Tensor] = None, solve: Optional[UnitSolver] = None,
                 chunk_rows: Optional[int] = None) -> Interval:
    """CROWN bounds on the output of layer ``end - 1`` for the neurons unstable under ``lower``, ``upper``
    (B, *shape) (or marked by ``unstable``, (B, *shape) bool), intersected with them (or in their
    place); the others keep them. ``solve``, ``chunk_rows``: as in :func:`crown_values`."""
    marked = (lower < 0) & (upper > 0) if unstable is None else unstable
    sample, neuron, low, high = crown_values(problem, as_chain(chain, problem), end, marked, solve, chunk_rows)
    if intersect:
        low = torch.fmax(lower.flatten(1)[sample, neuron], low)  # NaN (an overflow) loses
        high = torch.fmin(upper.flatten(1)[sample, neuron], high)
    return _replaced((lower, upper), sample, neuron, low, high)


def _unstable(bounds: Interval) -> Tensor:
    return (bounds[0] < 0) & (bounds[1] > 0)


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    """A (B,) mask broadcast against ``like`` (B, ...)."""
    return mask.view((-1,) + (1,) * (like.dim() - 1))


def relaxations(problem: Problem, crown: bool, intersect: bool = True, reuse: Optional[Chain] = None,
                samples: Optional[Tensor] = None) -> Chain:
    """The relaxations from IBP's bounds (``crown=False``) or CROWN's, layer by layer, intersected
    with IBP's (``intersect``; from the earlier, tightened bounds: the chain records where each sample
    diverges from pure CROWN) or not (pure CROWN). ``reuse``: an intersected chain whose pure-CROWN
    bounds are taken up to each sample's divergence; ``samples`` (B,) bool: pure CROWN for these
    samples only, the others keep ``reuse``'s bounds."""
    weights = problem.arithmetic.weights if reuse is None else reuse.weights
    folds = problem.arithmetic.folds(weights, 0) if reuse is None else reuse.folds
    chain = Chain({}, {}, dict(weights), dict(folds))
    track = crown and intersect
    if track:
        batch = problem.propagation.input_bounds(0, 0)[0]
        chain.diverged = torch.full(batch.shape[:1], len(problem.ops), dtype=torch.long, device=batch.device)
    previous: Optional[Tuple[int, Interval]] = None
    for i, op in enumerate(problem.ops):
        if op is not None:
            continue
        ibp = problem.propagation.input_bounds(0, i)
        exact = ibp_is_exact(problem.ops[:i])
        if not crown or (exact and reuse is None):
            bounds, pure = ibp, ibp
        elif track:
            bounds, pure = _intersected(problem, chain, i, ibp, previous, exact)
        elif reuse is None:
            bounds = crown_bounds(problem, chain, i, *ibp, intersect=False)
        else:
            bounds = _pure_after_divergence(problem, chain, i, ibp, reuse, samples, exact)
        extend(problem, chain, i, *bounds)
        if track:
            same = problem.arithmetic.relaxation(problem.layers[i], *pure).packed == chain.relaxations[i].packed
            changed = ~same.flatten(1).all(1) & (chain.diverged == len(problem.ops))
            chain.diverged = torch.where(changed, i, chain.diverged)
            chain.pure[i] = pure
        previous = (i, bounds)
    return chain


def _intersected(problem: Problem, chain: Chain, i: int, ibp: Interval, previous: Optional[Tuple[int, Interval]],
                 exact: bool) -> Tuple[Interval, Interval]:
    """CROWN's bounds on the input of activation i intersected with IBP's (and with IBP from the
    tightened bounds of the activation before), and pure CROWN's (exact for the samples not diverged
    before i: every neuron IBP leaves unstable gets its rows there). ``exact``: IBP's bounds are exact
    at activation i (kept)."""
    lower, upper = ibp if previous is None else forwarded(problem, i, ibp, previous)
    if exact:
        return (lower, upper), ibp
    fresh = _per_sample(chain.diverged >= i, lower)
    marked = _unstable((lower, upper)) | (_unstable(ibp) & fresh)
    sample, neuron, low, high = crown_values(problem, chain, i, marked)
    pure = _replaced(ibp, sample, neuron, low, high)
    low = torch.fmax(lower.flatten(1)[sample, neuron], low)  # NaN (an overflow) loses
    high = torch.fmin(upper.flatten(1)[sample, neuron], high)
    return _replaced((lower, upper), sample, neuron, low, high), pure


def forwarded(problem: Problem, i: int, bounds: Interval, previous: Tuple[int, Interval]) -> Interval:
    """``bounds`` on the input of activation i intersected with IBP from ``previous`` = (j, bounds on
    the input of activation j < i) through activation j and the linear layers up to i."""
    low, high = problem.arithmetic.forward(previous[0] + 1, i, previous[1])
    lower, upper = torch.fmax(bounds[0], low), torch.fmin(bounds[1], high)  # NaN (an overflow) loses
    return lower, torch.maximum(upper, lower)


def _pure_after_divergence(problem: Problem, chain: Chain, i: int, ibp: Interval, reuse: Chain,
                           samples: Optional[Tensor], exact: bool) -> Interval:
    """Pure CROWN's bounds on the input of activation i for ``samples`` (None: all): ``reuse``'s
    record up to each sample's divergence, CROWN passes after it; the other samples keep ``reuse``'s."""
    chosen = torch.ones_like(reuse.diverged, dtype=torch.bool) if samples is None else samples
    recorded, computed = chosen & (reuse.diverged >= i), chosen & (reuse.diverged < i)
    lower, upper = (torch.where(_per_sample(recorded, p), p, b) for p, b in zip(reuse.pure[i], reuse.bounds[i]))
    lower, upper = (torch.where(_per_sample(computed, p), p, b) for p, b in zip(ibp, (lower, upper)))
    if exact or not bool(computed.any()):
        return lower, upper
    marked = _unstable(ibp) & _per_sample(computed, lower)
    return crown_bounds(problem, chain, i, lower, upper, intersect=False, unstable=marked)


def extend(problem: Problem, chain: Chain, i: int, lower: Tensor, upper: Tensor) -> None:
    """Add activation i with pre-activation bounds lower, upper to the chain (its error weights are
    constants to autograd)."""
    chain.relaxations[i] = relaxation = problem.arithmetic.relaxation(problem.layers[i], lower, upper)
    chain.bounds[i] = (lower, upper)
    with torch.no_grad():
        chain.weights.update(problem.arithmetic.chain_weights(i, lower.detach(), upper.detach(), relaxation))
        chain.folds.update(problem.arithmetic.folds(chain.weights, i + 1))


def linear_bound(problem: Problem, chain: Chain, C: Tensor, rows: Tensor, start: int = 0) -> Tensor:
    """Lower bounds of ``C z`` (z the output) with the fixed relaxations; C (N, K), rows (N,) -> (N,)
    (from the interval bounds on the input of layer ``start`` when > 0)."""
    end, chain = len(problem.ops), as_chain(chain, problem)
    return torch.cat([backward(problem, chain, end, C[part], rows[part], start=start)
                      for part in chunks(C.shape[0], problem.rows(problem.width(end)))])


def no_nan(values: Tensor) -> Tensor:
    """NaN bounds (an overflow on the way: no information) as -inf."""
    return torch.where(values.isnan(), -float("inf"), values)
