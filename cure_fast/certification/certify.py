"""``cure-fast certify``: certificates for a trained model — IBP / CROWN-IBP / CROWN / α-CROWN as a
cascade, per norm and for their union, optionally randomized smoothing (with test-time adaptive
BatchNorm) and geometric robustness.

    cure-fast certify runs/mnist-0.1-cure --norms inf:0.1,2:0.5 --method alpha-crown
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from typing import Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import checkpoints, data, models
from ..config import NORMS as TRAINED_NORMS, TrainConfig, eps_rule, from_dict, load_run_config, resolve_device
from ..errors import CheckpointError, ConfigError, SignalGuard
from ..reporting import NORM_NAMES, format_table, plot_summary, pyplot
from ..storage import numbered_paths, save_figure, write_atomic, write_json
from ..validation import Integer, did_you_mean, integer_type, number_list, parse_number
from .evaluate import CERTIFIERS, evaluate, write_per_sample
from .geometric import format_geometric, geometric_robustness, plot_geometric
from .protocol import PAPER_METHOD, paper_setting, paper_table

CURVE = (0.25, 0.5, 0.75, 1.0)
SMOOTHING_N = 100_000
NORMS = TRAINED_NORMS + ("1",)  # certified: the trained norms and l1


def parse_norms(text: str) -> Dict[str, float]:
    """``"inf:2/255,2:0.25,1:0.5"`` -> {"inf": 2/255, "2": 0.25, "1": 0.5}; eps in any notation (``inf:1e-2``)."""
    norms = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = re.fullmatch(r"([^:\s]+)\s*:\s*(\S.*)", item)
        if not match or match.group(1) not in NORMS:
            hint = did_you_mean(match.group(1), NORMS) if match else ""
            raise ConfigError(f"bad --norms item {item!r}{hint}; write NORM:EPS with NORM one of "
                              f"{', '.join(NORMS)}, e.g. inf:2/255,2:0.25,1:0.5")
        eps = parse_number(match.group(2), f"--norms {match.group(1)}")  # its range: certify_run, per data set
        if match.group(1) in norms:
            raise ConfigError(f"--norms names {match.group(1)} twice; give each norm once (one eps per norm)")
        norms[match.group(1)] = eps
    if not norms:
        raise ConfigError("--norms names no norm; write NORM:EPS pairs, e.g. inf:2/255,2:0.25")
    return norms


def describe_norms(eps: Dict[str, float]) -> str:
    return ", ".join(f"{NORM_NAMES.get(n, n)} eps {v:.4g}" for n, v in eps.items())


def load_trained(path: str, device: torch.device) -> Tuple[nn.Module, TrainConfig, Optional[int]]:
    """A trained model, its config and the epochs it was trained for (None: a model.pt given alone, whose
    file does not say), from a run directory (config.yaml + model.pt, or checkpoint.pt while the run
    is unfinished), from the trainer's checkpoint.pt, or from a model.pt with the run's config.yaml
    beside it. Loading uses ``weights_only=True``; a broken or foreign file is a one-line
    CheckpointError."""
    if os.path.isdir(path):
        config_path = os.path.join(path, "config.yaml")
        if not os.path.exists(config_path):
            raise CheckpointError(f"{path} is not a run directory: it has no config.yaml")
        config = load_run_config(config_path)
        weights, (state, _, what, epoch) = _run_weights(path, config, device)
    elif os.path.isfile(path):
        weights = path
        state, config_dict, what, epoch = checkpoints.model_weights(path, device)
        beside = os.path.join(os.path.dirname(path), "config.yaml")
        if config_dict is not None:
            config = from_dict(config_dict)
        elif os.path.exists(beside):
            config = load_run_config(beside)
        else:
            raise CheckpointError(f"{path} holds no config (only {what}, and no config.yaml lies beside it): "
                                  "give the run directory or its checkpoint.pt")
    else:
        raise FileNotFoundError(f"no run directory or checkpoint at {path}")
    model = models.build(config.model, config.dataset, config.normalization, **config.model_args).to(device)
    checkpoints.load_weights(model, state, weights, what, f"{config.model} on {config.dataset}")
    if epoch is not None and epoch < config.epochs:
        print(f"note: {weights} is an unfinished run's checkpoint ({epoch} of {config.epochs} epochs trained); "
              f"certifying those weights", file=sys.stderr, flush=True)
    return model.eval(), config, epoch


def _run_weights(run: str, config: TrainConfig, device: torch.device) -> Tuple[str, tuple]:
    """The newest weights of a run directory and :func:`checkpoints.model_weights` of them: model.pt
    (the finished run's, trained for its checkpoint's epochs), unless checkpoint.pt is an unfinished
    one (a run resumed for more epochs keeps its earlier model.pt until it finishes). A checkpoint.pt
    that does not load is no reason to refuse a model.pt that does, nor the reverse (a finished run's
    checkpoint.pt holds model.pt's weights)."""
    model, checkpoint = os.path.join(run, "model.pt"), os.path.join(run, "checkpoint.pt")
    if not os.path.isfile(model):
        if not os.path.isfile(checkpoint):
            raise CheckpointError(f"{run} holds no model.pt or checkpoint.pt yet")
        return checkpoint, checkpoints.model_weights(checkpoint, device)
    epoch, found = None, None
    if os.path.isfile(checkpoint):
        try:
            found = checkpoints.model_weights(checkpoint, device)
        except CheckpointError:
            found = None
        if found is not None and found[3] is not None and found[3] < config.epochs:
            return checkpoint, found
        epoch = None if found is None else found[3]
    try:
        state, _, what, _ = checkpoints.model_weights(model, device)
    except CheckpointError as error:
        if found is None:
            raise
        print(f"note: {error}; certifying {checkpoint}, the finished run's weights (cure-fast train --resume {run} "
              f"writes model.pt again)", file=sys.stderr, flush=True)
        return checkpoint, found
    return model, (state, None, what, epoch)


def plot_curve(curve: Dict[float, Dict[str, float]], eps: Dict[str, float], path: str) -> None:
    """Certified accuracy against the fraction of eps, per norm and for the union."""
    plt = pyplot()
    fractions = sorted(curve)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in [f"certified_{n}" for n in eps] + (["union"] if len(eps) > 1 else []):
        norm = key.split("_")[-1]
        label = f"certified {NORM_NAMES.get(norm, norm)} (eps {eps[norm]:.4g})" if key != "union" else "union"
        ax.plot(fractions, [100 * curve[f][key] for f in fractions], marker="o", label=label)
    ax.set_xlabel("fraction of eps")
    ax.set_ylabel("certified accuracy (%)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _check_arguments(config: TrainConfig, eps: Dict[str, float], limit, batch_size, pgd_steps, smoothing,
                     smoothing_n) -> None:
    """Refuse values that would run wrong or fail late, naming the argument (ConfigError)."""
    Integer(1, optional=True)("limit", limit)
    Integer(1)("batch_size", batch_size)
    Integer(0)("pgd_steps", pgd_steps)
    if smoothing:
        from .smoothing import ALPHA, fewest_samples
        Integer(1)("smoothing_n", smoothing_n)
        if smoothing_n < fewest_samples(ALPHA):
            raise ConfigError(f"--smoothing-n {smoothing_n} cannot certify any image at confidence 1 - {ALPHA:g}: "
                              f"give at least {fewest_samples(ALPHA)} samples (the CURE paper uses 100000)")
        for sigma in smoothing:
            if not sigma > 0:
                raise ConfigError(f"smoothing sigma {sigma!r}; a number > 0")
        if len(set(smoothing)) < len(smoothing):
            given = ",".join(f"{sigma:g}" for sigma in smoothing)
            raise ConfigError(f"--smoothing {given} names a sigma twice; give each once")
    for norm, value in eps.items():
        if norm not in NORMS:
            raise ConfigError(f"eps names the norm {norm!r}; norms are {', '.join(map(repr, NORMS))} "
                              f"(--norms inf:…,2:…,1:…)")
        eps_rule(config.dataset, norm)(f"--norms {norm}", value)


def _new_report_folder(run_dir: str, name: str) -> str:
    """``run_dir/name``, or ``name-run2``, ``name-run3``, … : the first without a finished report
    (summary.json), so that a new certification never replaces an earlier one."""
    return next(folder for folder in numbered_paths(run_dir, name)
                if not os.path.isfile(os.path.join(folder, "summary.json")))


def _check_report_folder(out_dir: str) -> None:
    """A ConfigError unless ``out_dir`` is a new folder, or one without a finished report."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"the report folder {out_dir} is a file; give another with --out")
    above = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise ConfigError(f"the report folder {out_dir} cannot be made: {above} is a file; give another with --out")
    if os.path.isfile(os.path.join(out_dir, "config.yaml")):
        raise ConfigError(f"--out {out_dir} is a training run's folder (it holds config.yaml); give the report a "
                          f"folder of its own")
    if os.path.isfile(os.path.join(out_dir, "summary.json")):
        raise ConfigError(f"--out {out_dir} holds an earlier report (summary.json), which a new certification never "
                          f"replaces; give another folder, or leave --out out for a new one beside it")


def certify_run(path: str, eps: Optional[Dict[str, float]] = None, method: str = "ibp", limit: Optional[int] = None,
                data_root: Optional[str] = None, out_dir: Optional[str] = None, pgd_steps: int = 20,
                batch_size: int = 100, sound: Union[bool, str] = True, curve: Sequence[float] = CURVE,
                device: str = "auto", smoothing: Sequence[float] = (), smoothing_n: int = SMOOTHING_N,
                geometric: bool = False, progress: bool = False, protocol: Optional[str] = None,
                alpha_intermediate: bool = True) -> Dict:
    """Certify the model at ``path`` on the test set; writes the reports to ``out_dir`` and returns
    the summary (accuracies, seconds per image per method). ``eps``: {norm: eps}, by default both
    norms at the run's own evaluation eps. ``progress``: progress bars and what is written where.
    ``protocol="paper"``: the CURE paper's test images and eps (l∞, l2, l1; those given in ``eps``
    replace its own) and a ``paper_table.md`` (:mod:`~cure_fast.certification.protocol`)."""
    if method not in CERTIFIERS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(CERTIFIERS)}")
    if sound not in (True, False, "fp64", "fp32"):
        raise ConfigError(f"sound={sound!r}; choose True / 'fp64', 'fp32' (rounding bounded) or False (plain fp32)")
    if eps is not None:
        if not isinstance(eps, dict):
            raise ConfigError(f"eps is a mapping {{norm: eps}} (norms {', '.join(map(repr, NORMS))}), got "
                              f"{type(eps).__name__}")
        eps = {str(norm): value for norm, value in eps.items()}  # {2: 0.5} as {"2": 0.5}
    dev = resolve_device(device)
    model, config, epochs_trained = load_trained(path, dev)
    from_config = eps is None
    first, asked = 0, limit
    source = " (the run's own evaluation eps)" if from_config else ""
    if protocol == "paper":
        paper_eps, first, end = paper_setting(config.dataset, config.eps_inf)
        given = [NORM_NAMES.get(k, k) for k in eps or {} if k in paper_eps]
        source = f" (the paper's eps{'; --norms for ' + ', '.join(given) if given else ''})"
        eps, from_config = {**paper_eps, **(eps or {})}, False
        limit = min(limit or end - first, end - first)
    elif protocol is not None:
        raise ConfigError(f"unknown protocol {protocol!r}; the one there is: paper")
    eps = {n: config.eval_eps(n) for n in TRAINED_NORMS} if from_config else eps
    _check_arguments(config, eps, limit, batch_size, pgd_steps, smoothing, smoothing_n)
    test = data.load_dataset(config.dataset, "test", data_root or config.data_root,
                             limit=None if limit is None else first + limit)
    if first:
        test = data.ImageData(test.images[first:], test.labels[first:])
    out_dir = out_dir or _new_report_folder(path if os.path.isdir(path) else os.path.dirname(path),
                                            f"certify-{protocol or method}")
    _check_report_folder(out_dir)
    with _report_folder(out_dir):
        n = len(test.labels)
        if asked is not None and n < min(asked, limit):
            print(f"note: --limit {asked} is more than the {n} test images there are: certifying all {n}",
                  file=sys.stderr, flush=True)
        verb = "certifying" if sound is not False else "bounding (--fast: plain fp32, not certificates)"
        print(f"{verb} {path} ({config.model} on {config.dataset}) with {method} on {n} test images, "
              f"{describe_norms(eps)}{source}; reports to {out_dir}", flush=True)
        run = lambda e, steps: evaluate(  # noqa: E731
            model, test.images, test.labels, e, method=method, pgd_steps=steps, batch_size=batch_size,
            backend=config.backend, device=dev, sound=sound, progress=progress, alpha_intermediate=alpha_intermediate)
        evaluation = run(eps, pgd_steps)
        precision = {True: "fp64 (rounding bounded)", False: "fp32 (not sound)", "fp64": "fp64 (rounding bounded)",
                     "fp32": "fp32 (rounding bounded)"}.get(sound)
        alpha = {"alpha_intermediate": alpha_intermediate} if method == "alpha-crown" else {}
        summary = {"model": path, "epochs_trained": epochs_trained, "method": method, **alpha,
                   "sound": sound is not False, "precision": precision, "eps": eps, "images": n, "first_image": first,
                   **evaluation.summary(),
                   "seconds_per_image": {k: v / n for k, v in evaluation.seconds.items()},
                   "bounded": evaluation.bounded, "reports": out_dir}
        write_per_sample(evaluation, os.path.join(out_dir, "per_sample.csv"), test.labels, methods=True)
        if curve:
            points = {f: (summary if f == 1.0 else run({k: f * v for k, v in eps.items()}, 0).summary())
                      for f in curve}
            summary["curve"] = {str(f): {k: v for k, v in s.items() if k.startswith("certified_") or k == "union"}
                                for f, s in points.items()}
            plot_curve(points, eps, os.path.join(out_dir, "certified_vs_eps.png"))
        if smoothing:
            summary["smoothing"] = _smoothing(model, test, config, data_root, smoothing, smoothing_n, batch_size,
                                              out_dir, progress)
        if geometric:
            report = geometric_robustness(model, test.images, test.labels, batch_size=batch_size, device=dev,
                                          progress=progress)
            summary["geometric"] = {k: v for k, v in report.items() if k != "samples"}
            plot_geometric(report, os.path.join(out_dir, "geometric.png"))
        plot_summary({method: summary}, os.path.join(out_dir, "summary.png"), title=caption(summary))
        if protocol == "paper":
            table = paper_table({config.name: summary}, eps, f"{method}, test images {first}–{first + n - 1}")
            summary["paper_table"] = os.path.join(out_dir, "paper_table.md")
            write_atomic(summary["paper_table"], table + "\n")
        write_json(summary, os.path.join(out_dir, "summary.json"))
        return summary


@contextlib.contextmanager
def _report_folder(out_dir: str) -> Iterator[None]:
    """Create ``out_dir``; an error or an interruption before anything is written there removes it again."""
    existed = os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot make the report folder {out_dir} ({error.strerror}); give a writable one with "
                          f"--out") from None
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only when empty
        raise


def format_times(summary: Dict) -> str:
    """Seconds per test image of each stage, and, for the stages a cascade ran on fewer bounds than
    the first (every image and norm), how many and their time each:
    ``time per test image: pgd 1.2 ms, ibp 0.90 ms, crown 3.1 ms (7 of 200 bounds, 88 ms each); total 5.2 ms``."""
    n, per_image, bounded = summary["images"], summary["seconds_per_image"], summary.get("bounded", {})
    every = n * len(summary["eps"])
    parts = []
    for stage, seconds in per_image.items():
        done = bounded.get(stage, every)
        each = f" ({done} of {every} bounds, {1e3 * seconds * n / max(done, 1):.3g} ms each)" if done < every else ""
        parts.append(f"{stage} {1e3 * seconds:.3g} ms{each}")
    total = 1e3 * sum(per_image.values())
    return f"time per test image: {', '.join(parts)}; total {total:.3g} ms ({summary['precision']})"


def caption(summary: Dict) -> str:
    return f"{summary['method']} on {summary['images']} test images, {describe_norms(summary['eps'])}"


def _smoothing(model, test, config, data_root, sigmas, n, batch_size, out_dir, progress) -> Dict:
    """Randomized smoothing per sigma, plain and with BatchNorm re-estimated once on held-out noisy data."""
    from .smoothing import found_in, plot_smoothing, smoothing_report  # scipy: loaded only when smoothing is asked for
    heldout = data.load_dataset(config.dataset, "train", data_root or config.data_root, limit=1000).images
    heldout = heldout[~found_in(heldout, test.images)]  # a training image that is also a test image: left out
    reports = {}
    for sigma in sigmas:
        reports[f"sigma {sigma:g}"] = smoothing_report(model, test.images, test.labels, sigma, n=n,
                                                       batch_size=batch_size * 10, progress=progress)
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            reports[f"sigma {sigma:g}, adaptive BN"] = smoothing_report(
                model, test.images, test.labels, sigma, n=n, batch_size=batch_size * 10, adapt="heldout",
                heldout_images=heldout, progress=progress)
    plot_smoothing(reports, os.path.join(out_dir, "smoothing.png"))
    return {name: {k: v for k, v in r.items() if k != "samples"} for name, r in reports.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a run directory, or the trainer's checkpoint.pt")
    parser.add_argument("--norms", help="NORM:EPS pairs, e.g. inf:2/255,2:0.25 or inf:1e-2 (default: both norms "
                        "at the run's own evaluation eps; with --protocol paper they replace the paper's eps of "
                        "the norms given, the others stay)")
    parser.add_argument("--method", choices=CERTIFIERS, help="the strongest method of the cascade "
                        "(default ibp; alpha-crown with --protocol paper)")
    parser.add_argument("--protocol", choices=("paper",), help="paper: the CURE paper's test images, eps per norm "
                        "(l∞, l2, l1) and certifier (alpha-crown), and its union table")
    parser.add_argument("--limit", type=integer_type(1), help="certify the first N test images")
    parser.add_argument("--data-root", help="folder holding the data sets (default: the run's data_root)")
    parser.add_argument("--out", help="report folder (default: RUN_DIR/certify-METHOD, certify-paper with --protocol "
                        "paper, or -run2, … when that holds an earlier report)")
    parser.add_argument("--pgd-steps", type=integer_type(0), default=20, help="PGD steps of the empirical robustness "
                        "attack per norm (0: none; default 20)")
    parser.add_argument("--batch-size", type=integer_type(1), default=100, help="test images per batch (default 100)")
    parser.add_argument("--sound", choices=("fp64", "fp32"), help="the certifier's arithmetic: fp64 (the default) "
                        "or fp32 with every rounding error bounded (certificates for the float32 weights)")
    parser.add_argument("--fast", action="store_true", help="fp32 without accounting for rounding (not a "
                        "certificate; quick estimates)")
    parser.add_argument("--no-alpha-intermediate", action="store_true", help="α-CROWN on the final slopes only "
                        "(the pre-activation bounds' slopes cost about 20 CROWN passes per uncertified image)")
    parser.add_argument("--no-curve", action="store_true", help="skip certified accuracy at fractions of eps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: a GPU when there is one")
    parser.add_argument("--smoothing", default="", help="randomized smoothing sigmas, e.g. 0.25,0.5")
    parser.add_argument("--smoothing-n", type=integer_type(1), help=f"noise samples per image for smoothing's "
                        f"certificate (default {SMOOTHING_N})")
    parser.add_argument("--geometric", action="store_true", help="worst case over rotations, shifts, scaling, "
                                                                 "brightness and contrast")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _sound(args: argparse.Namespace) -> Union[bool, str]:
    if args.fast and args.sound:
        raise ConfigError(f"--fast and --sound {args.sound} contradict each other; give one of them")
    return False if args.fast else (args.sound or "fp64")


def _stopped(signum: int) -> str:
    return (f"stopped by {signal.Signals(signum).name} before the report was finished (no summary.json written); "
            f"run the command again to certify")


def run_from_args(args: argparse.Namespace) -> Dict:
    """``cure-fast certify``: SIGINT and SIGTERM stop it with one line; an empty report folder is removed."""
    with SignalGuard(_stopped):
        return _run(args)


def _run(args: argparse.Namespace) -> Dict:
    sigmas = number_list(args.smoothing, "--smoothing")
    if args.smoothing_n is not None and not sigmas:
        raise ConfigError("--smoothing-n sets the samples of randomized smoothing: give --smoothing SIGMAS too "
                          "(e.g. --smoothing 0.25,0.5)")
    eps = parse_norms(args.norms) if args.norms is not None else None
    method = args.method or (PAPER_METHOD if args.protocol == "paper" else "ibp")
    if args.no_alpha_intermediate and method != "alpha-crown":
        print(f"note: --no-alpha-intermediate sets α-CROWN's search; --method {method} has none", file=sys.stderr)
    summary = certify_run(args.model, eps, method, args.limit, args.data_root, args.out,
                          args.pgd_steps, args.batch_size, _sound(args), () if args.no_curve else CURVE,
                          args.device, sigmas, args.smoothing_n or SMOOTHING_N, args.geometric,
                          progress=not args.no_progress, protocol=args.protocol,
                          alpha_intermediate=not args.no_alpha_intermediate)
    print(format_table({method: summary}, caption=caption(summary)))
    print(format_times(summary))
    if "smoothing" in summary:
        from .smoothing import format_smoothing
        print(format_smoothing(summary["smoothing"]))
    if "geometric" in summary:
        print(format_geometric(summary["geometric"]))
    if "paper_table" in summary:
        with open(summary["paper_table"]) as f:
            print(f.read().rstrip())
    print(f"reports in {summary['reports']}")
    return summary

