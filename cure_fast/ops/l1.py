"""The first affine layer under an l1 ball, exact per output neuron by the dual (l∞) norm.

Over ``{x + s ⊙ u : |u|_1 <= eps}`` (``s`` the inverse std of a Normalize before the layer): Linear
``r_i = eps max_j |W_ij s_j|``; Conv2d ``r[o, p, q] = eps max |W[o, c, i, j]| s[c, p', q']`` over the
taps inside the image (zero padding cuts the kernel at the border); margins folded into the last
layer ``eps max_i |(W_y - W_j)_i s_i|``. Pure PyTorch on every backend (no kernels): a maximum
over the weights instead of a sum, cheap beside the layer's own product.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

from .common import Eps, Interval, IntOrPair, batched_eps, check_features, check_l2, check_labels, scale_power
from .policy import honoured, resolve_precision


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _pads(padding, weight: Tensor, dilation: Tuple[int, int]) -> Tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of a convolution, "same" as torch pads it."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        spans = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        return (spans[1] // 2, spans[1] - spans[1] // 2, spans[0] // 2, spans[0] - spans[0] // 2)
    ph, pw = _pair(padding)
    return (pw, pw, ph, ph)


def l1_linear_ref(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None) -> Interval:
    """``c = x W^T + b``, ``r_i = eps max_j |W_ij s_j|``. x (B, in), scale None or broadcastable -> (B, out) twice."""
    radius = (weight.abs()[None] * scale_power(scale, x, 1)[:, None, :]).amax(-1)  # (1 or B, out)
    r = (batched_eps(eps, x, 2) * radius).expand(x.shape[0], weight.shape[0])
    return F.linear(x, weight, bias), r


def l1_conv2d_ref(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None,
                  stride: IntOrPair = 1, padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1,
                  groups: int = 1, scale: Optional[Tensor] = None) -> Interval:
    """``c = conv(x, W) + b``; ``r`` the largest ``|W| s`` over the taps inside the image, times eps.
    x (B, C, H, W), scale None or broadcastable to x -> (B, O, P, Q) twice."""
    c = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    dilation, stride = _pair(dilation), _pair(stride)
    axes = F.pad(scale_power(scale, x, 1), _pads(padding, weight, dilation))  # zeros outside the image: never the max
    columns = F.unfold(axes, weight.shape[2:], dilation=dilation, stride=stride)  # (1 or B, C*KH*KW, P*Q)
    out, per_group = weight.shape[0], weight[0].numel()
    columns = columns.view(columns.shape[0], groups, 1, per_group, -1)
    magnitudes = weight.abs().reshape(groups, out // groups, per_group, 1)
    radius = (magnitudes[None] * columns).amax(3).reshape(columns.shape[0], out, *c.shape[2:])
    return c, (batched_eps(eps, x, 4) * radius).expand_as(c)


def l1_margins_linear_ref(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                          scale: Optional[Tensor] = None) -> Tensor:
    """``m_j = (W_y - W_j) x + b_y - b_j - eps max_i |(W_y - W_j)_i s_i|``. x (B, in) -> (B, K), 0 at j = y."""
    logits = F.linear(x, weight, bias)
    centre = logits.gather(1, labels[:, None]) - logits
    rows = (weight[labels][:, None, :] - weight[None]).abs()  # (B, K, in)
    spread = (rows * scale_power(scale, x, 1).expand_as(x)[:, None, :]).amax(-1)
    return centre - batched_eps(eps, x, 2) * spread


def l1_linear(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None, scale: Optional[Tensor] = None,
              *, precision: Optional[str] = None) -> Interval:
    """Exact bounds of a linear layer over ``{x + scale ⊙ u : |u|_1 <= eps}``: x (B, in) -> (B, out) twice."""
    check_l2("l1_linear", x, eps, scale)
    if x.dim() != 2:
        raise ValueError(f"l1_linear: expected x of shape (B, in), got {tuple(x.shape)}")
    check_features("l1_linear", x.shape[1], weight.shape[1], "input features")
    with honoured(resolve_precision(precision), x.device):
        return l1_linear_ref(x, eps, weight, bias, scale)


def l1_conv2d(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor] = None, stride: IntOrPair = 1,
              padding: Union[IntOrPair, str] = 0, dilation: IntOrPair = 1, groups: int = 1,
              scale: Optional[Tensor] = None, *, precision: Optional[str] = None) -> Interval:
    """Exact, padding-aware bounds of a convolution over ``{x + scale ⊙ u : |u|_1 <= eps}``:
    x (B, C, H, W) -> (B, O, P, Q) twice."""
    check_l2("l1_conv2d", x, eps, scale)
    if x.dim() != 4:
        raise ValueError(f"l1_conv2d: expected x of shape (B, C, H, W), got {tuple(x.shape)}")
    check_features("l1_conv2d", x.shape[1], weight.shape[1] * groups, "input channels")
    with honoured(resolve_precision(precision), x.device):
        return l1_conv2d_ref(x, eps, weight, bias, stride, padding, dilation, groups, scale)


def l1_margins_linear(x: Tensor, eps: Eps, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      scale: Optional[Tensor] = None, *, precision: Optional[str] = None) -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` of a linear layer over ``{x + scale ⊙ u : |u|_1 <= eps}``: (B, K)."""
    check_l2("l1_margins_linear", x, eps, scale)
    if x.dim() != 2:
        raise ValueError(f"l1_margins_linear: expected x of shape (B, in), got {tuple(x.shape)}")
    check_features("l1_margins_linear", x.shape[1], weight.shape[1], "input features")
    check_labels("l1_margins_linear", labels, x.shape[0], weight.shape[0])
    with honoured(resolve_precision(precision), x.device):
        return l1_margins_linear_ref(x, eps, weight, bias, labels.long(), scale)
