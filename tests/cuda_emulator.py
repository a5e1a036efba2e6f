"""A pure-PyTorch stand-in for the extension ``cure_fast._C``: every entry point computes what its
CUDA kernel computes (as csrc/ops/ documents it), on any device. Swapped in with
``cure_fast.cuda.use(extension)``, it lets the CPU tests check the Python side of the cuda backend:
the custom ops, their fake implementations and their autograd formulas.

:func:`entry_points` reads the names the cuda backend calls from its sources, so no list of them is
kept by hand."""
import ast
import pathlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

import cure_fast.cuda
from cure_fast.ops import interval_relu_ref


def _relu_backward(c, r, grad_c, grad_r):
    """Gradients of interval_relu_ref: with l = c - r, u = c + r, c' = (relu(u) + relu(l)) / 2 and
    r' = (relu(u) - relu(l)) / 2; relu(c) on the point rows (the first rows of c without radius)."""
    points = c.shape[0] - r.shape[0]
    lower, upper = c[points:] - r, c[points:] + r
    g_lower = (grad_c[points:] - grad_r) / 2 * (lower > 0)
    g_upper = (grad_c[points:] + grad_r) / 2 * (upper > 0)
    return torch.cat([grad_c[:points] * (c[:points] > 0), g_lower + g_upper]), g_upper - g_lower


def _channel(t, like):
    return t.view((1, -1) + (1,) * (like.dim() - 2))


def _epilogue(xc, xr, bias, scale, shift, relu):
    zc, zr = xc.clone(), xr.clone()  # outputs are new tensors, as the kernel's
    if bias is not None:
        zc = zc + _channel(bias, xc)
    if scale is not None:
        zc, zr = zc * _channel(scale, xc), zr * _channel(scale.abs(), xr)
    if shift is not None:
        zc = zc + _channel(shift, xc)
    return interval_relu_ref(zc, zr) if relu else (zc, zr)


def _epilogue_backward(xc, xr, bias, scale, shift, relu, grad_c, grad_r):
    """(grad_xc, grad_xr, sums (2, C)): sums[0] = sum of the gradient at z_c, sums[1] = the scale's gradient."""
    zc, zr = xc + (_channel(bias, xc) if bias is not None else 0), xr
    if scale is not None:
        zc, zr = zc * _channel(scale, xc), zr * _channel(scale.abs(), xr)
    if shift is not None:
        zc = zc + _channel(shift, xc)
    g_zc, g_zr = _relu_backward(zc, zr, grad_c, grad_r) if relu else (grad_c, grad_r)
    dims = [0] + list(range(2, xc.dim()))
    s = _channel(scale, xc) if scale is not None else 1
    sign = _channel(scale.sign(), xr) if scale is not None else 1
    pre_c = xc + (_channel(bias, xc) if bias is not None else 0)
    sums = torch.stack([g_zc.sum(dims), (g_zc * pre_c).sum(dims) + (g_zr * xr * sign).sum(dims)])
    return g_zc * s, g_zr * (s.abs() if scale is not None else 1), sums


def _pre(save, *tensors):
    return tensors if save else tuple(t.new_empty((0,)) for t in tensors)


def _linear_forward(c, r, weight, bias, scale, shift, relu, precision, save_pre):
    pre_c, pre_r = c @ weight.t(), r @ weight.abs().t()
    return (*_epilogue(pre_c, pre_r, bias, scale, shift, relu), *_pre(save_pre, pre_c, pre_r))


def _linear_grad_weight(grad_c, grad_r, c, r, weight, precision):
    return grad_c.t() @ c + weight.sign() * (grad_r.t() @ r[r.shape[0] - grad_r.shape[0]:])


def _conv_forward(c, r, weight, bias, scale, shift, relu, stride, padding, dilation, precision, save_pre):
    pre_c = F.conv2d(c, weight, None, stride, padding, dilation)
    pre_r = F.conv2d(r, weight.abs(), None, stride, padding, dilation)
    return (*_epilogue(pre_c, pre_r, bias, scale, shift, relu), *_pre(save_pre, pre_c, pre_r))


def _conv_grad_input(grad_c, grad_r, weight, input_size, stride, padding, dilation, precision):
    def one(g, w):
        return conv2d_input((g.shape[0], weight.shape[1], *input_size), w, g, stride, padding, dilation)
    return one(grad_c, weight), one(grad_r, weight.abs())


def _conv_grad_weight(grad_c, grad_r, c, r, weight, stride, padding, dilation, precision):
    def one(x, g):
        return conv2d_weight(x, weight.shape, g, stride, padding, dilation)
    return one(c, grad_c) + weight.sign() * one(r[r.shape[0] - grad_r.shape[0]:], grad_r)


def _l2_conv_forward(x, s2, weight, bias, eps, stride, padding, dilation, precision):
    centre = F.conv2d(x, weight, bias, stride, padding, dilation)
    radius = F.conv2d(s2, weight.square(), None, stride, padding, dilation).clamp_min(0).sqrt()
    if eps is None:
        return centre, radius[: x.shape[0]].contiguous()
    return centre, (eps.view(-1, 1, 1, 1) * radius).expand_as(centre).contiguous()


def _moments(x, rows):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    head = x[:rows].to(acc)
    var, mean = torch.var_mean(head, [0] + list(range(2, x.dim())), correction=0)
    return mean, var


def _margins(c, r, weight, bias, labels, eps, l2):
    logits = F.linear(c, weight, bias)
    centre = logits.gather(1, labels[:, None]) - logits
    diff = weight[labels][:, None, :] - weight[None]  # (N, K, F)
    if l2:
        spread = (diff.square() * r[:, None, :]).sum(2).clamp_min(0).sqrt()
        return centre - (eps[:, None] if eps is not None else 1) * spread
    points = c.shape[0] - r.shape[0]
    spread = torch.einsum("nkf,nf->nk", diff[points:].abs(), r)
    return torch.cat([centre[:points], centre[points:] - spread])


def _row_norms(weight, s2):
    return (weight.square() * (s2 if s2 is not None else 1)).sum(1).sqrt()


extension = SimpleNamespace(
    interval_relu_forward=lambda c, r: tuple(t.contiguous() for t in interval_relu_ref(c, r)),
    interval_relu_backward=_relu_backward,
    interval_linear_forward=_linear_forward,
    interval_linear_grad_input=lambda grad_c, grad_r, weight, precision: (grad_c @ weight, grad_r @ weight.abs()),
    interval_linear_grad_weight=_linear_grad_weight,
    interval_conv2d_forward=_conv_forward,
    interval_conv2d_grad_input=_conv_grad_input,
    interval_conv2d_grad_weight=_conv_grad_weight,
    l2_conv2d_forward=_l2_conv_forward,
    channel_epilogue_forward=_epilogue,
    channel_epilogue_backward=_epilogue_backward,
    channel_moments=_moments,
    margins_linear=_margins,
    l2_row_norms=_row_norms,
    set_poison=lambda on: None,
)


def entry_points():
    """The extension's entry points the cuda backend calls: every ``load().NAME`` in cure_fast/cuda/."""
    names = set()
    for path in pathlib.Path(cure_fast.cuda.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name) and node.value.func.id == "load"):
                names.add(node.attr)
    return sorted(names)
