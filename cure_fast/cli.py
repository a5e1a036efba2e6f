"""The ``cure-fast`` command line."""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from .errors import ConfigError, one_line_errors
from .validation import OneLineParser, integer_type, number_type


def quickstart(args: argparse.Namespace) -> None:
    """Bounds of a network on real MNIST digits (or random CIFAR-shaped inputs), and their cost."""
    import torch
    from . import BoundedModule, L2Ball, LinfBall, models
    from .ops import policy as backends
    from .ops.autoselect import median_ms
    torch.manual_seed(0)
    if args.dataset == "mnist":
        from .data import load_mnist
        x, y = load_mnist("test")
        x, y = x[: args.batch], y[: args.batch]
    else:
        info = models.DATASETS[args.dataset]
        x, y = torch.rand((args.batch,) + info.shape), torch.randint(0, info.classes, (args.batch,))
    from .ops.registry import check_runs
    check_runs(args.backend, x.device, "--backend")
    model = models.build(args.model, args.dataset)
    bm = BoundedModule(model, backend=args.backend)
    specs = [LinfBall(args.linf), L2Ball(args.l2)]
    print(f"{args.model} on {args.dataset}, batch {args.batch}, backend {args.backend or backends.get_backend()}")
    out = bm.propagate(x, specs, y)
    column = max(len("input set"), *(len(str(spec)) for spec in specs)) + 2
    print(f"{'input set':<{column}}{'mean width':>12}{'certified':>11}")
    for spec, (lower, upper), margins in zip(specs, out.bounds, out.margins):
        certified = (margins.scatter(1, y[:, None], 1.0) > 0).all(1).float().mean()
        print(f"{str(spec):<{column}}{(upper - lower).mean().item():>12.4g}{certified.item():>11.1%}")

    def natural_step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def bounded_step():
        model.zero_grad(set_to_none=True)
        result = bm.propagate(x, specs, y)
        loss = torch.nn.functional.cross_entropy(result.logits, y)
        for margins in result.margins:
            loss = loss + torch.nn.functional.cross_entropy(-margins, y)
        loss.backward()

    natural, bounded = (median_ms(step, x.device, warmup=1, repeats=args.repeats) for step in (natural_step, bounded_step))
    print(f"natural forward+backward {natural:.1f} ms; natural + l∞ + l2 bounds forward+backward "
          f"{bounded:.1f} ms; ratio {bounded / natural:.2f} (arithmetic floor 5)")


DEMO = [("mnist-demo-inf", "l∞ certified"), ("mnist-demo-2", "l2 certified"), ("mnist-demo-cure", "CURE l∞ + l2")]
DEMO_KEYS = ("norms", "name")  # what tells the demo's runs apart


def demo(args: argparse.Namespace) -> None:
    """Train a small CNN on real MNIST three ways (l∞ only, l2 only, CURE multi-norm) and compare."""
    from .config import load_config
    from .reporting import format_table, plot_summary
    from .training.rundir import caption, new_path
    from .training.trainer import Trainer
    start, rows = time.perf_counter(), {}
    configs = [load_config(preset, overrides=[f"out_dir={args.out_dir}"] + args.set) for preset, _ in DEMO]
    for key in DEMO_KEYS:
        if len({str(getattr(config, key)) for config in configs}) < len(DEMO):
            raise ConfigError(f"--set {key}=…: the demo compares its three runs by their {key}, which would "
                              f"then be alike; train one run with cure-fast train --preset {DEMO[-1][0]} --set …")
    images = 0
    for (preset, title), config in zip(DEMO, configs):
        print(f"== {title}: preset {preset} ({config.method}, norms {'+'.join(config.norms)}, "
              f"{config.epochs} epochs on {config.train_limit or 'all'} images)", flush=True)
        trainer = Trainer(config)
        rows[title] = trainer.run()
        images = len(trainer.test_set)
    title = caption(configs[0], images) + " (certified by IBP; union: certified for both at once)"
    print(f"\n{title}")
    print(format_table(rows))
    path = new_path(args.out_dir, "demo-summary", ".png")  # a second demo keeps the first one's table
    plot_summary(rows, path, title=caption(configs[0], images))
    print(f"table saved to {path}; wall time {time.perf_counter() - start:.0f} s")


