"""BoundedModule: sound interval / l2 bound propagation through an ``nn.Sequential``.

One call of :meth:`BoundedModule.propagate` pushes the natural input and every input set through
the network together: their centres are stacked along the batch (natural first), their radii
likewise (the natural stream has none), so each layer is one op over the weights for all streams.
An l2 ball is kept exact until the first affine layer (dual norm, DESIGN.md §2), then becomes an
interval like the rest.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as BF
from .backends import check_precision
from .nn import Normalize
from .specs import L2Ball, LinfBall, _Ball

Interval = Tuple[Tensor, Tensor]
Spec = Union[LinfBall, L2Ball]

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)
_SUPPORTED = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Flatten, nn.AvgPool2d,
              nn.Identity, nn.Dropout, Normalize)


def _flatten(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Module]]:
    """Layers of nested ``nn.Sequential`` containers in order, named by their dotted position."""
    layers = []
    for name, child in module.named_children():
        position = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            layers += _flatten(child, position + ".")
        else:
            layers.append((position, child))
    return layers


def _check_layer(position: str, module: nn.Module) -> None:
    if type(module) not in _SUPPORTED:
        names = ", ".join(t.__name__ for t in _SUPPORTED)
        raise ValueError(f"layer {position} ({module}) is not supported by BoundedModule; supported: {names}")
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        raise ValueError(f"layer {position} ({module}): only padding_mode='zeros' is supported")
    if isinstance(module, nn.Flatten) and module.start_dim == 0:
        raise ValueError(f"layer {position} ({module}): Flatten must keep the batch dimension (start_dim >= 1)")


def _channel_affine(module: nn.Module, natural: Tensor, backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    """``(scale, shift)`` of a per-channel affine layer, each (C,); train-mode BatchNorm takes the
    statistics of the natural stream (on ``backend``) and updates its running statistics once, as
    ``module(x)`` would."""
    if isinstance(module, Normalize):
        return module.channel_affine(natural)
    bn = module
    if bn.training or bn.running_mean is None:
        count = natural.numel() // natural.shape[1]
        if bn.training and count <= 1:
            raise ValueError(f"{bn}: expected more than 1 value per channel when training, got input of "
                             f"shape {tuple(natural.shape)}")
        mean, var = BF.batch_norm_stats(natural, backend=backend)
        if bn.training and bn.track_running_stats:
            _update_running_stats(bn, mean.detach(), var.detach() * count / (count - 1))
    else:
        mean, var = bn.running_mean.to(natural.dtype), bn.running_var.to(natural.dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
        return scale, bn.bias - mean * scale
    return scale, -mean * scale


@torch.no_grad()
def _update_running_stats(bn: nn.Module, mean: Tensor, unbiased_var: Tensor) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
    bn.running_var.lerp_(unbiased_var.to(bn.running_var.dtype), momentum)


def _intersect(a: Interval, b: Interval) -> Interval:
    """Intersection of two intervals that both contain the same set."""
    lower = torch.maximum(a[0] - a[1], b[0] - b[1])
    upper = torch.minimum(a[0] + a[1], b[0] + b[1])
    return (upper + lower) / 2, (upper - lower).clamp_min(0) / 2


def _check_input_shape(position: str, module: nn.Module, c: Tensor) -> None:
    """A clear error when a layer's input has the wrong per-sample shape."""
    if isinstance(module, nn.Linear):
        ok, want = c.shape[-1] == module.in_features and c.dim() >= 2, f"(..., {module.in_features})"
    elif isinstance(module, nn.Conv2d):
        ok, want = c.dim() == 4 and c.shape[1] == module.in_channels, f"({module.in_channels}, H, W)"
    elif isinstance(module, nn.BatchNorm2d):
        ok, want = c.dim() == 4 and c.shape[1] == module.num_features, f"({module.num_features}, H, W)"
    elif isinstance(module, nn.BatchNorm1d):
        ok, want = c.dim() in (2, 3) and c.shape[1] == module.num_features, f"({module.num_features}[, L])"
    elif isinstance(module, nn.AvgPool2d):
        ok, want = c.dim() == 4, "(C, H, W)"
    else:
        return
    if not ok:
        raise ValueError(f"layer {position} ({module}) expects per-sample input of shape {want}, "
                         f"got {tuple(c.shape[1:])}")


