"""Helpers of the fault-injection tests: a tiny MNIST in torchvision's raw format (loads instantly,
also in child processes), a tiny run config, the CLI in a child process, folder snapshots, and the
check that an error is one line without a traceback."""
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TEST_IMAGES = 128, 32


def write_tiny_mnist(root: Path) -> Path:
    """``root/MNIST/raw`` with 128 training and 32 test images (a bright square whose place depends on
    the label, plus noise): a data_root that loads in milliseconds."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", TRAIN_IMAGES), ("t10k", TEST_IMAGES)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            r, c = 2 + 8 * (label // 4), 2 + 6 * (label % 4)
            images[i, r:r + 6, c:c + 6] = 230
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + struct.pack(">3I", n, 28, 28)
                                                           + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + struct.pack(">I", n) + labels.tobytes())
    return root


def tiny_config(data_root: Path, out_dir: Path, **changes) -> Dict:
    """Two epochs of IBP on the tiny MNIST with a small MLP, evaluated every epoch (a second or so)."""
    return {**dict(name="tiny", dataset="mnist", data_root=str(data_root), model="mlp", model_args={"hidden": [8]},
                   method="ibp", norms=["inf", "2"], eps_inf=0.05, eps_2=0.3, batch_size=64, epochs=2,
                   eps_start_epoch=0, eps_end_epoch=1, eval_every=1, eval_pgd_steps=1, eval_batch_size=32, lr=2e-3,
                   progress=False, out_dir=str(out_dir)), **changes}


def write_config(path: Path, config: Dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def cli(args: Sequence[str], fault: Optional[str] = None, timeout: float = 120, env: Optional[Dict] = None,
        prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """``cure-fast ARGS`` in a child process (one thread, fault point ``fault`` armed)."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    environ.pop("CURE_FAST_FAULT", None)
    if fault:
        environ["CURE_FAST_FAULT"] = fault
    return subprocess.run([*prefix, sys.executable, "-m", "cure_fast.cli", *args], capture_output=True, text=True,
                          env=environ, timeout=timeout, cwd=ROOT)


def snapshot(folder: Path) -> Dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_one_line(err: str, *needles: str) -> str:
    """``err`` is one line, no traceback, and holds every needle; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, f"not a one-line error:\n{err}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def metric_epochs(run_dir: Path) -> list:
    import json
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def temporaries(folder: Path) -> list:
    return sorted(str(p) for p in Path(folder).rglob("*.tmp"))
