"""Reports of runs and certificates: the accuracy table (text and PNG) and the training curves.
Plots are written as PNG files (atomically), no display needed; matplotlib is imported on the first plot.

>>> print(format_table({"run": {"clean": 0.98, "certified_inf": 0.9, "union": 0.85}}, caption="on 1000 images"))
>>> plot_summary(rows, "summary.png", title="on 1000 images"); plot_curves(history, "curves.png")
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

from .storage import save_figure

COLUMNS = [("clean", "clean"), ("pgd_inf", "PGD l∞"), ("pgd_2", "PGD l2"), ("pgd_1", "PGD l1"),
           ("certified_inf", "cert l∞"), ("certified_2", "cert l2"), ("certified_1", "cert l1"), ("union", "union")]
"""The metric columns of the accuracy table: (summary key, title)."""

NAMES = {"clean": "clean", "correct": "clean", "union": "union (certified)", "empirical_union": "union (PGD)",
         "loss": "loss", "natural_train_loss": "natural loss"}
NORM_NAMES = {"inf": "l∞", "2": "l2", "1": "l1"}


def columns(rows: Dict[str, Dict[str, float]]) -> List[tuple]:
    """The columns of :data:`COLUMNS` that some row has (a one-norm report has no column of the other)."""
    present = [(key, title) for key, title in COLUMNS if any(key in summary for summary in rows.values())]
    return present or COLUMNS


def format_table(rows: Dict[str, Dict[str, float]], caption: Optional[str] = None) -> str:
    """The accuracy table, one row per run, in percent, under ``caption`` (e.g. the eps values and the
    number of images); a value a row lacks shows as nan."""
    shown = columns(rows)
    width = max(len(name) for name in rows) + 2
    lines = [caption] if caption else []
    lines.append(f"{'run':<{width}}" + "".join(f"{title:>10}" for _, title in shown))
    for name, summary in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * summary.get(key, math.nan):>9.1f}%" for key, _ in shown))
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def metric_label(key: str) -> str:
    """A readable name for a metrics key: ``test_certified_inf`` -> ``test certified l∞``."""
    words = key.split("_")
    if words[-1] in NORM_NAMES:
        words[-1] = NORM_NAMES[words[-1]]
    prefix = words.pop(0) if words[0] in ("test", "train") else ""
    rest = "_".join(words)
    rest = NAMES.get(rest, rest.replace("_", " ").replace("pgd", "PGD"))
    return f"{prefix} {rest}".strip()


def plot_curves(history: List[Dict[str, float]], path: str) -> None:
    """Loss, accuracies (%) and the training eps per epoch, in three panels; legends below the plots."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    epochs = [m["epoch"] for m in history]
    panels = [("training loss", "cross-entropy", 1, lambda k: k in ("train_loss", "natural_train_loss")),
              ("accuracy", "accuracy (%)", 100,
               lambda k: k.startswith("test_") or k.startswith("train_certified") or k == "train_correct"),
              ("training eps", "eps (pixel space)", 1, lambda k: k.startswith("eps_"))]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for ax, (title, ylabel, scale, wanted) in zip(axes, panels):
        for key in sorted({k for m in history for k in m if wanted(k)}):
            points = [(e, scale * m[key]) for e, m in zip(epochs, history) if key in m]
            ax.plot(*zip(*points), marker="o", label=metric_label(key))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_summary(rows: Dict[str, Dict[str, float]], path: str, title: Optional[str] = None) -> None:
    """The final accuracy table as an image: one row per run, accuracies in percent, ``title`` above."""
    plt = pyplot()
    shown = columns(rows)
    cells = [[f"{100 * summary.get(key, float('nan')):.1f}%" for key, _ in shown] for summary in rows.values()]
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(shown), 0.9 + 0.4 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=list(rows), colLabels=[t for _, t in shown], loc="center")
    table.scale(1, 1.4)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)
