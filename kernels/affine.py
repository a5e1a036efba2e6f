"""Affine layers on intervals and on l2 balls (Linear, Conv2d) as autograd functions over the
implicit-GEMM kernels of :mod:`.implicit_gemm`: ``interval_linear``, ``interval_conv2d``
(``(W ⊛ c + b, |W| ⊛ r)`` with the fused BatchNorm / ReLU epilogue) and ``l2_linear``,
``l2_conv2d`` (centre and ``eps sqrt(W² ⊛ s²)`` from one pass over the weight). Grouped
convolutions fall back to the torch backend.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from cure_fast import functional
from cure_fast.ops.common import batched_eps, check_epilogue, scale_squared
from cure_fast.ops.registry import register

from ._common import check_inputs, warn_once
from .elementwise import relu_grad
from .implicit_gemm import LINEAR_GEOMETRY, Geometry, affine_products, affine_weight_grad, conv_geometry


class _IntervalAffine(torch.autograd.Function):
    """(c, r) -> ((W ⊛ c + bias) * scale + shift, |W| ⊛ r * |scale|), then the interval ReLU if relu."""

    @staticmethod
    def forward(ctx, c, r, weight, bias, scale, shift, geometry: Geometry, relu: bool, precision: str):
        stride, padding, dilation, out_size = geometry
        fused_shift = shift if bias is None else (bias if scale is None else bias * scale + shift)
        c_out, r_out = affine_products(c, r, weight, scale, fused_shift, stride, padding, dilation, out_size, False, False,
                               relu, False, precision)
        ctx.save_for_backward(c, r, weight, bias, scale, *((c_out, r_out) if relu else ()))
        ctx.geometry, ctx.relu, ctx.precision = geometry, relu, precision
        ctx.has_shift = fused_shift is not None
        return c_out, r_out

    @staticmethod
    def backward(ctx, gc, gr):
        c, r, weight, bias, scale, *outputs = ctx.saved_tensors
        stride, padding, dilation, _ = ctx.geometry
        if ctx.relu:
            gc, gr = relu_grad(*outputs, gc, gr)
        folded = weight if scale is None else weight * scale.view(-1, 1, 1, 1)  # the weight the kernel applied
        need = ctx.needs_input_grad
        dc = dr = dw = dbias = dscale = dshift = None
        if need[0] or need[1]:
            dc, dr = affine_products(gc, gr, folded, None, None, stride, padding, dilation, list(c.shape[2:]), True, False,
                             False, False, ctx.precision)
        if any(need[2:6]):
            dw, d_fused = affine_weight_grad(gc, gr, c, r, folded, stride, padding, dilation, False, ctx.has_shift,
                                       ctx.precision)
            if scale is not None:
                dscale = (dw * weight).sum((1, 2, 3))
                dw = dw * scale.view(-1, 1, 1, 1)
                if bias is not None:
                    dscale = dscale + d_fused * bias
                dshift = d_fused
            if bias is not None:
                dbias = d_fused if scale is None else d_fused * scale
        return dc, dr, dw, dbias, dscale, dshift, None, None, None


class _L2Affine(torch.autograd.Function):
    """(x, s²) -> (W ⊛ x + bias, sqrt(W² ⊛ s²)); s² holds 1 or B rows (those of the last samples)."""

    @staticmethod
    def forward(ctx, x, s2, weight, bias, geometry: Geometry, precision: str):
        stride, padding, dilation, out_size = geometry
        c_out, radius = affine_products(x, s2, weight, None, bias, stride, padding, dilation, out_size, False, True, False,
                                True, precision)
        ctx.save_for_backward(x, s2, weight, radius)
        ctx.geometry, ctx.precision, ctx.has_bias = geometry, precision, bias is not None
        return c_out, radius

    @staticmethod
    def backward(ctx, gc, g_radius):
        x, s2, weight, radius = ctx.saved_tensors
        stride, padding, dilation, _ = ctx.geometry
        g_sq = torch.where(radius > 0, g_radius / (2 * radius), 0.0)  # through the square root, 0 where it is 0
        need = ctx.needs_input_grad
        dx = ds2 = dw = db = None
        if need[0] or need[1]:
            dx, ds2 = affine_products(gc, g_sq if need[1] else g_sq[:0], weight, None, None, stride, padding, dilation,
                              list(x.shape[2:]), True, True, False, False, ctx.precision)
        if need[2] or need[3]:
            dw, db = affine_weight_grad(gc, g_sq, x, s2, weight, stride, padding, dilation, True, ctx.has_bias, ctx.precision)
        return dx, ds2 if need[1] else None, dw, db if ctx.has_bias else None, None, None


@register("interval_linear", "triton")
def interval_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Fused interval linear layer: ``((c W^T + b) * scale + shift, r |W|^T * |scale|)``, then the
    interval ReLU if ``relu``. c (N, *, in), r (M, *, in) the radii of c's last M rows,
    weight (out, in), bias / scale / shift (out,) or None -> (N, *, out), (M, *, out)."""
    check_inputs("interval_linear", c, r, weight, bias, scale, shift)
    check_epilogue("interval_linear", c, weight.shape[0], scale, shift)
    features = c.shape[-1]
    c_out, r_out = _IntervalAffine.apply(c.reshape(c.shape[:-1].numel(), features, 1, 1),
                                         r.reshape(r.shape[:-1].numel(), features, 1, 1),
                                         weight[:, :, None, None], bias, scale, shift, LINEAR_GEOMETRY, relu, precision)
    return c_out.view(*c.shape[:-1], weight.shape[0]), r_out.view(*r.shape[:-1], weight.shape[0])


