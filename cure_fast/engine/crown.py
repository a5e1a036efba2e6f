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
  is stable, each bound intersected with CROWN's and with IBP from the optimized bounds below
  (:mod:`.alpha`). Then the margin rows: the objective is the sum of
  their bounds. The best bound seen per row is kept, the result is at least CROWN's and compared with
  pure CROWN's (every bound of every step is sound, whatever the slopes).
  ``alpha_intermediate=False``: CROWN's pre-activation bounds, final slopes only.
  ``target=0`` (what the certification cascade uses): a row leaves the objective once its
  bound is above 0, and the optimization stops when every row is (certified); samples whose CROWN
  bound is already above it are not optimized. In the sound modes the slopes are searched in plain
  float32 arithmetic (a float32 copy of the model, from the sound CROWN's relaxations: any slopes in
  range give a sound bound) and each bound is computed once in the sound arithmetic with every row's
  slopes from its best step (bounds capped at ``target``), the float64 search's bounds within 5e-8
  on small nets; a row whose search passed ``target`` but whose sound bound did not is searched
  again, alone, to the target plus twice the gap.

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
On the CPU with glibc the first call keeps freed memory in the process from then on (:mod:`.heap`:
the sound fp64 passes spent a quarter of their time faulting it back in; glibc's own heap settings
in the environment, e.g. ``MALLOC_TRIM_THRESHOLD_``, win and opt out).

>>> margins = crown_margins(BoundedModule(model.eval()), x, y, LinfBall(2 / 255), method="crown")
>>> certified = (margins > 0).sum(1) == margins.shape[1] - 1
"""
from __future__ import annotations

import copy
import inspect
import warnings
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..ops import policy
from ..specs import Ball, L1Ball, L2Ball, LinfBall
from . import alpha, heap, passes, rounding
from .inputs import InputSet, SoundInputSet
from .layers import Layer, Operator, parametrized_base
from .layers.activation import unknown_as_infinite
from .passes import Interval
from .rounding import round_down

BoundedModule = nn.Module  # annotations only: the engine's BoundedModule calls into this module, not back

Spec = Union[LinfBall, L2Ball, L1Ball]

METHODS = ("crown-ibp", "crown", "alpha-crown")


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


def _mode(sound: Union[bool, str]) -> Optional[str]:
    """``sound`` as "fp64", "fp32" or None (the model's dtype, not a certificate)."""
    if sound is True or sound == "fp64":
        return "fp64"
    if sound is False or sound == "fp32":
        return None if sound is False else "fp32"
    raise ValueError(f"sound must be True, False, 'fp64' or 'fp32', got {sound!r}")


def _floating(model: nn.Module) -> List[Tensor]:
    return [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]


def _check_finite(model: nn.Module) -> None:
    """A ValueError naming the first parameter or buffer with a NaN or infinite entry."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"the model's {name} contains NaN or Inf: no bound holds for it (a diverged training run?)")


def _materialized(model: nn.Module) -> nn.Module:
    """The model, or a copy whose parametrized weights (``torch.nn.utils.parametrize``) are plain tensors
    holding the values the model computes now, in its own dtype: a copy cast to another dtype would
    compute them anew in that dtype, which is not the network the model runs. (torch's
    ``remove_parametrizations`` on a copy would change the class it shares with the model.)"""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        return model
    plain = copy.deepcopy(model)
    for original, module in zip(list(model.modules()), list(plain.modules())):
        base = parametrized_base(original)
        if base is None:
            continue
        values = {name: getattr(original, name).detach().clone() for name in original.parametrizations}
        module.__class__ = base
        del module._modules["parametrizations"]
        for name, value in values.items():
            module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return plain


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model, or a copy in ``dtype`` when some floating tensor is in another."""
    if all(t.dtype == dtype for t in _floating(model)):
        return model
    plain = _materialized(model)  # a copy already when parametrized
    return (plain if plain is not model else copy.deepcopy(model)).to(dtype)


def _float32(model: nn.Module) -> nn.Module:
    """The model, or a float32 copy when its floating tensors are all float32 numbers."""
    model = _materialized(model)
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
    bounded.follow_model()
    for layer in bounded.layers:
        layer.check_certifiable()
    _check_finite(bounded.model)
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


def _note_alpha_options(method: str, **given) -> None:
    """Warn that α-CROWN options changed from their defaults do not act on another method."""
    defaults = inspect.signature(crown_margins).parameters
    changed = [f"{name}={value!r}" for name, value in given.items() if value != defaults[name].default]
    if changed and method != "alpha-crown":
        warnings.warn(f"{', '.join(changed)}: α-CROWN's options, ignored by method={method!r}")


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
        alpha_lr: Adam's initial learning rate in α-CROWN (decayed by ``alpha.LR_DECAY`` per step).
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
    if isinstance(alpha_lr, bool) or not isinstance(alpha_lr, (int, float)) or not 0 < alpha_lr < float("inf"):
        raise ValueError(f"alpha_lr must be a finite number > 0, got {alpha_lr!r}")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float)) or target != target):
        raise ValueError(f"target must be a number (0: enough to certify) or None (the tightest bound), got {target!r}")
    _note_alpha_options(method, alpha_steps=alpha_steps, alpha_lr=alpha_lr, alpha_intermediate=alpha_intermediate)
    with policy.strict(_mode(sound) is not None, x.device):
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
            values = alpha.optimized_bound(problem, chain, C, rows, alpha_steps, alpha_lr, alpha_intermediate, target,
                                      search)
        else:
            values = passes.linear_bound(problem, chain, C, rows)
        values = torch.fmax(values, _ibp_margins(problem, chain, C, rows, mask))  # fmax: NaN (overflow) loses
        if method in ("crown", "alpha-crown"):  # never looser than pure CROWN
            values = _with_pure_crown(problem, chain, C, rows, values, target)
    margins = values.new_zeros(mask.shape)
    margins[mask] = passes.no_nan(values)
    return round_down(margins, x.dtype)


@torch.no_grad()
def preactivation_bounds(bounded: BoundedModule, x: Tensor, spec: Spec, method: str = "crown",
                         sound: Union[bool, str] = True, max_rows: Optional[int] = None) -> List[Interval]:
    """Bounds ``(lower, upper)`` on the input of every ReLU, in order, each (B, *shape) in x's dtype
    (rounded outwards), as the CROWN-family methods use them (``sound`` as in :func:`crown_margins`).

    ``method``: ``"crown-ibp"`` (IBP's bounds), ``"crown"`` or ``"alpha-crown"`` (CROWN's bounds). A
    bound lost to an overflow (NaN) is returned as -inf / +inf.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    with policy.strict(_mode(sound) is not None, x.device):
        problem = _problem(bounded, x, None, spec, sound, max_rows)
        bounds = passes.relaxations(problem, crown=method != "crown-ibp").bounds
    bounds = [unknown_as_infinite(lower, upper) for lower, upper in bounds.values()]
    return [(round_down(lower, x.dtype), -round_down(-upper, x.dtype)) for lower, upper in bounds]
