"""Margins of the last linear layer on CUDA (csrc/margins.cu): lower bounds on ``z_y - z_j`` with the
specification ``e_y - e_j`` folded into the layer, for an interval input and for the l2 ball, one
block per row; the backward is :func:`margins_grad` (GEMMs against the label-indexed difference
tables, written in PyTorch)."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..ops.common import scale_squared
from ..ops.registry import register
from .extension import eps_rows, load

# ---------------------------------------------------------------------------------------------
# The custom op and its fake implementation


@torch.library.custom_op("cure_fast::margins_linear_cuda", mutates_args=())
def margins_op(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, eps: Optional[Tensor],
               l2: bool) -> Tensor:
    """The margins (N, K): interval (r the radii of c's last rows) or, with ``l2``, over the l2 ball
    (r the squared scales, one row or one per row; eps (N,) or None for 1)."""
    return load().margins_linear(c, r, weight, bias, labels, eps, l2)


@margins_op.register_fake
def _(c, r, weight, bias, labels, eps, l2):
    return c.new_empty((c.shape[0], weight.shape[0]))


# ---------------------------------------------------------------------------------------------
# Autograd

def _label_blocks(values: Tensor, labels: Tensor, classes: int) -> Tensor:
    """(R, K) values -> (R, K * K): row i holds its values in block ``labels[i]``, zeros elsewhere,
    so that ``blocks @ table.view(K * K, F)`` applies the (K, F) slice ``table[labels[i]]`` to row i."""
    out = values.new_zeros((values.shape[0], classes, classes))
    out[torch.arange(values.shape[0], device=values.device), labels] = values
    return out.view(values.shape[0], classes * classes)


def margins_grad(g: Tensor, c: Tensor, r: Tensor, weight: Tensor, labels: Tensor, eps: Optional[Tensor], l2: bool,
                 needs: Tuple[bool, ...]) -> Tuple[Optional[Tensor], ...]:
    """Gradients (c, r, weight, bias, eps) of ``m[n, j] = D_nj · c_n + b_y - b_j - e_n f(D_nj, r)``,
    ``D_nj = W_y - W_j``, ``f = |D| · r`` (interval: r holds the radii of c's last rows) or
    ``sqrt(D² · s2)`` (l2: r holds the squared scales, one row or one per row; e = eps or 1), given
    g = dL/dm (N, K); ``needs`` says which of the five are wanted (eps: l2 with eps only).

    Every radius term goes through the (K, K, F) tables ``W_y - W_j`` indexed by label, so the
    work is GEMMs of the rows against those tables, and no (rows, K, F) tensor is formed.
    """
    classes = weight.shape[0]
    n_points = 0 if l2 else c.shape[0] - r.shape[0]
    g_sum = g.sum(1, keepdim=True)
    d_c = g_sum * weight[labels] - g @ weight if needs[0] else None
    d_w = torch.index_add(-(g.t() @ c), 0, labels, g_sum * c) if needs[2] else None
    d_b = torch.index_add(-g.sum(0), 0, labels, g_sum[:, 0]) if needs[3] else None
    rows, g_r = labels[n_points:], g[n_points:]
    want_eps = l2 and eps is not None and len(needs) > 4 and needs[4]
    if not r.shape[0] or not (needs[1] or needs[2] or want_eps):
        return d_c, torch.zeros_like(r) if needs[1] else None, d_w, d_b, None
    diff = (weight[:, None, :] - weight[None]).reshape(classes * classes, -1)  # [y * K + j] = W_y - W_j
    if l2:
        squares = diff.square()
        spread = (r @ squares.t()).view(r.shape[0], classes, classes)  # (1 or R, K, K)
        spread = spread[0, rows] if r.shape[0] == 1 else spread[torch.arange(rows.shape[0], device=g.device), rows]
        e = eps[:, None] if eps is not None else g_r.new_ones(())
        d_eps = -(g_r * spread.clamp_min(0).sqrt()).sum(1) if want_eps else None
        positive = spread > 0
        coeff = torch.where(positive, -g_r * e / torch.where(positive, spread, 1).sqrt(), 0)  # 2 d m / d spread
        blocks = _label_blocks(coeff, rows, classes)
        d_r = 0.5 * (blocks @ squares) if needs[1] else None
        if d_r is not None and r.shape[0] == 1:
            d_r = d_r.sum(0, keepdim=True)
        table = diff * (blocks.t() @ r.expand(rows.shape[0], -1))  # sum over rows of each label
    else:
        d_eps = None
        blocks = _label_blocks(g_r, rows, classes)
        d_r = -(blocks @ diff.abs()) if needs[1] else None
        table = -diff.sign() * (blocks.t() @ r)
    if needs[2]:
        table = table.view(classes, classes, -1)  # [y, j]: summed over the rows of label y
        d_w = d_w - table.sum(0) + table.sum(1)
    return d_c, d_r, d_w, d_b, d_eps


def _setup(ctx, inputs, output):
    c, r, weight, bias, labels, eps, l2 = inputs
    ctx.l2 = l2
    ctx.save_for_backward(c, r, weight, bias, labels, eps)


def _grad(ctx, g):
    c, r, weight, bias, labels, eps = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], need[1], need[2], bias is not None and need[3], eps is not None and need[5])
    d_c, d_r, d_w, d_b, d_eps = margins_grad(g.contiguous(), c, r, weight, labels, eps, ctx.l2, needs)
    return d_c, d_r, d_w, d_b, None, d_eps, None


margins_op.register_autograd(_grad, setup_context=_setup)


# ---------------------------------------------------------------------------------------------
# The public functions

@register("margins_linear", "cuda")
def margins_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                   precision: str = "ieee") -> Tensor:
    """Lower bounds on ``z_y - z_j`` with ``e_y - e_j`` folded into the last layer, one block per row.
    c (N, in), r (M, in), weight (K, in), labels (N,) -> (N, K), 0 at ``j = y``. FMA in fp32 (fp64)
    whatever ``precision``."""
    opt_bias = bias.contiguous() if bias is not None else None
    return margins_op(c.contiguous(), r.contiguous(), weight.contiguous(), opt_bias, labels.long().contiguous(), None,
                      False)


@register("l2_margins_linear", "cuda")
def l2_margins_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` over ``{x + scale ⊙ u : |u|_2 <= eps}`` in one kernel.
    x (B, in), eps float or (B,), weight (K, in), labels (B,) -> (B, K)."""
    s2 = scale_squared(scale, x).contiguous()
    opt_bias = bias.contiguous() if bias is not None else None
    return margins_op(x.contiguous(), s2, weight.contiguous(), opt_bias, labels.long().contiguous(), eps_rows(eps, x),
                      True)
