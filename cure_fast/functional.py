"""Per-layer bound-propagation ops on intervals ``(c, r)``, each dispatched to a backend.

Every op takes ``backend=`` (``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or None for the
default, see :mod:`cure_fast.backends`). ``r`` may have fewer rows than ``c``: it then holds the
radii of the last ``r.shape[0]`` rows and the leading rows are points (the natural stream).
The ops with dot products take ``precision=`` (``"ieee"``, ``"tf32"``, ``"bf16"``, or None for
:func:`cure_fast.backends.get_precision`). ``interval_linear`` / ``interval_conv2d`` take an
optional epilogue (a per-output-feature affine ``scale``, ``shift`` and ``relu``) that the
``triton`` and ``cuda`` backends fuse into the kernel and the ``torch`` backend applies after the op. All ops are differentiable.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _cuda, backends, reference

Interval = Tuple[Tensor, Tensor]
IntOrPair = Union[int, Tuple[int, int]]

_IMPLS: Dict[str, Dict[str, Callable]] = {
    "interval_linear": {"torch": reference.interval_linear_ref},
    "interval_conv2d": {"torch": reference.interval_conv2d_ref},
    "interval_relu": {"torch": reference.interval_relu_ref, "cuda": _cuda.interval_relu},
    "interval_affine": {"torch": reference.interval_affine_ref},
    "l2_linear": {"torch": reference.l2_linear_ref},
    "l2_conv2d": {"torch": reference.l2_conv2d_ref},
    "margins_linear": {"torch": reference.margins_linear_ref},
    "l2_margins_linear": {"torch": reference.l2_margins_linear_ref},
    "batch_norm_stats": {"torch": reference.batch_norm_stats_ref},
}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator making ``fn`` the ``backend`` implementation of ``op``."""
    def wrap(fn: Callable) -> Callable:
        _IMPLS[op][backend] = fn
        return fn
    return wrap


def _triton_loader(op: str) -> Callable:
    """Stand-in for the Triton implementation of ``op``: the first call imports cure_fast.kernels
    (and triton), whose functions register themselves in its place."""
    def load(*args, **kwargs):
        from . import kernels  # noqa: F401
        impl = _IMPLS[op]["triton"]
        if impl is load:
            raise NotImplementedError(f"cure_fast.kernels does not register {op}")
        return impl(*args, **kwargs)
    return load


for _op in _IMPLS:  # every op has a Triton implementation; triton is imported on first use only
    _IMPLS[_op]["triton"] = _triton_loader(_op)


def _dispatch(op: str, backend: Optional[str], like: Tensor, call: Callable[[str], object], call_args,
              precision: str = "ieee"):
    """Run ``op``: ``call(name)`` computes it on backend ``name``; ``auto`` may measure every
    backend on this call (``call_args`` are its arguments, see :mod:`cure_fast.autoselect`)."""
    name = backends.select(op, _IMPLS[op], backend, like.device, call, call_args, precision)
    return call(name)


def _precision(precision: Optional[str]) -> str:
    return backends.get_precision() if precision is None else backends.check_precision(precision)


def _honoured(precision: str, device: torch.device):
    """Run torch ops with TF32 off when ``precision`` is ``ieee`` on a CUDA device."""
    if precision != "ieee" or device.type != "cuda":
        return contextlib.nullcontext()
    return backends.library_tf32(False)


# Backends whose implementations take ``precision=`` and the epilogue keywords (and fuse the
# epilogue); the others run under _honoured(precision), the epilogue after them as separate ops.
_FUSING = {"triton", "cuda"}


def _run_dot_op(op: str, backend: Optional[str], like: Tensor, precision: Optional[str], args: tuple,
                channel_dim: int = -1, **epilogue):
    """Run a dot-product op with its optional epilogue (``scale``, ``shift``, ``relu``)."""
    precision = _precision(precision)

    def call(name: str):
        impl = _IMPLS[op][name]
        if name in _FUSING:
            return impl(*args, **epilogue, precision=precision)
        with _honoured(precision, like.device):
            out = impl(*args)
        return _epilogue(out, channel_dim=channel_dim, backend=name, **epilogue) if epilogue else out

    return _dispatch(op, backend, like, call, (args, epilogue), precision)


def _check_interval(op: str, c: Tensor, r: Tensor, dims: Optional[int] = None) -> None:
    if not (c.is_floating_point() and r.is_floating_point()):
        raise TypeError(f"{op}: c and r must be floating tensors, got {c.dtype} and {r.dtype}")
    if c.dtype != r.dtype or c.device != r.device:
        raise ValueError(f"{op}: c and r must share dtype and device, got {c.dtype}/{c.device} and {r.dtype}/{r.device}")
    if dims is not None and c.dim() != dims:
        raise ValueError(f"{op}: expected {dims}-d input, got shape {tuple(c.shape)}")
    if r.dim() != c.dim() or r.shape[1:] != c.shape[1:] or r.shape[0] > c.shape[0]:
        raise ValueError(f"{op}: r must have c's trailing shape and at most as many rows; "
                         f"got c {tuple(c.shape)}, r {tuple(r.shape)}")


