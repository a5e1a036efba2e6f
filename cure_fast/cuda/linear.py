"""The CUDA interval linear layer (csrc/interval_linear.cu): the fused interval GEMM — one pass over
the weight tiles for ``W·c`` and ``|W|·r``, the bias / scale / shift / interval-ReLU epilogue on the
accumulators, the same kernel for the input gradient and the masked weight gradient — and a cuBLAS
route (the two products as library calls, then the epilogue kernel), chosen per call shape by
:func:`cure_fast.ops.autoselect.choose_method`."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import autoselect
from ..ops.affine import apply_epilogue, interval_linear_ref
from ..ops.policy import library_precision
from ..ops.registry import register
from .elementwise import channel_epilogue_backward_op, channel_epilogue_op, epilogue_param_grads, has_epilogue
from .extension import contiguous, empty_like, load, needs_grad, zeros_if_none

# ---------------------------------------------------------------------------------------------
# Custom ops and their fake implementations


@torch.library.custom_op("cure_fast::interval_linear_cuda", mutates_args=())
def interval_linear_op(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                       shift: Optional[Tensor], relu: bool, precision: str,
                       save_pre: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_out, r_out, pre_c, pre_r): the outputs and, with ``save_pre``, the accumulators before the
    epilogue (for the backward; else empty). c (N, in), r (M, in), weight (out, in), all contiguous."""
    return load().interval_linear_forward(c, r, weight, bias, scale, shift, relu, precision, save_pre)


@interval_linear_op.register_fake
def _(c, r, weight, bias, scale, shift, relu, precision, save_pre):
    out = weight.shape[0]
    pre_c = c.new_empty((c.shape[0], out) if save_pre else (0,))
    pre_r = c.new_empty((r.shape[0], out) if save_pre else (0,))
    return c.new_empty((c.shape[0], out)), c.new_empty((r.shape[0], out)), pre_c, pre_r


@torch.library.custom_op("cure_fast::interval_linear_cuda_grad_input", mutates_args=())
def linear_grad_input_op(grad_c: Tensor, grad_r: Tensor, weight: Tensor, precision: str) -> Tuple[Tensor, Tensor]:
    """(grad_c W, grad_r |W|)."""
    return load().interval_linear_grad_input(grad_c, grad_r, weight, precision)


@linear_grad_input_op.register_fake
def _(grad_c, grad_r, weight, precision):
    return grad_c.new_empty((grad_c.shape[0], weight.shape[1])), grad_c.new_empty((grad_r.shape[0], weight.shape[1]))


@torch.library.custom_op("cure_fast::interval_linear_cuda_grad_weight", mutates_args=())
def linear_grad_weight_op(grad_c: Tensor, grad_r: Tensor, c: Tensor, r: Tensor, weight: Tensor,
                          precision: str) -> Tensor:
    """``grad_c^T c + sign(W) ⊙ grad_r^T r``."""
    return load().interval_linear_grad_weight(grad_c, grad_r, c, r, weight, precision)


@linear_grad_weight_op.register_fake
def _(grad_c, grad_r, c, r, weight, precision):
    return empty_like(weight)


# ---------------------------------------------------------------------------------------------
# Autograd

def _setup(ctx, inputs, output):
    c, r, weight, bias, scale, shift, relu, precision, save_pre = inputs
    ctx.relu, ctx.precision, ctx.has_pre = relu, precision, save_pre
    ctx.save_for_backward(c, r, weight, bias, scale, shift, output[2], output[3])


def _grad(ctx, grad_c_out, grad_r_out, _grad_pre_c, _grad_pre_r):
    c, r, weight, bias, scale, shift, pre_c, pre_r = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_c_out = zeros_if_none(grad_c_out, c.new_empty((c.shape[0], weight.shape[0])))
    grad_r_out = zeros_if_none(grad_r_out, c.new_empty((r.shape[0], weight.shape[0])))
    d_bias = d_scale = d_shift = None
    if has_epilogue(scale, shift, ctx.relu):
        if not ctx.has_pre:  # the accumulators were not kept: recompute them
            pre_c, pre_r = interval_linear_op(c, r, weight, None, None, None, False, ctx.precision, False)[:2]
        g_c, g_r, sums = channel_epilogue_backward_op(pre_c, pre_r, bias, scale, shift, ctx.relu, grad_c_out,
                                                      grad_r_out)
        d_bias, d_scale, d_shift = epilogue_param_grads(sums, bias, scale, shift, need[3:6])
    else:
        g_c, g_r = grad_c_out, grad_r_out
        if bias is not None and need[3]:
            d_bias = g_c.sum(0)
    d_c = d_r = d_w = None
    if need[0] or need[1]:
        d_c, d_r = linear_grad_input_op(g_c, g_r, weight, ctx.precision)
    if need[2]:
        d_w = linear_grad_weight_op(g_c, g_r, c, r, weight, ctx.precision)
    return d_c, d_r, d_w, d_bias, d_scale, d_shift, None, None, None


