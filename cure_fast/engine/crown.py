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
  the adaptive slopes), so where the intersection changed any bound, pure CROWN (the same passes
  without the intersection, from the first layer it changed) is run too and the final bound is the
  larger of the two: never looser than pure CROWN.
- ``"alpha-crown"`` (α-CROWN, final layer): CROWN's pre-activation bounds; the lower slopes α of
  every ReLU, one per neuron *and per margin row*, are optimized for the final bound by Adam
  (``alpha_steps`` steps, learning rate ``alpha_lr`` decaying by 2% a step) from CROWN's choice, clamped to ``[0, 1]`` after
  each step; the best bound seen per row is kept and compared with pure CROWN's, so it is never
  looser than CROWN. The intermediate bounds are not re-optimized.

Every method returns the elementwise maximum of its bound and IBP's folded margin (both are sound).

**Sound modes** (``sound=``): ``True`` or ``"fp64"`` (the default): the bounds are computed in float64,
for a float64 copy of the model (the IBP part on the pure-PyTorch backend with IEEE dot products) and
the inputs, i.e. for the network with the model's weights evaluated in real arithmetic up to float64
rounding (~1e-16 relative, far below any margin that certifies; no further safety margin is added).
``"fp32"``: the bounds are computed in float32 for a float32 model and lowered by a rigorous bound on
every rounding error (:mod:`.rounding`, docs/design.md "Sound fp32 bounds"): a certificate for the
network with the model's float32 weights (per-channel affines derived in float64, as in ``"fp64"``).
The result is returned in the input's dtype, rounded downwards. With ``sound=False`` the bounds are
computed in the model's own dtype and backend (faster, not a certificate: rounding may make them
optimistic).

Cost: a backward pass from one neuron of a convolutional layer runs on its receptive field only (a
window of every feature map) until it reaches the input or a layer that mixes positions (Linear,
AvgPool2d). Backward passes run over at most ``max_rows`` rows at a time (default: as many as fit
``A`` in 256 MiB at the widest layer; α-CROWN uses an eighth of that, as it keeps α, its optimizer
state and the autograd graph per row).

>>> margins = crown_margins(BoundedModule(model.eval()), x, y, LinfBall(2 / 255), method="crown")
>>> certified = (margins > 0).sum(1) == margins.shape[1] - 1
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..specs import Ball, L1Ball, L2Ball, LinfBall
from . import rounding
from .inputs import InputSet, SoundInputSet
from .layers import Layer, Operator
from .layers.activation import Relaxation
from .rounding import round_down
from .window import Window

BoundedModule = nn.Module  # annotations only: the engine's BoundedModule calls into this module, not back

Interval = Tuple[Tensor, Tensor]
Spec = Union[LinfBall, L2Ball, L1Ball]

METHODS = ("crown-ibp", "crown", "alpha-crown")
ROW_BUDGET_BYTES = 2 ** 28
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


@dataclass
class _Problem:
    """The network's layers and operators, the input set and the IBP propagation, in the working dtype."""
    layers: List[Layer]
    ops: List[Optional[Operator]]
    shapes: List[torch.Size]
    inputs: Union[InputSet, SoundInputSet]
    propagation: object  # a BoundedModule's Propagation, or a rounding.SoundPropagation
    max_rows: int
    arithmetic: rounding.Arithmetic
    dtype: torch.dtype  # the working dtype


@dataclass
class _Chain:
    """The relaxation of every activation and its pre-activation bounds, keyed by layer index;
    ``weights``: the error weights of every layer (sound float32 mode, :mod:`.rounding`); ``folds``:
    per layer, the weights of it and of the layers below it that a pass through it charges at once,
    and those layers; ``diverged``: the first activation whose bounds the intersection with IBP
    changed (None: none)."""
    relaxations: Dict[int, Relaxation]
    bounds: Dict[int, Interval]
    weights: Dict[int, Tensor] = field(default_factory=dict)
    folds: Dict[int, Tuple[Tensor, FrozenSet[int]]] = field(default_factory=dict)
    diverged: Optional[int] = None


def _as_chain(chain: Union[_Chain, Dict[int, Relaxation]]) -> _Chain:
    """A chain, or a plain dict of relaxations (no error weights: working-dtype arithmetic)."""
    return chain if isinstance(chain, _Chain) else _Chain(chain, {})