def train_command(args: argparse.Namespace) -> None:
    """Train a model (presets: --list-presets)."""
    from .training.trainer import run_from_args
    with one_line_errors("cure-fast train"):
        run_from_args(args)


def certify_command(args: argparse.Namespace) -> None:
    """Certify a trained model: IBP / CROWN family per norm and union, smoothing, geometric."""
    from .certification.certify import run_from_args
    with one_line_errors("cure-fast certify"):
        run_from_args(args)


def info(_: argparse.Namespace) -> None:
    """Versions and the backends available on each device."""
    import importlib.util
    import torch
    from .ops import policy as backends
    from .ops.registry import is_available
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda devices: {torch.cuda.device_count()}")
    print(f"triton: {'installed' if importlib.util.find_spec('triton') else 'not installed'}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        names = [b for b in backends.BACKENDS if is_available(b, device)]
        print(f"backends on {device.type}: {', '.join(names)}; default: {backends.get_backend()}")


def main(argv: Optional[List[str]] = None) -> None:
    try:  # importing torch takes seconds: Ctrl-C meanwhile is one line too
        parser = _parser()
    except KeyboardInterrupt:
        print("cure-fast: interrupted (Ctrl-C) while starting", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    args = parser.parse_args(argv)
    if args.run in (quickstart, demo, info):
        with one_line_errors(f"cure-fast {args.command}"):
            args.run(args)
    else:
        args.run(args)


def _parser() -> OneLineParser:
    from . import models
    from .ops import policy as backends
    import cure_fast
    parser = OneLineParser(prog="cure-fast", description="The cure-fast command line: certified training and "
                           "certification with fast, sound bound propagation.")
    parser.add_argument("--version", action="version", version=f"cure-fast {cure_fast.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    quick = commands.add_parser("quickstart", help=quickstart.__doc__)
    quick.add_argument("--model", default="cnn7", choices=sorted(models.MODELS), help="architecture (default cnn7)")
    quick.add_argument("--dataset", default="mnist", choices=sorted(models.DATASETS),
                       help="input shape and classes of this data set (random inputs; default mnist)")
    quick.add_argument("--batch", type=integer_type(1), default=32, help="batch size (default 32)")
    quick.add_argument("--linf", type=number_type(0, high=1), default=0.1, help="l∞ eps in pixel space (default 0.1)")
    quick.add_argument("--l2", type=number_type(0), default=0.5, help="l2 eps in pixel space (default 0.5)")
    quick.add_argument("--backend", default=None, choices=backends.CHOICES,
                       help="the ops' backend (default: set_backend / $CURE_FAST_BACKEND / auto)")
    quick.add_argument("--repeats", type=integer_type(1), default=5, help="timed repeats per step (median; default 5)")
    quick.set_defaults(run=quickstart)
    commands.add_parser("info", help=info.__doc__).set_defaults(run=info)
    from .training.trainer import add_arguments
    trainer = commands.add_parser("train", help=train_command.__doc__)
    add_arguments(trainer)
    trainer.set_defaults(run=train_command)
    from .certification.certify import add_arguments as certify_arguments
    certifier = commands.add_parser("certify", help=certify_command.__doc__)
    certify_arguments(certifier)
    certifier.set_defaults(run=certify_command)
    show = commands.add_parser("demo", help=demo.__doc__)
    show.add_argument("--out-dir", default="runs/demo", help="folder of the three runs and the table (default runs/demo)")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of all three runs")
    show.set_defaults(run=demo)
    return parser


if __name__ == "__main__":
    main()
