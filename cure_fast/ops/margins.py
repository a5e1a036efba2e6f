"""Margins with the specification folded into the last linear layer (docs/design.md, "Margins").

Certifying label ``y`` needs lower bounds on ``z_y - z_j``; folding ``C = e_y - e_j`` into the last
layer (``W_C = C W``) is much tighter than subtracting logit intervals.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import Eps, batched_eps, check_features, check_interval, check_l2, check_labels, safe_sqrt, scale_squared
from .registry import dispatch_dot, register


@register("margins_linear", "torch")
def margins_linear_ref(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor) -> Tensor:
    """Lower bounds on ``z_y - z_j`` with the specification ``e_y - e_j`` folded into the last layer.

    ``m_j = (W_y - W_j) c + b_y - b_j - |W_y - W_j| r``. c (N, in), r (M, in), weight (K, in),
    labels (N,) int64 -> (N, K), exactly 0 at ``j = y``.
    """
    logits = F.linear(c, weight, bias)
    centre = logits.gather(1, labels[:, None]) - logits
    n_points = c.shape[0] - r.shape[0]
    rows = weight[labels[n_points:]]  # (M, in)
    spread = torch.einsum("mki,mi->mk", (rows[:, None, :] - weight[None]).abs(), r)
    return torch.cat([centre[:n_points], centre[n_points:] - spread])


@register("l2_margins_linear", "torch")
def l2_margins_linear_ref(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor],
                          labels: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``.

    ``m_j = (W_y - W_j) x + b_y - b_j - eps * |(W_y - W_j) ⊙ scale|_2``. x (B, in), eps float or (B,),
    weight (K, in), labels (B,) int64 -> (B, K), exactly 0 at ``j = y``.
    """
    logits = F.linear(x, weight, bias)
    centre = logits.gather(1, labels[:, None]) - logits
    rows = (weight[labels][:, None, :] - weight[None]).square()  # (B, K, in)
    spread = safe_sqrt(torch.einsum("bki,bi->bk", rows, scale_squared(scale, x).expand_as(x)))
    return centre - batched_eps(eps, x, 2) * spread


def margins_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                   backend: Optional[str] = None, precision: Optional[str] = None) -> Tensor:
    """Lower bounds on the margins ``z_y - z_j`` of a last linear layer, the specification folded in.

    c (N, in), r (M, in), weight (K, in), bias (K,) or None, labels (N,) int -> (N, K), 0 at ``j = y``.
    """
    check_interval("margins_linear", c, r, dims=2)
    check_features("margins_linear", c.shape[1], weight.shape[1], "input features")
    check_labels("margins_linear", labels, c.shape[0], weight.shape[0])
    return dispatch_dot("margins_linear", backend, c, precision, (c, r, weight, bias, labels.long()))


def l2_margins_linear(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      scale: Optional[Tensor] = None, *, backend: Optional[str] = None,
                      precision: Optional[str] = None) -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``.

    x (B, in), eps float or (B,), weight (K, in), labels (B,) int -> (B, K), 0 at ``j = y``.
    """
    check_l2("l2_margins_linear", x, eps, scale)
    if x.dim() != 2:
        raise ValueError(f"l2_margins_linear: expected x of shape (B, in), got {tuple(x.shape)}")
    check_features("l2_margins_linear", x.shape[1], weight.shape[1], "input features")
    check_labels("l2_margins_linear", labels, x.shape[0], weight.shape[0])
    return dispatch_dot("l2_margins_linear", backend, x, precision, (x, eps, weight, bias, labels.long(), scale))
