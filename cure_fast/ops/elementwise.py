"""Element-wise and per-channel interval ops: the interval ReLU, per-channel affines (BatchNorm,
Normalize) with the ReLU fused, and the train-mode BatchNorm statistics of the natural stream."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .common import Interval, check_interval
from .registry import dispatch, dispatch_simple, implementation, register


@register("interval_relu", "torch")
def interval_relu_ref(c: Tensor, r: Tensor) -> Interval:
    """ReLU of an interval: ``(relu(u) + relu(l)) / 2, (relu(u) - relu(l)) / 2``; shapes kept."""
    n_points = c.shape[0] - r.shape[0]
    lower = (c[n_points:] - r).relu()
    upper = (c[n_points:] + r).relu()
    return torch.cat([c[:n_points].relu(), (upper + lower) / 2]), (upper - lower) / 2


@register("interval_affine", "torch")
def interval_affine_ref(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor) -> Interval:
    """Per-channel affine ``c * scale + shift`` (channels on dim 1; scale, shift (C,)), ``r * |scale|``."""
    shape = (1, -1) + (1,) * (c.dim() - 2)
    return c * scale.view(shape) + shift.view(shape), r * scale.abs().view(shape)


@register("batch_norm_stats", "torch")
def batch_norm_stats_ref(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, *) over every dim but 1 -> (C,), (C,)."""
    var, mean = torch.var_mean(x, [0] + list(range(2, x.dim())), correction=0)
    return mean, var


def batch_norm_stats_grad(x: Tensor, mean: Tensor, grad_mean: Optional[Tensor],
                          grad_var: Optional[Tensor]) -> Tensor:
    """Gradient w.r.t. x (N, C, *) of (mean, biased var) per channel, given theirs (C,) or None."""
    count = x.numel() // max(x.shape[1], 1)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    grad = torch.zeros_like(x, dtype=mean.dtype)
    if grad_mean is not None:
        grad = grad + (grad_mean / count).view(shape)
    if grad_var is not None:
        grad = grad + (2 * grad_var / count).view(shape) * (x.to(mean.dtype) - mean.view(shape))
    return grad.to(x.dtype)


def interval_relu(c: Tensor, r: Tensor, *, backend: Optional[str] = None) -> Interval:
    """Interval image of ReLU: ``l' = relu(c - r)``, ``u' = relu(c + r)`` in centre–radius form; shapes kept."""
    check_interval("interval_relu", c, r)
    return dispatch_simple("interval_relu", backend, c, c, r)


def interval_affine(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor, *, relu: bool = False,
                    backend: Optional[str] = None) -> Interval:
    """Per-channel affine (BatchNorm, Normalize): ``c * scale + shift``, ``r * |scale|``; scale, shift (C,), channels on dim 1.

    With ``relu``, the interval ReLU follows (fused by the ``triton`` and ``cuda`` backends).
    """
    check_interval("interval_affine", c, r)
    if c.dim() < 2 or scale.shape != (c.shape[1],) or shift.shape != (c.shape[1],):
        raise ValueError(f"interval_affine: scale and shift must have shape ({c.shape[1] if c.dim() > 1 else '?'},), "
                         f"got {tuple(scale.shape)} and {tuple(shift.shape)} for input {tuple(c.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dtype != c.dtype or t.device != c.device:
            raise ValueError(f"interval_affine: {name} must have the input's dtype and device ({c.dtype}, {c.device}), "
                             f"got {t.dtype}, {t.device}")

    def call(name: str) -> Interval:
        impl = implementation("interval_affine", name)
        if name != "torch":
            return impl(c, r, scale, shift, relu=relu)
        out = impl(c, r, scale, shift)
        return interval_relu(*out, backend=name) if relu else out

    return dispatch("interval_affine", backend, c, call, (c, r, scale, shift, relu))


def batch_norm_stats(x: Tensor, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Train-mode BatchNorm statistics: per-channel mean and biased variance of x (N, C, *) over
    every dim but 1 (BoundedModule passes the natural stream) -> (C,), (C,); differentiable."""
    if not x.is_floating_point():
        raise TypeError(f"batch_norm_stats: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 2 or x.numel() == 0:
        raise ValueError(f"batch_norm_stats: expected a non-empty (N, C, *) input, got shape {tuple(x.shape)}")
    return dispatch_simple("batch_norm_stats", backend, x, x)
