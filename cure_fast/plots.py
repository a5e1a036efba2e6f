"""Plots of a run: training curves and the final accuracy table (PNG, no display needed)."""
from __future__ import annotations

from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: List[Dict[str, float]], path: str) -> None:
    """Loss, accuracies and eps per epoch, in three panels."""
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
    from .train import COLUMNS
    cells = [[f"{100 * summary.get(key, float('nan')):.1f}%" for key, _ in COLUMNS] for summary in rows.values()]
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(COLUMNS), 0.6 + 0.4 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=cells, rowLabels=list(rows), colLabels=[title for _, title in COLUMNS], loc="center")
    table.scale(1, 1.4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