@register("interval_conv2d", "triton")
def interval_conv2d(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
                    dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, *, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, relu: bool = False,
                    precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Fused interval convolution (implicit GEMM): ``((conv(c, W) + b) * scale + shift, conv(r, |W|) * |scale|)``,
    then the interval ReLU if ``relu``. c (N, C, H, W), r (M, C, H, W) the radii of c's last M rows,
    weight (O, C, KH, KW), bias / scale / shift (O,) or None -> (N, O, P, Q), (M, O, P, Q).
    groups > 1 runs on the torch backend (with a warning, once)."""
    if groups != 1:
        warn_once("interval_conv2d groups", "interval_conv2d (triton): groups > 1 runs on the torch backend")
        return functional.interval_conv2d(c, r, weight, bias, stride, padding, dilation, groups, scale=scale,
                                          shift=shift, relu=relu, backend="torch", precision=precision)
    check_inputs("interval_conv2d", c, r, weight, bias, scale, shift)
    check_epilogue("interval_conv2d", c, weight.shape[0], scale, shift)
    geometry = conv_geometry("interval_conv2d", c.shape[2:], weight, stride, padding, dilation)
    return _IntervalAffine.apply(c, r, weight, bias, scale, shift, geometry, relu, precision)


@register("l2_linear", "triton")
def l2_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Exact bounds of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``, centre and dual-norm
    radius ``eps * |W_i ⊙ scale|_2`` from one pass over the weight. x (B, in) -> (B, out) twice."""
    check_inputs("l2_linear", x, weight, bias)
    s2 = scale_squared(scale, x)
    c, radius = _L2Affine.apply(x[:, :, None, None], s2[:, :, None, None], weight[:, :, None, None], bias, LINEAR_GEOMETRY,
                                precision)
    c, radius = c.view(x.shape[0], -1), radius.view(radius.shape[0], -1)
    return c, (batched_eps(eps, x, 2) * radius).expand_as(c)


@register("l2_conv2d", "triton")
def l2_conv2d(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
              dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, scale: Optional[Tensor] = None, *,
              precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Exact, padding-aware bounds of a convolution over ``{x + scale ⊙ u : |u|_2 <= eps}``: the
    centre ``conv(x, W) + b`` and the radius ``eps * sqrt(conv(scale², W²))`` from one pass over the
    weight. x (B, C, H, W) -> (B, O, P, Q) twice. groups > 1 runs on the torch backend."""
    if groups != 1:
        warn_once("l2_conv2d groups", "l2_conv2d (triton): groups > 1 runs on the torch backend")
        return functional.l2_conv2d(x, eps, weight, bias, stride, padding, dilation, groups, scale, backend="torch",
                                    precision=precision)
    check_inputs("l2_conv2d", x, weight, bias)
    geometry = conv_geometry("l2_conv2d", x.shape[2:], weight, stride, padding, dilation)
    c, radius = _L2Affine.apply(x, scale_squared(scale, x), weight, bias, geometry, precision)
    return c, (batched_eps(eps, x, 4) * radius).expand_as(c)
