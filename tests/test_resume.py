"""Resume never destroys a finished result, rewrites a missing report from the checkpoint, keeps the
evaluation out of the training RNG streams, and restores every DDP rank's own RNG state."""
import io
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cure_fast.cli import main
from cure_fast.config import from_dict
from cure_fast.training.trainer import Trainer

from faultkit import metric_epochs, snapshot, tiny_config, write_tiny_mnist


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("resume") / "data")


def test_resume_of_a_finished_run_changes_nothing(data, tmp_path, capsys):
    trainer = Trainer(from_dict(tiny_config(data, tmp_path)))
    trainer.run()
    before = snapshot(tmp_path)
    main(["train", "--resume", trainer.run_dir])  # exits normally
    assert "run complete, nothing to resume" in capsys.readouterr().out
    assert snapshot(tmp_path) == before
    summary = json.loads(open(os.path.join(trainer.run_dir, "summary.json")).read())
    assert summary["clean"] >= 0 and summary["images"] == 32 and summary["eps"] == {"inf": 0.05, "2": 0.3}


def test_resume_of_a_finished_run_writes_no_file_and_restores_a_broken_model_file(data, tmp_path, capsys):
    from cure_fast.certification.certify import load_trained
    trainer = Trainer(from_dict(tiny_config(data, tmp_path)))
    trainer.run()
    run_dir = trainer.run_dir
    times = {p: os.stat(os.path.join(run_dir, p)).st_mtime_ns for p in os.listdir(run_dir)}
    main(["train", "--resume", run_dir])
    assert {p: os.stat(os.path.join(run_dir, p)).st_mtime_ns for p in os.listdir(run_dir)} == times
    model = os.path.join(run_dir, "model.pt")
    weights = open(model, "rb").read()
    for damage, problem in ((lambda: open(model, "r+b").truncate(2000), "model.pt does not load"),
                            (lambda: os.remove(model), "model.pt is missing")):
        damage()
        capsys.readouterr()
        if os.path.exists(model):  # certify takes the finished run's checkpoint.pt instead, with a note
            certified, _, epochs = load_trained(run_dir, torch.device("cpu"))
            assert epochs == 2 and "model.pt is truncated" in capsys.readouterr().err
            assert all(torch.equal(a, b) for a, b in zip(certified.state_dict().values(),
                                                         trainer.model.state_dict().values()))
        main(["train", "--resume", run_dir])
        out = capsys.readouterr().out
        assert f"{problem}" in out and "written again from checkpoint.pt" in out, out
        assert "run complete, nothing to resume" in out
        restored, original = torch.load(model, weights_only=True), torch.load(io.BytesIO(weights), weights_only=True)
        assert all(torch.equal(restored[k], original[k]) for k in original) and restored.keys() == original.keys()


def test_resume_rewrites_a_lost_report_with_the_same_results(data, tmp_path, capsys):
    trainer = Trainer(from_dict(tiny_config(data, tmp_path)))
    trainer.run()
    run_dir = trainer.run_dir
    original = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    per_sample = open(os.path.join(run_dir, "test_per_sample.csv")).read()
    for name in ("summary.json", "summary.png", "curves.png", "model.pt", "test_per_sample.csv"):
        os.remove(os.path.join(run_dir, name))
    main(["train", "--resume", run_dir])
    assert "training finished (2 epochs); writing its report" in capsys.readouterr().out
    assert json.loads(open(os.path.join(run_dir, "summary.json")).read()) == original
    assert open(os.path.join(run_dir, "test_per_sample.csv")).read() == per_sample  # re-evaluated: the same
    assert metric_epochs(tmp_path / "tiny") == [1, 2]


def test_evaluation_leaves_the_training_rng_streams_alone(data, tmp_path):
    trainer = Trainer(from_dict(tiny_config(data, tmp_path)))
    state = torch.get_rng_state()
    trainer.evaluate()  # PGD draws random starts
    assert torch.equal(torch.get_rng_state(), state)


def test_the_checkpoint_holds_every_ranks_rng_state(data, tmp_path):
    trainer = Trainer(from_dict(tiny_config(data, tmp_path)))
    trainer.run(stop_after=1)
    saved = torch.load(os.path.join(trainer.run_dir, "checkpoint.pt"), weights_only=True)
    assert len(saved["rng_ranks"]) == 1 and torch.equal(saved["rng_ranks"][0]["cpu"], torch.get_rng_state())


def _ddp_worker(rank, world, port, config, out_dir, result):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        whole = Trainer(from_dict(dict(config)), os.path.join(out_dir, "whole"))
        torch.rand(1 + rank)  # the ranks' RNG streams differ from here on
        whole.run()
        first = Trainer(from_dict(dict(config)), os.path.join(out_dir, "parted"))
        torch.rand(1 + rank)
        first.run(stop_after=1)
        torch.manual_seed(1000 + rank)  # a new process: nothing of the old RNG state is left
        resumed = Trainer(from_dict(dict(config)), os.path.join(out_dir, "parted"), resume=True)
        resumed.run()
        if rank == 0:
            torch.save({"whole": whole.model.state_dict(), "resumed": resumed.model.state_dict()}, result)
    finally:
        dist.destroy_process_group()


def test_ddp_resume_is_exact(data, tmp_path):
    """Two gloo processes, combine=random (every step draws from each rank's RNG) and rank 0
    evaluating every epoch: a resumed run ends with exactly the weights of an uninterrupted one."""
    config = tiny_config(data, tmp_path, combine="random")
    result = str(tmp_path / "result.pt")
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, config, str(tmp_path), result), nprocs=2, join=True)
    weights = torch.load(result, weights_only=True)
    for key, value in weights["whole"].items():
        assert torch.equal(value, weights["resumed"][key]), key
