"""Shared pieces of the ops and of every backend: input checks and small exact-math helpers.

Intervals are in centre–radius form ``(c, r)`` (docs/design.md, "Intervals"). ``r`` may have fewer
rows than ``c``: it then holds the radii of the *last* ``r.shape[0]`` rows of ``c``, and the
leading rows are points (radius 0) — how the natural stream rides along with the input sets.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

Interval = Tuple[Tensor, Tensor]
IntOrPair = Union[int, Tuple[int, int]]
Eps = Union[float, Tensor]


def check_interval(op: str, c: Tensor, r: Tensor, dims: Optional[int] = None) -> None:
    """A clear error unless (c, r) is an interval of floating tensors: r with c's trailing shape, at most as many rows."""
    if not (c.is_floating_point() and r.is_floating_point()):
        raise TypeError(f"{op}: c and r must be floating tensors, got {c.dtype} and {r.dtype}")
    if c.dtype != r.dtype or c.device != r.device:
        raise ValueError(f"{op}: c and r must share dtype and device, got {c.dtype}/{c.device} and {r.dtype}/{r.device}")
    if dims is not None and c.dim() != dims:
        raise ValueError(f"{op}: expected {dims}-d input, got shape {tuple(c.shape)}")
    if r.dim() != c.dim() or r.shape[1:] != c.shape[1:] or r.shape[0] > c.shape[0]:
        raise ValueError(f"{op}: r must have c's trailing shape and at most as many rows; "
                         f"got c {tuple(c.shape)}, r {tuple(r.shape)}")


def check_features(op: str, features: int, expected: int, what: str) -> None:
    if features != expected:
        raise ValueError(f"{op}: the weight expects {expected} {what}, the input has {features}")


def check_epilogue(op: str, c: Tensor, features: int, scale: Optional[Tensor], shift: Optional[Tensor]) -> None:
    """A clear error unless scale and shift are both None or both (features,) tensors like c."""
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: give both scale and shift, or neither")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and (t.shape != (features,) or t.dtype != c.dtype or t.device != c.device):
            raise ValueError(f"{op}: {name} must have shape ({features},) and the input's dtype and device "
                             f"({c.dtype}, {c.device}), got {tuple(t.shape)} {t.dtype} {t.device}")


def check_l2(op: str, x: Tensor, eps: Eps, scale: Optional[Tensor] = None) -> None:
    """A clear error unless x is floating, eps a finite non-negative float or (B,) tensor, scale broadcastable to x."""
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


def check_labels(op: str, labels: Tensor, rows: int, classes: int) -> None:
    if labels.shape != (rows,) or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: labels must be integers of shape ({rows},), got {labels.dtype} {tuple(labels.shape)}")
    if rows and not bool(((labels >= 0) & (labels < classes)).all()):
        raise ValueError(f"{op}: labels must lie in [0, {classes})")


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for x >= 0 whose gradient at 0 is 0 instead of inf."""
    positive = x > 0
    return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


def batched_eps(eps: Eps, x: Tensor, dims: int) -> Tensor:
    """eps (float or (B,)) as a tensor of shape (B or 1, 1, ..., 1) with ``dims`` dimensions."""
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    return eps.reshape(-1, *([1] * (dims - 1)))


def scale_power(scale: Optional[Tensor], x: Tensor, power: int) -> Tensor:
    """``|scale| ** power`` (an ellipsoid's axis scale), shaped (1 or B, *x.shape[1:]); ones when ``scale`` is None."""
    if scale is None:
        return x.new_ones((1,) + x.shape[1:])
    s = scale.to(x.dtype).abs() ** power
    s = s.reshape((1,) * (x.dim() - s.dim()) + tuple(s.shape))
    return s.expand((s.shape[0],) + x.shape[1:])


def scale_squared(scale: Optional[Tensor], x: Tensor) -> Tensor:
    """Squared ellipsoid axis scale, shaped (1 or B, *x.shape[1:]); ones when ``scale`` is None."""
    return scale_power(scale, x, 2)
