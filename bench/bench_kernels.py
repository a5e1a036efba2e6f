"""Per-layer benchmark of the fused Triton kernels on the CNN7 layer shapes for CIFAR-10, with the
streams of a multi-norm training step stacked (centres: natural + l∞ + l2, radii: l∞ + l2).

For every layer op, batch size, precision (``ieee``: fp32 IEEE products, the certification mode;
``tf32``: training) and pass (forward, backward, both), the median time of

- ``triton``: the fused Triton kernel (cure_fast.kernels),
- ``cuda``: the CUDA C++ backend (cure_fast.cuda), when the extension is built; for the
  convolutions and linear layers also its two methods on their own, ``cuda_fused`` (the implicit
  GEMM / the fused interval GEMM) and ``cuda_library`` (one grouped cuDNN call / one strided
  batched cuBLAS GEMM when the row counts allow, + the fused epilogue), ``cuda`` being the measured
  choice,
- ``eager``: centre-radius IBP in plain PyTorch (the torch backend: two convolutions, ``|W|``
  rebuilt on every call, separate ReLU passes),
- ``compile``: ``torch.compile`` of the same,
- ``floor``: cuDNN / cuBLAS computing ``W ⊛ c`` and ``|W| ⊛ r`` alone (``|W|`` precomputed),

with the speed-ups of the faster fused backend (``best``) over eager and compile, its share of the
floor, TFLOP/s (counting the two products) and GB/s (the minimum traffic: every input read once,
every output written once).

    python bench/bench_kernels.py [--batch 128 512] [--precisions ieee,tf32] [--json out.json] [--no-compile]
                                  [--warmup-ms 25] [--rep-ms 200] [--smoke]
"""
import itertools
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import harness
from cure_fast import cuda, kernels, models, ops
from cure_fast.ops import policy as backends

PRECISIONS = ("ieee", "tf32")
PASSES = ("forward", "backward", "both")
CUDA_METHODS = {"conv": ("implicit_gemm", "cudnn"), "linear": ("fused_gemm", "cublas")}  # (fused, library)
TITLE = "CNN7 layer kernels (fused Triton / CUDA vs PyTorch IBP)"
COLUMNS = ("layer", "op", "batch", "precision", "pass", "triton_ms", "cuda_ms", "cuda_fused_ms", "cuda_library_ms",
           "eager_ms", "compile_ms", "floor_ms", "best", "x_eager", "x_compile", "of_floor", "tflops", "gbps")


@dataclass
class Case:
    """One op on one layer. ``make()`` builds fresh inputs; ``fused(impl, precision)`` is the fused
    function of the backend module ``impl`` (cure_fast.kernels or cure_fast.cuda, which share
    their signatures); ``floor`` takes ``floor_inputs(inputs)``. ``flops`` counts the forward (the backward
    counts twice as much when the inputs need gradients, once otherwise); ``bytes`` = (forward, backward)."""
    layer: str
    op: str
    make: Callable[[], Tuple]
    fused: Callable[[object, str], Callable]
    eager: Callable
    floor: Optional[Callable]
    floor_inputs: Optional[Callable]
    flops: float
    bytes: Tuple[float, float]
    input_grads: bool = True
    methods: Dict[str, Callable[[object, str], Callable]] = field(default_factory=dict)  # extra cuda columns


def _numel(*shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)


def _layers(smoke: bool):
    """The data set and (name, module, input shape, output shape) of CNN7's Conv2d / Linear layers."""
    data = models.DATASETS["cifar10"]
    if smoke:
        data = models.DatasetInfo((3, 4, 4), 10, data.mean, data.std)
    model = models.cnn7(data, width=1 if smoke else 64, linear=4 if smoke else 512).eval()
    layers, h = [], torch.zeros((1,) + data.shape)
    for name, module in model.named_children():
        out = module(h)
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append((f"{type(module).__name__.lower()}{name}", module, tuple(h.shape[1:]), tuple(out.shape[1:])))
        h = out
    return data, layers


class _Inputs:
    """Random inputs on the device: centres of n rows (natural + l∞ + l2), radii of m rows (l∞ + l2)."""

    def __init__(self, batch: int, device: torch.device):
        self.n, self.m, self.device = 3 * batch, 2 * batch, device
        self.gen = torch.Generator(device=device).manual_seed(0)

    def rand(self, *shape, low=-1.0, grad=True):
        t = torch.rand(shape, generator=self.gen, device=self.device) * (1 - low) + low
        return t.requires_grad_(grad)

    def interval(self, shape, grad=True):
        return self.rand(self.n, *shape, grad=grad), self.rand(self.m, *shape, low=0.0, grad=grad)

    def params(self, module):
        weight = module.weight.detach().to(self.device)
        bias = module.bias.detach().to(self.device) if module.bias is not None else weight.new_zeros(weight.shape[0])
        return weight.clone().requires_grad_(), bias.clone().requires_grad_()


def _floor_inputs(inputs):
    c, r, w, b = inputs
    return c, r, w, w.detach().abs().requires_grad_(), b


