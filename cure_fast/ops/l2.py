"""The first affine layer under an l2 ball, exact per output neuron by the dual norm.

Over the ellipsoid ``{x + s ⊙ u : |u|_2 <= eps}`` (``s`` the inverse std of a Normalize before the
layer, docs/design.md "First affine layer under an l2 ball"): Linear ``r_i = eps |W_i ⊙ s|_2``;
Conv2d ``r = eps sqrt(conv(s², W²))``, padding-aware: at the border only the weights that touch the
image count.
"""
from __future__ import annotations

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor

from .common import Eps, Interval, IntOrPair, batched_eps, check_features, check_l2, safe_sqrt, scale_squared
from .registry import dispatch_dot, register


@register("l2_linear", "torch")
def l2_linear_ref(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None) -> Interval:
    """Exact bounds of a linear layer over the ellipsoid ``{x + s ⊙ u : |u|_2 <= eps}``.

    ``c = x W^T + b``, ``r_i = eps * |W_i ⊙ s|_2`` (the dual norm). x (B, in), eps float or (B,),
    scale ``s`` None or broadcastable to x -> c (B, out), r (B, out).
    """
    radius = safe_sqrt(F.linear(scale_squared(scale, x), weight.square()))  # (1 or B, out)
    r = (batched_eps(eps, x, 2) * radius).expand(x.shape[0], weight.shape[0])
    return F.linear(x, weight, bias), r


@register("l2_conv2d", "torch")
def l2_conv2d_ref(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                  groups: int = 1, scale: Optional[Tensor] = None) -> Interval:
    """Exact, padding-aware bounds of a conv layer over the ellipsoid ``{x + s ⊙ u : |u|_2 <= eps}``.

    ``r[o, p, q] = eps * sqrt(conv(s^2, W^2)[o, p, q])``: only the weights that touch the image at
    each output position count. x (B, C, H, W), scale None or broadcastable to x -> (B, O, H', W') twice.
    """
    c = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    radius = safe_sqrt(F.conv2d(scale_squared(scale, x), weight.square(), None, stride, padding, dilation, groups))
    return c, (batched_eps(eps, x, 4) * radius).expand_as(c)


def l2_linear(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[Tensor] = None, *, backend: Optional[str] = None,
              precision: Optional[str] = None) -> Interval:
    """Exact bounds of a linear layer over the l2 ball (ellipsoid) ``{x + scale ⊙ u : |u|_2 <= eps}``.

    x (B, in), eps float or (B,), scale None or broadcastable to x -> c (B, out), r (B, out) with
    ``r_i = eps * |W_i ⊙ scale|_2``.
    """
    check_l2("l2_linear", x, eps, scale)
    if x.dim() != 2:
        raise ValueError(f"l2_linear: expected x of shape (B, in), got {tuple(x.shape)}")
    check_features("l2_linear", x.shape[1], weight.shape[1], "input features")
    return dispatch_dot("l2_linear", backend, x, precision, (x, eps, weight, bias, scale))


def l2_conv2d(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None,
              stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
              groups: int = 1, scale: Optional[Tensor] = None, *, backend: Optional[str] = None,
              precision: Optional[str] = None) -> Interval:
    """Exact, padding-aware bounds of a convolution over ``{x + scale ⊙ u : |u|_2 <= eps}``.

    x (B, C, H, W), eps float or (B,), scale None or broadcastable to x -> c, r (B, O, H', W') with
    ``r = eps * sqrt(conv(scale^2, W^2))``: at the border only the weights inside the image count.
    """
    check_l2("l2_conv2d", x, eps, scale)
    if x.dim() != 4:
        raise ValueError(f"l2_conv2d: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    check_features("l2_conv2d", x.shape[1], weight.shape[1] * groups, "input channels")
    return dispatch_dot("l2_conv2d", backend, x, precision, (x, eps, weight, bias, stride, padding, dilation, groups,
                                                              scale))
