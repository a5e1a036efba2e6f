"""The files of a run folder and the order they are written in, so that a kill at any point loses
at most the epoch in progress and ``--resume`` never destroys a finished result.

Per epoch: ``test_per_sample.csv`` (last epoch), ``metrics.jsonl`` and ``metrics.csv`` (rewritten
whole from the history), then ``checkpoint.pt``. The write-up after the last epoch: ``model.pt``,
``curves.png``, ``summary.png``, then ``summary.json`` last: a run is complete exactly when its
``summary.json`` holds results. Every file is written atomically (:mod:`cure_fast.storage`).
"""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import shlex
from typing import Dict, List, Optional

import yaml

from ..config import TrainConfig, to_dict
from ..errors import CheckpointError, ConfigError
from ..reporting import format_table, plot_curves, plot_summary
from ..storage import numbered_paths, save_torch, write_atomic, write_json

CONFIG, METRICS, METRICS_CSV, CHECKPOINT = "config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt"
PER_SAMPLE, MODEL, CURVES, SUMMARY_PNG, SUMMARY = ("test_per_sample.csv", "model.pt", "curves.png", "summary.png",
                                                   "summary.json")


def new_path(folder: str, name: str, suffix: str = "") -> str:
    """The first of :func:`~cure_fast.storage.numbered_paths` that does not exist (a run folder, a table)."""
    return next(path for path in numbered_paths(folder, name, suffix) if not os.path.exists(path))


def make_run_dir(run_dir: str, out_dir: str) -> None:
    """Create the run folder ``run_dir`` under ``out_dir``; a ConfigError naming out_dir when it cannot be
    (a full disk stays a DiskFullError)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"out_dir={out_dir!r} is a file; give a folder for the runs")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full disk: the caller's advice
            raise
        raise ConfigError(f"out_dir={out_dir!r}: cannot create the run folder {run_dir} ({error.strerror})") from None


def resume_command(run_dir: str) -> str:
    return f"cure-fast train --resume {shlex.quote(run_dir)}"


RESUMABLE_CHANGES = ("name", "data_root", "device", "backend", "out_dir", "progress", "epochs", "final_certify",
                     "eval_every", "eval_limit", "eval_pgd_steps", "eval_pgd_restarts", "eval_batch_size")


def check_same_run(config: TrainConfig, saved: Dict, path: str) -> None:
    """A checkpoint at ``path`` written under another training config ``saved`` (copied from another
    run, or config.yaml edited) is refused: resuming it would silently continue that run under these
    settings."""
    ours = to_dict(config)
    differ = [k for k in ours if k not in RESUMABLE_CHANGES and k in saved and saved[k] != ours[k]]
    if differ:
        shown = ", ".join(f"{k}={saved[k]!r} there, {ours[k]!r} in {CONFIG}" for k in differ[:3])
        raise CheckpointError(f"{path} was written under another config ({shown}{', …' if len(differ) > 3 else ''}):"
                              f" {CONFIG} was edited, or the checkpoint comes from another run; a resume may change "
                              f"only epochs, eval_* and where it runs: restore those keys, or start a new run "
                              f"(init_from=PATH starts from its weights)")


def write_config(run_dir: str, config: TrainConfig) -> None:
    write_atomic(os.path.join(run_dir, CONFIG), yaml.safe_dump(to_dict(config), sort_keys=False))


def write_metrics(run_dir: str, history: List[Dict[str, float]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` from the whole history (so they hold exactly the
    checkpoint's epochs after a resume); a file that already holds it is left alone."""
    _write_if_changed(os.path.join(run_dir, METRICS), "".join(json.dumps(m) + "\n" for m in history))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=sorted({k for m in history for k in m}))
    writer.writeheader()
    writer.writerows(history)
    _write_if_changed(os.path.join(run_dir, METRICS_CSV), text.getvalue())


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if f.read() == text:
                return
    except (OSError, UnicodeDecodeError):
        pass
    write_atomic(path, text)


def final_from_history(history: List[Dict[str, float]]) -> Dict[str, float]:
    """The last epoch's test summary (the ``test_*`` metrics without the prefix)."""
    last = history[-1] if history else {}
    return {k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")}


def completed_summary(run_dir: str) -> Optional[Dict]:
    """The results of a complete run (its summary.json), or None while the write-up is unfinished."""
    try:
        with open(os.path.join(run_dir, SUMMARY)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and "clean" in summary else None


def caption(config: TrainConfig, images: int) -> str:
    eps = ", ".join(f"{'l∞' if n == 'inf' else 'l2'} eps {config.eval_eps(n):.4g}" for n in ("inf", "2"))
    return f"test accuracy on {images} images, {eps}"


def write_up(run_dir: str, config: TrainConfig, model_state, history: List[Dict[str, float]],
             final: Dict[str, float], images: int) -> Dict:
    """The report of a finished run, summary.json last; prints the table. Returns the summary."""
    title = caption(config, images)
    save_torch(model_state, os.path.join(run_dir, MODEL))
    plot_curves(history, os.path.join(run_dir, CURVES))
    plot_summary({config.name: final}, os.path.join(run_dir, SUMMARY_PNG), title=title)
    summary = {"name": config.name, **final, "images": images,
               "eps": {n: config.eval_eps(n) for n in ("inf", "2")}}
    write_json(summary, os.path.join(run_dir, SUMMARY))
    print(format_table({config.name: final}, caption=title), flush=True)
    print(f"results in {run_dir}", flush=True)
    return summary