def _affine_case(name, module, shape, out, inputs: _Inputs, first: bool) -> Case:
    """Conv2d / Linear on the stacked streams with the ReLU after it fused."""
    n, m = inputs.n, inputs.m
    conv = dict(stride=module.stride, padding=module.padding) if isinstance(module, nn.Conv2d) else None
    if conv:
        op = lambda impl: partial(impl.interval_conv2d, **conv)  # noqa: E731
        eager = partial(ops.interval_conv2d_ref, **conv)
        products = partial(F.conv2d, **conv)
    else:
        op, eager, products = (lambda impl: impl.interval_linear), ops.interval_linear_ref, F.linear
    io = _numel((n,) + shape, (m,) + shape, (n,) + out, (m,) + out) + module.weight.numel()
    return Case(
        name, "interval+relu",
        make=lambda: (*inputs.interval(shape, grad=not first), *inputs.params(module)),
        fused=lambda impl, precision: lambda c, r, w, b: op(impl)(c, r, w, b, relu=True, precision=precision),
        eager=lambda c, r, w, b: ops.interval_relu_ref(*eager(c, r, w, b)),
        floor=lambda c, r, w, w_abs, b: (products(c, w, b), products(r, w_abs)),
        floor_inputs=_floor_inputs,
        flops=2.0 * (n + m) * torch.Size(out).numel() * module.weight[0].numel(),
        bytes=(4.0 * io, 4.0 * (2 * io + _numel((n,) + out, (m,) + out))),
        input_grads=not first,
        methods={f"cuda_{short}": lambda impl, precision, method=method: lambda c, r, w, b: op(impl)(
            c, r, w, b, relu=True, precision=precision, method=method)
            for short, method in zip(("fused", "library"), CUDA_METHODS["conv" if conv else "linear"])})


def _l2_case(name, module, data, out, inputs: _Inputs, batch: int) -> Case:
    """The first layer under an l2 ball (in pixel space, so scaled by Normalize's 1 / std): centre and
    exact radius for the natural inputs, against the two convolutions ``W ⊛ x`` and ``W² ⊛ s²``."""
    conv = dict(stride=module.stride, padding=module.padding)
    scale = (1.0 / torch.tensor(data.std, device=inputs.device)).view(-1, 1, 1)
    s2 = scale.square().expand((1,) + data.shape).contiguous()
    io = _numel((batch,) + data.shape, (2 * batch,) + out) + module.weight.numel()
    return Case(
        name, "l2-first-layer",
        make=lambda: (inputs.rand(batch, *data.shape, low=0.0, grad=False), *inputs.params(module)),
        fused=lambda impl, precision: lambda x, w, b: impl.l2_conv2d(x, 0.5, w, b, **conv, scale=scale,
                                                                       precision=precision),
        eager=lambda x, w, b: ops.l2_conv2d_ref(x, 0.5, w, b, **conv, scale=scale),
        floor=lambda x, w, w_sq, b: (F.conv2d(x, w, b, **conv), F.conv2d(s2, w_sq, None, **conv)),
        floor_inputs=lambda i: (i[0], i[1], i[1].detach().square().requires_grad_(), i[2]),
        flops=2.0 * (batch + 1) * torch.Size(out).numel() * module.weight[0].numel(),
        bytes=(4.0 * io, 8.0 * io), input_grads=False)


def _margins_case(name, module, inputs: _Inputs) -> Case:
    """The last layer with the specification folded in, on the interval streams (l∞ + l2)."""
    rows, (classes, features) = inputs.m, module.weight.shape
    labels = torch.randint(0, classes, (rows,), generator=inputs.gen, device=inputs.device)
    io = 2 * rows * (features + classes) + module.weight.numel()
    return Case(
        name, "margins",
        make=lambda: (inputs.rand(rows, features), inputs.rand(rows, features, low=0.0), *inputs.params(module)),
        fused=lambda impl, precision: lambda c, r, w, b: impl.margins_linear(c, r, w, b, labels, precision=precision),
        eager=lambda c, r, w, b: ops.margins_linear_ref(c, r, w, b, labels),
        floor=lambda c, r, w, w_abs, b: (F.linear(c, w, b), F.linear(r, w_abs)),
        floor_inputs=_floor_inputs,
        flops=4.0 * rows * classes * features, bytes=(4.0 * io, 8.0 * io))


def _affine_relu_case(name, shape, inputs: _Inputs) -> Case:
    """Train-mode BatchNorm (its statistics given) and ReLU on the streams: one elementwise pass."""
    channels = shape[0]
    io = 2 * _numel((inputs.n,) + shape, (inputs.m,) + shape)
    return Case(
        f"bn+relu after {name}", "affine+relu",
        make=lambda: (*inputs.interval(shape), inputs.rand(channels, low=0.5), inputs.rand(channels)),
        fused=lambda impl, precision: lambda c, r, s, t: impl.interval_affine(c, r, s, t, relu=True),
        eager=lambda c, r, s, t: ops.interval_relu_ref(*ops.interval_affine_ref(c, r, s, t)),
        floor=None, floor_inputs=None, flops=2.0 * io, bytes=(4.0 * io, 8.0 * io))


