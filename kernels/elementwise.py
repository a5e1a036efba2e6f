"""Elementwise interval ops and their reductions: the interval ReLU, the per-channel affine of
Normalize / BatchNorm with the ReLU after it fused in (one pass each way; the backward reduces the
gradients of the scale and the shift per channel in the pass that writes the input gradients), and
the train-mode BatchNorm statistics of the natural stream (one pass)."""

import math
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from cure_fast.ops.elementwise import batch_norm_stats_grad
from cure_fast.ops.registry import register

from ._common import (acc_dtype, acc_zeros, check_inputs, empty, interval_relu_grad, launch, library_op, load,
                      sign, splits)
from ._common import interval_relu as _relu

BLOCK = 1024


@triton.jit
def _relu_kernel(c_ptr, r_ptr, c_out_ptr, r_out_ptr, numel, r_start, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Interval ReLU over flat c (numel elements) and r (the elements from r_start on)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] elements of c
    ok = e < numel
    has_r = ok & (e >= r_start)
    c, r = _relu(load(c_ptr + e, ok, FP64), load(r_ptr + e - r_start, has_r, FP64))
    tl.store(c_out_ptr + e, c.to(c_out_ptr.dtype.element_ty), mask=ok)
    tl.store(r_out_ptr + e - r_start, r.to(r_out_ptr.dtype.element_ty), mask=has_r)


