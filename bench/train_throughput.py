"""Images per second of one training step per method on CNN7 (CIFAR-10 shape), and the ratio to
the natural step, measured in one process on the current device.

    python bench/train_throughput.py [--batch 128] [--device cuda] [--json out.json] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics

import torch

import harness
from cure_fast import models
from cure_fast.config import from_dict
from cure_fast.ops.policy import BACKENDS
from cure_fast.training.trainer import Objective, training_sets
from cure_fast.validation import integer_type

METHODS = {
    "natural": dict(method="natural"),
    "pgd l∞+l2 (8 steps)": dict(method="pgd", norms=["inf", "2"]),
    "ibp l∞": dict(method="ibp", norms=["inf"]),
    "ibp l∞+l2 (CURE joint)": dict(method="ibp", norms=["inf", "2"]),
    "sabr l∞+l2 (CURE joint)": dict(method="sabr", norms=["inf", "2"]),
}


def _seconds(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of fn over ``repeats`` runs after one warm-up run."""
    fn()
    return statistics.median(harness.synced_seconds(fn, device) for _ in range(repeats))


def measure(batch: int, device: torch.device, repeats: int, backend: str, width: int) -> dict:
    torch.manual_seed(0)
    model = models.cnn7(models.DATASETS["cifar10"], width=width).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    results = {}
    for name, changes in METHODS.items():
        config = from_dict(dict(dataset="cifar10", eps_inf=2 / 255, eps_2=0.25, backend=backend, **changes))
        objective = Objective(model, config)
        eps = {n: config.train_eps(n) for n in config.norms}

        def step():
            specs = [] if config.method == "natural" else training_sets(config, model, x, y, eps)
            loss = objective(x, y, specs)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        results[name] = _seconds(step, repeats, device)
    natural = results["natural"]
    return {name: {"seconds": s, "images_per_second": batch / s, "ratio_to_natural": s / natural}
            for name, s in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(**harness.docstring_help(__doc__))
    parser.add_argument("--batch", type=integer_type(2), default=None,
                        help="default: 128 on a GPU, 16 on the CPU (at least 2: BatchNorm's batch statistics)")
    parser.add_argument("--device", type=harness.device_type, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--repeats", type=integer_type(1), default=5, help="timed steps per method (default 5)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS + ("auto",), help="ops backend (default auto)")
    parser.add_argument("--width", type=integer_type(1), default=64, help="CNN7 width (64 is the paper's)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="width 2, batch 2, one run: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.width, args.repeats = 2, 2, 1
    device = args.device
    batch = args.batch or (128 if device.type == "cuda" else 16)
    results = measure(batch, device, args.repeats, args.backend, args.width)
    print(f"CNN7 (width {args.width}), CIFAR-10 shape, batch {batch}, {harness.device_name(device)}, "
          f"backend {args.backend}")
    print(f"{'method':<28}{'ms/step':>10}{'img/s':>10}{'x natural':>11}")
    for method, r in results.items():
        print(f"{method:<28}{1e3 * r['seconds']:>10.1f}{r['images_per_second']:>10.0f}{r['ratio_to_natural']:>11.2f}")
    if args.json:
        harness.save_json(args.json, "train_throughput", device, {"batch": batch, "backend": args.backend,
                                                                  "width": args.width, "results": results})


if __name__ == "__main__":
    main()
