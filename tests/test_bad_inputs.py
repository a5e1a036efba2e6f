"""Every bad input is one line on stderr naming the key (or argument, or file) and what is allowed,
with exit status 2 (a bad value) or 1 (a broken file), no traceback, and nothing written before is
lost. The table BAD_VALUES holds every case of issue 16 and more; BROKEN_FILES the checkpoint cases."""
import shutil
import subprocess
import sys
import types

import pytest
import torch

from cure_fast import models
from cure_fast.certification.certify import parse_norms
from cure_fast.cli import main
from cure_fast.config import from_dict, load_config
from cure_fast.training.trainer import Trainer

from faultkit import assert_one_line, cli, snapshot, tiny_config, write_config, write_tiny_mnist


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run (out/tiny), its config file, and broken copies of its files."""
    root = tmp_path_factory.mktemp("bad")
    data = write_tiny_mnist(root / "data")
    config = tiny_config(data, root / "out", epochs=1)
    trainer = Trainer(from_dict(dict(config)))
    trainer.run()
    w = types.SimpleNamespace(root=root, data=data, run=root / "out" / "tiny", config=write_config(root / "tiny.yaml", config))
    model, checkpoint = (w.run / "model.pt").read_bytes(), (w.run / "checkpoint.pt").read_bytes()
    broken = root / "broken"
    broken.mkdir()
    files = {"half-model.pt": model[: len(model) // 2], "truncated.pt": checkpoint[:-100], "empty.pt": b"",
             "random.pt": bytes(range(256)) * 8, "text.pt": b"model: weights\n"}
    for name, content in files.items():
        (broken / name).write_bytes(content)
    torch.save(models.build("cnn3", "mnist", width=4).state_dict(), broken / "cnn3.pt")
    torch.save(torch.zeros(3), broken / "tensor.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "note": types.SimpleNamespace(a=1)}, broken / "object.pt")
    for name, replacement in [("run-truncated", "truncated.pt"), ("run-empty", "empty.pt"), ("run-random", "random.pt"),
                              ("run-model-as-checkpoint", None), ("run-other-architecture", "cnn3.pt")]:
        shutil.copytree(w.run, root / name)
        target = root / name / ("model.pt" if name == "run-other-architecture" else "checkpoint.pt")
        shutil.copy(broken / replacement if replacement else w.run / "model.pt", target)
    shutil.copytree(w.run, root / "run-other-config")  # its checkpoint.pt, as if copied from a run with lr 2e-3
    write_config(root / "run-other-config" / "config.yaml", {**config, "lr": 1e-3})
    shutil.copytree(w.run, root / "run-empty-config")
    (root / "run-empty-config" / "config.yaml").write_text("")
    shutil.copytree(w.run, root / "run-config-folder")
    (root / "run-config-folder" / "config.yaml").unlink()
    (root / "run-config-folder" / "config.yaml").mkdir()
    (root / "not-a-run").mkdir()
    (root / "list.yaml").write_text("- lr: 1\n")
    (root / "broken.yaml").write_text("lr: [1,\nepochs: 2\n")
    w.broken = broken
    return w


def _train(*sets):
    return lambda w: ["train", "--config", str(w.config)] + [a for s in sets for a in ("--set", s)]


def _certify(*args, run=None):
    return lambda w: ["certify", str(w.root / run if run else w.run), "--limit", "4", "--no-progress", *args]


BAD_VALUES = {
    # numbers, from issue 16's "tracebacks" list
    "lr=abc": (_train("lr=abc"), 2, ["lr='abc'", "a number > 0"]),
    "alpha=abc": (_train("alpha=abc"), 2, ["alpha='abc'", "[0, 1]"]),
    "sabr_lambda=x": (_train("sabr_lambda=x"), 2, ["sabr_lambda='x'", "(0, 1]"]),
    "eps_end_epoch=abc": (_train("eps_end_epoch=abc"), 2, ["eps_end_epoch='abc'", "an integer"]),
    "seed=abc": (_train("seed=abc"), 2, ["seed='abc'", "an integer"]),
    "eps_inf=2/0": (_train("eps_inf=2/0"), 2, ["eps_inf='2/0'", "divides by zero"]),
    "lr_milestones=5": (_train("lr_milestones=5"), 2, ["lr_milestones=5", "a list of increasing integers"]),
    "model_args=3": (_train("model_args=3"), 2, ["model_args=3", "a mapping"]),
    "model_args-typo": (_train("model=cnn3", "model_args={widht: 8}"), 2, ["'widht'", "did you mean 'width'"]),
    "model_args-value": (_train("model_args={hidden: abc}"), 2, ["model_args.hidden='abc'", "a list of integers"]),
    "name=": (_train("name="), 2, ["name=", "a folder name"]),
    "norms=[inf": (_train("norms=[inf"), 2, ["--set 'norms=[inf'", "not valid YAML"]),
    "config-broken-yaml": (lambda w: ["train", "--config", str(w.root / "broken.yaml")], 2,
                           ["broken.yaml is not valid YAML at line"]),
    "config-not-a-mapping": (lambda w: ["train", "--config", str(w.root / "list.yaml")], 2, ["list.yaml", "mapping"]),
    "config-missing": (lambda w: ["train", "--config", str(w.root / "nope.yaml")], 2, ["nope.yaml: no such file"]),
    "certify-device-gpu": (_certify("--device", "gpu"), 2, ["invalid choice: 'gpu'", "did you mean 'cuda'"]),
    "norms-inf:2/0": (_certify("--norms", "inf:2/0"), 2, ["--norms inf='2/0'", "divides by zero"]),
    # accepted silently although wrong, from issue 16
    "train_limit=-5": (_train("train_limit=-5"), 2, ["train_limit=-5", "an integer >= 1"]),
    "train_limit=0": (_train("train_limit=0"), 2, ["train_limit=0", "an integer >= 1"]),
    "eval_limit=-1": (_train("eval_limit=-1"), 2, ["eval_limit=-1", "an integer >= 1"]),
    "eval_limit=0": (_train("eval_limit=0"), 2, ["eval_limit=0", "null: the whole test set"]),
    "limit=-3": (_certify("--limit", "-3"), 2, ["argument --limit", "an integer >= 1"]),
    "limit=0": (_certify("--limit", "0"), 2, ["argument --limit", "an integer >= 1"]),
    "batch-size=0": (_certify("--batch-size", "0"), 2, ["argument --batch-size", "an integer >= 1"]),
    "smoothing-n=0": (_certify("--smoothing", "0.25", "--smoothing-n", "0"), 2, ["argument --smoothing-n", ">= 1"]),
    "progress=maybe": (_train("progress=maybe"), 2, ["progress='maybe'", "true or false"]),
    "ibp_init=maybe": (_train("ibp_init=maybe"), 2, ["ibp_init='maybe'", "true or false"]),
    "batch_size=true": (_train("batch_size=true"), 2, ["batch_size=True", "an integer >= 1"]),
    "eps_inf=5": (_train("eps_inf=5"), 2, ["eps_inf=5", "[0, 1]", "mnist images lie in [0, 1]"]),
    "name-escapes-out_dir": (_train("name=a/b/../../x"), 2, ["name='a/b/../../x'", "no '/'"]),
    "demo-eval_limit=-1": (lambda w: ["demo", "--out-dir", str(w.root / "out"), "--set", "eval_limit=-1"], 2,
                           ["eval_limit=-1"]),
    # more of the same families
    "eps_2-beyond-the-diagonal": (_train("eps_2=1e3"), 2, ["eps_2=", "[0, 28]"]),
    "eps_inf=nan": (_train("eps_inf=.nan"), 2, ["eps_inf=nan"]),
    "lr=-1e-3": (_train("lr=-1e-3"), 2, ["lr='-1e-3'", "> 0"]),
    "weight_decay=-1e-4": (_train("weight_decay=-1e-4"), 2, ["weight_decay='-1e-4'", ">= 0"]),
    "batch_size=1.5": (_train("batch_size=1.5"), 2, ["batch_size=1.5", "an integer"]),
    "epochs=0": (_train("epochs=0"), 2, ["epochs=0"]),
    "method=ibpp": (_train("method=ibpp"), 2, ["method='ibpp'", "did you mean 'ibp'"]),
    "norms=[inf,1]": (_train("norms=[inf, 1]"), 2, ["norms=", "distinct values from inf, 2"]),
    "device=gpu": (_train("device=gpu"), 2, ["device='gpu'", "did you mean 'cuda'"]),
    "unknown-key": (_train("lrr=0.1"), 2, ["unknown key 'lrr'", "did you mean 'lr'"]),
    "eps_schedule-typo": (_train("eps_schedule=expo"), 2, ["eps_schedule='expo'", "did you mean 'exp'"]),
    "shrink_ratio=2": (_train("shrink_ratio=2"), 2, ["shrink_ratio=2", "(0, 1]", "or null"]),
    "shrink_method-typo": (_train("shrink_method=to_zero_shrinking_box"), 2, ["shrink_method=", "to_zero, std"]),
    "shrink-with-pgd": (_train("method=pgd", "shrink_ratio=0.4"), 2, ["shrinking box", "needs method ibp or sabr"]),
    "reg_zero_eps_box=-1": (_train("reg_zero_eps_box=-1"), 2, ["reg_zero_eps_box=", "(0, 1]"]),
    "gp_start_epoch=x": (_train("gp_start_epoch=x"), 2, ["gp_start_epoch='x'", "an integer"]),
    "override-without-=": (_train("lr"), 2, ["--set 'lr' is not of the form key=value"]),
    "init_from-missing": (_train("init_from=/nope.pt"), 2, ["init_from='/nope.pt' is not a file"]),
    "unknown-preset": (lambda w: ["train", "--preset", "mnist-demo-inff"], 2, ["did you mean 'mnist-demo-inf'"]),
    "no-preset": (lambda w: ["train"], 2, ["give --preset NAME or --config FILE"]),
    "resume-missing": (lambda w: ["train", "--resume", str(w.root / "nope")], 2, ["--resume", "no such folder"]),
    "resume-not-a-run": (lambda w: ["train", "--resume", str(w.root / "not-a-run")], 2, ["not a run folder"]),
    "resume-with-set": (lambda w: ["train", "--resume", str(w.run), "--set", "epochs=5"], 2, ["drop --preset"]),
    "norms-unknown": (_certify("--norms", "3:0.1"), 2, ["bad --norms item '3:0.1'"]),
    "norms-typo": (_certify("--norms", "infinity:0.1"), 2, ["did you mean 'inf'"]),
    "norms-eps-word": (_certify("--norms", "inf:abc"), 2, ["--norms inf='abc' is not a number"]),
    "norms-eps-too-large": (_certify("--norms", "inf:5"), 2, ["--norms inf=5", "[0, 1]"]),
    "smoothing-word": (_certify("--smoothing", "0.25,abc"), 2, ["--smoothing='abc'"]),
    "smoothing-zero": (_certify("--smoothing", "0"), 2, ["--smoothing=", "> 0"]),
    "smoothing-n-alone": (_certify("--smoothing-n", "1000"), 2, ["--smoothing-n", "give --smoothing SIGMAS too"]),
    "smoothing-n-too-few": (_certify("--smoothing", "0.25", "--smoothing-n", "9"), 2,
                            ["--smoothing-n 9 cannot certify any image", "at least 10"]),
    "pgd-steps=-1": (_certify("--pgd-steps", "-1"), 2, ["argument --pgd-steps", ">= 0"]),
    "method-typo": (_certify("--method", "crow"), 2, ["invalid choice: 'crow'", "did you mean 'crown'"]),
    "certify-missing": (lambda w: ["certify", str(w.root / "nope")], 1, ["no run directory or checkpoint"]),
    "certify-not-a-run": (_certify(run="not-a-run"), 1, ["not-a-run is not a run directory"]),
    "quickstart-batch=0": (lambda w: ["quickstart", "--batch", "0"], 2, ["argument --batch"]),
    "command-typo": (lambda w: ["trian"], 2, ["invalid choice: 'trian'", "did you mean 'train'"]),
    # from the new-user walkthrough
    "norms-twice": (_certify("--norms", "inf:0.1,inf:0.2"), 2, ["--norms names inf twice"]),
    "resume-a-file": (lambda w: ["train", "--resume", str(w.run / "checkpoint.pt")], 2,
                      ["checkpoint.pt is a file", "give the run folder"]),
    "data-root-missing": (lambda w: ["train", "--config", str(w.config), "--data-root", str(w.root / "nope")], 1,
                          ["data_root", "nope: no such folder"]),
    "train-flag-typo": (lambda w: ["train", "--presset", "mnist-demo-inf"], 2,
                        ["cure-fast train: unrecognized arguments: --presset", "did you mean '--preset'"]),
    "certify-flag-typo": (_certify("--methd", "crown"), 2, ["cure-fast certify:", "did you mean '--method'"]),
    "backend-cannot-run": (_train("backend=cuda"), 2, ["backend='cuda' cannot run on cpu here", "use torch or auto"]),
    "quickstart-backend-cannot-run": (lambda w: ["quickstart", "--backend", "cuda", "--batch", "2"], 1,
                                      ["--backend='cuda' cannot run on cpu here"]),
    "certify-out-is-a-run": (lambda w: ["certify", str(w.run), "--limit", "2", "--out", str(w.run)], 2,
                             ["is a training run's folder", "a folder of its own"]),
    "data-root-a-file": (lambda w: ["train", "--config", str(w.config), "--data-root", str(w.config)], 1,
                         ["tiny.yaml: a file, not a folder"]),
    "set-norms-comma": (_train("norms=inf,2"), 2, ["norms='inf,2'", "write a list in brackets: norms=[inf, 2]"]),
    "set-two-pairs": (lambda w: ["train", "--config", str(w.config), "--set", "lr=1e-3", "epochs=2"], 2,
                      ["unrecognized arguments: epochs=2", "give each KEY=VALUE its own --set"]),
    "out-dir-a-file": (lambda w: _train(f"out_dir={w.config}")(w), 2, ["out_dir=", "is a file; give a folder"]),
    "out-dir-under-a-file": (lambda w: _train(f"out_dir={w.config}/runs")(w), 2,
                             ["out_dir=", "cannot create the run folder"]),
    "certify-out-a-file": (lambda w: _certify("--out", str(w.config))(w), 2, ["is a file; give another with --out"]),
    "certify-out-a-finished-report": (lambda w: _certify("--out", str(_finished_report(w)))(w), 2,
                                      ["holds an earlier report (summary.json)", "never replaces"]),
    "config-duplicate-key": (lambda w: ["train", "--config", str(_with_duplicate_key(w))], 2,
                             ["is not valid YAML at line", "key 'lr' is given twice"]),
    "choice-typo": (_train("sabr_l2_set=boks"), 2, ["sabr_l2_set='boks'", "did you mean 'box'"]),
    "set-duplicate-key": (_train("model_args={hidden: [8], hidden: [4]}"), 2, ["key 'hidden' is given twice"]),
    # from the second walkthrough
    "no-training-batch": (_train("train_limit=8", "drop_last=true"), 2,
                          ["no training batch: 8 training images make no full batch of batch_size=64"]),
    "seed-too-large": (_train("seed=9223372036854775807"), 2, ["seed=9223372036854775807", "[0, 4294967295]"]),
    "demo-set-norms": (lambda w: ["demo", "--out-dir", str(w.root / "demo"), "--set", "norms=[inf]"], 2,
                       ["--set norms=…: the demo compares its three runs by their norms"]),
    "certify-out-under-a-file": (lambda w: _certify("--out", f"{w.config}/sub")(w), 2,
                                 ["cannot be made", "tiny.yaml is a file"]),
    "smoothing-twice": (_certify("--smoothing", "0.25,0.25"), 2, ["--smoothing 0.25,0.25 names a sigma twice"]),
    "norms-negative": (_certify("--norms", "inf:-0.1"), 2, ["--norms inf=-0.1", "[0, 1]"]),
    "resume-empty-config": (lambda w: ["train", "--resume", str(w.root / "run-empty-config")], 2,
                            ["config.yaml is empty", "checkpoint.pt holds a copy"]),
    "certify-empty-config": (_certify(run="run-empty-config"), 2, ["config.yaml is empty"]),
    "certify-config-a-folder": (_certify(run="run-config-folder"), 2, ["config.yaml is a folder"]),
}


def _with_duplicate_key(w):
    path = w.root / "duplicate.yaml"
    path.write_text(w.config.read_text() + "lr: 0.1\nlr: 0.2\n")
    return path


def _finished_report(w):
    folder = w.root / "old-report"
    folder.mkdir(exist_ok=True)
    (folder / "summary.json").write_text('{"images": 5}')
    return folder

BROKEN_FILES = {
    "resume-truncated": (lambda w: ["train", "--resume", str(w.root / "run-truncated")], ["checkpoint.pt is truncated"]),
    "resume-empty": (lambda w: ["train", "--resume", str(w.root / "run-empty")], ["checkpoint.pt is empty"]),
    "resume-random-bytes": (lambda w: ["train", "--resume", str(w.root / "run-random")],
                            ["checkpoint.pt is not a PyTorch file"]),
    "resume-model.pt-as-checkpoint": (lambda w: ["train", "--resume", str(w.root / "run-model-as-checkpoint")],
                                      ["holds model weights", "not a training checkpoint"]),
    "resume-checkpoint-of-another-config": (lambda w: ["train", "--resume", str(w.root / "run-other-config")],
                                            ["checkpoint.pt was written under another config",
                                             "lr=0.002 there, 0.001 in config.yaml",
                                             "config.yaml was edited, or the checkpoint comes from another run"]),
    "certify-half-model.pt": (lambda w: ["certify", str(w.broken / "half-model.pt")], ["half-model.pt is truncated"]),
    "certify-empty": (lambda w: ["certify", str(w.broken / "empty.pt")], ["empty.pt is empty"]),
    "certify-random-bytes": (lambda w: ["certify", str(w.broken / "random.pt")], ["random.pt is not a PyTorch file"]),
    "certify-text": (lambda w: ["certify", str(w.broken / "text.pt")], ["text.pt is not a PyTorch file"]),
    "certify-other-architecture": (_certify(run="run-other-architecture"),
                                   ["model.pt holds model weights", "another architecture than mlp on mnist"]),
    "certify-objects": (lambda w: ["certify", str(w.broken / "object.pt")], ["object.pt holds Python objects"]),
    "init_from-truncated": (lambda w: _train(f"init_from={w.broken / 'truncated.pt'}")(w), ["truncated.pt is truncated"]),
    "init_from-random-bytes": (lambda w: _train(f"init_from={w.broken / 'random.pt'}")(w), ["not a PyTorch file"]),
    "init_from-empty": (lambda w: _train(f"init_from={w.broken / 'empty.pt'}")(w), ["empty.pt is empty"]),
    "init_from-half-model.pt": (lambda w: _train(f"init_from={w.broken / 'half-model.pt'}")(w), ["is truncated"]),
    "init_from-other-architecture": (lambda w: _train(f"init_from={w.broken / 'cnn3.pt'}")(w),
                                     ["cnn3.pt holds model weights", "another architecture", "tensor '2.weight'"]),
    "init_from-tensor": (lambda w: _train(f"init_from={w.broken / 'tensor.pt'}")(w),
                         ["tensor.pt holds a single tensor of shape (3,), not model weights"]),
}


def _fails_in_one_line(w, capsys, argv, status, needles):
    before = snapshot(w.root)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    out, err = capsys.readouterr()
    assert_one_line(err, *needles)
    assert exit.value.code == status, err
    assert snapshot(w.root) == before, "a failed command changed files written before"


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_is_one_line_and_loses_nothing(world, capsys, case):
    argv, status, needles = BAD_VALUES[case]
    _fails_in_one_line(world, capsys, argv(world), status, needles)


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_file_is_one_line_naming_it_and_loses_nothing(world, capsys, case):
    argv, needles = BROKEN_FILES[case]
    _fails_in_one_line(world, capsys, argv(world), 1, needles)


@pytest.mark.parametrize("argv, status, needle", [
    (["train", "--preset", "mnist-demo-inf", "--set", "lr=abc"], 2, "lr='abc'"),
    (["certify", "/nonexistent/run", "--limit", "0"], 2, "argument --limit"),
    (["trian"], 2, "did you mean 'train'"),
], ids=["config", "argument", "command"])
def test_a_real_process_prints_one_line_and_no_traceback(argv, status, needle):
    done = cli(argv)
    assert done.returncode == status and done.stdout == ""
    assert_one_line(done.stderr, needle)


def test_ctrl_c_while_the_command_line_starts_is_one_line(capsys, monkeypatch):
    """``import cure_fast.cli`` leaves torch alone (a child process shows it), so Ctrl-C during the
    seconds of importing torch lands in ``main``, which answers it with one line and status 130."""
    probe = subprocess.run([sys.executable, "-c", "import sys, cure_fast.cli; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"
    from cure_fast import cli as command_line

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(command_line, "_parser", interrupted)
    with pytest.raises(SystemExit) as exit:
        command_line.main(["info"])
    assert exit.value.code == 130
    assert_one_line(capsys.readouterr().err, "cure-fast: interrupted (Ctrl-C) while starting")


def test_numbers_in_every_notation_are_accepted():
    config = load_config("mnist-demo-inf", overrides=["lr=1e-3", "weight_decay=1e-4", "eps_inf=2/255",
                                                      "eps_2=5e-1", "grad_clip=1E1", "epochs=1e1", "norms=inf"])
    assert (config.lr, config.weight_decay, config.grad_clip, config.epochs) == (1e-3, 1e-4, 10.0, 10)
    assert config.eps_inf == pytest.approx(2 / 255) and config.eps_2 == 0.5 and config.norms == ["inf"]
    assert isinstance(config.epochs, int)
    assert parse_norms("inf:1e-2,2:2.5E-1") == {"inf": 0.01, "2": 0.25}
    assert parse_norms("inf:8/255") == {"inf": pytest.approx(8 / 255)}


def test_init_from_accepts_checkpoint_and_model_files(world, tmp_path):
    for name in ("checkpoint.pt", "model.pt"):
        config = from_dict(tiny_config(world.data, tmp_path, epochs=1, init_from=str(world.run / name), name=name))
        trainer = Trainer(config)
        saved = torch.load(world.run / "model.pt", weights_only=True)
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(value, saved[key]), (name, key)


def test_demo_prints_the_number_of_images_it_evaluated_and_a_second_demo_keeps_the_first(world, capsys):
    demo = world.root / "demo"
    argv = ["demo", "--out-dir", str(demo), "--set", f"data_root={world.data}", "--set", "eval_limit=20",
            "--set", "train_limit=64", "--set", "epochs=1", "--set", "eps_end_epoch=1", "--set", "model=mlp",
            "--set", "model_args={hidden: [8]}", "--set", "eval_pgd_steps=1", "--set", "progress=false"]
    main(argv)
    out = capsys.readouterr().out
    assert "test accuracy on 20 images, l∞ eps 0.2, l2 eps 0.5" in out and "1000" not in out
    first = {p.name: p.read_bytes() for p in demo.iterdir() if p.is_file()}
    main(argv)
    assert f"table saved to {demo / 'demo-summary-run2.png'}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in demo.iterdir() if p.name in first} == first


def test_a_finished_run_resumes_for_the_epochs_added_to_its_config(world, tmp_path, capsys):
    """``epochs`` may grow between runs (other training keys may not: the case table above)."""
    run = tmp_path / "longer"
    shutil.copytree(world.run, run)
    write_config(run / "config.yaml", {**tiny_config(world.data, world.root / "out", epochs=1), "epochs": 2})
    main(["train", "--resume", str(run)])
    assert f"resuming {run} from epoch 1 of 2" in capsys.readouterr().out
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2


def test_certifying_without_an_attack_reports_no_pgd_accuracy_and_notes_a_limit_past_the_test_set(world, tmp_path,
                                                                                                     capsys):
    from cure_fast.certification.certify import certify_run
    summary = certify_run(str(world.run), {"inf": 0.05}, limit=100, pgd_steps=0, curve=(), out_dir=str(tmp_path / "r"))
    assert "note: --limit 100 is more than the 32 test images there are: certifying all 32" in capsys.readouterr().err
    assert summary["images"] == 32 and "certified_inf" in summary
    assert not any(key.startswith("pgd_") or key == "empirical_union" for key in summary)
    rows = (tmp_path / "r" / "per_sample.csv").read_text().splitlines()
    assert rows[0].split(",")[3] == "pgd_inf" and all(row.split(",")[3] == "" for row in rows[1:])


def test_certify_run_refuses_bad_python_arguments_before_it_starts(world, tmp_path, capsys):
    from cure_fast.certification.certify import certify_run
    from cure_fast.errors import ConfigError
    for options, match in [(dict(eps=0.1), "eps is a mapping {norm: eps}"),
                           (dict(method="crwn"), "unknown method 'crwn'; choose one of ibp, crown-ibp"),
                           (dict(sound="fp16"), "sound='fp16'; choose True / 'fp64', 'fp32'")]:
        with pytest.raises(ConfigError, match=match):
            certify_run(str(world.run), out_dir=str(tmp_path / "r"), **options)
        assert capsys.readouterr().out == "" and not (tmp_path / "r").exists()
    summary = certify_run(str(world.run), {2: 0.1}, limit=2, pgd_steps=0, curve=(), out_dir=str(tmp_path / "r"))
    assert summary["eps"] == {"2": 0.1} and "certified_2" in summary
