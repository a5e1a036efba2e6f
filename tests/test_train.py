"""The trainer: every method trains, the formulas, exact resume, NaN handling, DDP equivalence."""
import dataclasses
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall
from cure_fast.config import TrainConfig, from_dict, load_config, presets
from cure_fast.reporting import format_table
from cure_fast.specs import contains
from cure_fast.training import attacks, objectives
from cure_fast.training.trainer import Trainer, TrainingError, small_set

TINY = dict(dataset="mnist", model="mlp", model_args={"hidden": [32]}, train_limit=256, eval_limit=64,
            batch_size=64, epochs=4, eps_start_epoch=0, eps_end_epoch=1, eps_inf=0.05, eps_2=0.3, lr=2e-3,
            pgd_steps=3, eval_pgd_steps=3, progress=False, eval_every=4)


def _config(tmp_path, **changes):
    return from_dict({**TINY, "out_dir": str(tmp_path), **changes})


METHODS = [dict(method="natural"), dict(method="pgd", norms=["inf", "2"]), dict(method="ibp"),
           dict(method="ibp", norms=["2"]), dict(method="sabr", norms=["inf", "2"], combine="max"),
           dict(method="sabr", norms=["inf", "2"], combine="random", sabr_l2_set="box"),
           dict(method="ibp", norms=["inf", "2"], combine="joint", align_lambda=0.5, gp_beta=0.5)]


@pytest.mark.parametrize("changes", METHODS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_each_method_trains_with_finite_decreasing_loss_and_sound_certificates(tmp_path, changes):
    trainer = Trainer(_config(tmp_path, **changes))
    summary = trainer.run()
    loss = [m["train_loss"] for m in trainer.history]
    assert all(math.isfinite(v) for v in loss)
    assert loss[-1] < loss[1], f"loss did not decrease after the ramp: {loss}"
    evaluation = trainer.evaluate()
    for norm in ("inf", "2"):
        assert not (evaluation.certified[norm] & ~evaluation.pgd_robust[norm]).any(), "PGD broke a certificate"
        assert summary[f"certified_{norm}"] <= summary[f"pgd_{norm}"] <= summary["clean"]
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "checkpoint.pt", "model.pt", "curves.png",
                 "summary.png", "summary.json", "test_per_sample.csv"):
        assert os.path.isfile(os.path.join(trainer.run_dir, name)), name


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    changes = dict(method="sabr", norms=["inf", "2"], combine="random", epochs=3, eps_end_epoch=2, eval_every=1)
    whole = Trainer(_config(tmp_path / "a", **changes))
    whole.run()
    first = Trainer(_config(tmp_path / "b", **changes))
    first.run(stop_after=1)
    resumed = Trainer(_config(tmp_path / "b", **changes), first.run_dir, resume=True)
    assert resumed.epoch == 1
    resumed.run()
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [m["train_loss"] for m in whole.history] == [m["train_loss"] for m in resumed.history]


def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    trainer = Trainer(_config(tmp_path, method="ibp", epochs=3))
    trainer.run(stop_after=1)
    saved = torch.load(trainer._checkpoint_path(), weights_only=True)
    with torch.no_grad():
        trainer.model[-1].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"loss is nan .* last good checkpoint .*checkpoint.pt \(epoch 1\)"):
        trainer.run()
    kept = torch.load(trainer._checkpoint_path(), weights_only=True)
    assert kept["epoch"] == 1
    assert all(torch.equal(kept["model"][k], v) for k, v in saved["model"].items())


def test_gradient_projection_formula_by_hand():
    theta0 = {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([0.0])}
    ct = {"w": torch.tensor([2.0, 1.0]), "v": torch.tensor([1.0])}
    nt = {"w": torch.tensor([2.0, 2.0]), "v": torch.tensor([-1.0])}
    merged = objectives.gradient_projection(theta0, ct, nt, beta=0.5)
    cos = 1 / math.sqrt(2)  # between (1, 0) and (1, 1)
    expected_w = torch.tensor([1.0, 1.0]) + 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * cos * torch.tensor([1.0, 1.0])
    torch.testing.assert_close(merged["w"], expected_w)
    torch.testing.assert_close(merged["v"], torch.tensor([0.5]))  # cos = -1: the natural update is dropped


def test_alignment_formula_by_hand():
    y = torch.tensor([0, 1])
    ref = torch.tensor([[0.0, 1.0, 2.0], [-1.0, 0.0, 1.0]])  # sample 0 certified, sample 1 not
    other = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, 0.0]])
    p = torch.softmax(-ref[0], 0)
    q = torch.softmax(-other[0], 0)
    expected = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(objectives.alignment(ref, other, y), expected)
    assert objectives.alignment(ref[1:], other[1:], y[1:]) == 0