def _check_features(op: str, features: int, expected: int, what: str) -> None:
    if features != expected:
        raise ValueError(f"{op}: the weight expects {expected} {what}, the input has {features}")


def _check_epilogue(op: str, c: Tensor, features: int, scale: Optional[Tensor], shift: Optional[Tensor]) -> None:
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: give both scale and shift, or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.shape != (features,) or t.dtype != c.dtype or t.device != c.device):
            raise ValueError(f"{op}: {name} must have shape ({features},) and the input's dtype and device "
                             f"({c.dtype}, {c.device}), got {tuple(t.shape)} {t.dtype} {t.device}")


def _epilogue(out: Interval, scale: Optional[Tensor], shift: Optional[Tensor], relu: bool, channel_dim: int,
              backend: str) -> Interval:
    """The epilogue of interval_linear / interval_conv2d as separate ops (backends that do not fuse it)."""
    c, r = out
    if scale is not None:
        shape = [1] * c.dim()
        shape[channel_dim] = -1
        c, r = c * scale.view(shape) + shift.view(shape), r * scale.abs().view(shape)
    return interval_relu(c, r, backend=backend) if relu else (c, r)


def interval_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    backend: Optional[str] = None, precision: Optional[str] = None) -> Interval:
    """Interval image of ``x W^T + b``: c (N, *, in), r (M, *, in), weight (out, in) -> (N, *, out), (M, *, out).

    Optional epilogue: ``* scale + shift`` per output feature (both (out,), e.g. a folded BatchNorm),
    then the interval ReLU when ``relu``.
    """
    _check_interval("interval_linear", c, r)
    _check_features("interval_linear", c.shape[-1], weight.shape[1], "input features")
    _check_epilogue("interval_linear", c, weight.shape[0], scale, shift)
    return _run_dot_op("interval_linear", backend, c, precision, (c, r, weight, bias), -1,
                       scale=scale, shift=shift, relu=relu)


def interval_conv2d(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                    groups: int = 1, *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                    relu: bool = False, backend: Optional[str] = None, precision: Optional[str] = None) -> Interval:
    """Interval image of a 2-d convolution: c (N, C, H, W), r (M, C, H, W) -> (N, O, H', W'), (M, O, H', W').

    Optional epilogue: ``* scale + shift`` per output channel (both (O,), e.g. a folded BatchNorm),
    then the interval ReLU when ``relu``.
    """
    _check_interval("interval_conv2d", c, r, dims=4)
    _check_features("interval_conv2d", c.shape[1], weight.shape[1] * groups, "input channels")
    _check_epilogue("interval_conv2d", c, weight.shape[0], scale, shift)
    return _run_dot_op("interval_conv2d", backend, c, precision,
                       (c, r, weight, bias, stride, padding, dilation, groups), 1,
                       scale=scale, shift=shift, relu=relu)


def interval_relu(c: Tensor, r: Tensor, *, backend: Optional[str] = None) -> Interval:
    """Interval image of ReLU: ``l' = relu(c - r)``, ``u' = relu(c + r)`` in centre–radius form; shapes kept."""
    _check_interval("interval_relu", c, r)
    return _dispatch("interval_relu", backend, c, lambda name: _IMPLS["interval_relu"][name](c, r), (c, r))


