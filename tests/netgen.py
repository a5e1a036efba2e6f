"""Random networks for the property tests, and a layer-by-layer evaluator of points."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import Tensor, nn

from cure_fast.nn import Normalize

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def _randomize_batchnorm(bn: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        n = bn.num_features
        bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
        bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        if bn.affine:
            bn.weight.copy_(torch.randn(n, generator=gen))
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)


def _activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "identity": nn.Identity}[name]()


def alpha_options(method: str, **options) -> Dict:
    """α-CROWN's options for method "alpha-crown" only (another method warns that they are ignored)."""
    return options if method == "alpha-crown" else {}


def modules_of(bounded) -> List[nn.Module]:
    """The modules of a BoundedModule's flattened layers, in order."""
    return [layer.module for layer in bounded.layers]


@st.composite
def networks(draw, conv: bool = True, dropout: bool = True):
    """(model, input shape) with Normalize, Conv2d (stride/padding/dilation/groups), BatchNorm,
    ReLU, LeakyReLU, AvgPool2d, Flatten, Linear, Identity and Dropout layers, in random order and sizes."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(4, 7))
    layers: List[nn.Module] = []
    if draw(st.booleans()):
        layers.append(Normalize(torch.rand(channels, generator=gen), torch.rand(channels, generator=gen) + 0.2))
    shape = in_shape = (channels, size, size)
    if draw(st.integers(0, 3)) == 0:  # a non-affine layer before the first affine one
        lead = draw(st.sampled_from(["avgpool", "relu", "dropout", "batchnorm"]))
        layers.append({"avgpool": lambda: nn.AvgPool2d(2, 1), "relu": nn.ReLU, "dropout": lambda: nn.Dropout(0.3),
                       "batchnorm": lambda: nn.BatchNorm2d(channels)}[lead]())
        if lead == "avgpool":
            shape = (channels, size - 1, size - 1)
    for _ in range(draw(st.integers(0, 2)) if conv else 0):
        groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0]))
        out = groups * draw(st.integers(1, 3))
        kernel = draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 2))
        stride = draw(st.integers(1, 2))
        padding = draw(st.integers(0, 2))
        span = dilation * (kernel - 1) + 1
        if shape[1] + 2 * padding < span:
            continue
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups, bias=draw(st.booleans())))
        channels = out
        side = (shape[1] + 2 * padding - span) // stride + 1
        shape = (out, side, side)
        if draw(st.booleans()):
            layers.append(nn.BatchNorm2d(out, affine=draw(st.booleans())))
        if draw(st.booleans()) and side >= 2:
            layers.append(nn.AvgPool2d(2, 1))
            shape = (out, side - 1, side - 1)
        layers.append(draw(st.sampled_from(["relu", "relu", "leaky", "identity"]).map(_activation)))
    layers.append(nn.Flatten())
    features = shape[0] * shape[1] * shape[2]
    for _ in range(draw(st.integers(0, 2))):
        units = draw(st.integers(2, 6))
        layers.append(nn.Linear(features, units, bias=draw(st.booleans())))
        features = units
        if draw(st.booleans()):
            layers.append(nn.BatchNorm1d(units))
        if dropout and draw(st.booleans()):
            layers.append(nn.Dropout(0.3))
        layers.append(draw(st.sampled_from(["relu", "relu", "leaky"]).map(_activation)))
    layers.append(nn.Linear(features, draw(st.integers(2, 4))))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    for m in model.modules():
        if isinstance(m, BATCHNORM):
            _randomize_batchnorm(m, gen)
    return model, in_shape


def draw_problem(net, data, dtype: torch.dtype, make_specs):
    """A drawn network in ``dtype`` and eval mode, a batch of 1-2 inputs, labels, and the sets
    ``make_specs(eps)`` with ``eps(top)`` a drawn radius in [0, top] (one, or one per sample)."""
    from cure_fast import BoundedModule
    model, shape = net
    model = model.to(dtype).eval()
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    batch = data.draw(st.integers(1, 2), label="batch")
    x = torch.rand((batch,) + shape, dtype=dtype)
    per_sample = data.draw(st.booleans(), label="per-sample eps")

    def eps(top):
        return torch.rand(batch, dtype=dtype) * top if per_sample else data.draw(st.floats(0.0, top), label="eps")
    y = torch.randint(0, model[-1].out_features, (batch,))
    return BoundedModule(model), x, y, make_specs(eps)


def batch_stats(layers: List[nn.Module], x: Tensor) -> Dict[int, Tuple[Tensor, Tensor]]:
    """Per BatchNorm layer index, the (mean, biased var) that train mode computes on the batch x."""
    stats, h = {}, x
    for i, m in enumerate(layers):
        if isinstance(m, BATCHNORM):
            dims = [0] + list(range(2, h.dim()))
            stats[i] = (h.mean(dims).detach(), h.var(dims, unbiased=False).detach())
        h = run_layer(m, h, stats.get(i))
    return stats


def run_layer(m: nn.Module, h: Tensor, stats=None) -> Tensor:
    """One layer as a fixed function: BatchNorm with the given (or running) statistics, Dropout off."""
    if isinstance(m, BATCHNORM):
        mean, var = stats if stats is not None else (m.running_mean, m.running_var)
        return F.batch_norm(h, mean, var, m.weight, m.bias, False, 0.0, m.eps)
    if isinstance(m, nn.Dropout):
        return h
    return m(h)


def run_layers(layers: List[nn.Module], h: Tensor, stats: Dict[int, Tuple[Tensor, Tensor]]) -> List[Tensor]:
    """The output of every layer for the points h (B, ...)."""
    outputs = []
    for i, m in enumerate(layers):
        h = run_layer(m, h, stats.get(i))
        outputs.append(h)
    return outputs
