"""Evaluation of a classifier: clean accuracy, PGD accuracy and certified accuracy per norm, and
union accuracy (certified for every norm at once)."""
from __future__ import annotations

import copy
import csv
import io
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..engine import BoundedModule
from ..engine.crown import crown_margins
from ..config import make_spec
from ..ops import policy as backends
from ..reporting import NORM_NAMES
from ..storage import write_atomic
from ..training.attacks import pgd_batched
from ..training.objectives import certified

CERTIFIERS = ("ibp", "crown-ibp", "crown", "alpha-crown")  # cheapest first: the cascade order
STAGES = {"crown-ibp": ((dict(), None),),
          "crown": ((dict(target=0.0), None),),
          "alpha-crown": ((dict(alpha_intermediate=False, target=0.0), None),
                          (dict(alpha_intermediate=True, target=0.0), None))}
"""(options, samples per call or None for all) of a method's passes in the cascade, each working
only until a sample is certified (``target=0``): CROWN adds pure CROWN's passes only for the samples
it has not certified (and whose relaxations the intersection with IBP changed); α-CROWN first
optimizes the final slopes only, then, on the samples still uncertified, the pre-activation bounds
too (layer by layer, on chunks of rows: memory stays that of one chunk's autograd graph)."""


def _checked(sound: Union[bool, str]) -> Union[bool, str]:
    """``sound`` as True (float64), ``"fp32"`` (float32, rounding errors bounded) or False (plain fp32)."""
    if not (isinstance(sound, bool) or sound in ("fp64", "fp32")):
        raise ValueError(f"sound={sound!r}; one of True (fp64), 'fp64', 'fp32' (sound float32), False (not sound)")
    return True if sound == "fp64" else sound


@dataclass
class Evaluation:
    """Per-sample results over N test points, and their summary."""
    correct: Tensor                   # (N,) bool
    pgd_robust: Dict[str, Tensor]     # norm -> (N,) bool: correct and no PGD point found misclassified
    certified: Dict[str, Tensor]      # norm -> (N,) bool
    margin: Dict[str, Tensor]         # norm -> (N,) lower bound of min_{j != y} z_y - z_j
    certified_by: Dict[str, List[str]] = field(default_factory=dict)  # norm -> per sample, the method ("" if none)
    seconds: Dict[str, float] = field(default_factory=dict)  # method (and "pgd") -> seconds spent
    bounded: Dict[str, int] = field(default_factory=dict)  # method -> (sample, norm) pairs it bounded
    attacked: bool = True  # False: no PGD step ran (pgd_robust is then just correct)

    def summary(self) -> Dict[str, float]:
        """Accuracies in [0, 1]: clean, pgd_<norm>, certified_<norm>, union (certified for all
        norms), empirical_union (PGD-robust for all norms); without an attack, no PGD entries."""
        out = {"clean": self.correct.double().mean().item()}  # float64: 0.8, not 0.800000011920929
        for norm in self.certified:
            if self.attacked:
                out[f"pgd_{norm}"] = self.pgd_robust[norm].double().mean().item()
            out[f"certified_{norm}"] = self.certified[norm].double().mean().item()
        out["union"] = torch.stack(list(self.certified.values())).all(0).double().mean().item()
        if self.attacked:
            out["empirical_union"] = torch.stack(list(self.pgd_robust.values())).all(0).double().mean().item()
        return out


def write_per_sample(evaluation: Evaluation, path: str, labels: Optional[Tensor] = None, methods: bool = False
                     ) -> None:
    """One CSV row per test point: index, its label (when ``labels`` are given), clean correct, and per
    norm PGD-robust (empty without an attack), certified, the margin's lower bound and, with
    ``methods``, the method that certified it."""
    norms = list(evaluation.certified)
    columns = ("pgd", "certified", "margin") + (("method",) if methods else ())
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["index"] + (["label"] if labels is not None else []) + ["correct"]
                    + [f"{k}_{n}" for n in norms for k in columns])
    for i in range(len(evaluation.correct)):
        row = [i] + ([int(labels[i])] if labels is not None else []) + [int(evaluation.correct[i])]
        for n in norms:
            row += [int(evaluation.pgd_robust[n][i]) if evaluation.attacked else "", int(evaluation.certified[n][i]),
                    f"{evaluation.margin[n][i].item():.6g}"]
            if methods:
                by = evaluation.certified_by.get(n)
                row.append(by[i] if by else "")
        writer.writerow(row)
    write_atomic(path, text.getvalue())


