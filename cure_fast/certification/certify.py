"""``cure-fast certify``: certificates for a trained model — IBP / CROWN-IBP / CROWN / α-CROWN as a
cascade, per norm and for their union, optionally randomized smoothing (with test-time adaptive
BatchNorm) and geometric robustness.

    cure-fast certify runs/mnist-0.1-cure --norms inf:0.1,2:0.5 --method alpha-crown
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from .. import data, models
from ..config import TrainConfig, from_dict, resolve_device
from ..reporting import format_table, plot_summary, pyplot
from .evaluate import CERTIFIERS, Evaluation, evaluate
from .geometric import geometric_robustness

CURVE = (0.25, 0.5, 0.75, 1.0)


def parse_norms(text: str) -> Dict[str, float]:
    """``"inf:2/255,2:0.25"`` -> {"inf": 2/255, "2": 0.25}."""
    norms = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"(inf|2)\s*:\s*([0-9.]+)(?:\s*/\s*([0-9.]+))?", item)
        if not match:
            raise ValueError(f"bad --norms item {item!r}; write NORM:EPS with NORM inf or 2, e.g. inf:2/255,2:0.25")
        eps = float(match.group(2)) / (float(match.group(3)) if match.group(3) else 1.0)
        norms[match.group(1)] = eps
    if not norms:
        raise ValueError("--norms names no norm")
    return norms


def load_trained(path: str, device: torch.device) -> Tuple[nn.Module, TrainConfig]:
    """A trained model and its config from a run directory (config.yaml + model.pt or checkpoint.pt)
    or from a checkpoint.pt written by the trainer. Loading uses ``weights_only=True``."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.yaml")) as f:
            config = from_dict(yaml.safe_load(f))
        weights = os.path.join(path, "model.pt")
        state = (torch.load(weights, map_location=device, weights_only=True) if os.path.isfile(weights)
                 else torch.load(os.path.join(path, "checkpoint.pt"), map_location=device, weights_only=True)["model"])
    elif os.path.isfile(path):
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        if not (isinstance(checkpoint, dict) and "model" in checkpoint and "config" in checkpoint):
            raise ValueError(f"{path} holds no config: give a run directory or the trainer's checkpoint.pt")
        config, state = from_dict(checkpoint["config"]), checkpoint["model"]
    else:
        raise FileNotFoundError(f"no run directory or checkpoint at {path}")
    model = models.build(config.model, config.dataset, **config.model_args).to(device)
    model.load_state_dict(state)
    return model.eval(), config


def write_per_sample(evaluation: Evaluation, labels: torch.Tensor, path: str) -> None:
    """One row per test point: index, label, clean correct, and per norm PGD-robust, certified,
    margin lower bound and the method that certified it."""
    norms = list(evaluation.certified)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "correct"] + [f"{k}_{n}" for n in norms
                                                         for k in ("pgd", "certified", "margin", "method")])
        for i in range(len(evaluation.correct)):
            row = [i, int(labels[i]), int(evaluation.correct[i])]
            for n in norms:
                by = evaluation.certified_by.get(n)
                row += [int(evaluation.pgd_robust[n][i]), int(evaluation.certified[n][i]),
                        f"{evaluation.margin[n][i].item():.6g}", by[i] if by else ""]
            writer.writerow(row)