def _cases(batch: int, device: torch.device, smoke: bool) -> List[Case]:
    data, layers = _layers(smoke)
    inputs = _Inputs(batch, device)
    cases = []
    for index, (name, module, shape, out) in enumerate(layers):
        if index == len(layers) - 1:
            cases.append(_margins_case(name, module, inputs))
            continue
        cases.append(_affine_case(name, module, shape, out, inputs, first=index == 0))
        if index == 0:
            cases.append(_l2_case(name, module, data, out, inputs, batch))
        if index == 1:
            cases.append(_affine_relu_case(name, out, inputs))
    return cases


def _timings(fn: Callable, make: Callable, device, smoke: bool) -> dict:
    """Median ms of fn's forward, backward (graph kept) and both, over rotating inputs."""
    def leaves(inputs):
        return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    get = harness.rotating(make, 1 if smoke else 3)
    fn = harness.as_tuple(fn)
    sample = fn(*get())
    grads = [torch.rand_like(o) for o in sample]
    forward = harness.median_ms(lambda: fn(*get()), device, smoke)
    graphs = []
    for _ in range(1 if smoke else 3):
        inputs = get()
        graphs.append((fn(*inputs), leaves(inputs)))
    cycle = itertools.cycle(graphs)

    def backward():
        outputs, wrt = next(cycle)
        return torch.autograd.grad(outputs, wrt, grads, retain_graph=True)

    def both():
        inputs = get()
        return torch.autograd.grad(fn(*inputs), leaves(inputs), grads)

    return {"forward": forward, "backward": harness.median_ms(backward, device, smoke),
            "both": harness.median_ms(both, device, smoke)}


def fused_backends(device: torch.device) -> dict:
    """The fused backends to measure: triton, and cuda when its extension is built (GPU only)."""
    impls = {"triton": kernels}
    if cuda.available(device):
        impls["cuda"] = cuda
    return impls


def _row(case: Case, batch: int, precision: str, step: str, ms: dict, fused: List[str], errors: dict) -> dict:
    flops = case.flops * {"forward": 1, "backward": 2 if case.input_grads else 1,
                          "both": 3 if case.input_grads else 2}[step]
    traffic = {"forward": case.bytes[0], "backward": case.bytes[1], "both": sum(case.bytes)}[step]
    row = dict(layer=case.layer, op=case.op, batch=batch, precision=precision, **{"pass": step},
               **{f"{impl}_ms": v for impl, v in ms.items()})
    measured = [impl for impl in fused if impl in ms]
    if measured:
        best = row["best"] = min(measured, key=ms.get)
        row.update(tflops=flops / ms[best] / 1e9, gbps=traffic / ms[best] / 1e6)
        for other, key in (("eager", "x_eager"), ("compile", "x_compile")):
            if other in ms:
                row[key] = ms[other] / ms[best]
        if "floor" in ms:
            row["of_floor"] = ms[best] / ms["floor"]
    if errors:
        row["errors"] = dict(errors)
    return row


def run(args) -> List[dict]:
    rows = []
    impls = fused_backends(args.device)
    precisions = PRECISIONS[:1] if args.smoke else args.precisions
    for batch in args.batch:
        for case in _cases(batch, args.device, args.smoke):
            compiled = None if args.no_compile else torch.compile(case.eager)
            for precision in precisions:
                variants = {name: case.fused(impl, precision) for name, impl in impls.items()}
                if "cuda" in impls:
                    variants.update({name: method(impls["cuda"], precision) for name, method in case.methods.items()})
                variants["eager"] = case.eager
                if compiled is not None:
                    variants["compile"] = compiled
                times, errors = {}, {}
                with backends.library_precision(precision == "tf32"):
                    for name, fn in variants.items():
                        times[name] = harness.attempt(
                            errors, name, lambda: _timings(fn, case.make, args.device, args.smoke), args.smoke)
                    if case.floor is not None:
                        times["floor"] = harness.attempt(errors, "floor", lambda: _timings(
                            case.floor, lambda: case.floor_inputs(case.make()), args.device, args.smoke), args.smoke)
                for step in PASSES:
                    rows.append(_row(case, batch, precision, step,
                                     {impl: t[step] for impl, t in times.items() if t is not None}, list(impls), errors))
                harness.partial(TITLE, rows, args)
    return rows


def _options(parser) -> None:
    parser.add_argument("--precisions", type=harness.subset_type(PRECISIONS), default=list(PRECISIONS),
                        help=f"comma-separated, of {', '.join(PRECISIONS)} (default: both)")


def main() -> None:
    args = harness.arguments(__doc__, _options)
    rows = run(args)
    harness.report(TITLE, rows, COLUMNS, args)


if __name__ == "__main__":
    main()
