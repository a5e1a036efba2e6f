"""Margin bounds beside auto_LiRPA: the same nets, images and input sets, IBP / CROWN / α-CROWN on
both sides, timed in one process, with the agreement checks of issue 14.

    python bench/certify_vs_peer.py --peer peers/auto_LiRPA [--json out.json] [--threads 1]
    python bench/certify_vs_peer.py --peer peers/auto_LiRPA --smoke        # tiny and fast

The peer (a checkout of github.com/Verified-Intelligence/auto_LiRPA) is not a dependency: it goes on
``sys.path`` only with ``--peer PATH``; without it the script says so and exits 0.

Nets: ``models.build(net, dataset)``, eval mode, random weights (BatchNorm statistics of random
images), briefly trained (natural, MNIST) or briefly certifiably trained (cnn3: IBP at l∞ 0.1, MNIST,
the kind of net certification is for: most neurons stable, many dead). Labels are the predictions; the specification is
``z_y - z_j``, ``j != y`` (the peer's ``C``). Sets: l∞ over ``[max(x-eps, 0), min(x+eps, 1)]``
(the peer's ``x_L, x_U``), l2 without the domain (the peer ignores it; ours ``L2Ball(eps, domain=None)``).
Ours: ``margins``, ``sound=True`` (fp64), ``sound="fp32"`` (sound fp32) and ``sound=False`` (fp32); IBP in fp32 and fp64. The peer:
fp32 (and fp64 for IBP), ``--conv-mode`` patches by default.

The peer gets our Normalize as a 1x1 Conv2d with a diagonal weight (the same function; grouped, its
patches mode goes wrong on 3 channels). Given Normalize itself (Sub/Div by constants) its patches mode
treats the zero padding of the next convolution as normalized input: its bounds exclude reachable
values (row "peer, Normalize as Sub/Div"). l2 IBP: the peer's ball becomes a box at that Conv2d (on
one-channel data it also gets the normalized net and input, ``eps / std``); ours stays exact to the
first real layer, padding-aware. α-CROWN: both sides optimize the slopes of the intermediate bounds too; the row "peer with CROWN's
intermediate bounds fixed" compares the final slopes only (ours with ``alpha_intermediate=False``). Where torch's ``clamp`` has a zero gradient at
the bounds (2.14), the peer's α-CROWN cannot leave CROWN's slopes 0 / 1: unless ``--peer-as-is``,
the clamp of its ReLU module gets the inclusive gradient of older torch (the peer's supported range).

Checks: IBP equal (relative to the largest bound: fp64 ≤ 1e-12, fp32 ≤ 1e-5); CROWN, α-CROWN: ours
never below the peer's by more than ``--tol`` · max(1, |peer|). Every bound is compared with the
margins at x and at 16 random points of the set (a bound above one is unsound). CNN7: the peer forked, capped.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import multiprocessing
import os
import pickle
import queue as queue_module
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import List

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from cure_fast import BoundedModule, L2Ball, LinfBall, models  # noqa: E402

EPS = {"mnist": {"inf": 0.1, "2": 1.0}, "cifar10": {"inf": 2 / 255, "2": 0.25}}
PEER_METHOD = {"ibp": "IBP", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}
NETS = ("cnn3", "cnn5", "cnn7")
VARIANTS = {"sound": "fp64 sound", "sound32": "fp32 sound", "fp32": "fp32"}  # our arithmetic: sound= True, "fp32", False


class _InclusiveClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, high):
        ctx.save_for_backward(x)
        ctx.bounds = (-np.inf if low is None else low, np.inf if high is None else high)
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * ((x >= ctx.bounds[0]) & (x <= ctx.bounds[1])).to(grad.dtype), None, None


class _InclusiveClampTorch:
    """``torch`` for the peer's ReLU module, with ``clamp``'s gradient 1 at the bounds (older torch)."""
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def clamp(x, min=None, max=None):  # noqa: A002 -- torch's signature
        grad = torch.is_grad_enabled() and x.requires_grad
        return _InclusiveClamp.apply(x, min, max) if grad else torch.clamp(x, min=min, max=max)


def load_peer(path: str, as_is: bool):
    """The peer's package, its perturbation class and a record of it; SystemExit saying why not."""
    package = os.path.join(path, "auto_LiRPA", "__init__.py")
    if not os.path.isfile(package):
        raise SystemExit(f"error: --peer {path}: no auto_LiRPA source there (expected {package})")
    sys.path.insert(0, os.path.abspath(path))
    try:
        with warnings.catch_warnings(action="ignore"):
            import auto_LiRPA
            from auto_LiRPA.operators import relu
            from auto_LiRPA.perturbations import PerturbationLpNorm
    except ImportError as error:
        raise SystemExit(f"error: --peer {path}: auto_LiRPA does not import: {type(error).__name__}: {error}")
    probe = torch.zeros(1, requires_grad=True)
    probe.clamp(0.0, 1.0).backward()
    if (shim := not as_is and float(probe.grad) == 0.0):
        relu.torch = _InclusiveClampTorch()
    commit = subprocess.run(["git", "-C", path, "log", "-1", "--format=%H %cs"], capture_output=True, text=True
                            ).stdout.strip() if os.path.exists(os.path.join(path, ".git")) else ""
    return auto_LiRPA, PerturbationLpNorm, {"version": auto_LiRPA.__version__, "commit": commit, "clamp_gradient_shim": shim}


