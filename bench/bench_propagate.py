"""Cost of one BoundedModule.propagate pass (natural + LinfBall + L2Ball) against the natural step of
the same model, forward and forward+backward, in one process on the current device.

The arithmetic floor of the ratio is 5: one unit for the natural stream, two (centre, radius) per
input set. Timings alternate between the two so that machine load affects both alike.

    python bench/bench_propagate.py [--model cnn7] [--batch 32] [--device cpu] [--json out.json] [--smoke]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import harness
from cure_fast import BoundedModule, L2Ball, LinfBall, models
from cure_fast.ops.policy import BACKENDS
from cure_fast.validation import integer_type


def measure(model_name: str, batch: int, device: torch.device, repeats: int, backend: str) -> dict:
    torch.manual_seed(0)
    model = models.build(model_name, "cifar10").to(device).train()
    bm = BoundedModule(model, backend=backend)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    specs = [LinfBall(2 / 255), L2Ball(0.25)]

    def natural(backward: bool):
        loss = F.cross_entropy(model(x), y)
        if backward:
            loss.backward()

    def bounded(backward: bool):
        out = bm.propagate(x, specs, y)
        loss = F.cross_entropy(out.logits, y) + sum(F.cross_entropy(-m, y) for m in out.margins)
        if backward:
            loss.backward()

    results = {}
    for backward in (False, True):
        key = "forward+backward" if backward else "forward"
        with torch.set_grad_enabled(True):
            natural(backward), bounded(backward)  # warm-up
            times = {"natural": [], "propagate": []}
            for _ in range(repeats):
                model.zero_grad(set_to_none=True)
                times["natural"].append(harness.synced_seconds(lambda: natural(backward), device))
                model.zero_grad(set_to_none=True)
                times["propagate"].append(harness.synced_seconds(lambda: bounded(backward), device))
        medians = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        results[key] = {**{f"{k}_ms": 1e3 * v for k, v in medians.items()},
                        "ratio": medians["propagate"] / medians["natural"]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(**harness.docstring_help(__doc__))
    parser.add_argument("--model", default="cnn7", choices=sorted(models.MODELS), help="architecture (default cnn7)")
    parser.add_argument("--batch", type=integer_type(1), default=32, help="batch size (default 32)")
    parser.add_argument("--device", type=harness.device_type, default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=integer_type(1), default=7, help="timed runs per pass (default 7)")
    parser.add_argument("--backend", default="auto", choices=BACKENDS + ("auto",), help="ops backend (default auto)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="cnn3, batch 2, one run: checks the script")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.repeats = "cnn3", 2, 1
    device = args.device
    results = measure(args.model, args.batch, device, args.repeats, args.backend)
    print(f"{args.model}, CIFAR-10 shape, batch {args.batch}, train mode, {harness.device_name(device)}, "
          f"backend {args.backend}")
    print(f"{'pass':<18}{'natural ms':>12}{'propagate ms':>14}{'ratio':>8}")
    for key, r in results.items():
        print(f"{key:<18}{r['natural_ms']:>12.1f}{r['propagate_ms']:>14.1f}{r['ratio']:>8.2f}")
    if args.json:
        harness.save_json(args.json, "propagate", device, {"model": args.model, "batch": args.batch,
                                                           "backend": args.backend, "results": results})


if __name__ == "__main__":
    main()
