"""Reports of runs and certificates: the accuracy table (text and PNG) and the training curves.
Plots are written as PNG files, no display needed; matplotlib is imported on the first plot.

>>> print(format_table({"run": {"clean": 0.98, "certified_inf": 0.9, "union": 0.85}}))
>>> plot_summary(rows, "summary.png"); plot_curves(history, "curves.png")
"""
from __future__ import annotations

import math
from typing import Dict, List

COLUMNS = [("clean", "clean"), ("pgd_inf", "PGD l∞"), ("pgd_2", "PGD l2"), ("certified_inf", "cert l∞"),
           ("certified_2", "cert l2"), ("union", "union")]
"""The metric columns of the accuracy table: (summary key, title)."""


def format_table(rows: Dict[str, Dict[str, float]]) -> str:
    """The accuracy table, one row per run, in percent."""
    width = max(len(name) for name in rows) + 2
    lines = [f"{'run':<{width}}" + "".join(f"{title:>10}" for _, title in COLUMNS)]
    for name, summary in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{100 * summary.get(key, math.nan):>9.1f}%" for key, _ in COLUMNS))
    return "\n".join(lines)


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(history: List[Dict[str, float]], path: str) -> None:
    """Loss, accuracies and eps per epoch, in three panels."""
    plt = pyplot()
    epochs = [m["epoch"] for m in history]
    panels = [("loss", lambda k: k in ("train_loss", "natural_train_loss")),
              ("accuracy", lambda k: k.startswith("test_") or k.startswith("train_certified") or k == "train_correct"),
              ("eps", lambda k: k.startswith("eps_"))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, wanted) in zip(axes, panels):
        for key in sorted({k for m in history for k in m if wanted(k)}):
            points = [(e, m[key]) for e, m in zip(epochs, history) if key in m]
            ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(rows: Dict[str, Dict[str, float]], path: str) -> None:
    """The final accuracy table as an image: one row per run, accuracies in percent."""
    plt = pyplot()
    cells = [[f"{100 * summary.get(key, float('nan')):.1f}%" for key, _ in COLUMNS] for summary in rows.values()]
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(COLUMNS), 0.6 + 0.4 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=list(rows), colLabels=[title for _, title in COLUMNS], loc="center")
    table.scale(1, 1.4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