def build(case: dict, smoke: bool):
    """The case's model (eval mode), images and labels (the model's predictions)."""
    torch.manual_seed(case["seed"])
    model = models.build(case["net"], case["data"], **({"width": 4} if smoke else {}))
    shape = models.DATASETS[case["data"]].shape
    if case["weights"] in ("trained", "ibp"):  # training on MNIST, Adam, batches of 64
        from cure_fast.data import load_mnist
        images, labels = load_mnist("train")
        generator = torch.Generator().manual_seed(case["seed"])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        bounded, steps = BoundedModule(model.train()) if case["weights"] == "ibp" else None, 20 if smoke else 300
        for step in range(steps):
            index = torch.randint(0, len(images), (64,), generator=generator)
            if case["weights"] == "ibp":  # certified training: IBP's worst-case logits, eps ramped up over half the steps
                eps = EPS["mnist"]["inf"] * min(1.0, 2 * (step + 1) / steps)
                out = bounded.propagate(images[index], [LinfBall(eps)], labels[index])  # natural and IBP, one pass
                logits, worst = out.logits, -out.margins[0]
                loss = (nn.functional.cross_entropy(logits, labels[index])
                        + nn.functional.cross_entropy(worst, labels[index])) / 2
            else:
                logits = model(images[index])
                loss = nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        case["train_batch_accuracy"] = float((logits.argmax(1) == labels[index]).float().mean())
        x = load_mnist("test")[0][: case["batch"]].clone()
    else:  # BatchNorm statistics of random images, so that pre-activations are roughly standardized
        for module in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            module.momentum = None
        with torch.no_grad():
            for _ in range(4):
                model.train()(torch.rand((32,) + shape))
        x = torch.rand((case["batch"],) + shape, generator=torch.Generator().manual_seed(case["seed"] + 1))
    model.eval().requires_grad_(False)
    with torch.no_grad():
        return model, x, model(x).argmax(1)


def peer_model(model: nn.Sequential, drop_normalize: bool = False) -> nn.Sequential:
    """``model`` with its Normalize first layer as a 1x1 Conv2d with a diagonal weight (the same function;
    not grouped: the peer's patches mode mishandles grouped convolutions), or without it."""
    layers = list(copy.deepcopy(model))
    norm, c = layers[0], layers[0].mean.numel()
    if drop_normalize:
        return nn.Sequential(*layers[1:]).eval()
    conv = nn.Conv2d(c, c, 1).to(norm.mean.dtype)
    conv.weight.data, conv.bias.data = torch.diag(1 / norm.std).view(c, c, 1, 1).clone(), (-norm.mean / norm.std).clone()
    return nn.Sequential(conv, *layers[1:]).eval()


def off_label(margins: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B, K-1): the entries j != y in order."""
    keep = torch.ones_like(margins, dtype=torch.bool).scatter(1, y[:, None], False)
    return margins.detach()[keep].view(margins.shape[0], -1)


def spec_matrix(y: torch.Tensor, classes: int, dtype) -> torch.Tensor:
    """The peer's ``C``: rows ``e_y - e_j`` for every ``j != y``, (B, K-1, K)."""
    eye = torch.eye(classes, dtype=dtype)
    return torch.stack([eye[int(t)][None] - eye[[j for j in range(classes) if j != int(t)]] for t in y])