def plot_curve(curve: Dict[float, Dict[str, float]], eps: Dict[str, float], path: str) -> None:
    """Certified accuracy against the fraction of eps, per norm and for the union."""
    plt = pyplot()
    fractions = sorted(curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in [f"certified_{n}" for n in eps] + ["union"]:
        label = f"{key} (eps {eps[key.split('_')[1]]:.4g})" if key != "union" else "union"
        ax.plot(fractions, [100 * curve[f][key] for f in fractions], marker="o", label=label)
    ax.set_xlabel("fraction of eps")
    ax.set_ylabel("certified accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def certify_run(path: str, eps: Dict[str, float], method: str = "ibp", limit: Optional[int] = None,
                data_root: Optional[str] = None, out_dir: Optional[str] = None, pgd_steps: int = 20,
                batch_size: int = 100, sound: bool = True, curve: Sequence[float] = CURVE,
                device: str = "auto", smoothing: Sequence[float] = (), smoothing_n: int = 100_000,
                geometric: bool = False) -> Dict:
    """Certify the model at ``path`` on the test set; writes the reports to ``out_dir`` and returns
    the summary (accuracies, seconds per image per method)."""
    dev = resolve_device(device)
    model, config = load_trained(path, dev)
    test = data.load_dataset(config.dataset, "test", data_root or config.data_root, limit=limit)
    out_dir = out_dir or os.path.join(path if os.path.isdir(path) else os.path.dirname(path), f"certify-{method}")
    os.makedirs(out_dir, exist_ok=True)
    run = lambda e, steps: evaluate(model, test.images, test.labels, e, method=method, pgd_steps=steps,  # noqa: E731
                                    batch_size=batch_size, backend=config.backend, device=dev, sound=sound)
    evaluation = run(eps, pgd_steps)
    n = len(test.labels)
    summary = {"model": path, "method": method, "sound": sound, "eps": eps, "images": n,
               **evaluation.summary(),
               "seconds_per_image": {k: v / n for k, v in evaluation.seconds.items()}}
    write_per_sample(evaluation, test.labels, os.path.join(out_dir, "per_sample.csv"))
    if curve:
        points = {f: (summary if f == 1.0 else run({k: f * v for k, v in eps.items()}, 0).summary()) for f in curve}
        summary["curve"] = {str(f): {k: v for k, v in s.items() if k.startswith("certified_") or k == "union"}
                            for f, s in points.items()}
        plot_curve(points, eps, os.path.join(out_dir, "certified_vs_eps.png"))
    if smoothing:
        summary["smoothing"] = _smoothing(model, test, config, data_root, smoothing, smoothing_n, batch_size, out_dir)
    if geometric:
        report = geometric_robustness(model, test.images, test.labels, batch_size=batch_size, device=dev)
        summary["geometric"] = {k: v for k, v in report.items() if k != "samples"}
    plot_summary({method: summary}, os.path.join(out_dir, "summary.png"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


def _smoothing(model, test, config, data_root, sigmas, n, batch_size, out_dir) -> Dict:
    """Randomized smoothing per sigma, plain and with BatchNorm re-estimated once on held-out noisy data."""
    from .smoothing import plot_smoothing, smoothing_report  # scipy: loaded only when smoothing is asked for
    heldout = data.load_dataset(config.dataset, "train", data_root or config.data_root, limit=1000).images
    reports = {}
    for sigma in sigmas:
        reports[f"sigma {sigma:g}"] = smoothing_report(model, test.images, test.labels, sigma, n=n,
                                                       batch_size=batch_size * 10)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            reports[f"sigma {sigma:g}, adaptive BN"] = smoothing_report(
                model, test.images, test.labels, sigma, n=n, batch_size=batch_size * 10, adapt="heldout",
                heldout_images=heldout)
    plot_smoothing(reports, os.path.join(out_dir, "smoothing.png"))
    return {name: {k: v for k, v in r.items() if k != "samples"} for name, r in reports.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run directory, or the trainer's checkpoint.pt")
    parser.add_argument("--norms", default="inf:2/255,2:0.25", help="NORM:EPS pairs, e.g. inf:2/255,2:0.25")
    parser.add_argument("--method", default="ibp", choices=CERTIFIERS, help="the strongest method of the cascade")
    parser.add_argument("--limit", type=int, help="certify the first N test images")
    parser.add_argument("--data-root")
    parser.add_argument("--out", help="report folder (default: RUN_DIR/certify-METHOD)")
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--fast", action="store_true", help="certify in fp32 (no TF32) instead of fp64")
    parser.add_argument("--no-curve", action="store_true", help="skip certified accuracy at fractions of eps")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoothing", default="", help="randomized smoothing sigmas, e.g. 0.25,0.5")
    parser.add_argument("--smoothing-n", type=int, default=100_000)
    parser.add_argument("--geometric", action="store_true", help="worst case over rotations, shifts, scaling, "
                                                                 "brightness and contrast")


def run_from_args(args: argparse.Namespace) -> Dict:
    sigmas = [float(s) for s in args.smoothing.split(",") if s.strip()]
    summary = certify_run(args.model, parse_norms(args.norms), args.method, args.limit, args.data_root, args.out,
                          args.pgd_steps, args.batch_size, not args.fast, () if args.no_curve else CURVE,
                          args.device, sigmas, args.smoothing_n, args.geometric)
    print(format_table({args.method: summary}))
    times = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in summary["seconds_per_image"].items())
    print(f"time per image: {times}  ({'fp64, sound' if summary['sound'] else 'fp32'})")
    return summary