def _charge(chain: _Chain, i: int, skip: FrozenSet[int]) -> Tuple[Optional[Tensor], FrozenSet[int]]:
    """The error weights charged at step i of a backward pass, and the steps below already charged."""
    if i in chain.folds:
        weights, folded = chain.folds[i]
        return weights, skip | folded
    return (None if i in skip else chain.weights.get(i)), skip


def _backward(problem: _Problem, chain: _Chain, end: int, A: Tensor, rows: Tensor,
              alphas: Optional[Dict[int, Tensor]] = None, bias: Optional[Tensor] = None, start: int = 0,
              skip: FrozenSet[int] = frozenset()) -> Tensor:
    """Lower bounds of ``A h + bias`` over the input set, h the output of layer ``end - 1``; with
    ``start > 0`` over the interval bounds on the input of layer ``start`` instead.

    A (N, *shape of h), rows (N,) the sample of each row, alphas per ReLU layer (N, *shape) or None,
    bias (N,) or None -> (N,); ``skip``: steps whose errors are already charged.
    """
    arithmetic, chain = problem.arithmetic, _as_chain(chain)
    bias = arithmetic.zeros(A) if bias is None else bias
    for i in reversed(range(start, end)):
        before = A
        if problem.ops[i] is None:
            A, term = chain.relaxations[i].back(A, rows, None if alphas is None else alphas[i])
        else:
            A, term = problem.ops[i].back(A)
        weights, skip = _charge(chain, i, skip)
        bias = arithmetic.add(bias, term, before, weights, rows)
    inputs = problem.inputs if start == 0 else SoundInputSet(box=problem.propagation.input_bounds(0, start))
    return inputs.minimum(A, bias, rows)


def _window_backward(problem: _Problem, chain: _Chain, end: int, window: Window, rows: Tensor) -> Tensor:
    """Lower bounds of the window coefficients times the output of layer ``end - 1`` (a (C, H, W) map)
    over the input set: windows through the local layers (convolutions, per-channel affines, ReLUs,
    identities), then whole maps from the first other layer on. rows (N,) -> (N,)."""
    bias, skip = problem.arithmetic.zeros(window.A), frozenset()
    height, width = problem.shapes[end][1:]
    while end > 0 and (problem.ops[end - 1] is None or problem.ops[end - 1].local):
        op, before = problem.ops[end - 1], window
        window, term = chain.relaxations[end - 1].back_window(window, rows) if op is None else op.back_window(window)
        height, width = problem.shapes[end - 1][1:]  # the layer's input map
        weights, skip = _charge(chain, end - 1, skip)
        bias = problem.arithmetic.add(bias, term, before, weights, rows)
        end -= 1
    if end == 0:
        return problem.inputs.minimum(window, bias, rows)
    return _backward(problem, chain, end, window.dense(height, width), rows, bias=bias, skip=skip)


