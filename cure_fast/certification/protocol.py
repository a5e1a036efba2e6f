"""The CURE paper's evaluation protocol (``cure-fast certify --protocol paper``): which test images,
which eps per norm, and the union table in the paper's layout.

The reference scripts certify with alpha,beta-CROWN without branching (``--complete_verifier
skip``), i.e. α-CROWN: here the cascade IBP → CROWN-IBP → CROWN → α-CROWN, per norm, on test
images 0–999 (TinyImageNet: 272–441, its configs' ``start: 272, end: 442``). The eps per setting
are those of the reference's ``configs_abc/*.yaml`` and issue 15.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

from ..errors import ConfigError

PAPER_METHOD = "alpha-crown"
PAPER_IMAGES = {"mnist": (0, 1000), "cifar10": (0, 1000), "tinyimagenet": (272, 442)}
"""(first, end) test image per data set, end excluded."""
PAPER_EPS = {
    ("mnist", 0.1): {"inf": 0.1, "2": 0.5, "1": 1.0},
    ("mnist", 0.3): {"inf": 0.3, "2": 1.0, "1": 2.0},
    ("cifar10", 2 / 255): {"inf": 2 / 255, "2": 0.25, "1": 0.5},
    ("cifar10", 8 / 255): {"inf": 8 / 255, "2": 0.5, "1": 1.0},
    # the reference's tinyimagenet_l1.yaml specifies norm 2 (eps 72/255): no l1 eps to take from it
    ("tinyimagenet", 1 / 255): {"inf": 1 / 255, "2": 36 / 255},
}
"""Certified eps per (data set, l∞ eps of the setting)."""


def paper_setting(dataset: str, eps_inf: float) -> Tuple[Dict[str, float], int, int]:
    """The paper's eps per norm and test image range (first, end) for a model trained on ``dataset``
    with l∞ eps ``eps_inf`` (an l2-only run: its setting's l∞ eps, as in its config)."""
    for (name, eps), norms in PAPER_EPS.items():
        if name == dataset and math.isclose(eps, eps_inf, rel_tol=1e-6):
            first, end = PAPER_IMAGES[dataset]
            return dict(norms), first, end
    known = ", ".join(f"{d} eps_inf {e:.4g}" for d, e in PAPER_EPS)
    raise ConfigError(f"--protocol paper: no paper setting for {dataset} with eps_inf {eps_inf:.4g}; the settings "
                      f"are {known}; to certify other eps, drop --protocol and give --norms (and --limit)")


NAMES = {"inf": "l∞", "2": "l2", "1": "l1"}


def paper_table(rows: Dict[str, Dict], eps: Dict[str, float], images: Optional[str] = None) -> str:
    """Markdown, the paper's layout: clean accuracy, certified accuracy per norm, union (all norms at
    once), in percent, one row per model."""
    header = ["model", "clean"] + [f"{NAMES[n]} ({eps[n]:.4g})" for n in eps] + ["union"]
    lines = [f"certified accuracy (%), {images}" if images else "certified accuracy (%)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in rows.items():
        values = [summary.get("clean")] + [summary.get(f"certified_{n}") for n in eps] + [summary.get("union")]
        lines.append(f"| {name} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)
