"""Certification time per image and peak memory of CNN7 (CIFAR-10 shape) per method (ibp, crown-ibp,
crown, alpha-crown) for l∞ 2/255 and l2 0.25, in a sound mode (``--sound fp64``, the default, or
``fp32``: float32 with every rounding error bounded) or plain float32 (``off``), on the current device.

    python bench/certify_time.py [--images 2] [--quick] [--device cpu] [--methods ibp,crown] [--sound fp32] [--json out.json]
    python bench/certify_time.py --smoke       # a tiny CNN7 (8x8 inputs, width 1) in one process: checks the script

The model has random weights (seed 0) in eval mode, its BatchNorm running statistics estimated on
random images, so every pre-activation is roughly standardized; the labels are its own predictions.
With ``--sound fp64`` model and images are float64, so every method, IBP included, computes in
float64; otherwise float32 (sound fp32 IBP: ``crown_margins(..., "ibp", sound="fp32")``). Such a network is
far from certifiable: almost every neuron of the deeper layers is unstable, which is the worst case for
CROWN (it computes bounds for every unstable neuron of every layer, one backward pass per neuron and
side).

Each (norm, method) runs in its own subprocess, so that its peak memory is its own:
``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's peak resident set size
(``ru_maxrss``), which includes the interpreter, torch and the model — the column "before" gives that
peak just before the measured runs. ibp and crown-ibp are timed as the median of 3 runs after a
warm-up; crown and alpha-crown by one run (minutes each on the CPU). The JSON records the load
average before and after, as CPU timings on shared cores depend on it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time

import torch

import harness
from cure_fast import BoundedModule, L2Ball, LinfBall, models
from cure_fast.engine.crown import crown_margins
from cure_fast.validation import integer_type

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
SOUND = {"fp64": True, "fp32": "fp32", "off": False}  # --sound -> crown_margins(sound=)
NORMS = {"linf 2/255": lambda: LinfBall(2 / 255), "l2 0.25": lambda: L2Ball(0.25)}


def _data(smoke: bool) -> models.DatasetInfo:
    data = models.DATASETS["cifar10"]
    return models.DatasetInfo((3, 8, 8), 10, data.mean, data.std) if smoke else data


def _model(device: torch.device, width: int, smoke: bool = False, dtype: torch.dtype = torch.float64) -> torch.nn.Sequential:
    """CNN7 in ``dtype`` with random weights and BatchNorm running statistics estimated on random images,
    in eval mode."""
    torch.manual_seed(0)
    data = _data(smoke)
    model = models.cnn7(data, width=width, **({"linear": 8} if smoke else {})).to(device, dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(8):
            model(torch.rand((32,) + data.shape, device=device, dtype=torch.float64).to(dtype))  # same in every mode
    return model.eval()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _margins(bounded: BoundedModule, x, y, spec, method: str, sound: str, alpha_steps: int = 20):
    if method == "ibp":
        return crown_margins(bounded, x, y, spec, "ibp", sound="fp32") if sound == "fp32" else bounded.margins(x, y, spec)
    steps = {"alpha_steps": alpha_steps} if method == "alpha-crown" else {}
    return bounded.margins(x, y, spec, method=method, sound=SOUND[sound], **steps)


def measure(method: str, norm: str, images: int, device: torch.device, width: int, smoke: bool = False,
            sound: str = "fp64", alpha_steps: int = 20) -> dict:
    """Seconds per image, peak memory and the bounds of one (method, norm) on ``images`` random images."""
    dtype = torch.float64 if sound == "fp64" else torch.float32
    model = _model(device, width, smoke, dtype)
    bounded = BoundedModule(model)
    torch.manual_seed(1)
    x = torch.rand((images,) + _data(smoke).shape, device=device, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = NORMS[norm]()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run = lambda: _margins(bounded, x, y, spec, method, sound, alpha_steps)  # noqa: E731
    repeats = 3 if method in ("ibp", "crown-ibp") else 1
    if repeats > 1:
        with torch.no_grad():  # as the timed runs: the backends are chosen per grad mode
            run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            margins = run()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    worst = margins.scatter(1, y[:, None], float("inf")).amin(1)
    steps = {"alpha_steps": alpha_steps} if method == "alpha-crown" else {}
    return {"method": method, "norm": norm, "images": images, "sound": sound, **steps,
            "seconds_per_image": sorted(times)[len(times) // 2] / images, "peak_memory_mb": peak / 2**20,
            "cpu_rss_before_mb": None if device.type == "cuda" else before / 2**20,
            "certified": int((worst > 0).sum()), "mean_worst_margin": float(worst.mean())}


def _run_isolated(method: str, norm: str, args: argparse.Namespace) -> dict:
    """:func:`measure` in a fresh subprocess (its own peak memory); on failure, the error's last line."""
    command = [sys.executable, __file__, "--worker", method, norm, "--images", str(args.images),
               "--device", str(args.device), "--width", str(args.width), "--sound", args.sound,
               "--alpha-steps", str(args.alpha_steps)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stderr)
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        return {"method": method, "norm": norm, "images": args.images,
                "error": lines[-1] if lines else f"exit status {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _save(args: argparse.Namespace, device: torch.device, load, results: list, complete: bool) -> None:
    if args.json:
        with contextlib.redirect_stdout(io.StringIO()) if not complete else contextlib.nullcontext():
            harness.save_json(args.json, "certify_time", device, {
                "load_average_before": load, "smoke": args.smoke,
                "model": f"cnn7 {'8x8 smoke' if args.smoke else 'cifar10'} width {args.width}, random weights, eval mode",
                "sound": args.sound, "images": args.images, "results": results, "complete": complete})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=integer_type(1), default=None, help="default: 2 on the CPU, 16 on a GPU")
    parser.add_argument("--quick", action="store_true", help="one image")
    parser.add_argument("--device", type=harness.device_type, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda where there is one)")
    parser.add_argument("--width", type=integer_type(1), default=64, help="CNN7 width (64 is the paper's)")
    parser.add_argument("--methods", type=harness.subset_type(METHODS), default=list(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    parser.add_argument("--sound", default="fp64", choices=list(SOUND),
                        help="fp64 (float64, the default), fp32 (float32, rounding errors bounded), off (plain float32)")
    parser.add_argument("--norms", default="inf,2", help="inf, 2 or both (the default): l∞ 2/255, l2 0.25")
    parser.add_argument("--alpha-steps", type=integer_type(0), default=20,
                        help="α-CROWN's steps (fewer: its memory in less time)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="CNN7 on 8x8 inputs, width 1, one image, in this process: checks the script")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "NORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device
    if args.smoke:
        args.width, args.images = 1, 1
    args.images = 1 if args.quick else args.images or (16 if device.type == "cuda" else 2)
    if args.worker:
        print(json.dumps(measure(*args.worker, args.images, device, args.width, sound=args.sound,
                                 alpha_steps=args.alpha_steps)))
        return
    results, load = [], os.getloadavg()
    print(f"{'norm':<11} {'method':<12} {'s/image':>9} {'peak MB':>9} {'(before)':>9} {'certified':>9} "
          f"{'mean worst margin':>18}")
    chosen = [n for n in NORMS if n.split()[0][1:] in args.norms.split(",")]
    if not chosen:
        parser.error(f"--norms {args.norms!r}: give inf, 2 or inf,2")
    for norm in chosen:
        for method in args.methods:
            r = measure(method, norm, args.images, device, args.width, True, args.sound, args.alpha_steps) \
                if args.smoke else \
                _run_isolated(method, norm, args)
            results.append(r)
            if "error" in r:
                print(f"{norm:<11} {method:<12} failed: {r['error']}", flush=True)
                continue
            _save(args, device, load, results, complete=False)
            before = "-" if r["cpu_rss_before_mb"] is None else f"{r['cpu_rss_before_mb']:.0f}"
            print(f"{norm:<11} {method:<12} {r['seconds_per_image']:>9.3f} {r['peak_memory_mb']:>9.0f} {before:>9} "
                  f"{r['certified']:>5}/{r['images']:<3} {r['mean_worst_margin']:>18.4g}", flush=True)
    _save(args, device, load, results, complete=True)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
