"""Element-wise and per-channel CUDA ops (csrc/interval_relu.cu, csrc/channel.cu): the interval
ReLU; the per-channel epilogue ``(x + bias) * scale + shift``, ``r * |scale|``, interval ReLU that
the affine ops' library routes run after cuBLAS / cuDNN (and :func:`interval_affine` on its own);
the per-channel moments of the natural rows (train-mode BatchNorm statistics)."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..ops.elementwise import batch_norm_stats_grad
from ..ops.registry import register
from .extension import empty_like, load, zeros_if_none

# ---------------------------------------------------------------------------------------------
# Custom ops and their fake implementations


@torch.library.custom_op("cure_fast::interval_relu_cuda", mutates_args=())
def interval_relu_op(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    return load().interval_relu_forward(c.contiguous(), r.contiguous())


@interval_relu_op.register_fake
def _(c, r):
    return empty_like(c), empty_like(r)


@torch.library.custom_op("cure_fast::interval_relu_cuda_backward", mutates_args=())
def interval_relu_backward_op(c: Tensor, r: Tensor, grad_c_out: Tensor, grad_r_out: Tensor) -> Tuple[Tensor, Tensor]:
    return load().interval_relu_backward(c.contiguous(), r.contiguous(), grad_c_out.contiguous(),
                                         grad_r_out.contiguous())


@interval_relu_backward_op.register_fake
def _(c, r, grad_c_out, grad_r_out):
    return empty_like(c), empty_like(r)


@torch.library.custom_op("cure_fast::channel_epilogue_cuda", mutates_args=())
def channel_epilogue_op(xc: Tensor, xr: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                        shift: Optional[Tensor], relu: bool) -> Tuple[Tensor, Tensor]:
    return load().channel_epilogue_forward(xc, xr, bias, scale, shift, relu)


@channel_epilogue_op.register_fake
def _(xc, xr, bias, scale, shift, relu):
    return empty_like(xc), empty_like(xr)


@torch.library.custom_op("cure_fast::channel_epilogue_cuda_backward", mutates_args=())
def channel_epilogue_backward_op(xc: Tensor, xr: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                                 shift: Optional[Tensor], relu: bool, grad_c_out: Tensor,
                                 grad_r_out: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return load().channel_epilogue_backward(xc, xr, bias, scale, shift, relu, grad_c_out.contiguous(),
                                            grad_r_out.contiguous())


@channel_epilogue_backward_op.register_fake
def _(xc, xr, bias, scale, shift, relu, grad_c_out, grad_r_out):
    return empty_like(xc), empty_like(xr), xc.new_empty((2, xc.shape[1]))


@torch.library.custom_op("cure_fast::channel_moments_cuda", mutates_args=())
def channel_moments_op(x: Tensor, rows: int) -> Tuple[Tensor, Tensor]:
    return load().channel_moments(x, rows)


@channel_moments_op.register_fake
def _(x, rows):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


# ---------------------------------------------------------------------------------------------
# Autograd

def _relu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _relu_grad(ctx, grad_c_out, grad_r_out):
    c, r = ctx.saved_tensors
    return interval_relu_backward_op(c, r, zeros_if_none(grad_c_out, c), zeros_if_none(grad_r_out, r))


interval_relu_op.register_autograd(_relu_grad, setup_context=_relu_setup)


def has_epilogue(scale: Optional[Tensor], shift: Optional[Tensor], relu: bool) -> bool:
    """Whether an affine op's epilogue does more than add the bias."""
    return scale is not None or shift is not None or relu


def epilogue_param_grads(sums: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                         needs: Sequence[bool]) -> Tuple[Optional[Tensor], ...]:
    """(d bias, d scale, d shift) from the per-channel sums of ``channel_epilogue_backward_op``
    (``sums[0]``: the gradient at the shifted centre, ``sums[1]``: the scale's); ``needs`` says
    which of the three are wanted."""
    d_shift = sums[0]
    d_bias = d_shift * scale if scale is not None else d_shift
    return (d_bias if bias is not None and needs[0] else None,
            sums[1] if scale is not None and needs[1] else None,
            d_shift if shift is not None and needs[2] else None)


def _epilogue_setup(ctx, inputs, output):
    xc, xr, bias, scale, shift, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(xc, xr, bias, scale, shift)


def _epilogue_grad(ctx, grad_c_out, grad_r_out):
    xc, xr, bias, scale, shift = ctx.saved_tensors
    g_xc, g_xr, sums = channel_epilogue_backward_op(xc, xr, bias, scale, shift, ctx.relu,
                                                    zeros_if_none(grad_c_out, xc), zeros_if_none(grad_r_out, xr))
    return (g_xc, g_xr, *epilogue_param_grads(sums, bias, scale, shift, ctx.needs_input_grad[2:5]), None)


channel_epilogue_op.register_autograd(_epilogue_grad, setup_context=_epilogue_setup)


def _moments_setup(ctx, inputs, output):
    x, rows = inputs
    ctx.rows = rows
    ctx.save_for_backward(x, output[0])


def _moments_grad(ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    head = batch_norm_stats_grad(x[:ctx.rows], mean, g_mean, g_var)
    return torch.cat([head, x.new_zeros((x.shape[0] - ctx.rows,) + x.shape[1:])]), None


channel_moments_op.register_autograd(_moments_grad, setup_context=_moments_setup)


# ---------------------------------------------------------------------------------------------
# The public functions

@register("interval_relu", "cuda")
def interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """ReLU of the interval ``(c, r)`` with the CUDA kernel (differentiable, traceable by torch.compile).

    c: (N, *) centres; r: (M, *) radii, M <= N, of the last M rows of c (the first N - M rows are
    points). Returns c_out (N, *) and r_out (M, *): ``(relu(u) + relu(l)) / 2`` and
    ``(relu(u) - relu(l)) / 2`` with ``l = c - r``, ``u = c + r``; ``relu(c)`` on point rows.
    float32, float64, float16 or bfloat16, on one CUDA device; computed in float32 (float64 for float64).
    """
    return interval_relu_op(c, r)


@register("interval_affine", "cuda")
def interval_affine(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor, *, relu: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-channel affine ``c * scale + shift``, ``r * |scale|`` (channels on dim 1), then the interval
    ReLU when ``relu``, in one kernel; its backward gives the scale / shift gradients in one more."""
    return channel_epilogue_op(c.contiguous(), r.contiguous(), None, scale.contiguous(), shift.contiguous(), relu)


def channel_moments(x: Tensor, rows: int) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of the first ``rows`` rows of x (N, C, *), the natural
    stream: train-mode BatchNorm statistics, in float32 (float64 for float64), differentiable."""
    return channel_moments_op(x.contiguous(), int(rows))


@register("batch_norm_stats", "cuda")
def batch_norm_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, *) in x's dtype (see :func:`channel_moments`)."""
    mean, var = channel_moments(x, x.shape[0])
    return mean.to(x.dtype), var.to(x.dtype)
