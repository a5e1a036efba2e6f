"""Randomized smoothing (Cohen et al., 2019): l2 certificates for the smoothed classifier
``g(x) = argmax_c P(f(x + e) = c)``, ``e ~ N(0, sigma^2 I)`` in pixel space, and test-time adaptive
BatchNorm (BatchNorm statistics re-estimated on Gaussian-noised inputs at the smoothing sigma).

>>> smooth = Smooth(model.eval(), num_classes=10, sigma=0.25)
>>> label, radius = smooth.certify(x, n0=100, n=100_000, alpha=0.001, batch_size=1000)  # x (C, H, W)
>>> adapt_batchnorm(model, heldout_images, sigma=0.25)          # mode "heldout": then frozen, sound
>>> report = smoothing_report(model, images, labels, 0.25, adapt="heldout", heldout_images=heldout_images)
>>> plot_smoothing({"plain": plain_report, "adaptive BN": report}, "smoothing.png")
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from ..data import to_float
from ..reporting import pyplot
from ..storage import save_figure

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
ADAPT_MODES = (None, "heldout", "per-batch")


def _device(model: nn.Module, fallback: Tensor) -> torch.device:
    """The device of the model's first parameter or buffer, else that of ``fallback``."""
    return next(itertools.chain(model.parameters(), model.buffers()), fallback).device