def _chunks(n: int, size: int) -> List[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _ibp_is_exact(ops: List[Optional[Operator]]) -> bool:
    """Whether IBP's bounds after these layers are exact: one Linear on a flat input or Conv2d, and
    otherwise per-channel affines and reshapes (no activation, no pooling)."""
    kinds = ["inexact" if op is None else op.ibp for op in ops]
    return "inexact" not in kinds and kinds.count("affine") <= 1


def _unit_bound(problem: _Problem, chain: _Chain, end: int, neurons: Tensor, signs: Tensor, rows: Tensor) -> Tensor:
    """Lower bounds of ``sign * h[neuron]`` for the neurons (N,) of the output h of layer ``end - 1``,
    signs (N,) ±1, of samples rows (N,) -> (N,); on windows when h is a (C, H, W) map."""
    shape, chain = problem.shapes[end], _as_chain(chain)
    n = neurons.shape[0]
    if len(shape) == 3:
        _, height, width = shape
        A = signs.new_zeros(n, shape[0], 1, 1)
        A[torch.arange(n, device=A.device), neurons // (height * width), 0, 0] = signs
        window = Window(A, (neurons // width) % height, neurons % width)
        return _window_backward(problem, chain, end, window, rows)
    A = signs.new_zeros(n, shape.numel())
    A[torch.arange(n, device=A.device), neurons] = signs
    return _backward(problem, chain, end, A.view((n,) + shape), rows)


def _crown_bounds(problem: _Problem, chain: _Chain, end: int, lower: Tensor, upper: Tensor,
                  intersect: bool = True) -> Tuple[Tensor, Tensor, bool]:
    """CROWN bounds on the output of layer ``end - 1`` for the neurons unstable under ``lower``, ``upper``
    (B, *shape), intersected with them (or in their place); returns the new ``(lower, upper)`` and
    whether the intersection made any of them tighter than CROWN's own."""
    l, u = lower.flatten(1).clone(), upper.flatten(1).clone()
    sample, neuron = ((l < 0) & (u > 0)).nonzero(as_tuple=True)
    count = sample.numel()
    rows, neurons = sample.repeat(2), neuron.repeat(2)
    signs = torch.cat([l.new_ones(count), -l.new_ones(count)])
    values = []
    for part in _chunks(2 * count, problem.max_rows):
        values.append(_unit_bound(problem, chain, end, neurons[part], signs[part], rows[part]))
    values = round_down(torch.cat(values), l.dtype) if values else l.new_zeros(0)
    low, high = values[:count], -values[count:]
    changed = intersect and bool((l[sample, neuron] > low).any() or (u[sample, neuron] < high).any())
    if intersect:
        low, high = torch.maximum(l[sample, neuron], low), torch.minimum(u[sample, neuron], high)
    l[sample, neuron], u[sample, neuron] = low, high
    return l.view_as(lower), torch.maximum(u, l).view_as(upper), changed


def _relaxations(problem: _Problem, crown: bool, intersect: bool = True, reuse: Optional[_Chain] = None) -> _Chain:
    """The relaxations from IBP's bounds (``crown=False``) or CROWN's, layer by layer, intersected
    with IBP's (``intersect``; from the earlier, tightened bounds) or not (pure CROWN). ``reuse``:
    a chain whose entries before its ``diverged`` layer are the same here."""
    weights = problem.arithmetic.weights if reuse is None else reuse.weights
    folds = problem.arithmetic.folds(weights, 0) if reuse is None else reuse.folds
    chain = _Chain({}, {}, dict(weights), dict(folds))
    previous: Optional[Tuple[int, Interval]] = None
    for i, op in enumerate(problem.ops):
        if op is not None:
            continue
        if reuse is not None and reuse.diverged is not None and i < reuse.diverged:
            chain.relaxations[i], chain.bounds[i] = reuse.relaxations[i], reuse.bounds[i]
            previous = (i, reuse.bounds[i])
            continue
        lower, upper = problem.propagation.input_bounds(0, i)
        changed = False
        if crown:
            if previous is not None and intersect:
                low, high = problem.arithmetic.forward(previous[0] + 1, i, previous[1])
                changed = bool((low > lower).any() or (high < upper).any())
                lower, upper = torch.maximum(lower, low), torch.minimum(upper, high)
                upper = torch.maximum(upper, lower)
            if not _ibp_is_exact(problem.ops[:i]):
                lower, upper, tightened = _crown_bounds(problem, chain, i, lower, upper, intersect)
                changed = changed or tightened
            previous = (i, (lower, upper))
        if changed and chain.diverged is None:
            chain.diverged = i
        chain.relaxations[i] = problem.arithmetic.relaxation(problem.layers[i], lower, upper)
        chain.bounds[i] = (lower, upper)
        chain.weights.update(problem.arithmetic.chain_weights(i, lower, upper, chain.relaxations[i]))
        chain.folds.update(problem.arithmetic.folds(chain.weights, i + 1))
    return chain


def _specification(y: Tensor, classes: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Rows ``e_y - e_j`` for every sample and every ``j != y``: C (B*(K-1), K), their samples
    (B*(K-1),), and the mask (B, K) of the entries ``j != y``."""
    eye = torch.eye(classes, dtype=dtype, device=y.device)
    mask = torch.ones(y.shape[0], classes, dtype=torch.bool, device=y.device).scatter(1, y[:, None], False)
    C = (eye[y][:, None, :] - eye[None])[mask]
    return C, mask.nonzero()[:, 0], mask


def _linear_bound(problem: _Problem, chain: _Chain, C: Tensor, rows: Tensor, start: int = 0) -> Tensor:
    """Lower bounds of ``C z`` (z the output) with the fixed relaxations; C (N, K), rows (N,) -> (N,)
    (from the interval bounds on the input of layer ``start`` when > 0)."""
    end, chain = len(problem.ops), _as_chain(chain)
    return torch.cat([_backward(problem, chain, end, C[part], rows[part], start=start)
                      for part in _chunks(C.shape[0], problem.max_rows)])


def _optimized_bound(problem: _Problem, chain: _Chain, C: Tensor, rows: Tensor, steps: int, lr: float) -> Tensor:
    """α-CROWN lower bounds of ``C z``: C (N, K), rows (N,) -> (N,), never below the fixed-slope bound."""
    if steps == 0 or not any(r.unstable.any() for r in chain.relaxations.values()):
        return _linear_bound(problem, chain, C, rows)
    size = max(1, problem.max_rows // 8)
    return torch.cat([_optimize_part(problem, chain, C[part], rows[part], steps, lr)
                      for part in _chunks(C.shape[0], size)])


def _optimize_part(problem: _Problem, chain: _Chain, C: Tensor, rows: Tensor, steps: int, lr: float) -> Tensor:
    """Projected Adam on the lower slopes α (one per neuron and row) from CROWN's choice; best bound per row."""
    end = len(problem.ops)
    alphas = {i: r.lower[rows].clone().requires_grad_(True) for i, r in chain.relaxations.items()}
    optimizer = torch.optim.Adam(list(alphas.values()), lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, ALPHA_LR_DECAY)
    best = None
    with torch.enable_grad():
        for _ in range(steps):
            value = _backward(problem, chain, end, C, rows, alphas)
            best = value.detach() if best is None else torch.fmax(best, value.detach())  # NaN: no bound
            optimizer.zero_grad(set_to_none=True)
            (-value.sum()).backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for i, alpha in alphas.items():
                    alpha.clamp_(*chain.relaxations[i].alpha_range)
    return torch.fmax(best, _backward(problem, chain, end, C, rows, alphas))


def _mode(sound: Union[bool, str]) -> Optional[str]:
    """``sound`` as "fp64", "fp32" or None (the model's dtype, not a certificate)."""
    if sound is True or sound == "fp64":
        return "fp64"
    if sound is False or sound == "fp32":
        return None if sound is False else "fp32"
    raise ValueError(f"sound must be True, False, 'fp64' or 'fp32', got {sound!r}")


def _float32(model: nn.Module) -> nn.Module:
    """The model, or a float32 copy when its floating tensors are all float32 numbers."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == torch.float32 for t in tensors):
        return model
    if not all(torch.equal(t.float().to(t.dtype), t) for t in tensors):
        raise ValueError("sound='fp32' certifies a network with float32 weights; this model has weights that "
                         "float32 cannot represent exactly: use sound='fp64'")
    return copy.deepcopy(model).float()


def _problem(bounded: BoundedModule, x: Tensor, y: Optional[Tensor], spec: Spec, sound: Union[bool, str],
             max_rows: Optional[int]) -> _Problem:
    if not (callable(getattr(bounded, "propagate", None)) and hasattr(bounded, "layers")):
        raise TypeError(f"expected a BoundedModule, got {type(bounded).__name__}")
    if not isinstance(spec, Ball):
        raise TypeError(f"spec must be a LinfBall, L2Ball or L1Ball, got {type(spec).__name__}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows must be a positive int or None, got {max_rows!r}")
    for layer in bounded.layers:
        layer.check_certifiable()
    given, mode = x, _mode(sound)
    if mode == "fp64":
        tensors = list(bounded.model.parameters()) + list(bounded.model.buffers())
        in_float64 = all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())
        model = bounded.model if in_float64 else copy.deepcopy(bounded.model).double()
    if mode is not None:
        model = _float32(bounded.model) if mode == "fp32" else model
        bounded = type(bounded)(model, backend="torch", precision="ieee")
        x = x.float() if mode == "fp32" else x.double()
    propagation = bounded.propagate(x, [spec], y)  # in float32 mode: the checks of the inputs only
    ops, shapes = _operators(bounded.layers, x)
    widest = max(shape.numel() for shape in shapes)
    rows = max_rows or max(1, ROW_BUDGET_BYTES // (widest * x.element_size()))
    if mode != "fp32":
        arithmetic = rounding.Arithmetic(bounded.layers, ops)
        return _Problem(bounded.layers, ops, shapes, InputSet(spec, x), propagation, rows, arithmetic, x.dtype)
    inputs = SoundInputSet(spec, given)
    arithmetic = rounding.Float32(bounded.layers, ops)
    spec_start = len(ops) if bounded.spec_layer is None else bounded.spec_layer
    propagation = arithmetic.propagate(inputs.box, inputs.ball, spec_start)
    return _Problem(bounded.layers, ops, shapes, inputs, propagation, rows, arithmetic, x.dtype)


def _ibp_margins(problem: _Problem, chain: _Chain, C: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
    """IBP's margins off the labels (N,): the folded last layer (float32 mode: a backward pass from the
    layer the specification folds into, over its input's sound interval)."""
    if problem.propagation.margins is not None:
        return problem.propagation.margins[0][mask]
    return _linear_bound(problem, chain, C, rows, start=problem.propagation.spec_start)


@torch.no_grad()
def crown_margins(bounded: BoundedModule, x: Tensor, y: Tensor, spec: Spec, method: str = "crown",
                  alpha_steps: int = 20, alpha_lr: float = 0.5, sound: Union[bool, str] = True,
                  max_rows: Optional[int] = None) -> Tensor:
    """Lower bounds on the margins ``z_y - z_j`` over ``spec`` around x by a CROWN-family method.

    Args:
        bounded: the network; BatchNorm and Dropout layers must be in eval mode.
        x: inputs (B, ...), inside the spec's domain.
        y: labels (B,) int.
        spec: a LinfBall, L2Ball or L1Ball (float or per-sample (B,) eps).
        method: ``"crown-ibp"``, ``"crown"`` or ``"alpha-crown"`` (see the module docstring).
        alpha_steps: Adam steps of α-CROWN.
        alpha_lr: Adam's initial learning rate in α-CROWN (decayed by ``ALPHA_LR_DECAY`` per step).
        sound: ``True`` / ``"fp64"``: float64 (a certificate); ``"fp32"``: float32 with a rigorous
            bound on every rounding error (a certificate, for a float32 model); ``False``: the model's
            dtype (not a certificate).
        max_rows: rows per backward pass (memory); None for the default budget.
    Returns:
        (B, K) in x's dtype, exactly 0 at ``j = y``; every entry off ``y`` > 0 certifies the sample.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(alpha_steps, bool) or not isinstance(alpha_steps, int) or alpha_steps < 0:
        raise ValueError(f"alpha_steps must be a non-negative int, got {alpha_steps!r}")
    with rounding.strict(_mode(sound) == "fp32"):
        problem = _problem(bounded, x, y, spec, sound, max_rows)
        chain = _relaxations(problem, crown=method != "crown-ibp")
        C, rows, mask = _specification(y.long(), problem.shapes[-1][0], problem.dtype)
        if method == "alpha-crown":
            values = _optimized_bound(problem, chain, C, rows, alpha_steps, alpha_lr)
        else:
            values = _linear_bound(problem, chain, C, rows)
        if method != "crown-ibp" and chain.diverged is not None:  # never looser than pure CROWN
            pure = _relaxations(problem, crown=True, intersect=False, reuse=chain)
            values = torch.maximum(values, _linear_bound(problem, pure, C, rows))
        values = torch.maximum(values, _ibp_margins(problem, chain, C, rows, mask))
    margins = values.new_zeros(mask.shape)
    margins[mask] = values
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
    with rounding.strict(_mode(sound) == "fp32"):
        problem = _problem(bounded, x, None, spec, sound, max_rows)
        bounds = _relaxations(problem, crown=method != "crown-ibp").bounds
    return [(round_down(lower, x.dtype), -round_down(-upper, x.dtype)) for lower, upper in bounds.values()]