def test_combinations():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([3.0, 2.0])
    assert objectives.combine([a, b], "joint", 0.25, None) == 0.75 * 2.5 + 0.25 * 2.5
    assert objectives.combine([a, b], "max", 0.5, None) == 3.5
    assert objectives.combine([a, b], "random", 0.5, torch.tensor([1, 0])) == 3.5


def test_eps_ramp_is_exponential_then_linear_continuous_and_reaches_eps():
    values = [objectives.eps_ramp(s, 10, 110, 0.3) for s in range(0, 130)]
    assert values[:11] == [0.0] * 11 and values[110:] == [0.3] * 20
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(d >= 0 for d in steps)
    assert max(abs(x - y) for x, y in zip(steps[35:], steps[36:109])) < 1e-9  # linear part
    assert steps[11] < steps[20] < steps[34]  # accelerating first quarter
    assert abs(steps[34] - steps[36]) < 1e-3 * 0.3  # no kink at the switch


def test_ibp_init_scales_all_but_the_last_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 4, 256), nn.Linear(256, 10))
    last = model[4].weight.clone()
    objectives.ibp_init(model)
    for layer in (model[0], model[3]):
        fan_in = layer.weight[0].numel()
        assert abs(layer.weight.std().item() / (math.sqrt(2 * math.pi) / fan_in) - 1) < 0.05
    assert torch.equal(model[4].weight, last)


def test_warmup_regularizer_by_hand():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.tensor([[0.2, 0.3]])
    out = BoundedModule(model).propagate(x, [LinfBall(0.1, domain=None)])
    reg = objectives.warmup_regularizer(out, 0, 0, tol=0.5)
    centre, radius = torch.tensor([0.7, -0.2, 0.5]), torch.tensor([0.1, 0.1, 0.2])
    tight = max(0.5 - 0.1 / radius.mean().item(), 0) / 0.5
    active, inactive = torch.tensor([1.0, 0, 1]), torch.tensor([0.0, 1, 0])
    mean_ratio = (centre * active).mean() / -(centre * inactive).mean()
    mean_ratio = min(mean_ratio, 1 / mean_ratio)
    spread = (centre - centre.mean()) ** 2
    var_ratio = (spread * active).sum() / (spread * inactive).sum()
    var_ratio = min(var_ratio, 1 / var_ratio)
    balance = (max(0.5 - mean_ratio, 0) + max(0.5 - var_ratio, 0)) / 0.5
    torch.testing.assert_close(reg, (tight + balance).clone().detach().float())


@pytest.mark.parametrize("norm", ["inf", "2", "2box"])
def test_sabr_small_sets_lie_in_the_eps_set(tmp_path, norm):
    changes = dict(method="sabr", norms=["inf" if norm == "inf" else "2"], sabr_l2_set="box" if norm == "2box" else "ball")
    config = _config(tmp_path, **changes)
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0
    eps = 0.3 if norm == "inf" else 1.5
    big = LinfBall(eps) if norm == "inf" else L2Ball(eps)
    point = attacks.random_point(big, x)
    small = small_set(config, x, "inf" if norm == "inf" else "2", eps, point)
    assert small.eps == pytest.approx(config.sabr_lambda * eps)
    for _ in range(20):
        inside = attacks.random_point(small, small.center)
        if norm != "2box":  # the box variant (as the CURE reference code) is not contained in the l2 ball
            assert contains(big, x, inside, tol=1e-5).all()


def test_l2_pgd_stays_in_ball_and_domain_and_finds_the_linear_worst_case():
    torch.manual_seed(0)
    x = torch.rand(6, 30)
    x[:, :10] = 0.98
    w = torch.randn(30)
    spec = L2Ball(0.8)
    best = attacks.pgd(lambda p: p @ w, x, spec, steps=200, step_size=0.5)
    assert contains(spec, x, best, tol=1e-6).all()
    # the exact maximizer over ball ∩ box: p(t) = clip(x + t w) with |p(t) - x| = eps, by bisection on t
    low, high = torch.zeros(6, 1), torch.full((6, 1), 100.0)
    for _ in range(200):
        t = (low + high) / 2
        far = ((x + t * w).clamp(0, 1) - x).norm(dim=1, keepdim=True) > 0.8
        low, high = torch.where(far, low, t), torch.where(far, t, high)
    exact = (x + low * w).clamp(0, 1) @ w
    torch.testing.assert_close(best @ w, exact, rtol=0, atol=1e-4)