@dataclass
class _Streams:
    """Stacked streams along the batch, B rows per block: ``c`` holds ``points`` point blocks (the
    natural input first, then the centres of l2 balls that have their own centre) followed by one
    block per interval spec (in ``order``); ``r`` holds the radii of the interval blocks. ``balls``
    maps each l2 spec that is still exact (before the first affine layer) to its eps (B,) and the
    point block of its centre; its axes are ``eps * scale``."""
    c: Tensor
    r: Tensor
    order: List[int]
    balls: Dict[int, Tuple[Tensor, int]] = field(default_factory=dict)
    scale: Optional[Tensor] = None  # (1 or B, *feature shape) or None for identity
    points: int = 1

    @property
    def batch(self) -> int:
        return self.c.shape[0] // (self.points + len(self.order))

    def point(self, j: int) -> Tensor:
        return self.c[self.batch * j: self.batch * (j + 1)]

    def natural(self) -> Tensor:
        return self.point(0)

    def intervals(self) -> Tensor:
        """The centres of all interval blocks."""
        return self.c[self.batch * self.points:]

    def block(self, k: int) -> Interval:
        B, i = self.batch, self.order.index(k)
        return self.c[B * (self.points + i): B * (self.points + i + 1)], self.r[B * i: B * (i + 1)]

    def ball_box(self, k: int) -> Interval:
        """Bounding box of pending ball ``k`` (intersected with its domain box when it has one)."""
        eps, j = self.balls[k]
        centre = self.point(j)
        axes = eps.view((-1,) + (1,) * (centre.dim() - 1))
        axes = axes if self.scale is None else axes * self.scale.abs()
        box = (centre, axes.expand_as(centre))
        return _intersect(box, self.block(k)) if k in self.order else box

    def resolved(self, n_specs: int, ball_bounds: Dict[int, Interval]) -> "_Streams":
        """All specs as interval blocks in spec order, pending balls replaced by ``ball_bounds``."""
        blocks = [ball_bounds[k] if k in ball_bounds else self.block(k) for k in range(n_specs)]
        c = torch.cat([self.natural()] + [b[0] for b in blocks])
        r = torch.cat([b[1] for b in blocks]) if blocks else c[:0]
        return _Streams(c, r, list(range(n_specs)))

    def materialized(self, n_specs: int) -> "_Streams":
        """The streams with every pending ball as its bounding box (for recording bounds)."""
        if not self.balls:
            return self
        return self.resolved(n_specs, {k: self.ball_box(k) for k in self.balls})

    def like(self, c: Tensor, r: Tensor, scale: Optional[Tensor] = None) -> "_Streams":
        """Streams with the same layout and pending balls, new tensors."""
        return _Streams(c, r, self.order, self.balls, scale, self.points)


class _Lazy:
    """A state inside a fused group of layers (see ``BoundedModule._fusable``), computed from the
    group's input only when asked for."""

    def __init__(self, compute: Callable[[], _Streams]):
        self._compute, self._value = compute, None

    def get(self) -> _Streams:
        if self._value is None:
            self._value = self._compute()
        return self._value


