"""``cure-fast certify --protocol paper``: the paper's images and eps, and the union table."""
import pytest

from cure_fast.certification.certify import certify_run
from cure_fast.certification.protocol import paper_setting, paper_table
from cure_fast.config import load_config
from cure_fast.errors import ConfigError
from cure_fast.training.trainer import train


@pytest.mark.parametrize("dataset, eps_inf, norms, first, end", [
    ("mnist", 0.1, {"inf": 0.1, "2": 0.5, "1": 1.0}, 0, 1000),
    ("mnist", 0.3, {"inf": 0.3, "2": 1.0, "1": 2.0}, 0, 1000),
    ("cifar10", 2 / 255, {"inf": 2 / 255, "2": 0.25, "1": 0.5}, 0, 1000),
    ("cifar10", 8 / 255, {"inf": 8 / 255, "2": 0.5, "1": 1.0}, 0, 1000),
    ("tinyimagenet", 1 / 255, {"inf": 1 / 255, "2": 36 / 255}, 272, 442),
])
def test_paper_settings(dataset, eps_inf, norms, first, end):
    assert paper_setting(dataset, eps_inf) == (pytest.approx(norms), first, end)


def test_no_paper_setting_is_one_line():
    with pytest.raises(ConfigError, match="no paper setting for mnist with eps_inf 0.2.*drop --protocol and give --norms"):
        paper_setting("mnist", 0.2)


def test_paper_table_layout():
    table = paper_table({"cure": {"clean": 0.5, "certified_inf": 0.25, "certified_2": 0.375, "union": 0.125}},
                        {"inf": 0.1, "2": 0.5, "1": 1.0})
    assert "| model | clean | l∞ (0.1) | l2 (0.5) | l1 (1) | union |" in table
    assert "| cure | 50.0 | 25.0 | 37.5 |  | 12.5 |" in table


def test_certify_with_the_paper_protocol(tmp_path, capsys):
    config = load_config("mnist-demo-cure", overrides=[
        "epochs=1", "eps_end_epoch=1", "eps_inf=0.1", "train_limit=64", "eval_limit=4", f"out_dir={tmp_path}",
        "progress=false", "final_certify=crown", "eval_pgd_steps=1"])
    train(config)
    run = tmp_path / "mnist-demo-cure"
    summary = certify_run(str(run), method="crown", limit=3, pgd_steps=1, curve=(), protocol="paper")
    assert summary["images"] == 3 and summary["eps"] == {"inf": 0.1, "2": 0.5, "1": 1.0}
    assert set(summary) >= {"certified_inf", "certified_2", "certified_1", "union"}
    assert (run / "certify-paper" / "paper_table.md").read_text().count("| mnist-demo-cure |") == 1
    assert "l∞ eps 0.1, l2 eps 0.5, l1 eps 1 (the paper's eps)" in capsys.readouterr().out
    summary = certify_run(str(run), {"2": 0.25}, method="ibp", limit=2, pgd_steps=1, curve=(), protocol="paper")
    assert summary["eps"] == {"inf": 0.1, "2": 0.25, "1": 1.0}
    assert "l2 eps 0.25, l1 eps 1 (the paper's eps; --norms for l2)" in capsys.readouterr().out