def _dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model computes in: that of its first floating parameter or buffer
    (float32 when it has none). Inputs and noise are cast to it."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def clopper_pearson_lower(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower confidence bound on a binomial proportion:
    the alpha quantile of Beta(successes, trials - successes + 1); 0 when successes is 0."""
    if successes == 0:
        return 0.0
    return float(beta.ppf(alpha, successes, trials - successes + 1))


ALPHA = 0.001
"""Default significance of the smoothing certificates (confidence 1 - ALPHA), as in Cohen et al."""


def fewest_samples(alpha: float) -> int:
    """The smallest n with which :meth:`Smooth.certify` can certify at all: with all n samples on the
    class, the lower bound ``alpha ** (1/n)`` must exceed 1/2, i.e. n > log2(1/alpha) (10 at 0.001)."""
    return math.floor(math.log2(1 / alpha)) + 1


class Smooth:
    """The smoothed classifier of ``base_classifier`` under Gaussian noise of std ``sigma``.

    ``base_classifier`` maps a batch (B, *x.shape) of pixel-space inputs to logits (B, num_classes)
    and is evaluated as given: put it in eval mode (its first layer is its Normalize, so the noise is
    added in pixel space, unclipped, as in the original). Noise is drawn on the model's device from
    ``generator`` (a ``torch.Generator`` on that device), by default torch's global RNG, so seeding
    either reproduces every result. Inputs and noise take the model's floating dtype (float32 when it
    has no floating parameter or buffer).
    """

    ABSTAIN = ABSTAIN

    def __init__(self, base_classifier: nn.Module, num_classes: int, sigma: float,
                 generator: Optional[torch.Generator] = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"Smooth needs num_classes, an int >= 2, got {num_classes!r}")
        if isinstance(sigma, Tensor) and sigma.numel() == 1:
            sigma = float(sigma)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma < math.inf:
            raise ValueError(f"Smooth needs sigma, a finite number > 0, got {sigma!r}")
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, float(sigma)
        self.generator = generator

    def predict(self, x: Tensor, n: int = 100_000, alpha: float = ALPHA, batch_size: int = 1000) -> int:
        """g(x) from ``n`` noise samples, or ABSTAIN when a two-sided binomial test of the top two
        counts does not reject equality at level ``alpha`` (then g(x) differs from the returned
        class with probability at most alpha). x: one input (C, H, W) in pixel space (uint8 bytes, or float:
        [0, 1] for the package's models; the noise is not clipped), not a batch."""
        _check_alpha(alpha)
        counts = self.sample_counts(x, n, batch_size)
        top, second = np.argsort(-counts, kind="stable")[:2]
        if binomtest(int(counts[top]), int(counts[top] + counts[second]), 0.5).pvalue > alpha:
            return ABSTAIN
        return int(top)

    def certify(self, x: Tensor, n0: int = 100, n: int = 100_000, alpha: float = ALPHA,
                batch_size: int = 1000) -> Tuple[int, float]:
        """(class, l2 radius) such that, with probability at least 1 - alpha, g is constant and
        equal to the class on the ball of that radius around x; (ABSTAIN, 0.0) otherwise.

        The class is the top one among ``n0`` noise samples; ``n`` fresh samples give the
        Clopper-Pearson lower bound ``p_A`` on its probability; radius ``sigma * Phi^-1(p_A)``;
        abstain unless ``p_A > 1/2``. x: one input (C, H, W), as in :meth:`predict`.
        """
        _check_alpha(alpha)
        guess = int(self.sample_counts(x, n0, batch_size).argmax())
        p_lower = clopper_pearson_lower(int(self.sample_counts(x, n, batch_size)[guess]), n, alpha)
        if p_lower <= 0.5:
            return ABSTAIN, 0.0
        return guess, self.sigma * float(norm.ppf(p_lower))

    def sample_counts(self, x: Tensor, num: int, batch_size: int) -> np.ndarray:
        """(num_classes,) int64: how often the base classifier predicts each class on ``num`` noisy
        copies of x (C, H, W), classified in batches of ``batch_size`` with the noise drawn on the
        device."""
        self._check(x, num, batch_size)
        device = _device(self.base_classifier, x)
        x = to_float(x.to(device), _dtype(self.base_classifier))
        counts = torch.zeros(self.num_classes, dtype=torch.int64, device=device)
        with torch.no_grad():
            for start in range(0, num, batch_size):
                size = min(batch_size, num - start)
                noise = torch.randn((size, *x.shape), dtype=x.dtype, device=device, generator=self.generator)
                try:
                    logits = self.base_classifier(x + self.sigma * noise)
                except torch.OutOfMemoryError:
                    raise
                except (RuntimeError, ValueError) as error:  # e.g. a batch given as x: a dimension too many
                    raise ValueError(f"the base classifier failed on {size} noisy copies of x {tuple(x.shape)}: "
                                     f"{str(error).splitlines()[0]} (x is one input: is it a batch?)") from error
                if logits.dim() != 2 or logits.shape[1] != self.num_classes:
                    raise ValueError(f"the base classifier returned logits of shape {tuple(logits.shape)} for "
                                     f"{size} inputs; Smooth was given num_classes={self.num_classes} (and x is one "
                                     f"input, not a batch)")
                counts += torch.bincount(logits.argmax(1), minlength=self.num_classes)
        return counts.cpu().numpy()

    def _check(self, x: Tensor, num: int, batch_size: int) -> None:
        """A ValueError for what would make no certificate: a model in train mode, a non-finite x."""
        training = next((f"layer {name}" if name else "the base classifier"
                         for name, m in self.base_classifier.named_modules()
                         if m.training and isinstance(m, (_BatchNorm, nn.modules.dropout._DropoutNd))), None)
        if training is not None:
            raise ValueError(f"{training} is in train mode: call .eval() on the base classifier first (a BatchNorm "
                             f"in train mode normalizes by the noisy batch and updates its running statistics)")
        if not isinstance(x, Tensor) or (x.is_floating_point() and not torch.isfinite(x).all()):
            raise ValueError("x must be a finite tensor (one input (C, H, W), in pixel space)")
        for name, value in (("the number of samples", num), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1) (the certificates hold with probability 1 - alpha), got {alpha!r}")


def _batchnorms(model: nn.Module) -> List[_BatchNorm]:
    """The model's BatchNorm layers; each must keep running statistics."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not layers:
        raise ValueError("the model has no BatchNorm layer to adapt")
    if any(layer.running_mean is None for layer in layers):
        raise ValueError("every BatchNorm layer must track running statistics (track_running_stats=True)")
    return layers


def adapt_batchnorm(model: nn.Module, images: Tensor, sigma: float, batch_size: int = 256,
                    generator: Optional[torch.Generator] = None) -> nn.Module:
    """Test-time adaptive BatchNorm, in place: reset every BatchNorm's running statistics, then
    re-estimate them on ``images`` (N, C, H, W) in [0, 1] (uint8 bytes or float) plus Gaussian noise
    of std ``sigma`` (pixel space, drawn on the model's device from ``generator``), as a cumulative
    average over the batches of ``batch_size`` (``momentum=None``: each batch weighs the same).

    Only the BatchNorm buffers (running_mean, running_var, num_batches_tracked) change; every
    parameter and other buffer, and each BatchNorm's momentum, are left as they were. Returns the
    model, in eval mode: a fixed function from then on. Adapted on held-out data (mode "heldout"),
    it is a valid base classifier for :class:`Smooth`, whose certificates are then sound.
    """
    layers = _batchnorms(model)
    device = _device(model, images)
    momenta = [layer.momentum for layer in layers]
    model.eval()
    try:
        with torch.no_grad():
            for layer in layers:
                layer.reset_running_stats()
                layer.momentum = None
                layer.train()
            for start in range(0, len(images), batch_size):
                x = to_float(images[start:start + batch_size].to(device), _dtype(model))
                model(x + sigma * torch.randn(x.shape, dtype=x.dtype, device=device, generator=generator))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    return model


def per_batch_batchnorm(model: nn.Module) -> nn.Module:
    """Test-time adaptive BatchNorm re-estimated on every forward batch (mode "per-batch", as the
    paper describes): a copy of ``model`` in eval mode whose BatchNorm layers normalize each batch
    by that batch's own statistics; ``model`` itself is untouched.

    NOT a sound certificate: used as :class:`Smooth`'s base classifier, the statistics are computed
    from the very noise samples being classified, so the samples are no longer independent draws of
    a fixed function and the Clopper-Pearson bound does not apply. Each batch needs more than one
    value per channel (BatchNorm1d: batches of at least 2).
    """
    adaptive = copy.deepcopy(model).eval()
    for layer in _batchnorms(adaptive):
        layer.track_running_stats = False
        layer.running_mean = layer.running_var = layer.num_batches_tracked = None
    return adaptive


def _batch_dependent(model: nn.Module) -> bool:
    """Whether some BatchNorm of the (eval-mode) model normalizes by the batch's statistics."""
    return any(isinstance(m, _BatchNorm) and m.running_mean is None for m in model.modules())


def found_in(a: Tensor, b: Tensor) -> Tensor:
    """Which images of ``a`` (N, ...) also occur in ``b`` (M, ...), byte for byte: (N,) bool."""
    seen = {image.numpy().tobytes() for image in b.detach().cpu().contiguous()}
    return torch.tensor([image.numpy().tobytes() in seen for image in a.detach().cpu().contiguous()], dtype=torch.bool)


def _adapted(frozen: nn.Module, sigma: float, adapt: Optional[str], heldout_images: Optional[Tensor],
             batch_size: int, generator: Optional[torch.Generator], images: Tensor) -> nn.Module:
    """The eval-mode copy ``frozen`` of a model with its BatchNorm adapted according to ``adapt``
    (``images``: those to certify, which the held-out statistics must not have seen)."""
    if adapt == "heldout":
        if heldout_images is None:
            raise ValueError('adapt="heldout" needs heldout_images, data disjoint from the evaluated images')
        if heldout_images.dtype == images.dtype and (shared := int(found_in(images, heldout_images).sum())):
            raise ValueError(f"{shared} of the images to certify are among heldout_images: statistics adapted on "
                             f"them make no certificate; give held-out data (e.g. training images)")
        return adapt_batchnorm(frozen, heldout_images, sigma, batch_size, generator)
    return per_batch_batchnorm(frozen) if adapt == "per-batch" else frozen


def smoothing_report(model: nn.Module, images: Tensor, labels: Tensor, sigma: float, n0: int = 100,
                     n: int = 100_000, alpha: float = ALPHA, batch_size: int = 1000, adapt: Optional[str] = None,
                     heldout_images: Optional[Tensor] = None, radii: Sequence[float] = RADII,
                     num_classes: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     progress: bool = False) -> Dict:
    """Certify every image with :meth:`Smooth.certify` and summarize; ``model`` is not modified.

    images (N, C, H, W) in [0, 1] (uint8 bytes or float), labels (N,). ``adapt``: None (the model's
    own BatchNorm statistics), "heldout" (:func:`adapt_batchnorm` on ``heldout_images`` at ``sigma``,
    then frozen) or "per-batch" (:func:`per_batch_batchnorm`, not a sound certificate).
    ``num_classes`` defaults to the model's output width. ``progress``: a progress bar on stderr
    (images done, certified so far, time left).

    Returns a JSON-serializable dict: sigma, n0, n, alpha, adapt, ``sound`` (False for "per-batch"
    or a model whose BatchNorm uses batch statistics), radii, certified_accuracy (per radius r: the
    share of images predicted correctly with radius >= r), acr (average certified radius, abstentions
    and wrong predictions count 0), abstain_rate, seconds_per_image, and samples: one record per
    image (index, label, prediction, radius, correct, time in seconds).
    """
    if adapt not in ADAPT_MODES:
        raise ValueError(f"unknown adapt mode {adapt!r}; choose one of {ADAPT_MODES}")
    if len(labels) == 0 or n < 1 or n0 < 1:
        raise ValueError(f"smoothing needs at least one image and n, n0 >= 1; got {len(labels)} images, n={n}, n0={n0}")
    frozen = copy.deepcopy(model).eval()
    if num_classes is None:
        with torch.no_grad():
            num_classes = frozen(to_float(images[:1].to(_device(frozen, images)), _dtype(frozen))).shape[1]
    base = _adapted(frozen, sigma, adapt, heldout_images, batch_size, generator, images)
    smooth = Smooth(base, num_classes, sigma, generator)
    samples = []
    name = f"smoothing sigma {sigma:g}" + (f", {adapt} BN" if adapt else "")
    with tqdm(total=len(labels), desc=name, unit="img", disable=None if progress else True, leave=False,
              dynamic_ncols=True) as bar:
        for i in range(len(labels)):
            samples.append(_certify_one(smooth, i, images[i], int(labels[i]), n0, n, alpha, batch_size))
            bar.update()
            bar.set_postfix_str(f"certified {sum(s['correct'] for s in samples)}")
    radius = np.array([s["radius"] if s["correct"] else -1.0 for s in samples])
    return {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "adapt": adapt or "none",
            "sound": adapt != "per-batch" and not _batch_dependent(base), "radii": [float(r) for r in radii],
            "certified_accuracy": [float((radius >= r).mean()) for r in radii],
            "acr": float(radius.clip(min=0).mean()),
            "abstain_rate": float(np.mean([s["prediction"] == ABSTAIN for s in samples])),
            "seconds_per_image": float(np.mean([s["time"] for s in samples])), "samples": samples}


def _certify_one(smooth: Smooth, index: int, x: Tensor, label: int, n0: int, n: int, alpha: float,
                 batch_size: int) -> Dict:
    start = time.perf_counter()
    prediction, radius = smooth.certify(x, n0, n, alpha, batch_size)
    return {"index": index, "label": label, "prediction": prediction, "radius": radius,
            "correct": prediction == label, "time": time.perf_counter() - start}


def plot_smoothing(reports: Dict[str, Dict], path: str) -> None:
    """Certified accuracy against the l2 radius, one curve per named report of
    :func:`smoothing_report` (e.g. with and without adaptive BatchNorm), computed from the
    per-sample radii; reports that are not sound certificates are dashed and labelled so."""
    plt = pyplot()
    top = max(max(r["radii"]) for r in reports.values())
    top = max([top] + [s["radius"] for r in reports.values() for s in r["samples"]])
    grid = np.linspace(0, 1.05 * top if top > 0 else 1.0, 300)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, report in reports.items():
        radius = np.array([s["radius"] if s["correct"] else -1.0 for s in report["samples"]])
        curve = (radius[None, :] >= grid[:, None]).mean(1)
        label = f"{name} (sigma={report['sigma']}, ACR={report['acr']:.3f})"
        if not report["sound"]:
            label += ", NOT sound"
        ax.plot(grid, curve, "-" if report["sound"] else "--", label=label)
    ax.set_xlabel("l2 radius (pixel space)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def format_smoothing(reports: Dict[str, Dict]) -> str:
    """The smoothing results as a text table: certified accuracy per l2 radius, ACR, abstentions."""
    if not reports:
        return "randomized smoothing: no report"
    first = next(iter(reports.values()))
    width = max([len(name) for name in reports] + [10]) + 2
    lines = [f"randomized smoothing: certified accuracy at l2 radius r (pixel space), n={first['n']} samples",
             f"{'':<{width}}" + "".join(f"{'r=' + format(r, 'g'):>8}" for r in first["radii"])
             + f"{'ACR':>8}{'abstain':>9}"]
    for name, r in reports.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * a:>7.1f}%" for a in r["certified_accuracy"])
                     + f"{r['acr']:>8.3f}{100 * r['abstain_rate']:>8.1f}%" + ("" if r["sound"] else "  NOT sound"))
    return "\n".join(lines)
