"""Whole-network benchmark: one certified-training step of CNN7 on CIFAR-10 shapes, the natural
input, an l∞ box and an l2 ball propagated together (``BoundedModule.propagate``), the loss on the
logits and margins, and its backward, against the natural step (forward + backward of the model)
of the same network.

Per batch size, mode (``train``: BatchNorm on batch statistics; ``eval``: running statistics, the
certification setting) and precision, the median time of the forward, the backward and both with
the ``triton`` backend, the ``cuda`` backend (when its extension is built), ``auto`` (per op the
fastest backend that agrees with torch, measured on the first call; each row's ``auto_chose`` says
which, per op), the ``torch`` backend (eager
centre-radius IBP) and ``torch.compile`` of the latter, and the ratio of each full step to the
natural one (the target: at most 3 at batch 128; the arithmetic alone would say 5).

    python bench/bench_network.py [--batch 128 512] [--settings train:tf32,eval:ieee] [--json out.json]
                                  [--no-compile] [--warmup-ms 25] [--rep-ms 200] [--smoke]
"""
import itertools
from typing import Callable, List

import torch
import torch.nn.functional as F

import harness
from bench_kernels import fused_backends
from cure_fast import BoundedModule, L2Ball, LinfBall, models
from cure_fast.ops import autoselect
from cure_fast.ops import policy as backends

SETTINGS = (("train", "tf32"), ("train", "ieee"), ("eval", "ieee"))
PASSES = ("forward", "backward", "both")
BOUNDED = ("triton", "cuda", "auto", "eager", "compile")
TITLE = "CNN7 step, natural + l∞ + l2 bounds vs the natural step"
COLUMNS = ("batch", "mode", "precision", "pass", "natural_ms") + tuple(f"{n}_ms" for n in BOUNDED) + \
    tuple(f"{n}_x_natural" for n in BOUNDED) + ("x_eager", "x_compile")


def _model(smoke: bool, device: torch.device):
    data = models.DATASETS["cifar10"]
    if smoke:
        data = models.DatasetInfo((3, 4, 4), 10, data.mean, data.std)
    torch.manual_seed(0)
    return models.cnn7(data, width=1 if smoke else 64, linear=4 if smoke else 512).to(device), data


def _bounded_loss(bm: BoundedModule) -> Callable:
    specs = [LinfBall(2 / 255), L2Ball(0.25)]

    def loss(x, y):
        out = bm.propagate(x, specs, y)
        return F.cross_entropy(out.logits, y) + sum(F.cross_entropy(-m, y) for m in out.margins)
    return loss


def _natural_loss(model) -> Callable:
    return lambda x, y: F.cross_entropy(model(x), y)


def _timings(loss: Callable, params: List[torch.Tensor], make: Callable, device, smoke: bool) -> dict:
    get = harness.rotating(make, 1 if smoke else 3)
    torch.autograd.grad(loss(*get()), params)  # first call: compilation, and the auto backend's measurements
    forward = harness.median_ms(lambda: loss(*get()), device, smoke)
    graphs = itertools.cycle([loss(*get()) for _ in range(1 if smoke else 3)])
    backward = harness.median_ms(lambda: torch.autograd.grad(next(graphs), params, retain_graph=True), device, smoke)
    both = harness.median_ms(lambda: torch.autograd.grad(loss(*get()), params), device, smoke)
    return {"forward": forward, "backward": backward, "both": both}


def _rows(batch: int, mode: str, precision: str, times: dict, errors: dict, chosen: dict, skipped: dict
          ) -> List[dict]:
    rows = []
    for step in PASSES:
        ms = {name: t[step] for name, t in times.items() if t is not None}
        row = dict(batch=batch, mode=mode, precision=precision, **{"pass": step},
                   **{f"{name}_ms": v for name, v in ms.items()})
        if "natural" in ms:
            for name in BOUNDED:
                if name in ms:
                    row[f"{name}_x_natural"] = ms[name] / ms["natural"]
        if "triton" in ms:
            for other, key in (("eager", "x_eager"), ("compile", "x_compile")):
                if other in ms:
                    row[key] = ms[other] / ms["triton"]
        if errors:
            row["errors"] = dict(errors)
        if chosen:
            row["auto_chose"] = chosen  # per op: {backend or method: call shapes}
        if skipped:
            row["skipped"] = skipped  # variants not run, and why
        rows.append(row)
    return rows


def run(args) -> List[dict]:
    model, data = _model(args.smoke, args.device)
    params = list(model.parameters())
    rows = []
    for batch in args.batch:
        def make():
            x = torch.rand((batch,) + data.shape, device=args.device)
            return x, torch.randint(0, data.classes, (batch,), device=args.device)
        for mode, precision in SETTINGS[2:] if args.smoke else args.settings:
            model.train(mode == "train")

            def bounded(backend: str) -> Callable:
                return _bounded_loss(BoundedModule(model, backend=backend, precision=precision))
            losses = {"natural": lambda: _natural_loss(model), "eager": lambda: bounded("torch")}
            for name in list(fused_backends(args.device)) + ([] if args.smoke else ["auto"]):
                losses[name] = lambda name=name: bounded(name)
            if not args.no_compile:
                losses["compile"] = lambda: torch.compile(bounded("torch"))
            times, errors, chosen = {}, {}, {}
            skipped = {name: _why_skipped(name, args) for name in BOUNDED if name not in losses}
            with backends.library_precision(precision == "tf32"):
                for name, loss in losses.items():  # the rows so far are written after each (a time limit keeps them)
                    autoselect.clear()
                    times[name] = harness.attempt(
                        errors, name, lambda: _timings(loss(), params, make, args.device, args.smoke), args.smoke)
                    if name == "auto":
                        chosen = autoselect.choices()
                    harness.partial(TITLE, rows + _rows(batch, mode, precision, times, errors, chosen, skipped), args)
            rows += _rows(batch, mode, precision, times, errors, chosen, skipped)
    return rows


def _why_skipped(name: str, args) -> str:
    if args.smoke and name in ("auto", "compile"):
        return "skipped under --smoke"
    return "skipped: --no-compile" if name == "compile" else f"skipped: not available on {args.device.type}"


def _settings(text: str):
    settings = [tuple(s.split(":")) for s in text.split(",")]
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {':'.join(setting)}; known: "
                             f"{', '.join(':'.join(s) for s in SETTINGS)}")
    return settings


def _options(parser) -> None:
    parser.add_argument("--settings", type=_settings, default=list(SETTINGS),
                        help="comma-separated MODE:PRECISION (default: train:tf32,train:ieee,eval:ieee)")


def main() -> None:
    args = harness.arguments(__doc__, _options)
    rows = run(args)
    harness.report(TITLE, rows, COLUMNS, args)


if __name__ == "__main__":
    main()
