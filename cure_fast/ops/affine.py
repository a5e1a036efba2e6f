"""Interval images of the affine layers (Linear, Conv2d): ``c' = W c + b``, ``r' = |W| r``.

The exact interval hull of an affine image of a box (docs/design.md, "Affine layers"). Both ops take
an optional epilogue — a per-output-feature affine ``scale``, ``shift`` (a folded eval-mode
BatchNorm) and the interval ReLU — that the ``triton`` and ``cuda`` backends fuse into the kernel
and the ``torch`` twin applies after the op.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor

from .common import Interval, IntOrPair, check_epilogue, check_features, check_interval
from .elementwise import interval_relu
from .registry import dispatch_dot, register


@register("interval_linear", "torch")
def interval_linear_ref(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Interval:
    """``(c W^T + b, r |W|^T)``: c (N, *, in), r (M, *, in), weight (out, in) -> (N, *, out), (M, *, out)."""
    return F.linear(c, weight, bias), F.linear(r, weight.abs())


@register("interval_conv2d", "torch")
def interval_conv2d_ref(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                        stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0,
                        dilation: IntOrPair = 1, groups: int = 1) -> Interval:
    """``(conv(c, W) + b, conv(r, |W|))``: c (N, C, H, W), r (M, C, H, W) -> (N, O, H', W'), (M, O, H', W')."""
    c_out = F.conv2d(c, weight, bias, stride, padding, dilation, groups)
    r_out = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    return c_out, r_out


def apply_epilogue(out: Interval, scale: Optional[Tensor], shift: Optional[Tensor], relu: bool, channel_dim: int,
                   backend: str) -> Interval:
    """The epilogue of interval_linear / interval_conv2d as separate ops: ``c * scale + shift``,
    ``r * |scale|`` along ``channel_dim``, then the interval ReLU (on ``backend``) when ``relu``."""
    c, r = out
    if scale is not None:
        shape = [1] * c.dim()
        shape[channel_dim] = -1
        c, r = c * scale.view(shape) + shift.view(shape), r * scale.abs().view(shape)
    return interval_relu(c, r, backend=backend) if relu else (c, r)


def _run(op: str, c: Tensor, backend, precision, args: tuple, channel_dim: int, scale, shift, relu) -> Interval:
    epilogue = dict(scale=scale, shift=shift, relu=relu)
    unfused = functools.partial(_unfused, epilogue, channel_dim)
    return dispatch_dot(op, backend, c, precision, args, epilogue, unfused)


def _unfused(epilogue: dict, channel_dim: int, out: Interval, backend: str) -> Interval:
    return apply_epilogue(out, channel_dim=channel_dim, backend=backend, **epilogue)


def interval_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    backend: Optional[str] = None, precision: Optional[str] = None) -> Interval:
    """Interval image of ``x W^T + b``: c (N, *, in), r (M, *, in), weight (out, in) -> (N, *, out), (M, *, out).

    Optional epilogue: ``* scale + shift`` per output feature (both (out,), e.g. a folded BatchNorm),
    then the interval ReLU when ``relu``.
    """
    check_interval("interval_linear", c, r)
    check_features("interval_linear", c.shape[-1], weight.shape[1], "input features")
    check_epilogue("interval_linear", c, weight.shape[0], scale, shift)
    return _run("interval_linear", c, backend, precision, (c, r, weight, bias), -1, scale, shift, relu)


def interval_conv2d(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                    groups: int = 1, *, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                    relu: bool = False, backend: Optional[str] = None, precision: Optional[str] = None) -> Interval:
    """Interval image of a 2-d convolution: c (N, C, H, W), r (M, C, H, W) -> (N, O, H', W'), (M, O, H', W').

    Optional epilogue: ``* scale + shift`` per output channel (both (O,), e.g. a folded BatchNorm),
    then the interval ReLU when ``relu``.
    """
    check_interval("interval_conv2d", c, r, dims=4)
    check_features("interval_conv2d", c.shape[1], weight.shape[1] * groups, "input channels")
    check_epilogue("interval_conv2d", c, weight.shape[0], scale, shift)
    return _run("interval_conv2d", c, backend, precision, (c, r, weight, bias, stride, padding, dilation, groups), 1,
                scale, shift, relu)
