"""Margins with the specification folded into the last linear layer.

For label y and every class j, the lower bound on ``z_y - z_j`` is ``(W_y - W_j)·c + b_y - b_j``
minus a spread: ``|W_y - W_j|·r`` over a box, ``eps |(W_y - W_j) ⊙ s|_2`` over an l2 ball. The rows
``W_y - W_j`` are formed on the fly, tile by tile, instead of materializing the (rows, classes, in)
tensor of the reference. The forward kernel writes the centre and the spread (the caller subtracts,
scaled by eps for l2); the backward kernel writes the input gradients and partial weight / bias
gradients for its slice of rows. Products are IEEE fp32 (fp64 for fp64) whatever the precision.
"""

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from cure_fast.ops.common import batched_eps, scale_squared
from cure_fast.ops.registry import register

from ._common import acc_dtype, check_inputs, empty, launch, library_op, load, sign, splits, sqrt_nearest


@triton.jit
def _margins_kernel(c_ptr, r_ptr, w_ptr, b_ptr, y_ptr, centre_ptr, spread_ptr, n_points, K, F,
                    sc_n, sc_f, sr_n, sr_f, sw_k, sw_f,
                    L2: tl.constexpr, HAS_BIAS: tl.constexpr, FP64: tl.constexpr, BK: tl.constexpr,
                    BF: tl.constexpr):
    """Row n: centre_j = (W_y - W_j)·c_n + b_y - b_j, spread_j = |W_y - W_j|·r (L2: sqrt((W_y - W_j)²·r));
    row n of c has radius row n - n_points of r (none before n_points: spread 0)."""
    n = tl.program_id(0)
    y = tl.load(y_ptr + n)
    j = tl.arange(0, BK)  # [BK] classes
    j_ok = j < K
    has_r = n >= n_points
    if FP64:
        acc_c = tl.zeros([BK], dtype=tl.float64)
    else:
        acc_c = tl.zeros([BK], dtype=tl.float32)
    acc_r = tl.zeros_like(acc_c)
    for f0 in range(0, F, BF):
        f = f0 + tl.arange(0, BF)  # [BF] input features
        f_ok = f < F
        x = load(c_ptr + n.to(tl.int64) * sc_n + f * sc_f, f_ok, FP64)
        rr = load(r_ptr + (n - n_points).to(tl.int64) * sr_n + f * sr_f, f_ok & has_r, FP64)
        d = load(w_ptr + y * sw_k + f * sw_f, f_ok, FP64)[None, :] - load(
            w_ptr + j[:, None] * sw_k + f[None, :] * sw_f, j_ok[:, None] & f_ok[None, :], FP64)  # [BK, BF]
        acc_c += tl.sum(d * x[None, :], axis=1)
        if L2:
            acc_r += tl.sum(d * d * rr[None, :], axis=1)
        else:
            acc_r += tl.sum(tl.abs(d) * rr[None, :], axis=1)
    if HAS_BIAS:
        acc_c += load(b_ptr + y, True, FP64) - load(b_ptr + j, j_ok, FP64)
    if L2:
        acc_r = sqrt_nearest(acc_r)
    tl.store(centre_ptr + n * K + j, acc_c.to(centre_ptr.dtype.element_ty), mask=j_ok)
    tl.store(spread_ptr + n * K + j, acc_r.to(spread_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _margins_grad_kernel(gc_ptr, gs_ptr, c_ptr, r_ptr, w_ptr, y_ptr, spread_ptr, dc_ptr, dr_ptr, dw_ptr, db_ptr,
                         N, n_points, K, F, chunk, sgc_n, sgc_k, sgs_n, sgs_k, sc_n, sc_f, sr_n, sr_f, sw_k, sw_f,
                         L2: tl.constexpr, HAS_BIAS: tl.constexpr, FP64: tl.constexpr, BK: tl.constexpr,
                         BF: tl.constexpr):
    """Gradients of _margins_kernel given gc (centre) and gs (spread): dc and dr for the rows of
    this split and feature block, its partial dW (K, F) and db (K,); grid (feature blocks, splits)."""
    pid_f = tl.program_id(0)
    split = tl.program_id(1)
    f = pid_f * BF + tl.arange(0, BF)  # [BF] input features
    f_ok = f < F
    j = tl.arange(0, BK)  # [BK] classes
    j_ok = j < K
    w = load(w_ptr + j[:, None] * sw_k + f[None, :] * sw_f, j_ok[:, None] & f_ok[None, :], FP64)  # [BK, BF]
    acc_w = tl.zeros_like(w)
    acc_b = tl.zeros([BK], dtype=w.dtype)
    for n in range(split * chunk, tl.minimum(N, split * chunk + chunk)):
        y = tl.load(y_ptr + n)
        one_hot = j == y  # [BK]
        has_r = n >= n_points
        row = tl.cast(n, tl.int64)
        row_r = row - n_points
        d = load(w_ptr + y * sw_k + f * sw_f, f_ok, FP64)[None, :] - w  # [BK, BF] rows W_y - W_j
        g = load(gc_ptr + row * sgc_n + j * sgc_k, j_ok, FP64)  # [BK]
        coef = tl.where(one_hot, tl.sum(g, axis=0), 0.0) - g  # [BK] d(centre)/d(W, b): +sum at y, -g_j at j
        acc_w += coef[:, None] * load(c_ptr + row * sc_n + f * sc_f, f_ok, FP64)[None, :]
        acc_b += coef
        tl.store(dc_ptr + row * F + f, tl.sum(g[:, None] * d, axis=0).to(dc_ptr.dtype.element_ty), mask=f_ok)
        gs = load(gs_ptr + row * sgs_n + j * sgs_k, j_ok & has_r, FP64)  # [BK]
        rr = load(r_ptr + row_r * sr_n + f * sr_f, f_ok & has_r, FP64)  # [BF]
        if L2:
            spread = load(spread_ptr + row * K + j, j_ok & has_r, FP64)
            u = tl.where(spread > 0, gs / tl.where(spread > 0, spread, 1.0), 0.0)  # [BK] 0 where the spread is 0
            t = u[:, None] * d * rr[None, :]  # [BK, BF] gs * d(spread)/d(W_y - W_j)
            dr = 0.5 * tl.sum(u[:, None] * d * d, axis=0)
        else:
            t = gs[:, None] * sign(d) * rr[None, :]
            dr = tl.sum(gs[:, None] * tl.abs(d), axis=0)
        acc_w += tl.where(one_hot[:, None], tl.sum(t, axis=0)[None, :], 0.0) - t
        tl.store(dr_ptr + row_r * F + f, dr.to(dr_ptr.dtype.element_ty), mask=f_ok & has_r)
    mask = j_ok[:, None] & f_ok[None, :]
    tl.store(dw_ptr + split * K * F + j[:, None] * F + f[None, :], acc_w, mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + split * K + j, acc_b, mask=j_ok & (pid_f == 0))


def _blocks(classes: int) -> Tuple[int, int]:
    block_k = max(2, triton.next_power_of_2(classes))
    return block_k, max(16, min(128, 4096 // block_k))


def _margins_outputs(c, r, weight, bias, labels, l2):
    return empty((c.shape[0], weight.shape[0]), c), empty((c.shape[0], weight.shape[0]), c)


@library_op("triton_margins", _margins_outputs)
def _margins(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
             l2: bool) -> Tuple[Tensor, Tensor]:
    """(centre, spread), each (N, K): c (N, F), r (M, F) the radii (l2: squared axes) of c's last M rows."""
    centre, spread = _margins_outputs(c, r, weight, bias, labels, l2)
    if c.shape[0]:
        block_k, block_f = _blocks(weight.shape[0])
        launch(_margins_kernel)[(c.shape[0],)](
            c, r, weight, bias, labels, centre, spread, c.shape[0] - r.shape[0], weight.shape[0],
            weight.shape[1], *c.stride(), *r.stride(), *weight.stride(), L2=l2, HAS_BIAS=bias is not None,
            FP64=c.dtype == torch.float64, BK=block_k, BF=block_f)
    return centre, spread


def _margins_grad_outputs(g_centre, g_spread, c, r, weight, labels, spread, l2, bias):
    return (empty(c.shape, c), empty(r.shape, r), empty(weight.shape, weight),
            empty((weight.shape[0] if bias else 0,), weight))


@library_op("triton_margins_grad", _margins_grad_outputs)
def _margins_grad(g_centre: Tensor, g_spread: Tensor, c: Tensor, r: Tensor, weight: Tensor, labels: Tensor,
                  spread: Tensor, l2: bool, bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dc, dr, dW, db) of _margins given the gradients of its outputs; db is empty without bias."""
    dc, dr, _, _ = _margins_grad_outputs(g_centre, g_spread, c, r, weight, labels, spread, l2, bias)
    classes, features = weight.shape
    if not c.shape[0]:
        return dc, dr, torch.zeros_like(weight), weight.new_zeros(classes if bias else 0)
    block_k, block_f = _blocks(classes)
    blocks = triton.cdiv(features, block_f)
    split = splits(c.shape[0] * features, blocks, c.device)
    dw = empty((split, classes, features), weight, acc_dtype(weight.dtype))
    db = empty((split, classes), weight, acc_dtype(weight.dtype))
    launch(_margins_grad_kernel)[(blocks, split)](
        g_centre, g_spread, c, r, weight, labels, spread, dc, dr, dw, db,
        c.shape[0], c.shape[0] - r.shape[0], classes, features, triton.cdiv(c.shape[0], split),
        *g_centre.stride(), *g_spread.stride(), *c.stride(), *r.stride(), *weight.stride(),
        L2=l2, HAS_BIAS=bias, FP64=c.dtype == torch.float64, BK=block_k, BF=block_f)
    return dc, dr, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype) if bias else weight.new_zeros(0)


class _Margins(torch.autograd.Function):
    @staticmethod
    def forward(ctx, c, r, weight, bias, labels, l2: bool):
        centre, spread = _margins(c, r, weight, bias, labels, l2)
        ctx.save_for_backward(c, r, weight, labels, spread)
        ctx.l2, ctx.has_bias = l2, bias is not None
        return centre, spread

    @staticmethod
    def backward(ctx, g_centre, g_spread):
        dc, dr, dw, db = _margins_grad(g_centre, g_spread, *ctx.saved_tensors, ctx.l2, ctx.has_bias)
        return dc, dr, dw, db if ctx.has_bias else None, None, None


@register("margins_linear", "triton")
def margins_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                   precision: str = "ieee") -> Tensor:
    """Lower bounds on ``z_y - z_j`` of a last linear layer over boxes, the specification folded in:
    ``(W_y - W_j)·c + b_y - b_j - |W_y - W_j|·r``. c (N, in), r (M, in) the radii of c's last M rows,
    weight (K, in), labels (N,) -> (N, K), exactly 0 at j = y. ``precision`` is not used (IEEE)."""
    check_inputs("margins_linear", c, r, weight, bias)
    centre, spread = _Margins.apply(c, r, weight, bias, labels, False)
    return centre - spread


@register("l2_margins_linear", "triton")
def l2_margins_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``:
    ``(W_y - W_j)·x + b_y - b_j - eps |(W_y - W_j) ⊙ scale|_2``. x (B, in) -> (B, K), 0 at j = y."""
    check_inputs("l2_margins_linear", x, weight, bias)
    s2 = scale_squared(scale, x).expand_as(x)
    centre, spread = _Margins.apply(x, s2, weight, bias, labels, True)
    return centre - batched_eps(eps, x, 2) * spread