def test_presets_load_and_validate(tmp_path):
    pretrained = tmp_path / "model.pt"
    pretrained.write_bytes(b"")
    for name in presets():
        config = load_config(name, overrides=[f"init_from={pretrained}"] if "finetune" in name else [])
        assert config.name == name
    cifar = load_config("cifar10-2-cure")
    assert cifar.eps_inf == pytest.approx(2 / 255) and cifar.batch_size == 128 and cifar.lr_milestones == [119, 139]  # 0-based


@pytest.mark.parametrize("override, match", [
    ("method=ibpp", "method='ibpp'"), ("norms=[inf, 1]", "norms"), ("eps_inf=-1", "eps_inf"),
    ("alpha=2", "alpha"), ("epochs=0", "epochs"), ("bogus=1", "unknown key"), ("sabr_lambda=0", "sabr_lambda"),
    ("lr_milestones=[5, 2]", "increasing"), ("align_lambda=1", "needs both norms"), ("init_from=/nope", "not a file"),
])
def test_bad_configs_are_clear_errors(override, match):
    with pytest.raises(ValueError, match=match):
        load_config("mnist-demo-inf", overrides=[override])


def test_fractions_in_overrides():
    assert load_config("mnist-demo-inf", overrides=["eps_inf=8/255"]).eps_inf == pytest.approx(8 / 255)


def test_format_table():
    table = format_table({"a": {"clean": 0.5, "union": 0.25}, "b": {"clean": 0.75}}, caption="on 8 images")
    assert "50.0%" in table and "25.0%" in table and "nan" in table  # a value a row lacks
    assert table.splitlines()[0] == "on 8 images"
    assert "PGD" not in table and "cert" not in table  # columns no row has are left out (no nan% columns)