@triton.jit
def _relu_grad_kernel(c_ptr, r_ptr, gc_ptr, gr_ptr, dc_ptr, dr_ptr, numel, r_start, FP64: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Gradients of the interval ReLU at (c, r) (its input or its output), flat as in _relu_kernel."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = e < numel
    has_r = ok & (e >= r_start)
    dc, dr = interval_relu_grad(load(c_ptr + e, ok, FP64), load(r_ptr + e - r_start, has_r, FP64),
                                load(gc_ptr + e, ok, FP64), load(gr_ptr + e - r_start, has_r, FP64))
    tl.store(dc_ptr + e, dc.to(dc_ptr.dtype.element_ty), mask=ok)
    tl.store(dr_ptr + e - r_start, dr.to(dr_ptr.dtype.element_ty), mask=has_r)


@triton.jit
def _channel_affine_kernel(c_ptr, r_ptr, scale_ptr, shift_ptr, c_out_ptr, r_out_ptr, numel, r_start, C, inner,
                           RELU: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """c * scale + shift, r * |scale| per channel (flat (N, C, inner) layout), then the ReLU if RELU."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = e < numel
    has_r = ok & (e >= r_start)
    channel = (e // inner) % C
    s = load(scale_ptr + channel, ok, FP64)
    c = load(c_ptr + e, ok, FP64) * s + load(shift_ptr + channel, ok, FP64)
    r = load(r_ptr + e - r_start, has_r, FP64) * tl.abs(s)
    if RELU:
        c, r = _relu(c, r)
    tl.store(c_out_ptr + e, c.to(c_out_ptr.dtype.element_ty), mask=ok)
    tl.store(r_out_ptr + e - r_start, r.to(r_out_ptr.dtype.element_ty), mask=has_r)


@triton.jit
def _channel_affine_grad_kernel(c_ptr, r_ptr, c_out_ptr, r_out_ptr, gc_ptr, gr_ptr, scale_ptr, dc_ptr, dr_ptr, ds_ptr,
                                dt_ptr, N, n_points, C, inner, chunk, RELU: tl.constexpr, FP64: tl.constexpr,
                                BLOCK: tl.constexpr):
    """Input gradients of _channel_affine_kernel for one channel and rows [split * chunk, (split + 1) * chunk),
    and that piece of the channel's scale and shift gradients; grid (channels, splits)."""
    channel = tl.program_id(0)
    split = tl.program_id(1)
    s = load(scale_ptr + channel, True, FP64)
    acc_s = acc_zeros(BLOCK, FP64)
    acc_t = tl.zeros_like(acc_s)
    end = tl.minimum(N, split * chunk + chunk) * inner
    for f0 in range(split * chunk * inner, end, BLOCK):
        f = f0 + tl.arange(0, BLOCK)  # [BLOCK] (row, position) pairs of the channel
        ok = f < end
        n = f // inner
        e = (n * C + channel).to(tl.int64) * inner + f % inner  # [BLOCK] elements of c
        e_r = e - n_points * C * inner
        ok_r = ok & (n >= n_points)
        gc = load(gc_ptr + e, ok, FP64)
        gr = load(gr_ptr + e_r, ok_r, FP64)
        if RELU:
            gc, gr = interval_relu_grad(load(c_out_ptr + e, ok, FP64), load(r_out_ptr + e_r, ok_r, FP64), gc, gr)
        tl.store(dc_ptr + e, (gc * s).to(dc_ptr.dtype.element_ty), mask=ok)
        tl.store(dr_ptr + e_r, (gr * tl.abs(s)).to(dr_ptr.dtype.element_ty), mask=ok_r)
        acc_s += gc * load(c_ptr + e, ok, FP64) + gr * load(r_ptr + e_r, ok_r, FP64) * sign(s)
        acc_t += gc
    tl.store(ds_ptr + split * C + channel, tl.sum(acc_s, axis=0))
    tl.store(dt_ptr + split * C + channel, tl.sum(acc_t, axis=0))


@triton.jit
def _moments_kernel(x_ptr, shift_ptr, sum_ptr, sq_ptr, N, C, inner, chunk, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """Sums of (x - shift) and (x - shift)^2 over one channel's rows [split * chunk, (split + 1) * chunk);
    grid (channels, splits). The shift (a value of the channel) keeps the squares from cancelling."""
    channel = tl.program_id(0)
    split = tl.program_id(1)
    k = load(shift_ptr + channel, True, FP64)
    acc = acc_zeros(BLOCK, FP64)
    acc_sq = tl.zeros_like(acc)
    end = tl.minimum(N, split * chunk + chunk) * inner
    for f0 in range(split * chunk * inner, end, BLOCK):
        f = f0 + tl.arange(0, BLOCK)  # [BLOCK] (row, position) pairs of the channel
        ok = f < end
        e = (f // inner * C + channel).to(tl.int64) * inner + f % inner
        v = tl.where(ok, load(x_ptr + e, ok, FP64) - k, 0.0)
        acc += v
        acc_sq += v * v
    tl.store(sum_ptr + split * C + channel, tl.sum(acc, axis=0))
    tl.store(sq_ptr + split * C + channel, tl.sum(acc_sq, axis=0))


def _flat_grid(numel: int):
    return (triton.cdiv(numel, BLOCK),)


def _pair_like(c: Tensor, r: Tensor, *_) -> Tuple[Tensor, Tensor]:
    return empty(c.shape, c), empty(r.shape, r)


@library_op("triton_interval_relu", _pair_like)
def _interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    c, r = c.contiguous(), r.contiguous()
    c_out, r_out = _pair_like(c, r)
    if c.numel():
        launch(_relu_kernel)[_flat_grid(c.numel())](c, r, c_out, r_out, c.numel(), c.numel() - r.numel(),
                                                    FP64=c.dtype == torch.float64, BLOCK=BLOCK)
    return c_out, r_out


@library_op("triton_interval_relu_grad", _pair_like)
def relu_grad(c: Tensor, r: Tensor, gc: Tensor, gr: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of (c, r) through the interval ReLU, given those of its outputs; (c, r) may be the
    ReLU's input or its output."""
    c, r, gc, gr = c.contiguous(), r.contiguous(), gc.contiguous(), gr.contiguous()
    dc, dr = _pair_like(c, r)
    if c.numel():
        launch(_relu_grad_kernel)[_flat_grid(c.numel())](c, r, gc, gr, dc, dr, c.numel(), c.numel() - r.numel(),
                                                         FP64=c.dtype == torch.float64, BLOCK=BLOCK)
    return dc, dr


@library_op("triton_channel_affine", _pair_like)
def _channel_affine(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tuple[Tensor, Tensor]:
    c, r = c.contiguous(), r.contiguous()
    c_out, r_out = _pair_like(c, r)
    if c.numel():
        launch(_channel_affine_kernel)[_flat_grid(c.numel())](
            c, r, scale, shift, c_out, r_out, c.numel(), c.numel() - r.numel(), c.shape[1], math.prod(c.shape[2:]),
            RELU=relu, FP64=c.dtype == torch.float64, BLOCK=BLOCK)
    return c_out, r_out


def _channel_affine_grad_outputs(c, r, c_out, r_out, gc, gr, scale, relu):
    return empty(c.shape, c), empty(r.shape, r), empty(scale.shape, scale), empty(scale.shape, scale)


@library_op("triton_channel_affine_grad", _channel_affine_grad_outputs)
def _channel_affine_grad(c: Tensor, r: Tensor, c_out: Tensor, r_out: Tensor, gc: Tensor, gr: Tensor, scale: Tensor,
                         relu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dc, dr, dscale, dshift) of _channel_affine; c_out, r_out (its outputs) are read when relu."""
    c, r, c_out, r_out, gc, gr = (t.contiguous() for t in (c, r, c_out, r_out, gc, gr))
    dc, dr = _pair_like(c, r)
    n, channels, inner = c.shape[0], c.shape[1], math.prod(c.shape[2:])
    split = splits(c.numel(), channels, c.device)
    ds, dt = (empty((split, channels), c, acc_dtype(c.dtype)) for _ in range(2))
    if not c.numel():
        return dc, dr, torch.zeros_like(scale), torch.zeros_like(scale)
    launch(_channel_affine_grad_kernel)[(channels, split)](
        c, r, c_out, r_out, gc, gr, scale, dc, dr, ds, dt, n, n - r.shape[0], channels, inner,
        triton.cdiv(n, split), RELU=relu, FP64=c.dtype == torch.float64,
        BLOCK=min(BLOCK, max(16, triton.next_power_of_2(triton.cdiv(n, split) * inner))))
    return dc, dr, ds.sum(0).to(scale.dtype), dt.sum(0).to(scale.dtype)


def _moments_outputs(x):
    return tuple(empty((x.shape[1],), x, acc_dtype(x.dtype)) for _ in range(2))


@library_op("triton_batch_norm_stats", _moments_outputs)
def _moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, biased variance) per channel of x (N, C, *), in float32 (float64 for float64)."""
    x = x.contiguous()
    n, channels, inner = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    shift = x.view(n, channels, inner)[0, :, 0].contiguous()
    split = splits(x.numel(), channels, x.device)
    sums, squares = (empty((split, channels), x, acc_dtype(x.dtype)) for _ in range(2))
    launch(_moments_kernel)[(channels, split)](
        x, shift, sums, squares, n, channels, inner, triton.cdiv(n, split), FP64=x.dtype == torch.float64,
        BLOCK=min(BLOCK, max(16, triton.next_power_of_2(triton.cdiv(n, split) * inner))))
    count = n * inner
    centred = sums.sum(0) / count
    return shift.to(centred.dtype) + centred, (squares.sum(0) / count - centred.square()).clamp_min(0)


class _IntervalReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, r):
        ctx.save_for_backward(c, r)
        return _interval_relu(c, r)

    @staticmethod
    def backward(ctx, gc, gr):
        return relu_grad(*ctx.saved_tensors, gc, gr)


class _ChannelAffine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, r, scale, shift, relu: bool):
        c_out, r_out = _channel_affine(c, r, scale, shift, relu)
        ctx.save_for_backward(c, r, scale, c_out, r_out)
        ctx.relu = relu
        return c_out, r_out

    @staticmethod
    def backward(ctx, gc, gr):
        c, r, scale, c_out, r_out = ctx.saved_tensors
        return (*_channel_affine_grad(c, r, c_out, r_out, gc, gr, scale, ctx.relu), None)


class _BatchNormStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        mean, var = _moments(x)
        ctx.save_for_backward(x, mean)
        return mean.to(x.dtype), var.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        return batch_norm_stats_grad(x, mean, grad_mean, grad_var)


@register("interval_relu", "triton")
def interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """Interval ReLU ``l' = relu(c - r)``, ``u' = relu(c + r)`` in centre–radius form; c (N, *),
    r (M, *) the radii of c's last M rows; shapes kept. Computed in fp32 (fp64 for fp64)."""
    check_inputs("interval_relu", c, r)
    return _IntervalReLU.apply(c, r)


@register("interval_affine", "triton")
def interval_affine(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor, *, relu: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-channel affine ``(c * scale + shift, r * |scale|)`` (channels on dim 1, scale and shift
    (C,)), then the interval ReLU if ``relu``, in one pass; the backward reduces the scale and shift
    gradients in the pass that writes those of c and r."""
    check_inputs("interval_affine", c, r, scale, shift)
    return _ChannelAffine.apply(c, r, scale, shift, relu)



@register("batch_norm_stats", "triton")
def batch_norm_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Train-mode BatchNorm statistics: per-channel mean and biased variance of x (N, C, *) over
    every dim but 1, in one pass (accumulated in fp32, fp64 for fp64, around a shift taken from
    the channel) -> (C,), (C,) in x's dtype."""
    check_inputs("batch_norm_stats", x)
    return _BatchNormStats.apply(x)