def timed(fn, quick: float = 0.5):
    """(result, seconds): one call, or the median of three when the first takes under ``quick`` s."""
    times = []
    for _ in range(3):
        start, out = time.perf_counter(), fn()
        times.append(time.perf_counter() - start)
        if times[0] >= quick:
            break
    return out, statistics.median(times)


def capped(fn, gigabytes: float, timeout: float):
    """``fn()`` in a forked child with its address space capped; (its result, its peak RSS in MB)."""
    def child(queue):
        try:
            resource.setrlimit(resource.RLIMIT_AS, (int(gigabytes * 2**30),) * 2)
            queue.put(pickle.dumps(("ok", fn(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
        except BaseException as error:  # noqa: BLE001 -- reported to the parent
            queue.put(pickle.dumps(("error", f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]}", 0.0)))

    queue = (context := multiprocessing.get_context("fork")).Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    deadline = time.time() + timeout
    while True:
        try:
            status, value, rss_mb = pickle.loads(queue.get(timeout=1.0))  # by value, not shared memory
            break
        except queue_module.Empty:
            if not process.is_alive() or time.time() > deadline:
                process.kill()
                process.join()
                raise RuntimeError(f"{'killed' if time.time() <= deadline else f'over {timeout:.0f} s'} "
                                   f"(address space capped at {gigabytes:g} GB)")
    process.join()
    if status != "ok":
        raise (MemoryError if "allocate memory" in value else RuntimeError)(f"{value} (address space capped at {gigabytes:g} GB)")
    return value, rss_mb


def compare(ours: torch.Tensor, peer: torch.Tensor, tol: float, case: str) -> dict:
    diff, slack = ours.double() - peer.double(), tol * peer.double().abs().clamp(min=1)
    looser, tighter = diff < -slack, diff > slack
    return {"rows": diff.numel(), "looser": int(looser.sum()), "tighter": int(tighter.sum()),
            "max_looser": float((-diff).clamp(min=0).max()), "max_tighter": float(diff.clamp(min=0).max()),
            "max_relative": float(diff.abs().max() / peer.abs().max().clamp(min=1e-30)),
            "looser_rows": [{"case": case, "image": b, "row": j, "ours": float(ours[b, j]), "peer": float(peer[b, j])}
                            for b, j in looser.nonzero()[:5].tolist()]}


def points(x, norm: str, eps: float, count: int = 16) -> List[torch.Tensor]:
    """x and ``count`` random points of the set: corners of the clipped box (l∞), the sphere (l2)."""
    generator, low, high = torch.Generator().manual_seed(7), (x - eps).clamp(min=0), (x + eps).clamp(max=1)
    noise = [torch.randn(x.shape, generator=generator, dtype=x.dtype) for _ in range(count)]
    if norm == "inf":
        return [x] + [torch.where(d < 0, low, high) for d in noise]
    return [x] + [x + eps * d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1)) for d in noise]


def sampled_margins(model: nn.Sequential, x, y, norm: str, eps: float) -> torch.Tensor:
    """The smallest margin over :func:`points`, (B, K-1); ``model`` in float64."""
    with torch.no_grad():
        z = torch.stack([model(c) for c in points(x.double(), norm, eps)])
    return off_label((z.gather(2, y.view(1, -1, 1).expand(len(z), -1, 1)) - z).amin(0), y)


def unsound(bound: torch.Tensor, sampled: torch.Tensor) -> float:
    """How far a lower bound exceeds a sampled margin (0 when it is below every one)."""
    return float((bound.double() - sampled - 1e-6 * sampled.abs().clamp(min=1)).clamp(min=0).max())


def outside(bounds, model: nn.Sequential, x, eps: float) -> float:
    """How far the values before the first ReLU at :func:`points` of the l∞ box fall outside ``bounds``."""
    with torch.no_grad():
        z = torch.stack([model[:[isinstance(m, nn.ReLU) for m in model].index(True)](c) for c in points(x, "inf", eps)])
    return float(torch.maximum(bounds[0] - z, z - bounds[1]).clamp(min=0).max())


def run_case(case: dict, args, lirpa, perturbation) -> List[dict]:
    model, x, y = build(case, args.smoke)
    name = f"{case['net']}/{case['data']}/{case['weights']}/seed {case['seed']}/batch {len(x)}"
    classes, norm_layer = models.DATASETS[case["data"]].classes, model[0]
    bm, bm64, x64 = BoundedModule(model), BoundedModule(copy.deepcopy(model).double()), x.double()
    pmodel, pmodel64 = peer_model(model), peer_model(copy.deepcopy(model).double())
    rows = []
    for norm in case.get("norms", ("inf", "2")):
        eps = EPS[case["data"]][norm]
        spec = LinfBall(eps) if norm == "inf" else L2Ball(eps, domain=None)
        sampled = sampled_margins(bm64.model, x, y, norm, eps)

        def peer(method, model_=pmodel, x_=x, eps_=eps, interm=False, first_relu=False):
            ptb = perturbation(norm=np.inf, eps=eps_, x_L=(x_ - eps_).clamp(min=0), x_U=(x_ + eps_).clamp(max=1)) \
                if norm == "inf" else perturbation(norm=2, eps=eps_)

            def call():
                with warnings.catch_warnings(action="ignore"), contextlib.redirect_stdout(io.StringIO()):
                    module = lirpa.BoundedModule(model_, torch.zeros_like(x_), verbose=0, device="cpu",
                                                 bound_opts={"conv_mode": args.conv_mode, "verbosity": 0})
                    bounded, C = lirpa.BoundedTensor(x_, ptb), spec_matrix(y, classes, x_.dtype)
                    fixed = None
                    if interm:  # CROWN's intermediate bounds, kept fixed during α-CROWN
                        module.compute_bounds(x=(bounded,), C=C, method="CROWN", bound_upper=False)
                        fixed = {n.inputs[0].name: [n.inputs[0].lower.detach(), n.inputs[0].upper.detach()]
                                 for n in module.nodes() if type(n).__name__ == "BoundRelu"}
                    out = timed(lambda: module.compute_bounds(x=(bounded,), C=C, method=PEER_METHOD[method],
                                                              bound_upper=False, interm_bounds=fixed)[0].detach())
                    node = next(n for n in module.nodes() if type(n).__name__ == "BoundRelu").inputs[0]
                    return ((node.lower.detach(), node.upper.detach()), out[1]) if first_relu else out
            if case.get("capped"):
                (out, seconds), row["peer_peak_rss_mb"] = capped(call, args.peer_mem_gb, args.peer_timeout)
                return out, seconds
            return call()

        for method in case["methods"]:
            print(f"  {name}  l{norm} eps {eps:.4g}  {method}", flush=True)
            rows.append(row := {"case": name, "images": len(x), "norm": norm, "eps": eps, "method": method,
                                **{k: case[k] for k in ("net", "data", "weights", "seed", "train_batch_accuracy") if k in case}})
            if case.get("capped"):  # ours first: the peer may run out of memory
                o, t = timed(lambda: off_label(bm.margins(x, y, spec, method=method, sound=False), y))
                row.update(ours_fp32_s_per_image=t / len(x), ours_unsound_by=unsound(o, sampled),
                           ours_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            try:
                p, t = peer(method)
                row.update(peer_s_per_image=t / len(x), peer_unsound_by=unsound(p, sampled))
                if method == "ibp":
                    (o32, t), (o64, _) = timed(lambda: off_label(bm.margins(x, y, spec), y)), timed(lambda: off_label(bm64.margins(x64, y, spec), y))
                    row.update(ours_fp32_s_per_image=t / len(x), vs_peer_fp32=compare(o32, p, args.tol, name),
                               vs_peer_fp64=compare(o64, peer(method, pmodel64, x64)[0], args.tol, name),
                               ours_unsound_by=max(unsound(o32, sampled), unsound(o64, sampled)))
                    if norm == "2" and norm_layer.mean.numel() == 1:  # the peer on the normalized net and input
                        m, s = norm_layer.mean.double(), norm_layer.std.double()
                        p64 = peer(method, peer_model(copy.deepcopy(model).double(), True), (x64 - m) / s, eps / float(s))[0]
                        row["vs_peer_fp64_normalized_input"] = compare(o64, p64, args.tol, name)
                elif case.get("capped"):
                    row["fp32_vs_peer"] = compare(o, p, args.tol, name)
                else:
                    row["ours_unsound_by"] = 0.0
                    fixed = peer(method, interm=True)[0] if method == "alpha-crown" and case.get("fixed_interm") else None
                    outs = {}
                    for label, sound in {"sound": True, "sound32": "fp32", "fp32": False}.items():
                        o, t = timed(lambda: off_label(bm.margins(x, y, spec, method=method, sound=sound), y))
                        outs[label] = o
                        row.update({f"ours_{label}_s_per_image": t / len(x), f"{label}_vs_peer": compare(o, p, args.tol, name),
                                    "ours_unsound_by": max(row["ours_unsound_by"], unsound(o, sampled))})
                        if fixed is not None and label == "sound":  # like with like: our final slopes only
                            own = off_label(bm.margins(x, y, spec, method=method, sound=sound,
                                                       alpha_intermediate=False), y)
                            row[f"{label}_vs_peer_fixed_intermediate"] = compare(own, fixed, args.tol, name)
                    row["sound32_vs_fp64"] = compare(outs["sound32"], outs["sound"], args.tol, name)
                if case.get("native_check") and method == "crown" and norm == "inf":  # bounds before the first ReLU
                    row["peer_first_relu_outside_by"] = {k: outside(peer(method, m, first_relu=True)[0], model, x, eps)
                                                         for k, m in (("normalize", model), ("conv", pmodel))}
            except Exception as error:  # noqa: BLE001 -- one failing case is a result, not the end of the run
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                print(f"!! {name} l{norm} {method}: {row['error']}", flush=True)
    return rows


def plan(args) -> List[dict]:
    methods = tuple(args.methods)
    crown = tuple(m for m in methods if m != "alpha-crown")
    if args.smoke:
        return [dict(net="cnn3", data="mnist", weights="random", seed=0, batch=2, methods=methods,
                     native_check=True, fixed_interm=True)]
    cases = [dict(net="cnn3", data=data, weights="random", seed=seed, batch=2, methods=methods,
                  native_check=seed == 0 and data == "mnist", fixed_interm=seed == 0)
             for seed in range(args.seeds) for data in ("mnist", "cifar10")]
    cases += [dict(net="cnn3", data="mnist", weights="trained", seed=0, batch=8, methods=methods, fixed_interm=True),
              dict(net="cnn3", data="mnist", weights="ibp", seed=0, batch=8, methods=methods),
              dict(net="cnn5", data="mnist", weights="trained", seed=0, batch=2,
                   methods=methods if args.cnn5_alpha else crown),  # α-CROWN: minutes per case
              dict(net="cnn5", data="cifar10", weights="random", seed=0, batch=2, methods=crown)]
    if not args.skip_cnn7 and "crown" in methods:
        cases.append(dict(net="cnn7", data="cifar10", weights="random", seed=0, batch=1, norms=("inf",),
                          methods=("crown",), capped=True))
    cases = [c for c in cases if c["net"] in args.nets]
    for case in cases:
        case["batch"] = args.images or case["batch"]
    return cases


def _span(values: List[float]) -> str:
    low, high = (f"{v:.3g} s" if v >= 1 else f"{1e3 * v:.3g} ms" for v in (min(values), max(values)))
    return low if low == high else f"{low} – {high}"


def _counts(stats: List[dict], label: str) -> str:
    """Rows looser / tighter than the peer beyond the tolerance, and the largest differences of any size
    (those within the tolerance included)."""
    n, lo, hi = (sum(s[k] for s in stats) for k in ("rows", "looser", "tighter"))
    return (f"{label}: looser beyond --tol on {lo}/{n} rows ({sum(s['looser'] > 0 for s in stats)}/{len(stats)} cases;"
            f" largest difference below the peer {max(s['max_looser'] for s in stats):.2g}), tighter on {hi}/{n} "
            f"(largest difference {max(s['max_tighter'] for s in stats):.2g})")


def summary(rows: List[dict], args, notes: List[str]) -> List[List[str]]:
    """The rows of the issue's table: check, cure_fast, peer, verdict."""
    ok, table = [r for r in rows if "error" not in r and "peer_s_per_image" in r], []
    for norm, label in (("inf", "l∞"), ("2", "l2")):
        sel = [r for r in ok if r["method"] == "ibp" and r["norm"] == norm]
        if not sel:
            continue
        r32, r64 = (max(r[k]["max_relative"] for r in sel) for k in ("vs_peer_fp32", "vs_peer_fp64"))
        if norm == "inf":
            table.append([f"IBP bounds, {label}", f"equal: ≤ {r64:.1e} relative (fp64), ≤ {r32:.1e} (fp32); {len(sel)} nets",
                          "", "ok" if r64 <= 1e-12 and r32 <= 1e-5 else "**not ok**"])
            continue
        stats = [r["vs_peer_fp64"] for r in sel] + [r["vs_peer_fp64_normalized_input"] for r in sel if "vs_peer_fp64_normalized_input" in r]
        table.append([f"IBP bounds, {label}", _counts(stats, "fp64, the peer given Normalize as a conv and (MNIST) the "
                      "normalized input") + "; ours: exact, padding-aware first layer", "", "**not ok**" if any(t["looser"] for t in stats) else "ok"])
    for method, label in (("crown", "CROWN margins, l∞ and l2"), ("alpha-crown", "α-CROWN margins, l∞ and l2")):
        sel = [r for r in ok if r["method"] == method and ("sound_vs_peer" in r or "fp32_vs_peer" in r)]
        if sel:
            variants = [v for v in ("sound", "fp32") if any(f"{v}_vs_peer" in r for r in sel)]
            parts = [_counts([r[f"{v}_vs_peer"] for r in sel if f"{v}_vs_peer" in r], VARIANTS[v]) for v in variants]
            bad = any(r[f"{v}_vs_peer"]["looser"] for r in sel for v in variants if f"{v}_vs_peer" in r)
            table.append([label, "; ".join(parts), "", "**not ok**" if bad else "ok"])
            allowance = [r["sound32_vs_fp64"] for r in sel if "sound32_vs_fp64" in r]
            if allowance:  # sound fp32 pays for its rounding errors: compared with our fp64, not judged
                table.append([label + ": fp32 sound beside our fp64 sound (its rounding-error allowance)",
                              _counts(allowance, "fp32 sound") + "; vs the peer: " +
                              _counts([r["sound32_vs_peer"] for r in sel if "sound32_vs_peer" in r], "fp32 sound"),
                              "", "info"])
        fixed = [r["sound_vs_peer_fixed_intermediate"] for r in sel if "sound_vs_peer_fixed_intermediate" in r]
        if fixed:
            table.append([label + ", final slopes only (both with CROWN's intermediate bounds)", _counts(fixed, "sound"), "",
                          "**not ok**" if any(s["looser"] for s in fixed) else "ok"])
    worst_ours, worst_peer = (max((r.get(k, 0) for r in ok), default=0.0) for k in ("ours_unsound_by", "peer_unsound_by"))
    table.append(["bounds vs sampled margins (x and 16 random points of the set)", f"never above (worst excess {worst_ours:.2g})",
                  f"worst excess {worst_peer:.2g}", "ok" if worst_ours == 0 else "**not ok**"])
    for r in (r for r in ok if "peer_first_relu_outside_by" in r):
        out = r["peer_first_relu_outside_by"]
        table.append([f"peer, Normalize as Sub/Div ({args.conv_mode} mode): CROWN l∞ bounds before the first ReLU, {r['case']}", "",
                      f"miss reachable values (x, box corners) by up to {out['normalize']:.3g} (Normalize as a conv: {out['conv']:.2g})",
                      "**peer unsound**" if out["normalize"] > 1e-4 else "ok"])

    def timing(label, pick, method="crown"):
        sel = [r for r in rows if pick(r) and r["method"] == method and "ours_fp32_s_per_image" in r]
        if not sel:
            return
        times = {v: [r[f"ours_{v}_s_per_image"] for r in sel if f"ours_{v}_s_per_image" in r] for v in VARIANTS}
        times = {v: t for v, t in times.items() if t}
        peer = [r["peer_s_per_image"] for r in sel if "peer_s_per_image" in r]
        ours = [" / ".join(f"{_span(t)} ({VARIANTS[v]})" for v, t in times.items())] + [
            f"process peak RSS {r['ours_peak_rss_mb'] / 1024:.2g} GB" for r in sel if "ours_peak_rss_mb" in r]
        ratio = [f"{max(t) / max(peer):.2g}× ({VARIANTS[v]})" for v, t in times.items()] if peer else []
        error = sel[0].get("error", "not run")
        error = f"out of memory (address space capped at {args.peer_mem_gb:g} GB)" if "allocate memory" in error else error
        table.append([label, ", ".join(ours), f"{_span(peer)} ({args.conv_mode} mode)" if peer else error,
                      "ours / peer time " + " / ".join(ratio) if peer else "peer did not finish"])

    for method, name in (("crown", "CROWN"), ("alpha-crown", "α-CROWN")):
        timing(f"{name} per image, cnn5 (batch 2, briefly trained, MNIST)", lambda r: r["net"] == "cnn5" and r["weights"] == "trained", method)
        timing(f"{name} per image, cnn3 (batch 8, briefly trained, MNIST)", lambda r: r["net"] == "cnn3" and r["weights"] == "trained", method)
        timing(f"{name} per image, cnn3 (batch 8, IBP-trained, MNIST)", lambda r: r["net"] == "cnn3" and r["weights"] == "ibp", method)
    timing("CROWN per image, cnn5 (one batch of 2, random weights, CIFAR-10)", lambda r: r["net"] == "cnn5" and r["weights"] == "random")
    timing("CROWN per image, CNN7 CIFAR (random weights, 1 image, l∞)", lambda r: r["net"] == "cnn7")
    table += [[f"{r['method']} l{r['norm']}, {r['case']}", "", r["error"], "error"] for r in rows if "error" in r and r["net"] != "cnn7"]
    return table + [[note, "", "", "skipped"] for note in notes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", metavar="PATH", help="auto_LiRPA's source folder (needed to run)")
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--images", type=int, help="images per case (default: the case's batch)")
    parser.add_argument("--seeds", type=int, default=3, help="random cnn3 nets per dataset for the agreement checks")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--methods", nargs="+", default=["ibp", "crown", "alpha-crown"], choices=list(PEER_METHOD))
    parser.add_argument("--conv-mode", default="patches", choices=["patches", "matrix"], help="the peer's conv_mode")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of the looser / tighter counts")
    parser.add_argument("--skip-cnn7", action="store_true", help="leave out CNN7 CIFAR (minutes, GBs)")
    parser.add_argument("--cnn5-alpha", action="store_true", help="α-CROWN on the trained cnn5 too (minutes a side)")
    parser.add_argument("--peer-mem-gb", type=float, default=14.0, help="address-space cap of the peer's CNN7 run")
    parser.add_argument("--peer-timeout", type=float, default=600.0, help="seconds for the peer's CNN7 run")
    parser.add_argument("--peer-as-is", action="store_true", help="no clamp-gradient fix for the peer's α-CROWN")
    parser.add_argument("--smoke", action="store_true", help="one tiny cnn3 (width 4), to check the script")
    parser.add_argument("--json", help="write the results here, and the printed table beside it (.md)")
    parser.add_argument("--resume", metavar="JSON", help="keep the rows of this earlier (partial) --json; skip their cases")
    args = parser.parse_args()
    if not args.peer:
        return print("certify_vs_peer: needs the peer's source, --peer PATH (a checkout of auto_LiRPA); nothing to do")
    lirpa, perturbation, peer_info = load_peer(args.peer, args.peer_as_is)
    torch.set_num_threads(args.threads)
    args.device, start = torch.device("cpu"), time.time()
    env = harness.environment(args.device)  # the commit whose code runs: taken before the cases, not after
    notes = ["CNN7 CIFAR (--skip-cnn7)"] if args.skip_cnn7 and "cnn7" in args.nets and not args.smoke else []
    rows = json.load(open(args.resume))["results"] if args.resume else []
    for case in (c for c in plan(args) if f"{c['net']}/{c['data']}/{c['weights']}/seed {c['seed']}/batch {c['batch']}"
                 not in {r["case"] for r in rows}):
        rows += run_case(case, args, lirpa, perturbation)
        harness.partial("certify_vs_peer", rows, args)
    table = summary(rows, args, notes)
    text = "\n".join([f"certify_vs_peer — {env['device']}, torch {env['torch']}, auto_LiRPA {peer_info['version']} "
                      f"({peer_info['commit'] or 'commit unknown'}), cure_fast {env['commit']}, {env['date']}, "
                      f"{time.time() - start:.0f} s", "", "| check | cure_fast | auto_LiRPA | |", "|---|---|---|---|"]
                     + ["| " + " | ".join(cells) + " |" for cells in table])
    print(text)
    if args.json:
        harness.save_json(args.json, "certify_vs_peer", args.device, {
            "commit": env["commit"], "date": env["date"],  # when the run started (the code it ran)
            "peer": peer_info, "threads": args.threads, "conv_mode": args.conv_mode, "tol": args.tol, "smoke": args.smoke,
            "eps": EPS, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_s": time.time() - start, "table": table, "notes": notes, "results": rows, "complete": True})
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(text + "\n")

if __name__ == "__main__":
    main()