@dataclass
class Propagation:
    """What :meth:`BoundedModule.propagate` returns.

    Attributes:
        logits: natural output (B, K).
        bounds: per spec, ``(lower, upper)`` on the output, each (B, K).
        margins: per spec, lower bounds on ``z_y - z_j`` (B, K), 0 at ``j = y``; None without labels.
        layer_names: position of every layer of the flattened model.
    """
    logits: Tensor
    bounds: List[Interval]
    margins: Optional[List[Tensor]]
    layer_names: List[str]
    # the input of every layer, then the output (inside fused groups computed on request)
    _states: List[Union[_Streams, _Lazy]] = field(repr=False, default_factory=list)
    _relus: List[int] = field(repr=False, default_factory=list)

    def _state(self, i: int) -> _Streams:
        state = self._states[i]
        return state.get() if isinstance(state, _Lazy) else state

    def input_bounds(self, spec: int, layer: int) -> Interval:
        """Bounds ``(lower, upper)`` of spec number ``spec`` on the input of layer number ``layer``."""
        return _lower_upper(self._state(layer).block(spec))

    def layer_bounds(self, spec: int) -> List[Interval]:
        """Bounds ``(lower, upper)`` of spec number ``spec`` on the output of every layer, each (B, *shape)."""
        return [_lower_upper(self._state(i).block(spec)) for i in range(1, len(self._states))]

    def preactivation_bounds(self, spec: int) -> List[Interval]:
        """Bounds ``(lower, upper)`` of spec number ``spec`` on the input of every ReLU, in order."""
        return [_lower_upper(self._state(i).block(spec)) for i in self._relus]


def _lower_upper(interval: Interval) -> Interval:
    c, r = interval
    return c - r, c + r


def _spec_list(specs) -> List[Spec]:
    specs = [specs] if isinstance(specs, _Ball) else list(specs)
    for spec in specs:
        if not isinstance(spec, _Ball):
            raise TypeError(f"specs must be LinfBall / L2Ball objects, got {type(spec).__name__}")
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


