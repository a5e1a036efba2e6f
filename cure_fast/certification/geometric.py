"""Empirical robustness to perturbations outside the certified l∞/l2 sets, as the CURE paper
compares on unseen perturbations: accuracy under the worst case over a grid of rotations,
translations, scalings, brightness and contrast changes, per family and over all families.

Every transform maps images (B, C, H, W) in [0, 1] and G parameters to (G, B, C, H, W), clamped
to [0, 1], with batched tensor ops on the images' device. Geometric ones resample bilinearly
(``affine_grid``/``grid_sample``, pixel centres, zeros outside the image); integer translations and
quarter turns of square images are exact up to rounding.

>>> result = geometric_robustness(model, images, labels)        # DEFAULT_GRID
>>> result["clean"], result["families"]["rotation"], result["worst_case"]
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..data import to_float

DEFAULT_GRID: Dict[str, tuple] = {
    "rotation": (-15.0, -10.0, -5.0, 5.0, 10.0, 15.0),
    "translation": tuple((dx, dy) for dx in range(-3, 4) for dy in range(-3, 4) if (dx, dy) != (0, 0)),
    "scale": (0.9, 1.1),
    "brightness": (-0.2, -0.1, 0.1, 0.2),
    "contrast": (0.8, 1.2),
}
"""The default grid, 62 transforms: rotations by ±5, ±10, ±15 degrees; translations by every
(dx, dy) in {-3, ..., 3}^2 but (0, 0) pixels; scalings by 0.9 and 1.1; brightness shifts by ±0.1, ±0.2;
contrast factors 0.8 and 1.2."""


def _warp(images: Tensor, theta: Tensor) -> Tensor:
    """images (B, C, H, W) resampled through each affine map theta (G, 2, 3), which takes output
    coordinates to input ones in affine_grid's normalized [-1, 1] frame; returns (G, B, C, H, W)."""
    g, (b, c, h, w) = theta.shape[0], images.shape
    grid = F.affine_grid(theta.to(images), [g, c, h, w], align_corners=False)          # [G, H, W, 2]
    grid = grid[:, None].expand(g, b, h, w, 2).reshape(g * b, h, w, 2)
    source = images[None].expand(g, b, c, h, w).reshape(g * b, c, h, w)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view(g, b, c, h, w).clamp_(0, 1)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Rotations about the image centre by ``degrees`` (G,), counter-clockwise as displayed (row 0 at
    the top; +90 equals ``torch.rot90(images, 1, (-2, -1))`` on square images); (G, B, C, H, W)."""
    h, w = images.shape[-2:]
    angle = degrees.to(images) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], -1), torch.stack([sin * w / h, cos, zero], -1)], 1)
    return _warp(images, theta)


def translate(images: Tensor, shifts: Tensor) -> Tensor:
    """Translations by ``shifts`` (G, 2) = (dx, dy) pixels (right, down), zeros shifted in;
    (G, B, C, H, W)."""
    h, w = images.shape[-2:]
    shifts = shifts.to(images)
    eye = torch.eye(2, dtype=images.dtype, device=images.device).expand(len(shifts), 2, 2)
    offset = torch.stack([-2 * shifts[:, 0] / w, -2 * shifts[:, 1] / h], -1)
    return _warp(images, torch.cat([eye, offset[:, :, None]], 2))


def scale(images: Tensor, factors: Tensor) -> Tensor:
    """Zooms about the image centre by ``factors`` (G,) (> 1 enlarges, < 1 shrinks with zeros
    around); (G, B, C, H, W)."""
    inverse = 1 / factors.to(images)
    zero = torch.zeros_like(inverse)
    theta = torch.stack([torch.stack([inverse, zero, zero], -1), torch.stack([zero, inverse, zero], -1)], 1)
    return _warp(images, theta)


def brightness(images: Tensor, deltas: Tensor) -> Tensor:
    """``clamp(x + delta, 0, 1)`` for each of ``deltas`` (G,); (G, B, C, H, W)."""
    return (images[None] + deltas.to(images).view(-1, 1, 1, 1, 1)).clamp_(0, 1)


def contrast(images: Tensor, factors: Tensor) -> Tensor:
    """``clamp(m + c (x - m), 0, 1)`` for each factor c of ``factors`` (G,), m the image's mean over
    its channels and pixels; (G, B, C, H, W)."""
    mean = images.mean((1, 2, 3), keepdim=True)
    return (mean + factors.to(images).view(-1, 1, 1, 1, 1) * (images - mean)).clamp_(0, 1)


TRANSFORMS: Dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rotation": rotate, "translation": translate, "scale": scale, "brightness": brightness, "contrast": contrast}


def _identity(images: Tensor, params: Tensor) -> Tensor:
    return images[None]


def _robust(model: nn.Module, images: Tensor, labels: Tensor, transform: Callable[[Tensor, Tensor], Tensor],
            params: Tensor, batch_size: int, device: torch.device, dtype: torch.dtype, bar=None) -> Tensor:
    """(N,) bool on the CPU: the model is correct on ``transform(x, params)`` for all G parameters,
    evaluated on about ``batch_size`` transformed images (in ``dtype``) per forward pass."""
    chunk = max(1, batch_size // len(params))
    params = params.to(device)
    parts = []
    for start in range(0, len(labels), chunk):
        x = to_float(images[start:start + chunk].to(device), dtype)
        views = transform(x, params)                                              # [G, b, C, H, W]
        predictions = model(views.flatten(0, 1)).argmax(1).view(views.shape[:2])
        parts.append((predictions == labels[start:start + chunk].to(device)).all(0).cpu())
        if bar is not None:
            bar.update(views.shape[0] * views.shape[1])
    return torch.cat(parts)


def geometric_robustness(model: nn.Module, images: Tensor, labels: Tensor,
                         grid: Optional[Dict[str, Sequence]] = None, batch_size: int = 1000,
                         device: Optional[torch.device] = None, progress: bool = False) -> Dict:
    """Worst-case accuracy of ``model`` (evaluated in eval mode) over a grid of transforms.

    images (N, C, H, W) in [0, 1] (uint8 bytes or float; transformed in the model's floating dtype),
    labels (N,). ``grid`` maps families of :data:`TRANSFORMS` (rotation: degrees, translation:
    (dx, dy) pixels, scale: factors, brightness: additive shifts, contrast: factors) to their
    parameter values; default :data:`DEFAULT_GRID`. A sample is robust to a family when it is classified correctly clean and
    on every grid point of the family; ``worst_case``: robust to every family at once.

    Returns a JSON-serializable dict: clean, families (family -> robust accuracy), worst_case, grid,
    and samples: one record per image (index, label, correct, robust: family -> bool, worst_case).
    ``progress``: a progress bar on stderr (transformed images classified, time left).
    """
    grid = DEFAULT_GRID if grid is None else grid
    unknown = set(grid) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transform families {sorted(unknown)}; choose from {', '.join(TRANSFORMS)}")
    if not all(len(values) for values in grid.values()):
        raise ValueError("every family of the grid needs at least one value")
    params = {family: torch.tensor(values, dtype=torch.float64) for family, values in grid.items()}
    device = device or next(itertools.chain(model.parameters(), model.buffers()), images).device
    floating = (t.dtype for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point())
    dtype = next(floating, torch.float32)  # the model's own precision
    was_training = model.training
    model.eval()
    total = len(labels) * (1 + sum(len(values) for values in params.values()))
    bar = tqdm(total=total, desc="geometric", unit="img", disable=None if progress else True, leave=False,
               dynamic_ncols=True)
    try:
        with torch.no_grad():
            correct = _robust(model, images, labels, _identity, torch.zeros(1), batch_size, device, dtype, bar)
            robust = {}
            for family, values in params.items():
                bar.set_postfix_str(family)
                robust[family] = correct & _robust(model, images, labels, TRANSFORMS[family], values, batch_size,
                                                   device, dtype, bar)
    finally:
        bar.close()
        model.train(was_training)
    worst = torch.stack([correct, *robust.values()]).all(0)
    samples = [{"index": i, "label": int(labels[i]), "correct": bool(correct[i]),
                "robust": {family: bool(r[i]) for family, r in robust.items()}, "worst_case": bool(worst[i])}
               for i in range(len(labels))]
    return {"clean": correct.double().mean().item(),
            "families": {family: r.double().mean().item() for family, r in robust.items()},
            "worst_case": worst.double().mean().item(),
            "grid": {family: values.tolist() for family, values in params.items()},
            "samples": samples}


def format_geometric(report: Dict) -> str:
    """The geometric robustness results as one text block: accuracy clean, per family, worst case."""
    families = "  ".join(f"{family} {100 * value:.1f}%" for family, value in report["families"].items())
    return (f"geometric robustness (accuracy under the worst transform of each family): clean "
            f"{100 * report['clean']:.1f}%  {families}  all families {100 * report['worst_case']:.1f}%")


def plot_geometric(report: Dict, path: str) -> None:
    """A bar per family (and clean, and the worst case over all families): accuracy in percent,
    with the grid's range under each family's name."""
    from ..reporting import pyplot
    from ..storage import save_figure
    plt = pyplot()
    names = ["clean"] + list(report["families"]) + ["all families"]
    values = [report["clean"]] + list(report["families"].values()) + [report["worst_case"]]
    ticks = ["clean"] + [f"{family}\n({len(report['grid'][family])} values)" for family in report["families"]] + [
        "worst case\n(all families)"]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 1, 4))
    bars = ax.bar(range(len(names)), [100 * v for v in values], color=["C0"] + ["C1"] * (len(names) - 2) + ["C3"])
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_xticks(range(len(names)), ticks, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("geometric and photometric robustness (worst case over each family's grid)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
