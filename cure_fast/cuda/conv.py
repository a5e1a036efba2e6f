"""The CUDA interval convolution (csrc/interval_conv.cu): one implicit GEMM with the interval
GEMM's tiles and epilogue, its input gradient (one GEMM per stride phase) and split-K weight
gradient — or a cuDNN route (one grouped convolution over ``[c; r]`` with ``[W; |W|]``, then the
epilogue kernel), chosen per call shape by :func:`cure_fast.ops.autoselect.choose_method`."""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import autoselect
from ..ops.affine import apply_epilogue, interval_conv2d_ref
from ..ops.policy import library_precision
from ..ops.registry import register
from .elementwise import channel_epilogue_backward_op, channel_epilogue_op, epilogue_param_grads, has_epilogue
from .extension import contiguous, empty_like, load, needs_grad, zeros_if_none

IntPair = Union[int, Tuple[int, int]]
Geometry = Tuple[List[int], List[int], List[int]]  # stride, padding, dilation as [height, width]
MAX_INDEX = 2 ** 31 - 1  # the implicit GEMM decomposes pixel and tap indices in 32 bits


def _pair(value) -> Optional[List[int]]:
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    return value if len(value) == 2 else None


def conv_out_size(image: Sequence[int], weight: Tensor, stride, padding, dilation) -> List[int]:
    """[P, Q]: the output size of a convolution of an ``image`` (H, W) with numeric geometry."""
    return [(size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(image, weight.shape[2:], stride, padding, dilation)]


def implicit_geometry(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> Optional[Geometry]:
    """(stride, padding, dilation) as [height, width] lists for the implicit-GEMM kernels, or None
    when they cannot run this convolution: groups > 1, padding "same" with an odd kernel span (torch
    pads the extra pixel at the bottom / right only), a kernel that does not fit the padded input,
    or pixel / tap counts beyond int32."""
    stride, dilation = _pair(stride), _pair(dilation)
    if groups != 1 or stride is None or dilation is None or x.dim() != 4 or weight.dim() != 4:
        return None
    spans = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        if stride != [1, 1] or any(span % 2 for span in spans):
            return None
        padding = [span // 2 for span in spans]
    else:
        padding = _pair(padding)
    if padding is None or min(stride + dilation) < 1 or min(padding) < 0:
        return None
    image = list(x.shape[2:])
    out = conv_out_size(image, weight, stride, padding, dilation)
    if min(image + out) < 1 or min(weight.shape[1:]) < 1:
        return None
    taps = weight.shape[2] * weight.shape[3]
    if (x.shape[0] * max(image[0] * image[1], out[0] * out[1]) > MAX_INDEX
            or max(weight.shape[0], weight.shape[1]) * taps > MAX_INDEX):
        return None
    return stride, padding, dilation


# ---------------------------------------------------------------------------------------------
# Custom ops and their fake implementations

@torch.library.custom_op("cure_fast::interval_conv2d_cuda", mutates_args=())
def interval_conv2d_op(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                       shift: Optional[Tensor], relu: bool, stride: List[int], padding: List[int], dilation: List[int],
                       precision: str, save_pre: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_out, r_out, pre_c, pre_r) as :func:`~cure_fast.cuda.linear.interval_linear_op`, for an
    implicit-GEMM convolution (geometry from :func:`implicit_geometry`)."""
    return load().interval_conv2d_forward(c, r, weight, bias, scale, shift, relu, stride, padding, dilation,
                                          precision, save_pre)


@interval_conv2d_op.register_fake
def _(c, r, weight, bias, scale, shift, relu, stride, padding, dilation, precision, save_pre):
    out = (weight.shape[0], *conv_out_size(c.shape[2:], weight, stride, padding, dilation))
    pre_c = c.new_empty((c.shape[0], *out) if save_pre else (0,))
    pre_r = c.new_empty((r.shape[0], *out) if save_pre else (0,))
    return c.new_empty((c.shape[0], *out)), c.new_empty((r.shape[0], *out)), pre_c, pre_r


@torch.library.custom_op("cure_fast::interval_conv2d_cuda_grad_input", mutates_args=())
def conv_grad_input_op(grad_c: Tensor, grad_r: Tensor, weight: Tensor, input_size: List[int], stride: List[int],
                       padding: List[int], dilation: List[int], precision: str) -> Tuple[Tensor, Tensor]:
    """The adjoint convolutions of grad_c with W and of grad_r with |W|, onto images of ``input_size``."""
    return load().interval_conv2d_grad_input(grad_c.contiguous(), grad_r.contiguous(), weight, input_size, stride,
                                             padding, dilation, precision)


@conv_grad_input_op.register_fake
def _(grad_c, grad_r, weight, input_size, stride, padding, dilation, precision):
    return (grad_c.new_empty((grad_c.shape[0], weight.shape[1], *input_size)),
            grad_c.new_empty((grad_r.shape[0], weight.shape[1], *input_size)))


@torch.library.custom_op("cure_fast::interval_conv2d_cuda_grad_weight", mutates_args=())
def conv_grad_weight_op(grad_c: Tensor, grad_r: Tensor, c: Tensor, r: Tensor, weight: Tensor, stride: List[int],
                        padding: List[int], dilation: List[int], precision: str) -> Tensor:
    """``grad_c ⋆ c + sign(W) ⊙ (grad_r ⋆ r)``, split-K over the pixels."""
    return load().interval_conv2d_grad_weight(grad_c.contiguous(), grad_r.contiguous(), c, r, weight, stride,
                                              padding, dilation, precision)


@conv_grad_weight_op.register_fake
def _(grad_c, grad_r, c, r, weight, stride, padding, dilation, precision):
    return empty_like(weight)


# ---------------------------------------------------------------------------------------------
# Autograd

def _setup(ctx, inputs, output):
    c, r, weight, bias, scale, shift, relu, stride, padding, dilation, precision, save_pre = inputs
    ctx.relu, ctx.precision, ctx.has_pre = relu, precision, save_pre
    ctx.geometry = (stride, padding, dilation)
    ctx.save_for_backward(c, r, weight, bias, scale, shift, output[2], output[3])


def _grad(ctx, grad_c_out, grad_r_out, _grad_pre_c, _grad_pre_r):
    c, r, weight, bias, scale, shift, pre_c, pre_r = ctx.saved_tensors
    need = ctx.needs_input_grad
    out = (weight.shape[0], *conv_out_size(c.shape[2:], weight, *ctx.geometry))
    grad_c_out = zeros_if_none(grad_c_out, c.new_empty((c.shape[0], *out)))
    grad_r_out = zeros_if_none(grad_r_out, c.new_empty((r.shape[0], *out)))
    d_bias = d_scale = d_shift = None
    if has_epilogue(scale, shift, ctx.relu):
        if not ctx.has_pre:  # the accumulators were not kept: recompute them
            pre_c, pre_r = interval_conv2d_op(c, r, weight, None, None, None, False, *ctx.geometry, ctx.precision,
                                              False)[:2]
        g_c, g_r, sums = channel_epilogue_backward_op(pre_c, pre_r, bias, scale, shift, ctx.relu, grad_c_out,
                                                      grad_r_out)
        d_bias, d_scale, d_shift = epilogue_param_grads(sums, bias, scale, shift, need[3:6])
    else:
        g_c, g_r = grad_c_out, grad_r_out
        if bias is not None and need[3]:
            d_bias = g_c.sum((0, 2, 3))
    d_c = d_r = d_w = None
    if need[0] or need[1]:
        d_c, d_r = conv_grad_input_op(g_c, g_r, weight, list(c.shape[2:]), *ctx.geometry, ctx.precision)
    if need[2]:
        d_w = conv_grad_weight_op(g_c, g_r, c, r, weight, *ctx.geometry, ctx.precision)
    return d_c, d_r, d_w, d_bias, d_scale, d_shift, None, None, None, None, None, None


interval_conv2d_op.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# The methods and the public function

METHODS = ("auto", "implicit_gemm", "cudnn")


def _implicit_gemm(c, r, weight, bias, scale, shift, *, geometry, relu, precision):
    opt = contiguous(bias, scale, shift)
    save_pre = has_epilogue(scale, shift, relu) and needs_grad(c, r, weight, *opt)
    return interval_conv2d_op(c.contiguous(), r.contiguous(), weight.contiguous(), *opt, relu, *geometry, precision,
                              save_pre)[:2]


def _cudnn(c, r, weight, bias, scale, shift, *, stride, padding, dilation, groups, relu, precision):
    out = weight.shape[0]
    with library_precision(precision != "ieee"):  # bf16 runs as TF32 here
        if groups == 1 and r.shape[0] == c.shape[0] and c.shape[0] > 0:
            both = F.conv2d(torch.cat([c, r], 1), torch.cat([weight, weight.abs()], 0), None, stride, padding,
                            dilation, 2)
            xc, xr = both[:, :out], both[:, out:]  # row-strided views; the epilogue reads them in place
        else:
            xc = F.conv2d(c, weight, None, stride, padding, dilation, groups)
            xr = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    return channel_epilogue_op(xc, xr, *contiguous(bias, scale, shift), relu)


def _torch(c, r, weight, bias, scale, shift, *, stride, padding, dilation, groups, relu, precision):
    """The torch backend's result for the same call: the reference the methods are checked against."""
    with library_precision(precision != "ieee"):  # bf16 runs as TF32 here
        out = interval_conv2d_ref(c, r, weight, bias, stride, padding, dilation, groups)
    return apply_epilogue(out, scale, shift, relu, 1, "torch")


@register("interval_conv2d", "cuda")
def interval_conv2d(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                    padding: Union[IntPair, str] = 0, dilation: IntPair = 1, groups: int = 1, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    precision: str = "ieee", method: str = "auto") -> Tuple[Tensor, Tensor]:
    """Interval convolution: ``((conv(c, W) + b) * scale + shift, conv(r, |W|) * |scale|)``, then the
    interval ReLU if ``relu``. c (N, C, H, W), r (M, C, H, W) the radii of c's last M samples ->
    (N, O, P, Q), (M, O, P, Q).

    ``method``: ``"implicit_gemm"`` runs one kernel that reads each weight tile once for both
    products and applies bias / scale / shift / ReLU on the accumulators (its backward: one kernel
    for the input gradients, one split-K kernel for ``g_c ⋆ c + sign(W) ⊙ (g_r ⋆ r)``);
    ``"cudnn"`` runs the products as cuDNN calls and the epilogue as one more kernel; ``"auto"``
    measures both on the first call per shape / dtype / precision / device and keeps the faster of
    those that agree with the torch backend (outputs, and gradients when they are recorded;
    ``implicit_gemm`` while torch.compile traces). What was measured:
    :data:`cure_fast.ops.autoselect.measurements`. groups > 1 (and padding "same" with an odd
    kernel span) always takes the cuDNN route.
    """
    if method not in METHODS:
        raise ValueError(f"interval_conv2d: method must be one of {METHODS}, got {method!r}")
    geometry = implicit_geometry(c, weight, stride, padding, dilation, groups)
    if geometry is None and method == "implicit_gemm":
        raise ValueError("interval_conv2d: the implicit GEMM needs groups == 1, numeric padding (or 'same' with an "
                         "even kernel span) and fewer than 2^31 pixels; use method='cudnn'")
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu, precision=precision)
    methods = {"cudnn": functools.partial(_cudnn, **options), "torch": functools.partial(_torch, **options)}
    if geometry is not None:
        methods["implicit_gemm"] = functools.partial(_implicit_gemm, geometry=geometry, relu=relu, precision=precision)
    tensors = [c, r, weight, bias, scale, shift]
    if method == "auto":
        if geometry is None:
            method = "cudnn"
        elif torch.compiler.is_compiling():
            method = "implicit_gemm"
        else:
            key = autoselect.key("cuda.interval_conv2d", c.device,
                                 (tensors, relu, precision, geometry, torch.is_grad_enabled()))
            method = autoselect.choose_method(key, methods, tensors, precision, c.device, "cudnn")
    return methods[method](*tensors)
