"""The implicit-GEMM kernels behind the affine ops (:mod:`.affine`) and their launchers.

Forward: a program owns a tile of output pixels x output channels and walks the reduction (kernel
taps x input channels; with few input channels, as for an RGB first layer, the (channel, tap) pairs
together, so that no k-step is mostly padding) once; every weight tile it loads feeds two accumulators, ``W ⊛ c`` for all
rows of the centres and ``|W| ⊛ r`` for the rows that carry a radius (the trailing rows, so the
natural stream rides along at no radius cost). The epilogue applies a per-channel scale (a folded
BatchNorm), adds the shift (bias) and applies the interval ReLU. The first layer under an l2 ball is
the same kernel with ``W² ⊛ s²`` and a square root for the radius (docs/design.md, "First affine layer under an l2 ball").

Backward: the gradient of the inputs is the same kernel run on the adjoint convolution (weight
strides swapped, gather inverted, one program per stride phase so that no product meets the zeros a
strided adjoint inserts); the weight gradient ``dc^T ⊛ c + sign(W) ⊙ (dr^T ⊛ r)`` (for l2
``+ 2W ⊙ (dr^T ⊛ s²)``) and the shift gradient come from one kernel, split over the output pixels
when the weight has few tiles. Likewise a forward with few output tiles and a long reduction (a
Linear layer on flattened features: a few hundred rows, 512 outputs, 32768 inputs) splits its input
channels over the grid and finishes the epilogue in a second, element-wise kernel. Linear is the 1x1 convolution of 1x1 images. Grouped convolutions
fall back to the torch backend.
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (acc_dtype, acc_zeros, autotune, dot, dot_flags, empty, interval_relu, launch, library_op, pair,
                      sign, splits, sqrt_nearest)
from .elementwise import BLOCK

Geometry = Tuple[List[int], List[int], List[int], List[int]]  # stride, padding (top, left), dilation, output size


def _configs(shapes):
    return [triton.Config(dict(zip(("BM", "BN", "BK"), s[:3])), num_warps=s[3], num_stages=s[4]) for s in shapes]


@triton.jit
def _accumulate(acc_c, acc_r, x_ptrs, xr_ptrs, x_mask, w_ptrs, w_mask, RADIUS: tl.constexpr, SQUARE: tl.constexpr,
                DOT: tl.constexpr, BF16: tl.constexpr):
    """One k-step: acc_c += x @ W and, when RADIUS, acc_r += xr @ f(W) (f = (.)² when SQUARE, else
    |.|); x, xr [BM, BK] and W [BK, BN] loaded through the pointers, 0 where masked."""
    wt = tl.load(w_ptrs, mask=w_mask, other=0.0)
    acc_c = dot(tl.load(x_ptrs, mask=x_mask, other=0.0), wt, acc_c, DOT, BF16)
    if RADIUS:
        if SQUARE:
            wr = wt * wt
        else:
            wr = tl.abs(wt)
        acc_r = dot(tl.load(xr_ptrs, mask=x_mask, other=0.0), wr, acc_r, DOT, BF16)
    return acc_c, acc_r


@triton.jit
def _epilogue(acc_c, acc_r, scale_ptr, shift_ptr, channel, mask, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
              SQRT: tl.constexpr, RELU: tl.constexpr):
    """(acc_c * scale + shift, acc_r * |scale|), then the square root of the radius (SQRT) and the
    interval ReLU (RELU); scale and shift are read at ``channel`` (broadcast against the accumulators)."""
    if HAS_SCALE:
        s = tl.load(scale_ptr + channel, mask=mask, other=0.0).to(acc_c.dtype)
        acc_c = acc_c * s
        acc_r = acc_r * tl.abs(s)
    if HAS_SHIFT:
        acc_c += tl.load(shift_ptr + channel, mask=mask, other=0.0).to(acc_c.dtype)
    if SQRT:
        acc_r = sqrt_nearest(acc_r)
    if RELU:
        acc_c, acc_r = interval_relu(acc_c, acc_r)
    return acc_c, acc_r


@triton.jit
def _finish_splits_kernel(ws_c_ptr, ws_r_ptr, scale_ptr, shift_ptr, c_out_ptr, r_out_ptr, numel, r_start, splits, O,
                          inner, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SQRT: tl.constexpr,
                          RELU: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """The outputs of a split _affine_kernel: its pieces summed (c: ``splits`` x numel elements; r:
    the elements from r_start on), then the epilogue; flat (N, O, inner) layout."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    ok = e < numel
    has_r = ok & (e >= r_start)
    acc_c = acc_zeros(BLOCK, FP64)
    acc_r = acc_zeros(BLOCK, FP64)
    for _ in range(splits):
        acc_c += tl.load(ws_c_ptr + e, mask=ok, other=0.0)
        acc_r += tl.load(ws_r_ptr + e - r_start, mask=has_r, other=0.0)
        ws_c_ptr += numel  # the next piece (64-bit pointer arithmetic)
        ws_r_ptr += numel - r_start
    acc_c, acc_r = _epilogue(acc_c, acc_r, scale_ptr, shift_ptr, (e // inner) % O, ok, HAS_SCALE, HAS_SHIFT, SQRT,
                             RELU)
    tl.store(c_out_ptr + e, acc_c.to(c_out_ptr.dtype.element_ty), mask=ok)
    tl.store(r_out_ptr + e - r_start, acc_r.to(r_out_ptr.dtype.element_ty), mask=has_r)


@autotune(_configs([(64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (32, 64, 32, 4, 4)]),
          key=["C", "O", "KH", "KW", "TRANSPOSED", "SQUARE", "RADIUS", "FLAT", "SPLIT", "DOT", "BF16"],
          interpreter=triton.Config({"BM": 16, "BN": 16, "BK": 16}))
@triton.jit
def _affine_kernel(
    c_ptr, r_ptr, w_ptr, scale_ptr, shift_ptr, c_out_ptr, r_out_ptr,
    sample_start, sample_end, n_points, chunk, piece_c, piece_r, C, H, W, O, P, Q, KH, KW,
    stride_h, stride_w, phases_w, pad_h, pad_w, dil_h, dil_w,
    sc_n, sc_c, sc_h, sc_w,
    sr_n, sr_c, sr_h, sr_w,
    sw_k, sw_o, sw_i, sw_j,
    so_n, so_o, so_p, so_q,
    TRANSPOSED: tl.constexpr, SQUARE: tl.constexpr, RADIUS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, SQRT: tl.constexpr, FLAT: tl.constexpr, SPLIT: tl.constexpr,
    FP64: tl.constexpr, DOT: tl.constexpr, BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr,
):
    """c_out = W ⊛ c, r_out = f(W) ⊛ r (f = |.| or (.)²) over a (C, H, W) -> (O, P, Q) convolution,
    then the epilogue, for the samples [sample_start, sample_end); sample n of r is sample n_points + n
    of c. RADIUS: every sample of the range has a radius (else none has). TRANSPOSED: the adjoint of
    the convolution with this stride / padding / dilation, from its output (C, H, W) to its input
    (O, P, Q), one stride phase (a, b) per program_id(2) = a * phases_w + b (phases past the image's
    edge have no pixels and get no program): the output pixels (a + stride_h*u, b + stride_w*v) and
    only the taps that reach them (no product with the zeros a strided adjoint
    would insert). FLAT (not TRANSPOSED): the reduction runs over (input channel, tap) pairs
    together, for C too small to fill a k-step. SPLIT (neither): program_id(2) sums the input
    channels [split * chunk, (split + 1) * chunk) only and stores its raw products into piece
    ``split`` of workspaces shaped like the outputs (piece_c / piece_r elements apart), for
    _finish_splits_kernel to sum and finish (a long reduction over few output tiles: Linear layers
    on flattened features)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    split = 0
    if TRANSPOSED:
        a = tl.program_id(2) // phases_w
        b = tl.program_id(2) % phases_w
        grid_p = (P - a + stride_h - 1) // stride_h  # rows of the phase's pixel grid (a < P: at least 1)
        grid_q = (Q - b + stride_w - 1) // stride_w
        step_p = stride_h
        step_q = stride_w
    else:
        a = 0
        b = 0
        grid_p = P
        grid_q = Q
        step_p = 1
        step_q = 1
        if SPLIT:
            split = tl.program_id(2)
    k_lo = split * chunk  # the input channels of this program: [k_lo, k_hi)
    k_hi = tl.minimum(C, k_lo + chunk)
    offs_m = pid_m * BM + tl.arange(0, BM)  # [BM] output pixels (n, u, v) of the sample range
    n = sample_start + offs_m // (grid_p * grid_q)
    p = a + step_p * ((offs_m // grid_q) % grid_p)
    q = b + step_q * (offs_m % grid_q)
    row_ok = n < sample_end
    offs_o = pid_o * BN + tl.arange(0, BN)  # [BN] output channels
    offs_k = tl.arange(0, BK)  # [BK] input channels of one step
    o_ok = offs_o < O
    n_r = n - n_points
    c_rows = c_ptr + n.to(tl.int64) * sc_n  # [BM]
    r_rows = r_ptr + n_r.to(tl.int64) * sr_n  # [BM]
    if FP64:
        acc_c = tl.zeros([BM, BN], dtype=tl.float64)
        acc_r = tl.zeros([BM, BN], dtype=tl.float64)
    else:
        acc_c = tl.zeros([BM, BN], dtype=tl.float32)
        acc_r = tl.zeros([BM, BN], dtype=tl.float32)
    if FLAT:  # few input channels: one reduction over the (input channel, tap) pairs, BK at a time
        taps = KH * KW
        for k0 in range(0, C * taps, BK):
            k = k0 + offs_k  # [BK]
            k_ok = k < C * taps
            ci = k // taps
            i = (k % taps) // KW
            j = k % KW
            h = p[:, None] * stride_h - pad_h + (i * dil_h)[None, :]  # [BM, BK]
            w = q[:, None] * stride_w - pad_w + (j * dil_w)[None, :]
            ok = row_ok[:, None] & k_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            acc_c, acc_r = _accumulate(acc_c, acc_r, c_rows[:, None] + ci[None, :] * sc_c + h * sc_h + w * sc_w,
                                       r_rows[:, None] + ci[None, :] * sr_c + h * sr_h + w * sr_w, ok,
                                       w_ptr + (ci * sw_k + i * sw_i + j * sw_j)[:, None] + offs_o[None, :] * sw_o,
                                       k_ok[:, None] & o_ok[None, :], RADIUS, SQUARE, DOT, BF16)
    else:  # tap by tap, BK input channels at a time
        for i in range(KH):
            for j in range(KW):
                if TRANSPOSED:  # the tap reaches the phase's pixels exactly, or none of them
                    lands = ((a + pad_h - i * dil_h) % stride_h == 0) & ((b + pad_w - j * dil_w) % stride_w == 0)
                    hh = p + pad_h - i * dil_h
                    ww = q + pad_w - j * dil_w
                    h = hh // stride_h
                    w = ww // stride_w
                    inside = (hh >= 0) & (ww >= 0) & (h < H) & (w < W)
                else:
                    lands = True
                    h = p * stride_h - pad_h + i * dil_h
                    w = q * stride_w - pad_w + j * dil_w
                    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
                if lands:
                    c_pix = c_rows + h * sc_h + w * sc_w  # [BM]
                    r_pix = r_rows + h * sr_h + w * sr_w  # [BM]
                    ok = row_ok & inside
                    w_tap = w_ptr + i * sw_i + j * sw_j
                    for k0 in range(k_lo, k_hi, BK):
                        k = k0 + offs_k
                        k_ok = k < k_hi
                        acc_c, acc_r = _accumulate(acc_c, acc_r, c_pix[:, None] + k[None, :] * sc_c,
                                                   r_pix[:, None] + k[None, :] * sr_c, ok[:, None] & k_ok[None, :],
                                                   w_tap + k[:, None] * sw_k + offs_o[None, :] * sw_o,
                                                   k_ok[:, None] & o_ok[None, :], RADIUS, SQUARE, DOT, BF16)
    if SPLIT:
        c_out_ptr += split * piece_c
        r_out_ptr += split * piece_r
    else:
        acc_c, acc_r = _epilogue(acc_c, acc_r, scale_ptr, shift_ptr, offs_o[None, :], o_ok[None, :], HAS_SCALE,
                                 HAS_SHIFT, SQRT, RELU)
    pix = p * so_p + q * so_q
    c_out = c_out_ptr + (n.to(tl.int64) * so_n + pix)[:, None] + offs_o[None, :] * so_o  # [BM, BN]
    tl.store(c_out, acc_c.to(c_out_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])
    if RADIUS:
        r_out = r_out_ptr + (n_r.to(tl.int64) * so_n + pix)[:, None] + offs_o[None, :] * so_o
        tl.store(r_out, acc_r.to(r_out_ptr.dtype.element_ty), mask=row_ok[:, None] & o_ok[None, :])


@triton.jit
def _gather_grad(acc, acc_b, g_ptr, x_ptr, start, end, offs_o, ci, col_ok, i, j, H, W, O, P, Q,
                 stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, sg_n, sg_o, sg_p, sg_q, sx_n, sx_c, sx_h, sx_w,
                 SUM: tl.constexpr, DOT: tl.constexpr, BF16: tl.constexpr, BK: tl.constexpr):
    """acc += g^T ⊛ x over the output pixels [start, end) for the columns (input channel ci [BN],
    tap (i, j): scalars, or [1, BN] per column); acc_b += g's row sums when SUM."""
    o_ok = offs_o < O
    for m0 in range(start, end, BK):
        m = m0 + tl.arange(0, BK)  # [BK] output pixels (n, p, q)
        m_ok = m < end
        n = (m // (P * Q)).to(tl.int64)
        p = (m // Q) % P
        q = m % Q
        h = p[:, None] * stride_h - pad_h + i * dil_h  # [BK, 1] or [BK, BN]
        w = q[:, None] * stride_w - pad_w + j * dil_w
        inside = m_ok[:, None] & col_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)  # [BK, BN]
        g = tl.load(g_ptr + offs_o[:, None] * sg_o + (n * sg_n + p * sg_p + q * sg_q)[None, :],
                    mask=o_ok[:, None] & m_ok[None, :], other=0.0)  # [BO, BK]
        x = tl.load(x_ptr + (n * sx_n)[:, None] + h * sx_h + w * sx_w + ci[None, :] * sx_c, mask=inside,
                    other=0.0)  # [BK, BN]
        acc = dot(g, x, acc, DOT, BF16)
        if SUM:
            acc_b += tl.sum(g.to(acc_b.dtype), axis=1)
    return acc, acc_b


@autotune(_configs([(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (32, 32, 64, 4, 3)]),
          key=["C", "O", "KH", "KW", "SQUARE", "FLAT", "DOT", "BF16"],
          interpreter=triton.Config({"BM": 16, "BN": 16, "BK": 16}))
@triton.jit
def _weight_grad_kernel(
    gc_ptr, gr_ptr, c_ptr, r_ptr, w_ptr, dw_ptr, db_ptr,
    pixels_c, pixels_r, chunk_c, chunk_r, C, H, W, O, P, Q, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sgc_n, sgc_o, sgc_p, sgc_q, sgr_n, sgr_o, sgr_p, sgr_q,
    sc_n, sc_c, sc_h, sc_w, sr_n, sr_c, sr_h, sr_w,
    sw_o, sw_k, sw_i, sw_j,
    sd_s, sd_o, sd_k, sd_i, sd_j, sb_s,
    SQUARE: tl.constexpr, HAS_BIAS: tl.constexpr, FLAT: tl.constexpr, FP64: tl.constexpr, DOT: tl.constexpr,
    BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Piece ``split`` of dW[o, k, i, j] = gc^T ⊛ c + f'(W) ⊙ (gr^T ⊛ r) (f' = sign or 2W) and of
    db[o] = sum of gc; grid (output-channel tiles, column tiles, splits): the columns are the input
    channels of one tap (program_id(2) = split * KH*KW + tap), or with FLAT the (input channel, tap)
    pairs together (program_id(2) = split), for C too small to fill a tile."""
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    if FLAT:
        split = tl.program_id(2)
        cols = pid_c * BN + tl.arange(0, BN)  # [BN] (input channel, tap) pairs
        ci = cols // (KH * KW)
        i = ((cols % (KH * KW)) // KW)[None, :]  # [1, BN]
        j = (cols % KW)[None, :]
        col_ok = cols < C * KH * KW
        first = pid_c == 0
    else:
        tap = tl.program_id(2) % (KH * KW)
        split = tl.program_id(2) // (KH * KW)
        ci = pid_c * BN + tl.arange(0, BN)  # [BN] input channels
        i = tap // KW
        j = tap % KW
        col_ok = ci < C
        first = (pid_c == 0) & (tap == 0)
    offs_o = pid_o * BM + tl.arange(0, BM)  # [BM] output channels
    if FP64:
        acc = tl.zeros([BM, BN], dtype=tl.float64)
        acc_b = tl.zeros([BM], dtype=tl.float64)
    else:
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        acc_b = tl.zeros([BM], dtype=tl.float32)
    acc_r = tl.zeros_like(acc)
    end_c = tl.minimum(pixels_c, split * chunk_c + chunk_c)
    end_r = tl.minimum(pixels_r, split * chunk_r + chunk_r)
    acc, acc_b = _gather_grad(acc, acc_b, gc_ptr, c_ptr, split * chunk_c, end_c, offs_o, ci, col_ok, i, j,
                              H, W, O, P, Q, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                              sgc_n, sgc_o, sgc_p, sgc_q, sc_n, sc_c, sc_h, sc_w, HAS_BIAS, DOT, BF16, BK)
    acc_r, acc_b = _gather_grad(acc_r, acc_b, gr_ptr, r_ptr, split * chunk_r, end_r, offs_o, ci, col_ok, i, j,
                                H, W, O, P, Q, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                sgr_n, sgr_o, sgr_p, sgr_q, sr_n, sr_c, sr_h, sr_w, False, DOT, BF16, BK)
    mask = (offs_o < O)[:, None] & col_ok[None, :]
    wt = tl.load(w_ptr + offs_o[:, None] * sw_o + ci[None, :] * sw_k + i * sw_i + j * sw_j,
                 mask=mask, other=0.0).to(acc.dtype)  # [BM, BN]
    if SQUARE:
        acc += 2.0 * wt * acc_r
    else:
        acc += sign(wt) * acc_r
    tl.store(dw_ptr + split * sd_s + offs_o[:, None] * sd_o + ci[None, :] * sd_k + i * sd_i + j * sd_j, acc,
             mask=mask)
    if HAS_BIAS:
        tl.store(db_ptr + split * sb_s + offs_o, acc_b, mask=(offs_o < O) & first)


def _flat(weight: Tensor, transposed: bool = False) -> bool:
    """Whether a convolution's reduction runs over (input channel, tap) pairs together: fewer input
    channels than the 32 of a tuned k-step (an RGB first layer), a kernel of several taps."""
    return not transposed and weight.shape[1] < 32 and weight.shape[2] * weight.shape[3] > 1


def _affine_outputs(c, r, weight, scale, shift, stride, padding, dilation, out_size, transposed, square, relu, sqrt,
                    precision):
    channels = weight.shape[1] if transposed else weight.shape[0]
    return empty((c.shape[0], channels, *out_size), c), empty((r.shape[0], channels, *out_size), c)


@library_op("triton_affine", _affine_outputs)
def affine_products(c: Tensor, r: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
            stride: List[int], padding: List[int], dilation: List[int], out_size: List[int], transposed: bool,
            square: bool, relu: bool, sqrt: bool, precision: str) -> Tuple[Tensor, Tensor]:
    """(W ⊛ c * scale + shift, f(W) ⊛ r * |scale|), f = |.| or (.)² (square), then sqrt of the radius
    (sqrt) and the interval ReLU (relu); c (N, C, H, W), r (M, C, H, W) the last M rows' radii,
    weight (O, C, KH, KW) -> (N, O, *out_size), (M, O, *out_size). transposed: the adjoint
    convolution, c (N, O, P, Q) -> (N, C, *out_size)."""
    c_out, r_out = _affine_outputs(c, r, weight, scale, shift, stride, padding, dilation, out_size, transposed, square,
                                   relu, sqrt, precision)
    if c_out.numel() == 0:
        return c_out, r_out
    channels, p, q = c_out.shape[1:]
    sw_k, sw_o = (weight.stride(0), weight.stride(1)) if transposed else (weight.stride(1), weight.stride(0))
    n_points = c.shape[0] - r.shape[0]
    # stride phases of the output pixels: phases at or past the image's edge have no pixels
    phases = (min(stride[0], p), min(stride[1], q)) if transposed else (1, 1)
    cells = triton.cdiv(p, phases[0]) * triton.cdiv(q, phases[1])  # pixels of the largest stride phase
    flat = _flat(weight, transposed)
    pieces, chunk = (1, c.shape[1]) if transposed or flat else _input_splits(c.shape[0] * cells, channels, weight)
    if pieces > 1:  # raw products into workspaces, finished by _finish_splits_kernel
        acc = acc_dtype(c.dtype)
        outputs = empty((pieces, *c_out.shape), c, acc), empty((pieces, *r_out.shape), c, acc)
    else:
        outputs = c_out, r_out
    # Two launches: the samples without a radius (the leading points), then those with one.
    for start, end, radius in ((0, n_points, False), (n_points, c.shape[0], True)):
        if end == start:
            continue

        def grid(meta, rows=(end - start) * cells):
            return triton.cdiv(rows, meta["BM"]), triton.cdiv(channels, meta["BN"]), phases[0] * phases[1] * pieces

        launch(_affine_kernel)[grid](
            c, r, weight, scale, shift, *outputs,
            start, end, n_points, chunk, c_out.numel(), r_out.numel(), c.shape[1], c.shape[2], c.shape[3], channels,
            p, q, weight.shape[2], weight.shape[3], stride[0], stride[1], phases[1], padding[0], padding[1], dilation[0],
            dilation[1], *c.stride(), *r.stride(), sw_k, sw_o, weight.stride(2), weight.stride(3), *c_out.stride(),
            TRANSPOSED=transposed, SQUARE=square, RADIUS=radius, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, RELU=relu, SQRT=sqrt, FLAT=flat, SPLIT=pieces > 1,
            FP64=c.dtype == torch.float64, **dot_flags(c.dtype, precision))
    if pieces > 1:
        launch(_finish_splits_kernel)[(triton.cdiv(c_out.numel(), BLOCK),)](
            *outputs, scale, shift, c_out, r_out, c_out.numel(), c_out.numel() - r_out.numel(), pieces, channels,
            p * q, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SQRT=sqrt, RELU=relu,
            FP64=c.dtype == torch.float64, BLOCK=BLOCK)
    return c_out, r_out


def _input_splits(rows: int, channels: int, weight: Tensor) -> Tuple[int, int]:
    """(pieces, input channels per piece) of a forward whose reduction over the input channels is
    split so that the grid fills the device: a long reduction over few output tiles, like a Linear
    layer on flattened features. Pieces are multiples of 32 channels (the tuned k-step)."""
    in_channels = weight.shape[1]
    tiles = triton.cdiv(rows, 64) * triton.cdiv(channels, 64)
    pieces = splits(in_channels * weight.shape[2] * weight.shape[3], tiles, weight.device)
    chunk = max(triton.cdiv(triton.cdiv(in_channels, pieces), 32), 1) * 32
    return max(triton.cdiv(in_channels, chunk), 1), chunk


def _weight_grad_outputs(gc, gr, c, r, weight, stride, padding, dilation, square, bias, precision):
    return empty(weight.shape, weight), empty((weight.shape[0] if bias else 0,), weight)


@library_op("triton_affine_weight_grad", _weight_grad_outputs)
def affine_weight_grad(gc: Tensor, gr: Tensor, c: Tensor, r: Tensor, weight: Tensor, stride: List[int],
                 padding: List[int], dilation: List[int], square: bool, bias: bool,
                 precision: str) -> Tuple[Tensor, Tensor]:
    """Gradients of the weight, ``gc^T ⊛ c + f'(W) ⊙ (gr^T ⊛ r)`` (f' = sign, or 2W when square),
    and of a shift (gc's channel sums, when bias; else an empty tensor). gc (N, O, P, Q), gr (M, O, P, Q)."""
    out_o, n, p, q = weight.shape[0], gc.shape[0], gc.shape[2], gc.shape[3]
    if weight.numel() == 0:  # no products (no input channels): the shift's gradient is gc's channel sums
        return torch.zeros_like(weight), gc.sum((0, 2, 3)) if bias else weight.new_empty(0)
    acc = acc_dtype(weight.dtype)
    taps = weight.shape[2] * weight.shape[3]
    flat = _flat(weight)
    columns, column_groups = (weight.shape[1] * taps, 1) if flat else (weight.shape[1], taps)
    tiles = triton.cdiv(out_o, 64) * triton.cdiv(columns, 64) * column_groups
    split = splits((n + gr.shape[0]) * p * q, tiles, weight.device)
    direct = split == 1 and acc == weight.dtype
    if direct:
        dw, db = _weight_grad_outputs(gc, gr, c, r, weight, stride, padding, dilation, square, bias, precision)
    else:
        dw, db = empty((split, *weight.shape), weight, acc), empty((split, out_o if bias else 0), weight, acc)

    def grid(meta):
        return triton.cdiv(out_o, meta["BM"]), triton.cdiv(columns, meta["BN"]), column_groups * split

    launch(_weight_grad_kernel)[grid](
        gc, gr, c, r, weight, dw, db if bias else None,
        n * p * q, gr.shape[0] * p * q, triton.cdiv(n * p * q, split), triton.cdiv(gr.shape[0] * p * q, split),
        weight.shape[1], c.shape[2], c.shape[3], out_o, p, q, weight.shape[2], weight.shape[3],
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *gc.stride(), *gr.stride(), *c.stride(), *r.stride(), *weight.stride(),
        0 if direct else dw.stride(0), *dw.stride()[-4:], 0 if direct else db.stride(0),
        SQUARE=square, HAS_BIAS=bias, FLAT=flat, FP64=acc == torch.float64, **dot_flags(c.dtype, precision))
    if direct:
        return dw, db
    return dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


def conv_geometry(op: str, image: Tuple[int, int], weight: Tensor, stride, padding, dilation) -> Geometry:
    """Stride, numeric top/left padding, dilation and output size of a convolution; padding "same"
    pads like torch (the odd pixel at the bottom / right)."""
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    spans = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if padding == "valid":
        padding = 0
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"{op}: padding='same' needs stride 1, got {stride}")
        return list(stride), [s // 2 for s in spans], list(dilation), list(image)
    padding = pair(padding, "padding")
    out = [(size + 2 * pad - span - 1) // st + 1 for size, pad, span, st in zip(image, padding, spans, stride)]
    if min(out) <= 0:
        raise ValueError(f"{op}: the kernel (span {spans[0] + 1}x{spans[1] + 1}) does not fit the padded "
                         f"input ({image[0]}x{image[1]}, padding {padding})")
    return list(stride), list(padding), list(dilation), out


LINEAR_GEOMETRY = ([1, 1], [0, 0], [1, 1], [1, 1])