def _misclassification(model: nn.Module, y: Tensor):
    """Objective for PGD: ``max_{j != y} z_j - z_y`` per sample (> 0: misclassified)."""
    def objective(points: Tensor) -> Tensor:
        logits = model(points)
        labels = y.repeat(points.shape[0] // y.shape[0])
        true = logits.gather(1, labels[:, None])[:, 0]
        return logits.scatter(1, labels[:, None], float("-inf")).amax(1) - true
    return objective


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, eps: Dict[str, float], method: str = "ibp",
             pgd_steps: int = 20, pgd_restarts: int = 1, batch_size: int = 500, backend: Optional[str] = None,
             device: Optional[torch.device] = None, sound: Union[bool, str] = False,
             progress: bool = False, alpha_intermediate: bool = True) -> Evaluation:
    """Evaluate ``model`` (in eval mode) on images (N, C, H, W) in [0, 1] (uint8 bytes or float) and
    labels (N,), for the input sets ``eps`` = {"inf": eps_inf, "2": eps_2} (either may be absent).

    Certification is a cascade: IBP first, then each stronger method up to ``method`` only on the
    correctly classified samples still uncertified (order: ibp, crown-ibp, crown, alpha-crown;
    α-CROWN on the final slopes, then, with ``alpha_intermediate``, on the pre-activation bounds'
    slopes too: about ``alpha_steps`` CROWN passes per sample, the bulk of the time).
    ``sound``: ``True`` / ``"fp64"``: certify in float64 (a float64 copy of the model); ``"fp32"``: in
    float32 with every rounding error bounded (sound, the model's float32 weights); ``False``: fp32
    without TF32 (rounding not accounted for: not a certificate).
    ``progress``: a progress bar on stderr (images done, certified so far per norm, time left).
    """
    if method not in CERTIFIERS:
        raise ValueError(f"unknown certification method {method!r}; available: {', '.join(CERTIFIERS)}")
    if len(labels) == 0:
        raise ValueError("no test images to evaluate (a limit of 0?)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; an integer >= 1")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sound = _checked(sound)
    certifier = copy.deepcopy(model).double() if sound is True else model
    bm = BoundedModule(certifier, backend=backend)
    cascade = CERTIFIERS[: CERTIFIERS.index(method) + 1]
    stages = cascade_stages(cascade, alpha_intermediate)
    norms = list(eps)
    parts = {"correct": [], **{f"{k}_{n}": [] for n in norms for k in ("pgd", "cert", "margin", "by")}}
    seconds, bounded = dict.fromkeys(("pgd",) + cascade, 0.0), dict.fromkeys(cascade, 0)
    bar = tqdm(total=len(labels), unit="img", disable=None if progress else True, leave=False, dynamic_ncols=True,
               desc=f"certify ({method})" if sound is not False else f"evaluate ({method})")
    try:
        with backends.library_precision(False, ("cpu", "cuda")):  # certificates need IEEE fp32 products
            for start in range(0, len(labels), batch_size):
                x = images[start:start + batch_size].to(device)
                x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
                y = labels[start:start + batch_size].to(device)
                _evaluate_batch(model, bm, x, y, eps, stages, pgd_steps, pgd_restarts, parts, seconds, bounded,
                                sound)
                bar.update(len(y))
                bar.set_postfix_str(", ".join(
                    f"certified {NORM_NAMES.get(n, n)} {int(sum(c.sum() for c in parts[f'cert_{n}']))}" for n in norms))
    finally:
        bar.close()
        model.train(was_training)
    join = lambda key: torch.cat(parts[key]).cpu()  # noqa: E731
    return Evaluation(join("correct"), {n: join(f"pgd_{n}") for n in norms},
                      {n: join(f"cert_{n}") for n in norms}, {n: join(f"margin_{n}").float() for n in norms},
                      {n: sum(parts[f"by_{n}"], []) for n in norms}, seconds, bounded, attacked=pgd_steps > 0)


def _timed(seconds: Dict[str, float], key: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    seconds[key] += time.perf_counter() - start
    return result


def cascade_stages(cascade, alpha_intermediate: bool) -> List:
    """(method, options, samples per call) of every pass after IBP."""
    stages = [(method, options, per_call) for method in cascade[1:] for options, per_call in STAGES[method]]
    return [stage for stage in stages if alpha_intermediate or not stage[1].get("alpha_intermediate")]


def _evaluate_batch(model, bm, x, y, eps, stages, pgd_steps, pgd_restarts, parts, seconds, bounded, sound) -> None:
    norms = list(eps)
    specs = [make_spec(n, eps[n]) for n in norms]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    parts["correct"].append(correct)
    objective = _misclassification(model, y)
    points = _timed(seconds, "pgd", pgd_batched, objective, x, specs, steps=pgd_steps, restarts=pgd_restarts)
    with torch.no_grad():
        for norm, point in zip(norms, points):
            parts[f"pgd_{norm}"].append(correct & (objective(point) < 0))
    x_cert = x.to(next(bm.parameters()).dtype)
    with torch.no_grad():
        if sound is not False:  # IBP with every rounding error bounded, per input set
            ibp = [_timed(seconds, "ibp", crown_margins, bm, x_cert, y, spec, "ibp", sound=sound) for spec in specs]
        else:
            ibp = _timed(seconds, "ibp", bm.propagate, x_cert, specs, y).margins
    bounded["ibp"] += len(y) * len(specs)
    for norm, spec, margins in zip(norms, specs, ibp):
        margins = margins.clone()
        by = ["ibp" if ok else "" for ok in (correct & certified(margins, y)).tolist()]
        reached = {}  # method -> the samples it bounded (α-CROWN's second pass: a subset of its first)
        for method, options, per_call in stages:
            todo = (correct & ~certified(margins, y)).nonzero()[:, 0]
            if len(todo) == 0:
                break
            reached.setdefault(method, set()).update(todo.tolist())
            for part in todo.split(per_call or len(todo)):
                stronger = _timed(seconds, method, bm.margins, x_cert[part], y[part], spec, method=method,
                                  sound=sound, **options)
                margins[part] = torch.maximum(margins[part], stronger.to(margins.dtype))
                for i in part[certified(margins[part], y[part])].tolist():
                    by[i] = method
        for method, samples in reached.items():
            bounded[method] += len(samples)
        # a margin bound > 0 of the sound modes' float64 copy can hold where the model itself misclassifies x
        parts[f"cert_{norm}"].append(correct & certified(margins, y))
        parts[f"margin_{norm}"].append(margins.scatter(1, y[:, None], float("inf")).amin(1))
        parts[f"by_{norm}"].append(by)