def _fold_affines(linear: nn.Linear, affines: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """Weight and bias of ``linear`` followed by per-feature affines ``z * scale + shift``."""
    weight = linear.weight
    bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
    for scale, shift in affines:
        weight, bias = weight * scale[:, None], bias * scale + shift
    return weight, bias


def _margins_from_bounds(lower: Tensor, upper: Tensor, labels: Tensor) -> Tensor:
    """``l_y - u_j`` (0 at j = y): the margin bound when the specification cannot be folded."""
    margins = lower.gather(1, labels[:, None]) - upper
    return margins.scatter(1, labels[:, None], 0.0)


class BoundedModule(nn.Module):
    """Sound bound propagation through an ``nn.Sequential``, sharing the model's parameters.

    Supported layers: Conv2d (any stride, padding, dilation, groups; zero padding), Linear,
    BatchNorm1d/2d, ReLU, Flatten, AvgPool2d, Identity, Dropout and :class:`cure_fast.nn.Normalize`;
    nested ``nn.Sequential`` containers are flattened. In train mode BatchNorm normalizes every stream
    with the natural stream's batch statistics (and updates the running statistics once per call);
    in eval mode it uses the running statistics.

    A Linear / Conv2d with the eval-mode BatchNorm and / or ReLU after it, and a BatchNorm /
    Normalize with a ReLU after it, run as one op (the ``triton`` backend fuses them into one kernel);
    the bounds between those layers (``layer_bounds``, ``preactivation_bounds``) are computed when
    first asked for.

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
        layers = _flatten(model)
        if not layers:
            raise ValueError("BoundedModule needs a model with at least one layer")
        for position, module in layers:
            _check_layer(position, module)
        self.model = model
        self.backend = backend
        self.precision = None if precision is None else check_precision(precision)
        self.layer_names = [position for position, _ in layers]
        self._layers = [module for _, module in layers]
        self._spec_layer = self._find_spec_layer()
        affine = [i for i, m in enumerate(self._layers) if isinstance(m, (nn.Linear, nn.Conv2d))]
        self.first_affine = affine[0] if affine else None

    def _find_spec_layer(self) -> Optional[int]:
        """Index of the last Linear when only per-feature affine or shape-neutral layers follow it."""
        foldable = (nn.Identity, nn.Flatten, nn.Dropout, nn.BatchNorm1d, Normalize)
        for i in reversed(range(len(self._layers))):
            if isinstance(self._layers[i], nn.Linear):
                return i
            if not isinstance(self._layers[i], foldable):
                return None
        return None

    def forward(self, x: Tensor) -> Tensor:
        """The natural output, exactly ``model(x)``."""
        return self.model(x)

    def bounds(self, x: Tensor, spec: Spec) -> Interval:
        """``(lower, upper)`` on the output over the input set ``spec`` around x; each (B, K)."""
        return self.propagate(x, [spec]).bounds[0]

    def margins(self, x: Tensor, y: Tensor, spec: Spec, method: str = "ibp", **options) -> Tensor:
        """Lower bounds on ``z_y - z_j`` over ``spec`` around x, (B, K), 0 at ``j = y``; > 0 off y certifies.

        ``method``: ``"ibp"`` (this module's interval propagation), or ``"crown-ibp"``, ``"crown"``,
        ``"alpha-crown"`` (eval mode; ``options`` go to :func:`cure_fast.crown.crown_margins`).
        """
        if method == "ibp":
            if options:
                raise TypeError(f"options {sorted(options)} apply to the CROWN methods only, not to 'ibp'")
            return self.propagate(x, [spec], y).margins[0]
        from . import crown
        if method not in crown.METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of ibp, {', '.join(crown.METHODS)}")
        return crown.crown_margins(self, x, y, spec, method=method, **options)

    def propagate(self, x: Tensor, specs: Union[Spec, Sequence[Spec]] = (), y: Optional[Tensor] = None) -> Propagation:
        """One pass for the natural input and every spec, stacked along the batch.

        Args:
            x: inputs (B, ...), inside every spec's domain.
            specs: input sets (LinfBall / L2Ball), or one of them.
            y: optional labels (B,); when given, margins are returned too.
        Returns:
            a :class:`Propagation` with the logits (B, K), the bounds per spec, the margins per spec
            when ``y`` is given, and the bounds of every layer (``layer_bounds``, ``preactivation_bounds``).
        """
        specs = _spec_list(specs)
        _check_input(x, specs)
        if y is not None and (not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point()):
            raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},), got {getattr(y, 'shape', y)}")
        streams = self._input_streams(x, specs)
        states, tail, penultimate = [streams.materialized(len(specs))], [], None
        i = 0
        while i < len(self._layers):
            if i == self._spec_layer:
                penultimate = streams
            size = self._fusable(i, streams)
            if size > 1:
                streams, inside = self._fused_step(i, size, streams)
                states += inside + [streams]
            else:
                streams, affine = self._step(self.layer_names[i], self._layers[i], streams, len(specs))
                if affine is not None and self._spec_layer is not None and i > self._spec_layer:
                    tail.append(affine)
                states.append(streams.materialized(len(specs)))
            i += size
        out = states[-1]
        bounds = [_lower_upper(out.block(k)) for k in range(len(specs))]
        margins = None
        if y is not None:
            margins = self._margins(out, penultimate, tail, specs, bounds, y.long())
        relus = [i for i, m in enumerate(self._layers) if isinstance(m, nn.ReLU)]
        return Propagation(out.natural(), bounds, margins, self.layer_names, states, relus)

    def _input_streams(self, x: Tensor, specs: List[Spec]) -> _Streams:
        boxes = [spec.domain_box(x) for spec in specs]
        order = [k for k, box in enumerate(boxes) if box is not None]
        l2 = [k for k, spec in enumerate(specs) if isinstance(spec, L2Ball)]
        centred = [k for k in l2 if specs[k].center is not None]
        c = torch.cat([x] + [specs[k].center_for(x) for k in centred] + [boxes[k][0] for k in order])
        r = torch.cat([boxes[k][1] for k in order]) if order else x[:0]
        balls = {k: (specs[k].per_sample_eps(x).reshape(-1), 1 + centred.index(k) if k in centred else 0) for k in l2}
        return _Streams(c, r, order, balls, points=1 + len(centred))

    def _fusable(self, i: int, s: _Streams) -> int:
        """How many layers from ``i`` on run as one op: a Linear / Conv2d with the eval-mode
        BatchNorm after it (folded into its epilogue) and / or a ReLU, or a BatchNorm / Normalize
        with a ReLU. Not while l2 balls are pending, nor at the layer the specification folds into."""
        layers, j = self._layers, i + 1
        if s.balls or i == self._spec_layer:
            return 1
        if isinstance(layers[i], (nn.Linear, nn.Conv2d)):
            bn = nn.BatchNorm2d if isinstance(layers[i], nn.Conv2d) else nn.BatchNorm1d
            if (j < len(layers) and type(layers[j]) is bn and not layers[j].training
                    and layers[j].running_mean is not None and layers[j].num_features == layers[i].weight.shape[0]
                    and (bn is nn.BatchNorm2d or s.c.dim() == 2)):
                j += 1
        elif not isinstance(layers[i], (Normalize,) + _BATCHNORM):
            return 1
        if j < len(layers) and isinstance(layers[j], nn.ReLU):
            j += 1
        return j - i

    def _fused_step(self, i: int, size: int, s: _Streams) -> Tuple[_Streams, List[_Lazy]]:
        """Layers ``i .. i + size - 1`` (see :meth:`_fusable`) as one op; returns the output streams and
        the states between the layers, computed only if asked for."""
        layers = self._layers[i: i + size]
        _check_input_shape(self.layer_names[i], layers[0], s.c)
        affine_layer = isinstance(layers[0], (nn.Linear, nn.Conv2d))
        norm = [m for m in layers if isinstance(m, (Normalize,) + _BATCHNORM)]
        affine = _channel_affine(norm[0], s.natural(), self.backend) if norm else None

        def through(k: int) -> _Streams:
            """The streams after the group's first k layers."""
            relu = isinstance(layers[k - 1], nn.ReLU)
            if not affine_layer:
                return s.like(*BF.interval_affine(s.c, s.r, *affine, relu=relu, backend=self.backend))
            folded = affine if any(isinstance(m, _BATCHNORM) for m in layers[:k]) else None
            return s.like(*_affine(layers[0], s.c, s.r, self.backend, self.precision, folded, relu))

        return through(size), [_Lazy(functools.partial(through, k)) for k in range(1, size)]

    def _step(self, position: str, module: nn.Module, s: _Streams, n_specs: int):
        """Apply one layer to all streams; returns the new streams and the (scale, shift) of a
        per-channel affine layer (None otherwise)."""
        _check_input_shape(position, module, s.c)
        backend = self.backend
        if isinstance(module, nn.Linear) and s.balls and s.c.dim() != 2:
            s = s.resolved(n_specs, {k: s.ball_box(k) for k in s.balls})
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            out = s.like(*_affine(module, s.c, s.r, backend, self.precision))
            if not s.balls:
                return out, None
            balls = {}
            for k, (eps, j) in s.balls.items():
                ball = _l2_affine(module, s.point(j), eps, s.scale, backend, self.precision)
                balls[k] = _intersect(ball, out.block(k)) if k in out.order else ball
            return out.resolved(n_specs, balls), None
        if isinstance(module, (Normalize,) + _BATCHNORM):
            scale, shift = _channel_affine(module, s.natural(), backend)
            c, r = BF.interval_affine(s.c, s.r, scale, shift, backend=backend)
            axes = s.scale
            if s.balls:
                channel = scale.abs().view((1, -1) + (1,) * (s.c.dim() - 2))
                axes = channel if axes is None else axes * channel
            return s.like(c, r, axes), (scale, shift)
        if isinstance(module, nn.Flatten):
            axes = None
            if s.scale is not None:
                axes = module(s.scale.expand((s.scale.shape[0],) + s.c.shape[1:]))
            return s.like(module(s.c), module(s.r), axes), None
        if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not (module.training and module.p > 0)):
            return s, None
        if isinstance(module, nn.Dropout):
            return _dropout(module.p, s), None
        if s.balls:  # ReLU, AvgPool2d: an ellipsoid does not map to an ellipsoid; bound it by its box
            s = s.resolved(n_specs, {k: s.ball_box(k) for k in s.balls})
        if isinstance(module, nn.ReLU):
            return s.like(*BF.interval_relu(s.c, s.r, backend=backend)), None
        # AvgPool2d: linear with non-negative weights, so exact on (c, r) separately.
        return s.like(module(s.c), module(s.r)), None

    def _margins(self, out: _Streams, pen: Optional[_Streams], tail, specs, bounds, labels: Tensor) -> List[Tensor]:
        logits = out.natural()
        if logits.dim() != 2:
            raise ValueError(f"margins need a (B, K) output, the model gives {tuple(logits.shape)}")
        low, high = (float(v) for v in torch.aminmax(labels))
        if low < 0 or high >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got values in [{low:g}, {high:g}]")
        foldable = pen is not None and pen.c.dim() == 2 and not any(
            isinstance(m, nn.Dropout) and m.training and m.p > 0 for m in self._layers[self._spec_layer:])
        if not foldable:
            return [_margins_from_bounds(lo, hi, labels) for lo, hi in bounds]
        weight, bias = _fold_affines(self._layers[self._spec_layer], tail)
        per_block = {}
        if pen.order:
            folded = BF.margins_linear(pen.intervals(), pen.r, weight, bias, labels.repeat(len(pen.order)),
                                       backend=self.backend, precision=self.precision)
            per_block = dict(zip(pen.order, folded.chunk(len(pen.order))))
        margins = []
        for k in range(len(specs)):
            if k in pen.balls:
                eps, j = pen.balls[k]
                ball = BF.l2_margins_linear(pen.point(j), eps, weight, bias, labels, pen.scale, backend=self.backend,
                                            precision=self.precision)
                margins.append(torch.maximum(ball, per_block[k]) if k in per_block else ball)
            else:
                margins.append(per_block[k])
        return margins

    def extra_repr(self) -> str:
        return f"backend={self.backend or 'default'}"


def _affine(module: nn.Module, c: Tensor, r: Tensor, backend: Optional[str], precision: Optional[str],
            affine: Optional[Tuple[Tensor, Tensor]] = None, relu: bool = False) -> Interval:
    """A Linear / Conv2d layer on (c, r), then the per-channel ``affine`` (scale, shift) and the ReLU if given."""
    scale, shift = affine if affine is not None else (None, None)
    epilogue = dict(scale=scale, shift=shift, relu=relu, backend=backend, precision=precision)
    if isinstance(module, nn.Linear):
        return BF.interval_linear(c, r, module.weight, module.bias, **epilogue)
    return BF.interval_conv2d(c, r, module.weight, module.bias, module.stride, module.padding,
                              module.dilation, module.groups, **epilogue)


def _l2_affine(module: nn.Module, x: Tensor, eps: Tensor, scale: Optional[Tensor], backend: Optional[str],
               precision: Optional[str]) -> Interval:
    if isinstance(module, nn.Linear):
        return BF.l2_linear(x, eps, module.weight, module.bias, scale, backend=backend, precision=precision)
    return BF.l2_conv2d(x, eps, module.weight, module.bias, module.stride, module.padding, module.dilation,
                        module.groups, scale, backend=backend, precision=precision)


def _dropout(p: float, s: _Streams) -> _Streams:
    """Train-mode dropout: one mask per sample, shared by all streams (and the pending balls' axes)."""
    natural = s.natural()
    mask = torch.zeros_like(natural) if p >= 1 else torch.empty_like(natural).bernoulli_(1 - p) / (1 - p)
    c = (s.c.view((-1,) + natural.shape) * mask).view_as(s.c)
    r = (s.r.view((-1,) + natural.shape) * mask).view_as(s.r) if s.r.shape[0] else s.r
    axes = None if not s.balls else (mask if s.scale is None else s.scale * mask)
    return s.like(c, r, axes)
