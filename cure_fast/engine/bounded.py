"""BoundedModule: sound interval / l2 bound propagation through an ``nn.Sequential``.

One call of :meth:`BoundedModule.propagate` pushes the natural input and every input set through
the network together (:mod:`.streams`): each layer is one op over the weights for all streams. An
l2 ball is kept exact until the first affine layer (dual norm), then becomes an interval like the
rest (an l1 ball likewise, by the l∞ norm of the weight rows). What each layer type does lives in its class in :mod:`.layers`; this module only loops.

The one exception to soundness is training-only and explicit: ``propagate(..., shrink=ShrinkBox(...))``
shrinks the box of chosen input sets at every ReLU (:mod:`.shrink`, the CURE reference code's
shrinking box); such a :class:`Propagation` has ``sound=False`` and certification never asks for one.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from .. import ops
from ..ops.policy import check_backend, check_precision
from ..specs import Ball, L1Ball, L2Ball, LinfBall
from ..validation import did_you_mean
from .layers import CALL_METHODS, Affine, Context, Layer, bound_layer, own_call
from .passes import no_nan
from .shrink import ShrinkBox
from .streams import Interval, Lazy, Pending, Streams, lower_upper

Spec = Union[LinfBall, L2Ball, L1Ball]


def _check_runs_as_its_layers(model: nn.Module) -> None:
    """Refuse what makes the model's output differ from its layers applied in order (the bounds would
    not bound it): an ``nn.Sequential`` subclass that calls or iterates otherwise, a call method set on
    an instance, a forward hook (:data:`~.layers.CALL_METHODS`)."""
    for name, module in model.named_modules():
        where = f"{name or 'the model'} ({type(module).__name__})"
        overridden = own_call(type(module), nn.Sequential) if isinstance(module, nn.Sequential) else None
        if overridden is not None:
            raise ValueError(f"{where} defines {overridden}, which the bounds would not follow (they take its "
                             f"layers in order); make what it adds a layer")
        on_instance = next((attr for attr in CALL_METHODS if attr in vars(module)), None)
        if on_instance is not None:
            raise ValueError(f"{where} has a {on_instance} of its own, set on the instance: the bounds follow its "
                             f"type's")
        if module._forward_hooks or module._forward_pre_hooks:
            hooks = list(module._forward_hooks.values()) + list(module._forward_pre_hooks.values())
            legacy = any(type(h).__name__ in ("SpectralNorm", "WeightNorm") for h in hooks)
            raise ValueError(f"{where} has a forward hook, which the bounds would not follow: " + (
                "torch.nn.utils.spectral_norm / weight_norm work by hooks; use torch.nn.utils.parametrizations' "
                "instead" if legacy else "remove it (handle.remove()) before bounding"))
    if _global_forward_hooks or _global_forward_pre_hooks:
        raise ValueError("a global module forward hook is registered (register_module_forward_hook), which the "
                         "bounds would not follow: remove it before bounding")


def _flatten(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """Layers of nested ``nn.Sequential`` containers in order, named by their dotted position; a module
    placed twice counts twice, as in the forward (``named_children`` would list it once)."""
    layers = []
    for name, child in module._modules.items():
        position = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            layers += _flatten(child, position + ".")
        else:
            layers.append((position, child))
    return layers


@dataclass
class Propagation:
    """What :meth:`BoundedModule.propagate` returns.

    Attributes:
        logits: natural output (B, K).
        bounds: per spec, ``(lower, upper)`` on the output, each (B, K).
        margins: per spec, lower bounds on ``z_y - z_j`` (B, K), 0 at ``j = y``, -inf where an overflow
            lost the bound; None without labels.
        layer_names: position of every layer of the flattened model.
        sound: False when a shrinking box was applied (training only): then bounds and margins are
            NOT bounds of the network over the input sets.
    """
    logits: Tensor
    bounds: List[Interval]
    margins: Optional[List[Tensor]]
    layer_names: List[str]
    # the input of every layer, then the output (inside fused groups computed on request)
    states: List[Union[Streams, Lazy]] = field(repr=False, default_factory=list)
    activations: List[int] = field(repr=False, default_factory=list)
    sound: bool = True

    def _state(self, i: int) -> Streams:
        state = self.states[i]
        return state.get() if isinstance(state, Lazy) else state

    def _check_spec(self, spec: int) -> int:
        if isinstance(spec, bool) or not isinstance(spec, int) or not 0 <= spec < len(self.bounds):
            raise ValueError(f"spec must be the number of one of the {len(self.bounds)} specs propagated "
                             f"(0 to {len(self.bounds) - 1}), got {spec!r}")
        return spec

    def input_bounds(self, spec: int, layer: int) -> Interval:
        """Bounds ``(lower, upper)`` of spec number ``spec`` on the input of layer number ``layer``."""
        layers = len(self.states) - 1
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
            raise ValueError(f"layer must be the number of one of the model's {layers} layers (0 to {layers - 1}), "
                             f"got {layer!r}")
        return lower_upper(self._state(layer).block(self._check_spec(spec)))

    def layer_bounds(self, spec: int) -> List[Interval]:
        """Bounds ``(lower, upper)`` of spec number ``spec`` on the output of every layer, each (B, *shape)."""
        spec = self._check_spec(spec)
        return [lower_upper(self._state(i).block(spec)) for i in range(1, len(self.states))]

    def preactivation_bounds(self, spec: int) -> List[Interval]:
        """Bounds ``(lower, upper)`` of spec number ``spec`` on the input of every activation, in order."""
        spec = self._check_spec(spec)
        return [lower_upper(self._state(i).block(spec)) for i in self.activations]


def _spec_list(specs) -> List[Spec]:
    if not isinstance(specs, (Ball, list, tuple)):
        raise TypeError(f"specs must be a LinfBall / L2Ball / L1Ball or a list of them, got {type(specs).__name__}")
    specs = [specs] if isinstance(specs, Ball) else list(specs)
    for spec in specs:
        if not isinstance(spec, Ball):
            raise TypeError(f"specs must be LinfBall / L2Ball / L1Ball objects, got {type(spec).__name__}")
    return specs


def _check_input(x: Tensor, specs: Sequence[Spec]) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"input must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"input must be a non-empty batch of shape (B, ...), got {tuple(x.shape)}")
    low, high = (float(v) for v in torch.aminmax(x.detach()))
    if not (torch.isfinite(torch.tensor([low, high])).all()):
        raise ValueError("input contains NaN or Inf")
    for spec in specs:
        if spec.domain is not None and (low < spec.domain[0] or high > spec.domain[1]):
            raise ValueError(f"input values span [{low:g}, {high:g}], outside the domain {spec.domain} of {spec}")


def _check_dtype(x: Tensor, model: nn.Module) -> None:
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    if dtypes and x.dtype not in dtypes:
        model_dtype = ", ".join(sorted(str(d)[6:] for d in dtypes))
        raise TypeError(f"the input is {str(x.dtype)[6:]} but the model is {model_dtype}: convert one of them "
                        f"(x.to(dtype) or model.to(dtype))")


def _check_shrink(shrink: Optional[ShrinkBox], n_specs: int) -> None:
    if shrink is None:
        return
    if not isinstance(shrink, ShrinkBox):
        raise TypeError(f"shrink must be a ShrinkBox or None, got {type(shrink).__name__}")
    if any(not 0 <= k < n_specs for k in shrink.specs):
        raise ValueError(f"shrink.specs {shrink.specs} name specs that were not given ({n_specs} specs)")


def _fold_affines(linear: nn.Linear, affines: List[Affine]) -> Tuple[Tensor, Tensor]:
    """Weight and bias of ``linear`` followed by per-feature affines ``z * scale + shift``."""
    weight = linear.weight
    bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
    for scale, shift in affines:
        weight, bias = weight * scale[:, None], bias * scale + shift
    return weight, bias


def _lost_as_no_bound(margins: Tensor, labels: Tensor) -> Tensor:
    """Margins (B, K) with NaN (a bound lost to an overflow) as -inf, and exactly 0 at the labels."""
    return no_nan(margins).scatter(1, labels[:, None], 0.0)


def _margins_from_bounds(lower: Tensor, upper: Tensor, labels: Tensor) -> Tensor:
    """``l_y - u_j`` (0 at j = y): the margin bound when the specification cannot be folded."""
    return _lost_as_no_bound(lower.gather(1, labels[:, None]) - upper, labels)


class BoundedModule(nn.Module):
    """Sound bound propagation through an ``nn.Sequential``, sharing the model's parameters.

    Supported layers: those of :mod:`cure_fast.engine.layers` — Conv2d (any stride, dilation, groups;
    zero padding: numbers, ``'valid'`` or ``'same'``, the CROWN methods only where ``'same'`` pads
    symmetrically), Linear, BatchNorm1d/2d, ReLU, LeakyReLU, Flatten, AvgPool2d,
    Identity, Dropout and :class:`cure_fast.nn.Normalize`; nested ``nn.Sequential`` containers are
    flattened (a subclass with a ``forward`` of its own, or a forward hook, is refused; a module placed
    twice counts twice); a layer of the model replaced, added or removed after wrapping is followed
    (the bound layers are rebuilt at the next call), a setting changed in place is checked again. In
    train mode BatchNorm normalizes every stream with the natural stream's batch statistics (and
    updates the running statistics once per call); in eval mode it uses the
    running statistics.

    A Linear / Conv2d with the eval-mode BatchNorm and / or ReLU after it, and a BatchNorm /
    Normalize with a ReLU after it, run as one op (the ``triton`` and ``cuda`` backends fuse them
    into one kernel); the bounds between those layers (``layer_bounds``, ``preactivation_bounds``)
    are computed when first asked for.

    Args:
        model: the network, an ``nn.Sequential``.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"``, or None for the process default.
        precision: dot-product precision of the affine layers, ``"ieee"``, ``"tf32"``, ``"bf16"``, or
            None for the process default (:func:`cure_fast.set_precision`, ``"ieee"`` unless changed).
    """

    def __init__(self, model: nn.Sequential, backend: Optional[str] = None, precision: Optional[str] = None):
        if not isinstance(model, nn.Sequential):
            raise ValueError(f"BoundedModule needs an nn.Sequential, got {type(model).__name__}")
        super().__init__()
        self.model = model
        self.backend = backend
        self.precision = None if precision is None else check_precision(precision)
        if backend is not None:
            check_backend(backend)
        self._structure: List[Tuple[nn.Module, type]] = []
        self.follow_model()

    def follow_model(self) -> None:
        """The bound layers of the model's layers as they are now: rebuilt where a layer was replaced,
        added or removed since they were last built (every entry point calls this; in-place changes of
        a layer's parameters need nothing). Refuses a model whose output is not its layers' in order
        (a forward of its own, a forward hook)."""
        _check_runs_as_its_layers(self.model)
        named = _flatten(self.model)
        if not named:
            raise ValueError("BoundedModule needs a model with at least one layer")
        structure = [(module, type(module)) for _, module in named]
        if len(structure) == len(self._structure) and all(
                a is b and s is t for (a, s), (b, t) in zip(structure, self._structure)):
            for layer in self.layers:
                layer.check()  # a setting changed in place (padding_mode, ...) is refused as when wrapping
            return
        self.layer_names = [position for position, _ in named]
        self.layers: List[Layer] = [bound_layer(module, position) for position, module in named]
        self._structure = structure
        modules = [module for module, _ in structure]
        self.spec_layer = self._find_spec_layer()
        affine = [i for i, layer in enumerate(self.layers) if layer.fuses == "affine"]
        self.first_affine = affine[0] if affine else None
        self._copies_input = any(getattr(module, "inplace", False) for module in modules)

    def _find_spec_layer(self) -> Optional[int]:
        """Index of the last Linear when only layers the specification folds through follow it."""
        for i in reversed(range(len(self.layers))):
            if isinstance(self.layers[i].module, nn.Linear):
                return i
            if not self.layers[i].follows_spec():
                return None
        return None

    def forward(self, x: Tensor) -> Tensor:
        """The natural output, ``model(x)`` (on a copy of x when a layer works in place)."""
        self.follow_model()
        return self.model(x.clone() if self._copies_input else x)

    def bounds(self, x: Tensor, spec: Spec) -> Interval:
        """``(lower, upper)`` on the output over the input set ``spec`` around x; each (B, K)."""
        return self.propagate(x, [spec]).bounds[0]

    def margins(self, x: Tensor, y: Tensor, spec: Spec, method: str = "ibp", **options) -> Tensor:
        """Lower bounds on ``z_y - z_j`` over ``spec`` around x, (B, K), 0 at ``j = y``. A certificate (every
        entry off y > 0 proves the sample robust) with the CROWN methods' sound modes (their default) and
        IBP with ``sound=``; plain IBP computes in the model's dtype, rounding unbounded: bounds for
        training, not a proof.

        ``method``: ``"ibp"`` (this module's interval propagation; with ``options``, e.g. ``sound=True``,
        :func:`cure_fast.engine.crown.crown_margins`' IBP, eval mode), or ``"crown-ibp"``, ``"crown"``,
        ``"alpha-crown"`` (eval mode; ``options`` go to :func:`cure_fast.engine.crown.crown_margins`).
        """
        if method == "ibp" and not options:
            return self.propagate(x, [spec], y).margins[0]
        from . import crown
        if method not in ("ibp",) + crown.METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of ibp, {', '.join(crown.METHODS)}")
        known = [name for name in inspect.signature(crown.crown_margins).parameters
                 if name not in ("bounded", "x", "y", "spec", "method")]
        for name in options:
            if name not in known:
                raise TypeError(f"margins() got an unexpected option {name!r}{did_you_mean(name, known)}; options: "
                                f"{', '.join(known)}")
        return crown.crown_margins(self, x, y, spec, method=method, **options)

    def propagate(self, x: Tensor, specs: Union[Spec, Sequence[Spec]] = (), y: Optional[Tensor] = None,
                  shrink: Optional[ShrinkBox] = None) -> Propagation:
        """One pass for the natural input and every spec, stacked along the batch.

        Args:
            x: inputs (B, ...), inside every spec's domain.
            specs: input sets (LinfBall / L2Ball / L1Ball), or one of them.
            y: optional labels (B,); when given, margins are returned too.
            shrink: TRAINING ONLY, unsound by design: a :class:`~cure_fast.engine.shrink.ShrinkBox`
                shrinks the pre-activation box of its specs at every ReLU (the recorded
                ``preactivation_bounds`` are those before shrinking); None (the default): sound bounds.
        Returns:
            a :class:`Propagation` with the logits (B, K), the bounds per spec, the margins per spec
            when ``y`` is given, and the bounds of every layer (``layer_bounds``, ``preactivation_bounds``);
            ``sound`` is False when ``shrink`` was given.
        """
        self.follow_model()
        specs = _spec_list(specs)
        _check_input(x, specs)
        _check_dtype(x, self.model)
        _check_shrink(shrink, len(specs))
        if y is not None and (not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point()
                              or y.dtype == torch.bool):
            got = f"{tuple(y.shape)} {str(y.dtype)[6:]}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},), got {got}")
        ctx = Context(self.backend, self.precision, len(specs))
        streams = self._input_streams(x, specs)
        states, tail, penultimate = [streams.boxed(len(specs))], [], None
        i = 0
        while i < len(self.layers):
            if i == self.spec_layer:
                penultimate = streams
            size = self._group_size(i, streams, split_relu=shrink is not None)
            self.layers[i].check_input(streams.c)
            if size > 1:
                streams, inside = self._fused_step(i, size, streams, ctx)
                states += inside + [streams]
            else:
                if shrink is not None and isinstance(self.layers[i].module, nn.ReLU):
                    streams = shrink.streams(streams.boxed(len(specs)))  # the state recorded before stays unshrunk
                streams, affine = self.layers[i].step(streams, ctx)
                if affine is not None and self.spec_layer is not None and i > self.spec_layer:
                    tail.append(affine)
                states.append(streams.boxed(len(specs)))
            i += size
        out = states[-1]
        bounds = [lower_upper(out.block(k)) for k in range(len(specs))]
        margins = None if y is None else self._margins(out, penultimate, tail, specs, bounds, y.long(), ctx)
        activations = [i for i, layer in enumerate(self.layers) if layer.activation]
        return Propagation(out.natural(), bounds, margins, self.layer_names, states, activations, shrink is None)

    def _input_streams(self, x: Tensor, specs: List[Spec]) -> Streams:
        boxes = [spec.domain_box(x) for spec in specs]
        order = [k for k, box in enumerate(boxes) if box is not None]
        exact = [k for k, spec in enumerate(specs) if spec.exact_first_layer]
        centred = [k for k in exact if specs[k].center is not None]
        c = torch.cat([x] + [specs[k].center_for(x) for k in centred] + [boxes[k][0] for k in order])
        r = torch.cat([boxes[k][1] for k in order]) if order else x[:0]
        balls = {k: Pending(specs[k].per_sample_eps(x).reshape(-1), 1 + centred.index(k) if k in centred else 0,
                            specs[k].p) for k in exact}
        return Streams(c, r, order, balls, points=1 + len(centred))

    def _group_size(self, i: int, s: Streams, split_relu: bool = False) -> int:
        """How many layers from ``i`` on run as one op: an affine layer with a following channel
        layer that folds into its epilogue and / or a ReLU, or a channel layer with a ReLU. Not while
        l2 balls are pending, nor at the layer the specification folds into. ``split_relu`` (a
        shrinking pass): a ReLU always runs on its own (its own ``step``, on the configured
        backend), since the fused triton / cuda kernels apply it in their epilogue, where the box
        cannot be shrunk first; the layers before it still fuse."""
        layers, j = self.layers, i + 1
        head = layers[i]
        if s.balls or i == self.spec_layer or not head.fuses:
            return 1
        if head.fuses == "affine" and j < len(layers) and layers[j].folds_into(head, s):
            j += 1
        if j < len(layers) and layers[j].relu_epilogue and not split_relu:
            j += 1
        return j - i

    def _fused_step(self, i: int, size: int, s: Streams, ctx: Context) -> Tuple[Streams, List[Lazy]]:
        """Layers ``i .. i + size - 1`` (see :meth:`_group_size`) as one op; returns the output streams
        and the states between the layers, computed only if asked for."""
        group = self.layers[i: i + size]
        head = group[0]
        channel = head if head.fuses == "channel" else next((g for g in group[1:] if g.fuses == "channel"), None)
        affine = channel.affine(s.natural(), ctx) if channel is not None else None  # once: may update BN statistics

        def through(k: int) -> Streams:
            """The streams after the group's first k layers."""
            inside = group[:k]
            return head.fused(s, ctx, affine if channel in inside else None, inside[-1].relu_epilogue)

        return through(size), [Lazy(functools.partial(through, k)) for k in range(1, size)]

    def _margins(self, out: Streams, pen: Optional[Streams], tail: List[Affine], specs, bounds, labels: Tensor,
                 ctx: Context) -> List[Tensor]:
        logits = out.natural()
        if logits.dim() != 2:
            raise ValueError(f"margins need a (B, K) output, the model gives {tuple(logits.shape)}")
        low, high = (float(v) for v in torch.aminmax(labels))
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got values in [{low:g}, {high:g}]")
        foldable = pen is not None and pen.c.dim() == 2 and not any(
            layer.is_random() for layer in self.layers[self.spec_layer:])
        if not foldable:
            return [_margins_from_bounds(lo, hi, labels) for lo, hi in bounds]
        weight, bias = _fold_affines(self.layers[self.spec_layer].module, tail)
        options = dict(backend=ctx.backend, precision=ctx.precision)
        per_block = {}
        if pen.order:
            folded = ops.margins_linear(pen.intervals(), pen.r, weight, bias, labels.repeat(len(pen.order)), **options)
            per_block = dict(zip(pen.order, folded.chunk(len(pen.order))))
        margins = []
        for k in range(len(specs)):
            if k in pen.balls:
                eps, j, p = pen.balls[k]
                if p == 1:
                    ball = ops.l1_margins_linear(pen.point(j), eps, weight, bias, labels, pen.scale,
                                                 precision=ctx.precision)
                else:
                    ball = ops.l2_margins_linear(pen.point(j), eps, weight, bias, labels, pen.scale, **options)
                margins.append(torch.fmax(ball, per_block[k]) if k in per_block else ball)  # NaN loses
            else:
                margins.append(per_block[k])
        return [_lost_as_no_bound(m, labels) for m in margins]

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'default'}"