interval_linear_op.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# The methods (on (rows, features) tensors) and the public function

METHODS = ("auto", "fused_gemm", "cublas")


def _fused_gemm(c, r, weight, bias, scale, shift, *, relu, precision):
    opt = contiguous(bias, scale, shift)
    save_pre = has_epilogue(scale, shift, relu) and needs_grad(c, r, weight, *opt)
    return interval_linear_op(c.contiguous(), r.contiguous(), weight.contiguous(), *opt, relu, precision, save_pre)[:2]


def _cublas(c, r, weight, bias, scale, shift, *, relu, precision):
    """The two products from cuBLAS (one strided batched GEMM of ``[c; r]`` against ``[W; |W|]``
    when every row has a radius, else two GEMMs), then the fused epilogue kernel."""
    with library_precision(precision != "ieee"):  # bf16 runs as TF32 here
        if r.shape[0] == c.shape[0] and c.shape[0] > 0:
            xc, xr = torch.bmm(torch.stack([c, r]), torch.stack([weight, weight.abs()]).transpose(1, 2)).unbind(0)
        else:
            xc, xr = c @ weight.t(), r @ weight.abs().t()
    return channel_epilogue_op(xc, xr, *contiguous(bias, scale, shift), relu)


def _torch(c, r, weight, bias, scale, shift, *, relu, precision):
    """The torch backend's result for the same call: the reference the methods are checked against."""
    with library_precision(precision != "ieee"):
        out = interval_linear_ref(c, r, weight, bias)
    return apply_epilogue(out, scale, shift, relu, -1, "torch")


@register("interval_linear", "cuda")
def interval_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    precision: str = "ieee", method: str = "auto") -> Tuple[Tensor, Tensor]:
    """Interval linear layer: ``((c W^T + b) * scale + shift, r |W|^T * |scale|)``, then the interval
    ReLU if ``relu``. c (N, *, in), r (M, *, in) the radii of c's last M rows, weight (out, in),
    bias / scale / shift (out,) or None -> (N, *, out), (M, *, out).

    ``method``: ``"fused_gemm"`` runs one kernel that reads each weight tile once for both products
    and applies bias / scale / shift / ReLU on the accumulators; ``"cublas"`` runs the products as
    cuBLAS calls and the epilogue as one more kernel; ``"auto"`` measures both on the first call per
    shape / dtype / precision / device and keeps the faster of those that agree with the torch
    backend (outputs, and gradients when they are recorded; ``fused_gemm`` while torch.compile
    traces). What was measured: :data:`cure_fast.ops.autoselect.measurements`.
    """
    if method not in METHODS:
        raise ValueError(f"interval_linear: method must be one of {METHODS}, got {method!r}")
    features, out = c.shape[-1], weight.shape[0]
    rows = [t.reshape(t.shape[:-1].numel(), features) for t in (c, r)]  # (no -1: features may be 0)
    tensors = [*rows, weight, bias, scale, shift]
    options = dict(relu=relu, precision=precision)
    methods = {"fused_gemm": functools.partial(_fused_gemm, **options),
               "cublas": functools.partial(_cublas, **options),
               "torch": functools.partial(_torch, **options)}
    if method == "auto":
        if torch.compiler.is_compiling():
            method = "fused_gemm"
        else:
            key = autoselect.key("cuda.interval_linear", c.device, (tensors, relu, precision, torch.is_grad_enabled()))
            method = autoselect.choose_method(key, methods, tensors, precision, c.device, "cublas")
    c_out, r_out = methods[method](*tensors)
    return c_out.view(*c.shape[:-1], out), r_out.view(*r.shape[:-1], out)