def interval_affine(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor, *, relu: bool = False,
                    backend: Optional[str] = None) -> Interval:
    """Per-channel affine (BatchNorm, Normalize): ``c * scale + shift``, ``r * |scale|``; scale, shift (C,), channels on dim 1.

    With ``relu``, the interval ReLU follows (fused by the ``triton`` and ``cuda`` backends).
    """
    _check_interval("interval_affine", c, r)
    if c.dim() < 2 or scale.shape != (c.shape[1],) or shift.shape != (c.shape[1],):
        raise ValueError(f"interval_affine: scale and shift must have shape ({c.shape[1] if c.dim() > 1 else '?'},), "
                         f"got {tuple(scale.shape)} and {tuple(shift.shape)} for input {tuple(c.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dtype != c.dtype or t.device != c.device:
            raise ValueError(f"interval_affine: {name} must have the input's dtype and device ({c.dtype}, {c.device}), "
                             f"got {t.dtype}, {t.device}")

    def call(name: str) -> Interval:
        impl = _IMPLS["interval_affine"][name]
        if name in _FUSING:
            return impl(c, r, scale, shift, relu=relu)
        out = impl(c, r, scale, shift)
        return interval_relu(*out, backend=name) if relu else out

    return _dispatch("interval_affine", backend, c, call, (c, r, scale, shift, relu))


def batch_norm_stats(x: Tensor, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Train-mode BatchNorm statistics: per-channel mean and biased variance of x (N, C, *) over
    every dim but 1 (BoundedModule passes the natural stream) -> (C,), (C,); differentiable."""
    if not x.is_floating_point():
        raise TypeError(f"batch_norm_stats: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"batch_norm_stats: expected a non-empty (N, C, *) input, got shape {tuple(x.shape)}")
    return _dispatch("batch_norm_stats", backend, x, lambda name: _IMPLS["batch_norm_stats"][name](x), (x,))


def _check_l2(op: str, x: Tensor, eps: Union[float, Tensor], scale: Optional[Tensor] = None) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {x.dtype}")
    if isinstance(eps, Tensor) and not (eps.dim() == 0 or eps.shape == (x.shape[0],)):
        raise ValueError(f"{op}: eps must be a float or a tensor of shape ({x.shape[0]},), got {tuple(eps.shape)}")
    if not bool(torch.isfinite(torch.as_tensor(eps)).all() and (torch.as_tensor(eps) >= 0).all()):
        raise ValueError(f"{op}: eps must be finite and non-negative")
    if scale is not None:
        try:
            broadcast = torch.broadcast_shapes(scale.shape, x.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != x.shape:
            raise ValueError(f"{op}: scale of shape {tuple(scale.shape)} does not broadcast to x's shape {tuple(x.shape)}")


def l2_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[Tensor] = None, *, backend: Optional[str] = None,
              precision: Optional[str] = None) -> Interval:
    """Exact bounds of a linear layer over the l2 ball (ellipsoid) ``{x + scale ⊙ u : |u|_2 <= eps}``.

    x (B, in), eps float or (B,), scale None or broadcastable to x -> c (B, out), r (B, out) with
    ``r_i = eps * |W_i ⊙ scale|_2``.
    """
    _check_l2("l2_linear", x, eps, scale)
    if x.dim() != 2:
        raise ValueError(f"l2_linear: expected x of shape (B, in), got {tuple(x.shape)}")
    _check_features("l2_linear", x.shape[1], weight.shape[1], "input features")
    return _run_dot_op("l2_linear", backend, x, precision, (x, eps, weight, bias, scale))


def l2_conv2d(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
              groups: int = 1, scale: Optional[Tensor] = None, *, backend: Optional[str] = None,
              precision: Optional[str] = None) -> Interval:
    """Exact, padding-aware bounds of a convolution over ``{x + scale ⊙ u : |u|_2 <= eps}``.

    x (B, C, H, W), eps float or (B,), scale None or broadcastable to x -> c, r (B, O, H', W') with
    ``r = eps * sqrt(conv(scale^2, W^2))``: at the border only the weights inside the image count.
    """
    _check_l2("l2_conv2d", x, eps, scale)
    if x.dim() != 4:
        raise ValueError(f"l2_conv2d: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    _check_features("l2_conv2d", x.shape[1], weight.shape[1] * groups, "input channels")
    return _run_dot_op("l2_conv2d", backend, x, precision,
                       (x, eps, weight, bias, stride, padding, dilation, groups, scale))


def _check_labels(op: str, labels: Tensor, rows: int, classes: int) -> None:
    if labels.shape != (rows,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: labels must be integers of shape ({rows},), got {labels.dtype} {tuple(labels.shape)}")
    if rows and not bool(((labels >= 0) & (labels < classes)).all()):
        raise ValueError(f"{op}: labels must lie in [0, {classes})")


def margins_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                   backend: Optional[str] = None, precision: Optional[str] = None) -> Tensor:
    """Lower bounds on the margins ``z_y - z_j`` of a last linear layer, the specification folded in.

    c (N, in), r (M, in), weight (K, in), bias (K,) or None, labels (N,) int -> (N, K), 0 at ``j = y``.
    """
    _check_interval("margins_linear", c, r, dims=2)
    _check_features("margins_linear", c.shape[1], weight.shape[1], "input features")
    _check_labels("margins_linear", labels, c.shape[0], weight.shape[0])
    return _run_dot_op("margins_linear", backend, c, precision, (c, r, weight, bias, labels.long()))


def l2_margins_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      scale: Optional[Tensor] = None, *, backend: Optional[str] = None,
                      precision: Optional[str] = None) -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``.

    x (B, in), eps float or (B,), weight (K, in), labels (B,) int -> (B, K), 0 at ``j = y``.
    """
    _check_l2("l2_margins_linear", x, eps, scale)
    if x.dim() != 2:
        raise ValueError(f"l2_margins_linear: expected x of shape (B, in), got {tuple(x.shape)}")
    _check_features("l2_margins_linear", x.shape[1], weight.shape[1], "input features")
    _check_labels("l2_margins_linear", labels, x.shape[0], weight.shape[0])
    return _run_dot_op("l2_margins_linear", backend, x, precision, (x, eps, weight, bias, labels.long(), scale))
