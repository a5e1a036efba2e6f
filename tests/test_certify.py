"""``cure-fast certify``: loading a trained run, the certification cascade and its reports."""
import json
import os
import shutil
import sys

import pytest
import torch

from cure_fast.certification.certify import certify_run, format_times, load_trained, parse_norms
from cure_fast.cli import main
from cure_fast.config import from_dict
from cure_fast.training.trainer import Trainer

from faultkit import assert_one_line, cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = from_dict(dict(dataset="mnist", model="cnn3", model_args={"width": 4}, train_limit=512, eval_limit=32,
                            batch_size=64, epochs=2, eps_start_epoch=0, eps_end_epoch=1, method="ibp",
                            norms=["inf", "2"], eps_inf=0.05, eps_2=0.3, eval_pgd_steps=2, progress=False,
                            out_dir=str(out)))
    trainer = Trainer(config)
    trainer.run()
    return trainer.run_dir


def test_parse_norms():
    assert parse_norms("inf:2/255, 2:0.25") == {"inf": pytest.approx(2 / 255), "2": 0.25}
    for bad in ("3:0.1", "inf", "inf:x", ""):
        with pytest.raises(ValueError, match="norm"):
            parse_norms(bad)


def test_load_trained_from_run_dir_and_checkpoint(run_dir, tmp_path):
    from_dir, config, epochs = load_trained(run_dir, torch.device("cpu"))
    from_checkpoint, _, _ = load_trained(os.path.join(run_dir, "checkpoint.pt"), torch.device("cpu"))
    from_model, _, alone_epochs = load_trained(os.path.join(run_dir, "model.pt"), torch.device("cpu"))
    assert config.model == "cnn3" and not from_dir.training and epochs == 2
    assert alone_epochs is None  # a model.pt does not say; config.yaml beside it gives the architecture
    for a, b, c in zip(from_dir.state_dict().values(), from_checkpoint.state_dict().values(),
                       from_model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    alone = tmp_path / "model.pt"
    shutil.copy(os.path.join(run_dir, "model.pt"), alone)
    with pytest.raises(ValueError, match="holds no config"):
        load_trained(str(alone), torch.device("cpu"))
    with pytest.raises(FileNotFoundError):
        load_trained(os.path.join(run_dir, "nope"), torch.device("cpu"))


def test_cascade_only_adds_certificates_and_never_certifies_a_pgd_break(run_dir, tmp_path):
    eps = {"inf": 0.05, "2": 0.3}
    ibp = certify_run(run_dir, eps, "ibp", limit=16, out_dir=str(tmp_path / "ibp"), pgd_steps=5, curve=())
    crown = certify_run(run_dir, eps, "crown-ibp", limit=16, out_dir=str(tmp_path / "crown"), pgd_steps=5, curve=())
    for norm in eps:
        assert crown[f"certified_{norm}"] >= ibp[f"certified_{norm}"]
    rows = list(open(tmp_path / "crown" / "per_sample.csv"))[1:]
    assert len(rows) == 16
    for row in rows:
        fields = row.strip().split(",")
        for k in range(2):
            pgd, certified, _, method = fields[3 + 4 * k: 7 + 4 * k]
            assert not (certified == "1" and pgd == "0"), "a certified point was broken by PGD"
            assert (method in ("ibp", "crown-ibp")) == (certified == "1")
    assert set(crown["seconds_per_image"]) == {"pgd", "ibp", "crown-ibp"}


def test_cli_writes_reports(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    main(["certify", run_dir, "--norms", "inf:0.05,2:0.3", "--limit", "8", "--out", str(out), "--pgd-steps", "2"])
    for name in ("per_sample.csv", "summary.json", "summary.png", "certified_vs_eps.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sound"] and summary["images"] == 8
    assert [summary["curve"][f]["union"] for f in ("0.25", "0.5", "0.75", "1.0")] == sorted(
        (summary["curve"][f]["union"] for f in ("0.25", "0.5", "0.75", "1.0")), reverse=True)
    assert "union" in capsys.readouterr().out


def test_l1_certificates_and_the_union_over_three_norms(run_dir, tmp_path):
    eps = {"inf": 0.05, "2": 0.3, "1": 1.0}
    summary = certify_run(run_dir, eps, "crown", limit=8, out_dir=str(tmp_path), pgd_steps=3, curve=())
    assert 0 <= summary["union"] <= min(summary[f"certified_{n}"] for n in eps)
    assert summary["certified_1"] <= summary["pgd_1"] <= summary["clean"]
    rows = list(open(tmp_path / "per_sample.csv"))
    assert len(rows) == 9 and "1" in rows[0]
    assert parse_norms("1:1e-1,inf:2/255") == {"1": pytest.approx(0.1), "inf": pytest.approx(2 / 255)}


def test_cli_errors_are_clear(run_dir, capsys):
    for argv, status, match in [([run_dir, "--norms", "3:0.1"], 2, "bad --norms"),
                                (["/nonexistent/run"], 1, "no run directory")]:
        with pytest.raises(SystemExit) as exit:
            main(["certify", *argv])
        err = capsys.readouterr().err
        assert exit.value.code == status and match in err and len(err.strip().splitlines()) == 1, err


def test_smoothing_and_geometric_reports(run_dir, tmp_path):
    summary = certify_run(run_dir, {"2": 0.3}, "ibp", limit=4, out_dir=str(tmp_path), pgd_steps=1, curve=(),
                          smoothing=[0.25], smoothing_n=200, geometric=True)
    plain, adaptive = summary["smoothing"]["sigma 0.25"], summary["smoothing"]["sigma 0.25, adaptive BN"]
    assert plain["sound"] and adaptive["sound"]
    assert len(plain["certified_accuracy"]) == 5
    assert 0 <= summary["geometric"]["worst_case"] <= summary["geometric"]["clean"]
    assert (tmp_path / "smoothing.png").is_file()


def test_cli_shows_progress_where_it_writes_and_every_result(run_dir, tmp_path, capsys, monkeypatch):
    """No --norms: the run's own evaluation eps; progress bars on stderr (a terminal); the smoothing and
    geometric results printed at the end and plotted."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    out = tmp_path / "report"
    main(["certify", run_dir, "--limit", "4", "--out", str(out), "--pgd-steps", "1", "--no-curve",
          "--smoothing", "0.25", "--smoothing-n", "50", "--geometric"])
    stdout, stderr = capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eps"] == {"inf": 0.05, "2": 0.3}  # from the run's config, not CIFAR values
    assert f"reports to {out}" in stdout and f"reports in {out}" in stdout
    assert "ibp on 4 test images, l∞ eps 0.05, l2 eps 0.3" in stdout
    for bar in ("certify (ibp)", "certified l∞", "smoothing sigma 0.25", "geometric", "4/4"):
        assert bar in stderr, bar
    assert "randomized smoothing" in stdout and "ACR" in stdout and "sigma 0.25, adaptive BN" in stdout
    assert "geometric robustness" in stdout and "rotation" in stdout
    assert (out / "geometric.png").is_file() and (out / "smoothing.png").is_file()


def test_a_second_certification_does_not_replace_the_first_report(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("certify-*"))
    for _ in range(2):
        main(["certify", str(run), "--limit", "2", "--pgd-steps", "1", "--no-curve", "--norms", "inf:0.01,1:0.5"])
    stdout = capsys.readouterr().out
    assert (run / "certify-ibp" / "summary.json").is_file() and (run / "certify-ibp-run2" / "summary.json").is_file()
    assert "cert l1" in stdout and "PGD l1" in stdout


def test_one_norm_certify_has_no_nan_columns_and_no_bar_off_a_terminal(run_dir, tmp_path, capsys):
    main(["certify", run_dir, "--norms", "inf:1e-2", "--limit", "4", "--out", str(tmp_path), "--pgd-steps", "1"])
    stdout, stderr = capsys.readouterr()
    assert "certify (ibp)" not in stderr
    assert "nan" not in stdout and "cert l∞" in stdout and "cert l2" not in stdout
    assert json.loads((tmp_path / "summary.json").read_text())["eps"] == {"inf": 0.01}


def test_sound_fp32_certifies_no_more_than_fp64_and_per_sample_margins_stay_below(run_dir, tmp_path):
    """``--sound fp32``: every bound lowered by its rounding errors, so a float32 certificate is also
    one in float64 up to those errors: per sample, its margin is at most fp64's plus a hair."""
    eps = {"inf": 0.05, "2": 0.3}
    runs = {}
    for sound in ("fp64", "fp32"):
        main(["certify", run_dir, "--norms", "inf:0.05,2:0.3", "--limit", "8", "--out", str(tmp_path / sound),
              "--pgd-steps", "1", "--method", "crown", "--sound", sound, "--no-curve", "--no-progress"])
        runs[sound] = json.loads((tmp_path / sound / "summary.json").read_text())
        rows = [line.strip().split(",") for line in open(tmp_path / sound / "per_sample.csv")]
        runs[sound]["margins"] = [[float(v) for v in r[5::4][:2]] for r in rows[1:]]
    assert runs["fp32"]["sound"] and runs["fp32"]["precision"].startswith("fp32")
    for norm in eps:
        assert runs["fp32"][f"certified_{norm}"] <= runs["fp64"][f"certified_{norm}"]
    for m32, m64 in zip(runs["fp32"]["margins"], runs["fp64"]["margins"]):
        for a, b in zip(m32, m64):
            assert a <= b + 1e-5 * (1 + abs(b))


def test_sound_fp32_ibp_margins_are_below_float64_ones():
    from cure_fast import BoundedModule, L2Ball, LinfBall
    from cure_fast.engine.crown import crown_margins
    from cure_fast.models import build
    torch.manual_seed(0)
    model = build("cnn3", "mnist", width=4).eval()
    x, y = torch.rand(3, 1, 28, 28), torch.tensor([0, 1, 2])
    bm = BoundedModule(model)
    for spec in (LinfBall(0.05), L2Ball(0.3)):
        exact = crown_margins(bm, x.double(), y, spec, method="ibp", sound="fp64")
        lowered = crown_margins(bm, x, y, spec, method="ibp", sound="fp32")
        assert lowered.dtype == torch.float32
        assert (lowered.double() <= exact).all()
        assert torch.allclose(lowered.double(), exact, atol=1e-4, rtol=1e-4)


def test_fast_and_sound_together_are_refused(run_dir, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["certify", run_dir, "--fast", "--sound", "fp32"])
    err = capsys.readouterr().err
    assert exit.value.code != 0 and "contradict" in err and len(err.strip().splitlines()) == 1, err


def test_alpha_crown_cascade_certifies_at_least_what_crown_does(run_dir, tmp_path):
    eps = {"inf": 0.08, "2": 0.5}
    crown = certify_run(run_dir, eps, "crown", limit=8, out_dir=str(tmp_path / "crown"), pgd_steps=1, curve=())
    alpha = certify_run(run_dir, eps, "alpha-crown", limit=8, out_dir=str(tmp_path / "alpha"), pgd_steps=1, curve=())
    for norm in eps:
        assert crown[f"certified_{norm}"] <= alpha[f"certified_{norm}"] <= alpha[f"pgd_{norm}"]
    assert set(alpha["seconds_per_image"]) == {"pgd", "ibp", "crown-ibp", "crown", "alpha-crown"}


def test_alpha_intermediate_off_skips_the_second_alpha_pass(run_dir, tmp_path, capsys):
    from cure_fast.certification.evaluate import cascade_stages
    full = [(m, o.get("alpha_intermediate")) for m, o, _ in cascade_stages(("ibp", "crown", "alpha-crown"), True)]
    assert full == [("crown", None), ("alpha-crown", False), ("alpha-crown", True)]
    assert [m for m, _, _ in cascade_stages(("ibp", "crown", "alpha-crown"), False)] == ["crown", "alpha-crown"]
    main(["certify", run_dir, "--norms", "inf:0.08", "--limit", "4", "--out", str(tmp_path), "--pgd-steps", "1",
          "--method", "alpha-crown", "--no-alpha-intermediate", "--no-curve", "--no-progress"])
    assert json.loads((tmp_path / "summary.json").read_text())["alpha_intermediate"] is False
    main(["certify", run_dir, "--norms", "inf:0.08", "--limit", "2", "--out", str(tmp_path / "crown"), "--pgd-steps",
          "1", "--method", "crown", "--no-alpha-intermediate", "--no-curve", "--no-progress"])
    assert "note: --no-alpha-intermediate sets α-CROWN's search; --method crown has none" in capsys.readouterr().err


def test_info_lists_the_backends_of_every_device(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert "backends on cpu: torch" in out and "default:" in out


@pytest.mark.parametrize("signame, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_certification_is_one_line_and_leaves_no_empty_report_folder(run_dir, tmp_path, signame, status):
    """The signal arrives as the first report file is about to be written (fault injection)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("certify-*"))
    before = sorted(os.listdir(run))
    stopped = cli(["certify", str(run), "--limit", "4", "--pgd-steps", "1", "--no-curve", "--no-progress"],
                  fault=f"before:per_sample.csv={signame}")
    assert stopped.returncode == status, stopped.stderr
    assert_one_line(stopped.stderr, f"stopped by {signame} before the report was finished", "run the command again")
    assert sorted(os.listdir(run)) == before


@pytest.mark.parametrize("earlier_model", [False, True])
def test_certifying_an_unfinished_run_says_so(run_dir, tmp_path, capsys, earlier_model):
    """An unfinished run: its checkpoint is certified, with a note and the epochs in the summary; also
    when the run finished before and was resumed for more epochs (its earlier model.pt is older)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("certify-*", *(() if earlier_model else ("model.pt",))))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    model = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}  # newer weights
    torch.save({**state, "model": model, "epoch": 1}, run / "checkpoint.pt")
    summary = certify_run(str(run), {"inf": 0.05}, "ibp", limit=2, out_dir=str(tmp_path / "out"), pgd_steps=1, curve=())
    err = capsys.readouterr().err
    assert "is an unfinished run's checkpoint (1 of 2 epochs trained)" in err and len(err.splitlines()) == 1
    assert summary["epochs_trained"] == 1
    loaded = load_trained(str(run), torch.device("cpu"))[0]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.items())


def test_a_finished_run_with_a_broken_checkpoint_is_certified_from_its_model(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("certify-*"))
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    model, _, epochs = load_trained(str(run), torch.device("cpu"))
    assert epochs is None and all(torch.equal(a, b) for a, b in zip(
        model.state_dict().values(), load_trained(run_dir, torch.device("cpu"))[0].state_dict().values()))
    (run / "model.pt").unlink()
    with pytest.raises(ValueError, match="checkpoint.pt"):
        load_trained(str(run), torch.device("cpu"))


def test_times_say_how_many_bounds_a_later_stage_ran_on():
    summary = {"images": 100, "eps": {"inf": 0.1, "2": 0.5}, "precision": "fp64 (rounding bounded)",
               "seconds_per_image": {"pgd": 0.001, "ibp": 0.002, "crown": 0.004},
               "bounded": {"ibp": 200, "crown": 10}}
    text = format_times(summary)
    assert text.startswith("time per test image: pgd 1 ms, ibp 2 ms, crown 4 ms (10 of 200 bounds, 40 ms each)")
    assert text.endswith("total 7 ms (fp64 (rounding bounded))")


@pytest.mark.parametrize("sound", [True, "fp32", False])
def test_a_sample_the_model_misclassifies_is_never_counted_certified(sound):
    """The sound fp64 mode bounds a float64 copy: x + 1e8 - 1e8 is 1 there and 0 in the float32 model,
    which predicts class 1; the copy's IBP margin 0.49 > 0 counted the sample certified (and in union)."""
    from cure_fast.certification.evaluate import evaluate
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 2), torch.nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model[1].bias.copy_(torch.tensor([1e8, 0.5]))
        model[2].weight.copy_(torch.eye(2))
        model[2].bias.copy_(torch.tensor([-1e8, 0.0]))
    x, y = torch.ones(1, 1, 1, 1), torch.tensor([0])
    assert model(x).argmax(1).item() == 1
    result = evaluate(model, x, y, {"inf": 0.01, "2": 0.01}, method="crown", pgd_steps=2, sound=sound)
    summary = result.summary()
    assert summary["clean"] == 0 and summary["certified_inf"] == summary["certified_2"] == summary["union"] == 0
    assert result.certified_by == {"inf": [""], "2": [""]}


def test_an_eps_of_an_unknown_norm_from_python_is_a_clear_error(run_dir, tmp_path):
    from cure_fast.errors import ConfigError
    with pytest.raises(ConfigError, match=r"eps names the norm '3'; norms are 'inf', '2', '1'"):
        certify_run(run_dir, eps={"3": 0.1}, limit=2, out_dir=str(tmp_path / "report"))
    assert not (tmp_path / "report").exists()
