"""Pure-PyTorch reference implementations of every bound-propagation op (the ``torch`` backend).

Intervals are in centre–radius form ``(c, r)``. ``r`` may have fewer rows than ``c``: it then
holds the radii of the *last* ``r.shape[0]`` rows of ``c``, and the leading rows are points
(radius 0). This is how the natural stream rides along with the input sets at no radius cost.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Interval = Tuple[Tensor, Tensor]
IntOrPair = Union[int, Tuple[int, int]]


def interval_linear_ref(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Interval:
    """``(c W^T + b, r |W|^T)``: c (N, *, in), r (M, *, in), weight (out, in) -> (N, *, out), (M, *, out)."""
    return F.linear(c, weight, bias), F.linear(r, weight.abs())


def interval_conv2d_ref(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0,
                        dilation: IntOrPair = 1, groups: int = 1) -> Interval:
    """``(conv(c, W) + b, conv(r, |W|))``: c (N, C, H, W), r (M, C, H, W) -> (N, O, H', W'), (M, O, H', W')."""
    c_out = F.conv2d(c, weight, bias, stride, padding, dilation, groups)
    r_out = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    return c_out, r_out


def interval_relu_ref(c: Tensor, r: Tensor) -> Interval:
    """ReLU of an interval: ``(relu(u) + relu(l)) / 2, (relu(u) - relu(l)) / 2``; shapes kept."""
    n_points = c.shape[0] - r.shape[0]
    lower = (c[n_points:] - r).relu()
    upper = (c[n_points:] + r).relu()
    return torch.cat([c[:n_points].relu(), (upper + lower) / 2]), (upper - lower) / 2


def interval_affine_ref(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor) -> Interval:
    """Per-channel affine ``c * scale + shift`` (channels on dim 1; scale, shift (C,)), ``r * |scale|``."""
    shape = (1, -1) + (1,) * (c.dim() - 2)
    return c * scale.view(shape) + shift.view(shape), r * scale.abs().view(shape)


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


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` for x >= 0 whose gradient at 0 is 0 instead of inf."""
    positive = x > 0
    return torch.where(positive, x, torch.ones_like(x)).sqrt() * positive


def _batched_eps(eps: Union[float, Tensor], x: Tensor, dims: int) -> Tensor:
    """eps (float or (B,)) as a tensor of shape (B or 1, 1, ..., 1) with ``dims`` dimensions."""
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    return eps.reshape(-1, *([1] * (dims - 1)))


def _scale_squared(scale: Optional[Tensor], x: Tensor) -> Tensor:
    """Squared ellipsoid axis scale, shaped (1 or B, *x.shape[1:]); ones when ``scale`` is None."""
    if scale is None:
        return x.new_ones((1,) + x.shape[1:])
    s2 = scale.to(x.dtype).square()
    s2 = s2.reshape((1,) * (x.dim() - s2.dim()) + tuple(s2.shape))
    return s2.expand((s2.shape[0],) + x.shape[1:])


def l2_linear_ref(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None) -> Interval:
    """Exact bounds of a linear layer over the ellipsoid ``{x + s ⊙ u : |u|_2 <= eps}``.

    ``c = x W^T + b``, ``r_i = eps * |W_i ⊙ s|_2`` (the dual norm). x (B, in), eps float or (B,),
    scale ``s`` None or broadcastable to x -> c (B, out), r (B, out).
    """
    radius = _safe_sqrt(F.linear(_scale_squared(scale, x), weight.square()))  # (1 or B, out)
    r = (_batched_eps(eps, x, 2) * radius).expand(x.shape[0], weight.shape[0])
    return F.linear(x, weight, bias), r


def l2_conv2d_ref(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                  stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                  groups: int = 1, scale: Optional[Tensor] = None) -> Interval:
    """Exact, padding-aware bounds of a conv layer over the ellipsoid ``{x + s ⊙ u : |u|_2 <= eps}``.

    ``r[o, p, q] = eps * sqrt(conv(s^2, W^2)[o, p, q])``: only the weights that touch the image at
    each output position count. x (B, C, H, W), scale None or broadcastable to x -> (B, O, H', W') twice.
    """
    c = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    radius = _safe_sqrt(F.conv2d(_scale_squared(scale, x), weight.square(), None, stride, padding, dilation, groups))
    return c, (_batched_eps(eps, x, 4) * radius).expand_as(c)


def margins_linear_ref(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
    """Lower bounds on ``z_y - z_j`` with the specification ``e_y - e_j`` folded into the last layer.

    ``m_j = (W_y - W_j) c + b_y - b_j - |W_y - W_j| r``. c (N, in), r (M, in), weight (K, in),
    labels (N,) int64 -> (N, K), exactly 0 at ``j = y``.
    """
    logits = F.linear(c, weight, bias)
    centre = logits.gather(1, labels[:, None]) - logits
    n_points = c.shape[0] - r.shape[0]
    rows = weight[labels[n_points:]]  # (M, in)
    spread = torch.einsum("mki,mi->mk", (rows[:, None, :] - weight[None]).abs(), r)
    return torch.cat([centre[:n_points], centre[n_points:] - spread])


def l2_margins_linear_ref(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor],
                          labels: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``.

    ``m_j = (W_y - W_j) x + b_y - b_j - eps * |(W_y - W_j) ⊙ scale|_2``. x (B, in), eps float or (B,),
    weight (K, in), labels (B,) int64 -> (B, K), exactly 0 at ``j = y``.
    """
    logits = F.linear(x, weight, bias)
    centre = logits.gather(1, labels[:, None]) - logits
    rows = (weight[labels][:, None, :] - weight[None]).square()  # (B, K, in)
    spread = _safe_sqrt(torch.einsum("bki,bi->bk", rows, _scale_squared(scale, x).expand_as(x)))
    return centre - _batched_eps(eps, x, 2) * spread
