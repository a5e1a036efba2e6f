"""Fault injection: a child process killed (SIGKILL) at every point of the checkpoint and write-up
sequence, stopped by SIGINT / SIGTERM, or writing to a full disk (a real tiny tmpfs where the
platform allows, and a writer that fails with ENOSPC). Afterwards nothing finished is lost, no
temporary file is left, the error is one line, and ``--resume`` completes the run: the same model
and results as an uninterrupted run, every epoch logged once.

The fault points are those of cure_fast/faults.py: ``trained``, ``evaluated`` and, for every file,
``before:NAME``, ``tmp:NAME`` (the temporary copy complete, not renamed) and ``after:NAME``."""
import contextlib
import errno
import json
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

from cure_fast import storage
from cure_fast.cli import main
from cure_fast.config import from_dict
from cure_fast.training.trainer import Trainer

from faultkit import (assert_one_line, cli, metric_epochs, snapshot, temporaries, tiny_config, write_config,
                      write_tiny_mnist)

FINAL_FILES = ("config.yaml", "checkpoint.pt", "metrics.jsonl", "metrics.csv", "test_per_sample.csv", "model.pt",
               "curves.png", "summary.png", "summary.json")
WRITE_UP = ("model.pt", "curves.png", "summary.png", "summary.json")

# (fault point, what --resume finds). Two epochs, evaluated after each: checkpoint.pt is written at
# epoch 0 (@1), after training epoch 1 (@2, before its evaluation can be interrupted) and after its
# evaluation (@3), likewise for epoch 2 (@4, @5); the last epoch also writes test_per_sample.csv;
# then the write-up. "evaluate": training is finished, its last evaluation is not.
KILL_POINTS = [
    ("tmp:config.yaml", "not a run"), ("tmp:checkpoint.pt@1", "no checkpoint"), ("after:checkpoint.pt@1", "resume"),
    ("trained@1", "resume"), ("tmp:checkpoint.pt@2", "resume"), ("after:checkpoint.pt@2", "resume"),
    ("evaluated@1", "resume"), ("tmp:metrics.jsonl@1", "resume"), ("tmp:metrics.csv@1", "resume"),
    ("before:checkpoint.pt@3", "resume"), ("tmp:checkpoint.pt@3", "resume"), ("trained@2", "resume"),
    ("tmp:checkpoint.pt@4", "resume"), ("after:checkpoint.pt@4", "evaluate"), ("evaluated@2", "evaluate"),
    ("tmp:test_per_sample.csv", "evaluate"), ("before:checkpoint.pt@5", "evaluate"), ("tmp:checkpoint.pt@5", "evaluate"),
    ("after:checkpoint.pt@5", "report"), ("tmp:model.pt", "report"), ("after:model.pt", "report"),
    ("tmp:curves.png", "report"), ("tmp:summary.png", "report"), ("tmp:summary.json", "report"),
    ("after:summary.json", "complete"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data, a config file, and the reference: the same run, uninterrupted."""
    root = tmp_path_factory.mktemp("faults")
    data = write_tiny_mnist(root / "data")
    with _one_thread():
        Trainer(from_dict(tiny_config(data, root / "reference"))).run()
    run_dir = root / "reference" / "tiny"
    return types.SimpleNamespace(root=root, data=data, summary=json.loads((run_dir / "summary.json").read_text()),
                                 model=torch.load(run_dir / "model.pt", weights_only=True))


def _config_file(world, tmp_path, **changes):
    return write_config(tmp_path / "tiny.yaml", tiny_config(world.data, tmp_path / "out", **changes))


@contextlib.contextmanager
def _one_thread():
    """Arithmetic as in the child processes (OMP_NUM_THREADS=1), so that results compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _resume(run_dir, capsys):
    """``cure-fast train --resume RUN_DIR`` in this process, on one thread; returns stdout."""
    with _one_thread():
        main(["train", "--resume", str(run_dir)])
    return capsys.readouterr().out


def _assert_same_as_reference(world, run_dir):
    assert metric_epochs(run_dir) == [1, 2], "every epoch logged exactly once"
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 3
    assert not temporaries(run_dir)
    for name in FINAL_FILES:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k != "name"} == {k: v for k, v in world.summary.items() if k != "name"}
    model = torch.load(run_dir / "model.pt", weights_only=True)
    for key, value in world.model.items():
        assert torch.equal(model[key], value), key


@pytest.mark.parametrize("point, found", KILL_POINTS, ids=[p for p, _ in KILL_POINTS])
def test_killed_at_every_point_then_resumed(world, tmp_path, capsys, point, found):
    config = _config_file(world, tmp_path)
    killed = cli(["train", "--config", str(config)], fault=point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = tmp_path / "out" / "tiny"
    if found in ("not a run", "no checkpoint"):
        with pytest.raises(SystemExit) as exit:
            main(["train", "--resume", str(run_dir)])
        assert_one_line(capsys.readouterr().err, "not a run folder" if found == "not a run" else "cannot resume")
        assert exit.value.code in (1, 2)
        return
    kept = {k: v for k, v in snapshot(run_dir).items()
            if not k.endswith(".tmp") and (k not in WRITE_UP or found == "complete")}
    out = _resume(run_dir, capsys)
    if found == "resume":
        assert "resuming" in out and "from epoch" in out
    elif found in ("report", "evaluate"):
        assert "training finished (2 epochs); writing its report" in out
    else:
        assert "run complete, nothing to resume" in out
    after = snapshot(run_dir)
    if found not in ("resume", "evaluate"):  # nothing finished is rewritten
        assert {k: after[k] for k in kept} == kept
    _assert_same_as_reference(world, run_dir)


def test_a_logged_but_unsaved_epoch_is_trimmed_from_the_logs_on_resume(world, tmp_path, capsys):
    """Three epochs, evaluated after the last: checkpoint.pt is written at epoch 0 (@1), 1 (@2), 2 (@3),
    each after its metrics."""
    changes = dict(epochs=3, eval_every=3)
    killed = cli(["train", "--config", str(_config_file(world, tmp_path, **changes))], fault="before:checkpoint.pt@3")
    run_dir = tmp_path / "out" / "tiny"
    assert killed.returncode == -signal.SIGKILL and metric_epochs(run_dir) == [1, 2]
    Trainer(from_dict(tiny_config(world.data, tmp_path / "out", **changes)), str(run_dir), resume=True)
    assert metric_epochs(run_dir) == [1]  # the checkpoint's epochs, not 1, 2 (then 1, 2, 2 after resume)
    assert len((run_dir / "metrics.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize("fault, status, needles, saved_epoch", [
    ("trained@1=SIGINT", 130, ["stopped by SIGINT", "checkpoint.pt at epoch 0 of 2"], 0),
    ("evaluated@1=SIGTERM", 143, ["stopped by SIGTERM", "checkpoint.pt at epoch 1 of 2"], 1),
    ("evaluated@2=SIGINT", 130, ["stopped by SIGINT", "training is finished", "holds all 2 epochs"], 2),
    ("tmp:checkpoint.pt@2=SIGINT", 130, ["stopped by SIGINT", "at epoch 1 of 2"], 1),  # waits for the checkpoint
    ("tmp:curves.png=SIGTERM", 143, ["as the run completed", "nothing to resume"], 2),  # waits for the report
], ids=["sigint-in-epoch", "sigterm-in-evaluation", "sigint-in-last-evaluation", "sigint-while-saving",
        "sigterm-in-write-up"])
def test_a_signal_saves_says_how_to_resume_and_resume_completes(world, tmp_path, capsys, fault, status, needles,
                                                                 saved_epoch):
    stopped = cli(["train", "--config", str(_config_file(world, tmp_path))], fault=fault)
    run_dir = tmp_path / "out" / "tiny"
    line = assert_one_line(stopped.stderr, *needles)
    assert stopped.returncode == status
    if "nothing to resume" not in line:
        assert line.endswith(f"resume with: cure-fast train --resume {run_dir}")
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == saved_epoch
    assert not temporaries(run_dir)
    _resume(run_dir, capsys)
    _assert_same_as_reference(world, run_dir)


def test_sigterm_from_outside_mid_run(world, tmp_path):
    config = _config_file(world, tmp_path, epochs=200, eval_every=100)
    child = subprocess.Popen([sys.executable, "-m", "cure_fast.cli", "train", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**cli_env(), "OMP_NUM_THREADS": "1"})
    try:
        for line in child.stdout:
            if line.startswith("epoch 1:"):  # inside the epoch loop, where the handlers are installed
                break
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 143
    line = assert_one_line(err, "stopped by SIGTERM", "resume with: cure-fast train --resume")
    saved = torch.load(tmp_path / "out" / "tiny" / "checkpoint.pt", weights_only=True)["epoch"]
    assert f"at epoch {saved} of 200" in line and not temporaries(tmp_path / "out")


def cli_env():
    import os
    from faultkit import ROOT
    return {**os.environ, "PYTHONPATH": str(ROOT)}


DISK_FULL = [("checkpoint.pt", 3), ("metrics.jsonl", 2), ("test_per_sample.csv", 1), ("model.pt", 1),
             ("curves.png", 1), ("summary.json", 1), ("config.yaml", 1)]


@pytest.mark.parametrize("name, nth", DISK_FULL, ids=[f"{n}@{k}" for n, k in DISK_FULL])
def test_disk_full_while_writing_is_one_line_keeps_the_previous_file_and_resumes(world, tmp_path, capsys, monkeypatch,
                                                                                name, nth):
    """The writer fails with ENOSPC halfway through the ``nth`` write of ``name``."""
    calls, write = {"n": 0}, storage.write_chunk  # every file here is one chunk: one call per write

    def full(f, chunk):
        if f.name.endswith(f"/{name}.tmp"):
            calls["n"] += 1
            if calls["n"] == nth:
                write(f, chunk[: len(chunk) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        write(f, chunk)

    monkeypatch.setattr(storage, "write_chunk", full)
    run_dir = tmp_path / "out" / "tiny"
    with pytest.raises(SystemExit) as exit, _one_thread():
        main(["train", "--config", str(_config_file(world, tmp_path))])
    err = capsys.readouterr().err
    assert exit.value.code == 1
    assert_one_line(err, f"no space left on device while writing {run_dir / name}", "no temporary file left")
    assert not temporaries(tmp_path)
    monkeypatch.undo()
    if name == "config.yaml":  # nothing to resume: the message says to start again
        assert "start the run again" in err and not (run_dir / "checkpoint.pt").exists()
        return
    assert "free some space, then resume with: cure-fast train --resume" in err
    previous = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert previous["epoch"] == (1 if name == "checkpoint.pt" else 2)  # epoch 2 is saved before its evaluation
    _resume(run_dir, capsys)
    _assert_same_as_reference(world, run_dir)


def test_another_write_error_names_the_file_and_keeps_the_previous_copy(world, tmp_path, capsys, monkeypatch):
    """A write that fails with another errno than ENOSPC (here EFBIG, "File too large", the
    second checkpoint) names the file in its one line."""
    calls, write = {"n": 0}, storage.write_chunk

    def too_large(f, chunk):
        if f.name.endswith("/checkpoint.pt.tmp"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.EFBIG, "File too large")
        write(f, chunk)

    monkeypatch.setattr(storage, "write_chunk", too_large)
    with pytest.raises(SystemExit) as exit, _one_thread():
        main(["train", "--config", str(_config_file(world, tmp_path))])
    assert exit.value.code == 1
    run_dir = tmp_path / "out" / "tiny"
    assert_one_line(capsys.readouterr().err, f"File too large while writing: {run_dir / 'checkpoint.pt'}")
    assert not temporaries(tmp_path)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 0


def _can_mount_tmpfs(path) -> bool:
    if not shutil.which("unshare") or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {path}"],
                           capture_output=True)
    return probe.returncode == 0


def test_a_real_full_filesystem(world, tmp_path, capsys):
    """A 128 KiB tmpfs (in a user and mount namespace: no root needed where the kernel allows it): the
    first checkpoint fits, the next one does not."""
    mount = tmp_path / "small"
    mount.mkdir()
    if not _can_mount_tmpfs(mount):
        pytest.skip("cannot mount a tmpfs here (unshare -rm not permitted)")
    config = _config_file(world, tmp_path)
    kept = tmp_path / "kept"
    script = (f"mount -t tmpfs -o size=128k tmpfs {mount} && "
              f"{sys.executable} -m cure_fast.cli train --config {config} --set out_dir={mount} "
              f"> {tmp_path}/stdout 2> {tmp_path}/stderr; echo $? > {tmp_path}/status; cp -a {mount}/. {kept}/")
    kept.mkdir()
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env={**cli_env(), "OMP_NUM_THREADS": "1"}, timeout=120,
                   check=True)
    err = (tmp_path / "stderr").read_text()
    assert (tmp_path / "status").read_text().strip() == "1", err
    assert_one_line(err, "no space left on device while writing", "checkpoint.pt", "resume with")
    run_dir = kept / "tiny"
    assert not temporaries(kept)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # the previous checkpoint, intact
    assert saved["epoch"] in (0, 1)
    _resume(run_dir, capsys)
    _assert_same_as_reference(world, run_dir)