def _ddp_worker(rank, world, rendezvous, config, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        trainer = Trainer(config, os.path.join(config.out_dir, "ddp"))
        trainer.run()
        if rank == 0:
            torch.save(trainer.model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_ddp_with_two_cpu_processes_matches_a_single_process(tmp_path):
    config = _config(tmp_path, method="ibp", norms=["inf", "2"], epochs=2, eval_every=2, model_args={"hidden": [16]})
    single = Trainer(config, str(tmp_path / "single"))
    single.run()
    out = str(tmp_path / "ddp.pt")
    rendezvous = str(tmp_path / "rendezvous")  # a file, not a port: a free port probed here can be taken before use
    mp.spawn(_ddp_worker, args=(2, rendezvous, config, out), nprocs=2, join=True)
    for (name, a), b in zip(single.model.state_dict().items(), torch.load(out, weights_only=True).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_list_keys_names_every_config_key_with_its_default(capsys):
    from cure_fast.cli import main
    main(["train", "--list-keys"])
    lines = capsys.readouterr().out.splitlines()
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert [line.split(" ", 1)[0] for line in lines] == fields
    assert "lr (default 0.0005): a number > 0" in lines[fields.index("lr")]
    assert "init_from (default null): a non-empty string, or null — fine-tune" in lines[fields.index("init_from")]


def test_settings_that_cannot_act_are_noted_and_no_preset_has_one(tmp_path):
    from cure_fast.config import inert_settings
    config = load_config("mnist-demo-inf", overrides=["combine=random", "lr_milestones=[2, 100]", "sabr_l2_set=box"])
    assert inert_settings(config) == [
        "combine=random combines two norms; norms=[inf] trains one",
        "lr_milestones [100] lie at or past epochs=3 (0-based epochs): they never apply",
        "sabr_l2_set set the small sets of method=sabr, not method=ibp"]
    two = load_config("mnist-demo-cure", overrides=["alpha=0.3"])
    assert inert_settings(two) == ["alpha=0.3 weighs the norms of combine=joint only, not combine=max"]
    pretrained = tmp_path / "model.pt"
    pretrained.write_bytes(b"")
    for name in presets():
        assert not inert_settings(load_config(name, overrides=[f"init_from={pretrained}"] if "finetune" in name else []))


def test_a_second_run_of_a_name_ending_in_a_number_gets_an_unambiguous_folder(tmp_path):
    from cure_fast.training.rundir import new_path
    assert new_path(str(tmp_path), "mnist-demo-2") == str(tmp_path / "mnist-demo-2")
    (tmp_path / "mnist-demo-2").mkdir()
    assert new_path(str(tmp_path), "mnist-demo") == str(tmp_path / "mnist-demo")  # not taken by the l2 demo
    (tmp_path / "mnist-demo").mkdir()
    assert new_path(str(tmp_path), "mnist-demo") == str(tmp_path / "mnist-demo-run2")
    assert new_path(str(tmp_path), "mnist-demo-2") == str(tmp_path / "mnist-demo-2-run2")
    (tmp_path / "mnist-demo-2-run2").mkdir()
    assert new_path(str(tmp_path), "mnist-demo-2") == str(tmp_path / "mnist-demo-2-run3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", [LinfBall(0.0017293476), LinfBall(0.3), LinfBall(0.1, domain=None),
                                  L2Ball(0.3), L2Ball(0.7, domain=None), L1Ball(0.9), L1Ball(0.2, domain=None)],
                         ids=str)
def test_projected_points_are_in_the_set_exactly(spec, dtype):
    """Every projected point in the set of the spec's own eps, its distance to x computed in float64 (x ± eps
    rounded to nearest in float32 can fall outside; eps in float32, 0.3 -> 0.30000001, is larger)."""
    from cure_fast.training.attacks import project
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 5, 5, generator=gen, dtype=torch.float64).to(dtype)
    z = x + torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    p = project(spec, x, z)
    assert p.dtype == dtype and contains(spec, x, p).all()
    distance = (p.double() - x.double()).flatten(1).norm(p=spec.p, dim=1)
    assert (distance <= spec.eps).all(), (distance - spec.eps).max()
    if spec.domain is not None:
        assert ((p >= spec.domain[0]) & (p <= spec.domain[1])).all()
    assert (project(spec, x, x) == x).all()


@pytest.fixture
def registered():
    from cure_fast import models
    yield models
    for name in [n for n in models.MODELS if n not in models.BUILT_IN]:
        del models.MODELS[name]


def test_a_registered_model_trains_and_certifies_by_name_and_bad_registrations_are_refused(tmp_path, registered):
    from cure_fast.certification.certify import certify_run
    from cure_fast.errors import ConfigError
    from cure_fast.nn import Normalize

    def two_layers(data, hidden=12):
        return nn.Sequential(Normalize(data.mean, data.std), nn.Flatten(),
                             nn.Linear(math.prod(data.shape), hidden), nn.ReLU(), nn.Linear(hidden, data.classes))
    config = dict(model="two-layers", model_args={"hidden": 6}, method="ibp", epochs=1, eval_every=1)
    with pytest.raises(ConfigError, match=r"model=.two-layers.; choose one of cnn7, cnn5, cnn3, mlp"):
        _config(tmp_path, **config)
    assert registered.register("two-layers", two_layers) is two_layers
    with pytest.raises(ConfigError, match=r"model_args.*width"):
        _config(tmp_path, **{**config, "model_args": {"width": 4}})
    trainer = Trainer(_config(tmp_path, **config))
    assert [m.out_features for m in trainer.model if isinstance(m, nn.Linear)] == [6, 10]
    trainer.run()
    summary = certify_run(trainer.run_dir, {"inf": 0.01}, method="crown", limit=4, pgd_steps=1, curve=())
    assert summary["images"] == 4 and summary["model"] == trainer.run_dir
    with pytest.raises(ValueError, match="'cnn3' is a built-in model"):
        registered.register("cnn3", two_layers)
    with pytest.raises(ValueError, match="non-empty string"):
        registered.register(" ", two_layers)
    with pytest.raises(ValueError, match="model name 'true' reads as True in a config file"):
        registered.register("true", two_layers)
    registered.register("options", lambda data, extra=0, dropout=0.5, act="relu": two_layers(data))
    assert from_dict({**TINY, "model": "options", "model_args": {"extra": 0, "dropout": 0.1}}).model_args["extra"] == 0
    with pytest.raises(ConfigError, match="model_args.*dropout"):
        from_dict({**TINY, "model": "options", "model_args": {"dropout": "abc"}})
    with pytest.raises(TypeError, match="callable"):
        registered.register("x", nn.Linear(2, 2).weight)
    with pytest.raises(TypeError, match="DatasetInfo as its first argument"):
        registered.register("x", lambda **kwargs: None)
    with pytest.raises(TypeError, match="builder 'x': give width a default"):
        registered.register("x", lambda data, width: None)
    registered.register("not-sequential", lambda data: nn.Linear(2, 2))
    with pytest.raises(TypeError, match="built a Linear; the bound layers take an nn.Sequential"):
        registered.build("not-sequential", "mnist")
