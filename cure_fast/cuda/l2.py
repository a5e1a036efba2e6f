"""The first affine layer under an l2 ball on CUDA, exact per output neuron by the dual norm:
``l2_linear`` (the centre from the interval GEMM, the radius ``eps |W_i ⊙ s|_2`` from the row-norm
kernel of csrc/margins.cu) and ``l2_conv2d`` (centre and ``eps sqrt(conv(s², W²))`` from one
implicit GEMM of csrc/interval_conv.cu, its backward from the implicit-GEMM gradient kernels)."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops.common import batched_eps, safe_sqrt, scale_squared
from ..ops.l2 import l2_conv2d_ref
from ..ops.policy import library_precision
from ..ops.registry import register
from .conv import IntPair, conv_grad_input_op, conv_grad_weight_op, conv_out_size, implicit_geometry, interval_conv2d_op
from .extension import eps_rows, load
from .linear import interval_linear

# ---------------------------------------------------------------------------------------------
# Custom ops and their fake implementations


@torch.library.custom_op("cure_fast::l2_row_norms_cuda", mutates_args=())
def row_norms_op(weight: Tensor, s2: Optional[Tensor]) -> Tensor:
    """``|W_i ⊙ s|_2`` per row of weight (out, in); s2 (in,) the squared scales, or None for ones."""
    return load().l2_row_norms(weight, s2)


@row_norms_op.register_fake
def _(weight, s2):
    return weight.new_empty((weight.shape[0],))


@torch.library.custom_op("cure_fast::l2_conv2d_cuda", mutates_args=())
def l2_conv2d_op(x: Tensor, s2: Tensor, weight: Tensor, bias: Optional[Tensor], eps: Optional[Tensor],
                 stride: List[int], padding: List[int], dilation: List[int], precision: str) -> Tuple[Tensor, Tensor]:
    """(conv(x, W) + b, e * sqrt(conv(s2, W²))): with eps (B,) one radius per sample (e = eps), else
    e = 1 and one radius per row of s2 (1 or B)."""
    return load().l2_conv2d_forward(x, s2, weight, bias, eps, stride, padding, dilation, precision)


@l2_conv2d_op.register_fake
def _(x, s2, weight, bias, eps, stride, padding, dilation, precision):
    out = (weight.shape[0], *conv_out_size(x.shape[2:], weight, stride, padding, dilation))
    rows = x.shape[0] if eps is not None else torch.sym_min(s2.shape[0], x.shape[0])
    return x.new_empty((x.shape[0], *out)), x.new_empty((rows, *out))


# ---------------------------------------------------------------------------------------------
# Autograd

def _row_norms_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _row_norms_grad(ctx, g):
    weight, s2, radius = ctx.saved_tensors
    positive = radius > 0
    h = torch.where(positive, g / torch.where(positive, radius, 1), 0)  # d radius / d (radius^2) * 2
    ones = s2 if s2 is not None else weight.new_ones(weight.shape[1])
    d_w = h[:, None] * weight * ones[None] if ctx.needs_input_grad[0] else None
    d_s2 = 0.5 * (h[:, None] * weight.square()).sum(0) if s2 is not None and ctx.needs_input_grad[1] else None
    return d_w, d_s2


row_norms_op.register_autograd(_row_norms_grad, setup_context=_row_norms_setup)


def _conv_setup(ctx, inputs, output):
    x, s2, weight, bias, eps, stride, padding, dilation, precision = inputs
    ctx.geometry, ctx.precision = (stride, padding, dilation), precision
    ctx.save_for_backward(x, s2, weight, bias, eps)


def _conv_grad(ctx, g_c, g_r):
    """Gradients of c = conv(x, W) + b and r = e * sqrt(a), a = conv(s2, W²) (e = eps, or 1), from the
    implicit-GEMM kernels with no radius rows: dL/da = g_r e / (2 sqrt(a)), 0 where a = 0 (the
    reference's safe square root); W² is the weight of the products that involve s2."""
    x, s2, weight, bias, eps = ctx.saved_tensors
    need = ctx.needs_input_grad
    geometry, precision = ctx.geometry, ctx.precision
    image = list(x.shape[2:])
    d_x = d_s2 = d_w = d_b = d_eps = None
    if g_c is not None:
        g_c = g_c.contiguous()
        if need[0]:
            d_x = conv_grad_input_op(g_c, g_c[:0], weight, image, *geometry, precision)[0]
        if need[2]:
            d_w = conv_grad_weight_op(g_c, g_c[:0], x, x[:0], weight, *geometry, precision)
        if bias is not None and need[3]:
            d_b = g_c.sum((0, 2, 3))
    if g_r is not None and (need[1] or need[2] or (eps is not None and need[4])):
        w2 = weight.square()
        a = interval_conv2d_op(s2, s2[:0], w2, None, None, None, False, *geometry, precision, False)[0]
        root = safe_sqrt(a)  # (1 or N, O, P, Q)
        if eps is not None and need[4]:
            d_eps = (g_r * root).sum((1, 2, 3))
        e = eps.view(-1, 1, 1, 1) if eps is not None else 1
        positive = root > 0
        g_a = torch.where(positive, g_r * e / (2 * torch.where(positive, root, 1)), 0)
        if s2.shape[0] == 1:  # one scale image for every sample
            g_a = g_a.sum(0, keepdim=True)
        g_a = g_a.contiguous()
        if need[1]:
            d_s2 = conv_grad_input_op(g_a, g_a[:0], w2, image, *geometry, precision)[0]
        if need[2]:
            d_w2 = 2 * weight * conv_grad_weight_op(g_a, g_a[:0], s2, s2[:0], weight, *geometry, precision)
            d_w = d_w2 if d_w is None else d_w + d_w2
    return d_x, d_s2, d_w, d_b, d_eps, None, None, None, None


l2_conv2d_op.register_autograd(_conv_grad, setup_context=_conv_setup)


# ---------------------------------------------------------------------------------------------
# The public functions

@register("l2_linear", "cuda")
def l2_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Exact bounds of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``: the centre from the
    interval GEMM (no radius rows), the radius ``eps * |W_i ⊙ scale|_2`` from the row-norm kernel
    (one scale for all samples), or a GEMM of the squared scales with W² (one scale per sample)."""
    c = interval_linear(x, x[:0], weight, bias, precision=precision)[0]
    s2 = scale_squared(scale, x)
    if s2.shape[0] == 1:
        radius = row_norms_op(weight.contiguous(), s2[0].contiguous())[None]
    else:
        radius = safe_sqrt(interval_linear(s2, s2[:0], weight.square(), precision=precision)[0])
    return c, (batched_eps(eps, x, 2) * radius).expand_as(c)


@register("l2_conv2d", "cuda")
def l2_conv2d(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1,
              scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Exact, padding-aware bounds of a convolution over ``{x + scale ⊙ u : |u|_2 <= eps}``: the
    centre ``conv(x, W) + b`` and the radius ``eps * sqrt(conv(scale², W²))`` from one implicit GEMM
    (one pass over the weight; the backward from the implicit-GEMM gradient kernels). groups > 1, or
    padding the kernel cannot take, runs the reference formula as cuDNN calls. x (B, C, H, W),
    eps float or (B,), scale None or broadcastable to x -> (B, O, P, Q) twice."""
    geometry = implicit_geometry(x, weight, stride, padding, dilation, groups)
    if geometry is None:
        with library_precision(precision != "ieee"):  # bf16 runs as TF32 here
            return l2_conv2d_ref(x, eps, weight, bias, stride, padding, dilation, groups, scale)
    s2 = scale_squared(scale, x).contiguous()
    opt_bias = bias.contiguous() if bias is not None else None
    x, weight = x.contiguous(), weight.contiguous()
    if s2.shape[0] > 1 or (isinstance(eps, Tensor) and eps.numel() > 1):  # one radius per sample, eps fused
        return l2_conv2d_op(x, s2, weight, opt_bias, eps_rows(eps, x), *geometry, precision)
    c, radius = l2_conv2d_op(x, s2, weight, opt_bias, None, *geometry, precision)  # one radius for all samples
    return c, (batched_eps(eps, x, 4) * radius).expand_as(c)
