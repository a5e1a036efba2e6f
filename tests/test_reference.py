"""The reference code's procedures: its l2 attack stays in the l∞ box of radius eps₂ (not the l2
ball), its small box, the PGD step decay, its eps schedules (by hand from its formula), the
regularizer while eps = 0, the shrinking box in the training step, and a run with all of them."""
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cure_fast import models
from cure_fast.config import from_dict
from cure_fast.engine.shrink import ShrinkBox
from cure_fast.specs import LinfBall
from cure_fast.training import objectives, reference
from cure_fast.training.attacks import pgd_batched
from cure_fast.training.batch import Objective
from cure_fast.training.trainer import Trainer

from faultkit import tiny_config, write_tiny_mnist


def test_reference_l2_attack_stays_in_the_box_not_the_ball():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 3, (32,))
    eps = 0.5
    point = reference.l2_attack(model, x, y, eps, steps=8)
    assert ((point - x).abs() <= eps + 1e-6).all() and point.min() >= 0 and point.max() <= 1
    assert ((point - x).flatten(1).norm(dim=1) > eps + 1e-6).any()  # it leaves the l2 ball, as the reference does
    box = reference.small_box(x, point, eps, 1e-5 * eps)
    assert isinstance(box, LinfBall)


def test_step_decay_shrinks_the_last_steps():
    x = torch.zeros(1, 4)
    seen = []

    def objective(p):
        seen.append(p.detach().clone())
        return p.sum(1)
    pgd_batched(objective, x, [LinfBall(1.0)], steps=10, random_start=False, step_sizes=[0.01],
                decay_at=(0.5, 0.8, 0.9))
    moves = [(b - a).abs().max().item() for a, b in zip(seen[1:-1], seen[2:-1])]
    assert moves[0] > 5 * moves[-1]


def test_exp_schedule_by_hand():
    """start 10, end 30: o = 9, switch s = 9 + floor(21 / 4) = 14, a = 1 / ((30 - 14) 4 5^3 + 5 5^3) = 1 / 8625."""
    ramp = [objectives.eps_exp_ramp(t, 10, 30, 1.0) for t in range(0, 33)]
    assert ramp[9] == 0.0 and ramp[10] == pytest.approx(1 / 8625)            # a (10 - 9)^4: > 0 at the start
    assert ramp[14] == pytest.approx(625 / 8625)                              # a 5^4, the switch
    assert ramp[22] == pytest.approx((625 + 8000 * 8 / 16) / 8625)            # linear: 625/8625 + (8000/8625) 8/16
    assert ramp[29] == pytest.approx((625 + 8000 * 15 / 16) / 8625)
    assert ramp[30] == ramp[32] == 1.0
    assert ramp[15] - ramp[14] == pytest.approx(4 * 5 ** 3 / 8625)            # the slope is continuous at s
    assert all(b >= a for a, b in zip(ramp, ramp[1:]))


def test_exp_schedule_of_a_short_ramp_is_linear():
    assert [objectives.eps_exp_ramp(t, 2, 4, 0.3) for t in range(6)] == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0.3])


def test_linear_schedule_by_hand():
    assert [objectives.eps_linear_ramp(t, 4, 12, 0.4) for t in (3, 4, 8, 11, 12, 20)] == pytest.approx(
        [0, 0, 0.2, 0.35, 0.4, 0.4])


def _schedule(**changes):
    config = from_dict({**dict(method="sabr", norms=["inf", "2"], epochs=6, eps_inf=0.1, eps_2=0.5), **changes})
    return types.SimpleNamespace(config=config, steps_per_epoch=4, step=0)


def test_trainer_eps_follows_the_reference_numbering():
    """A fresh reference run counts epochs from 1 (--start_epoch_eps 2, --end_epoch_eps 4 there; its step
    index is ours + 4 with 4 steps per epoch): in its index o = 7, s = 7 + floor(9 / 4) = 9,
    a = eps / ((16 - 9) 4 2^3 + 2 2^3) = eps / 240. Ours: eps_start_epoch 1, eps_end_epoch 3."""
    t = _schedule(eps_schedule="exp", eps_start_epoch=1, eps_end_epoch=3)
    got = [Trainer.eps(t, "inf", step) for step in range(14)]
    assert got[:4] == [0.0] * 4
    assert got[4] == pytest.approx(0.1 / 240) and got[5] == pytest.approx(0.1 * 16 / 240)
    assert got[8] == pytest.approx(0.1 * (16 + 224 * 3 / 7) / 240) and got[11] == pytest.approx(0.1 * 208 / 240)
    assert got[12] == got[13] == 0.1 and Trainer.eps(t, "2", 12) == 0.5
    smooth = _schedule(eps_start_epoch=1, eps_end_epoch=3)
    assert [Trainer.eps(smooth, "inf", s) for s in range(14)] == [objectives.eps_ramp(s, 4, 12, 0.1) for s in range(14)]


@pytest.mark.parametrize("changes, eps, weight", [
    ({}, 0.0, 0.0), ({"reg_zero_eps_box": 1e-6}, 0.0, 0.5), ({"reg_zero_eps_box": 1e-6}, 0.05, 0.25),
    ({"reg_zero_eps_box": 1e-6}, 0.1, 0.0), ({"reg_zero_eps_box": 1e-6, "norms": ["2"], "reg_placement": "reference"},
                                              0.0, 0.0),
])
def test_regularizer_weight_while_eps_is_zero(changes, eps, weight):
    t = _schedule(**changes)
    eps_of = {n: eps * t.config.train_eps(n) / t.config.eps_inf for n in t.config.norms}
    assert Trainer._regularizer_weight(t, eps_of) == pytest.approx(weight)


def _objective(**changes):
    torch.manual_seed(0)
    config = from_dict({**dict(method="sabr", norms=["inf", "2"], model="mlp", model_args={"hidden": [16, 16]},
                               combine="max"), **changes})
    model = models.build("mlp", "mnist", hidden=[16, 16])
    return Objective(model, config), model, torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))


def test_zero_eps_step_adds_the_regularizer_on_the_tiny_box_and_the_l1_penalty():
    objective, model, x, y = _objective(reg_zero_eps_box=1e-6, l1_penalty=1e-5)
    loss, logits, margins = objective(x, y, [], regularizer_weight=0.5)
    out = objective.bounded.propagate(x, [LinfBall(1e-6)])
    reg = objectives.warmup_regularizer(out, 0, objective.bounded.first_affine, 0.5)
    expected = F.cross_entropy(model(x), y) + 0.5 * reg + 1e-5 * objectives.l1_norm(model)
    assert margins == [] and torch.isfinite(reg) and reg > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    plain, _, _ = _objective(l1_penalty=1e-5)[0](x, y, [], regularizer_weight=0.5)  # no box: no regularizer
    assert plain.item() == pytest.approx((F.cross_entropy(model(x), y) + 1e-5 * objectives.l1_norm(model)).item())


@pytest.mark.parametrize("norms, combine, shrink_norms, specs", [
    (["inf", "2"], "max", ["inf"], (0,)), (["inf", "2"], "random", ["inf", "2"], (0, 1)),
    (["2"], "joint", ["inf"], None),
])
def test_the_objective_shrinks_the_configured_sets(norms, combine, shrink_norms, specs):
    objective = _objective(norms=norms, combine=combine, shrink_ratio=0.4, shrink_norms=shrink_norms)[0]
    assert objective.shrink == (None if specs is None else ShrinkBox(0.4, "to_zero", "cross", specs))


def test_a_shrinking_step_lowers_the_robust_loss_and_trains():
    objective, model, x, y = _objective()
    shrinking = _objective(shrink_ratio=0.4)[0]
    model.eval()
    shrinking.model.load_state_dict(model.state_dict())
    shrinking.model.eval()
    specs = [LinfBall(0.1), LinfBall(0.05)]
    sound, _, sound_margins = objective(x, y, specs)
    shrunk, _, shrunk_margins = shrinking(x, y, specs)
    assert shrunk.item() < sound.item()
    assert (shrunk_margins[0] >= sound_margins[0] - 1e-5).all() and torch.allclose(shrunk_margins[1], sound_margins[1])
    shrunk.backward()
    assert all(torch.isfinite(p.grad).all() for p in shrinking.model.parameters())


def test_a_run_with_every_reference_option(tmp_path):
    """Epoch 0 at eps = 0 (regularizer on the tiny box), the exp ramp in epoch 1, gradient projection
    only from gp_start_epoch 3 although eps is full from epoch 2, the shrinking box throughout."""
    data = write_tiny_mnist(tmp_path / "data")
    options = dict(eps_schedule="exp", reg_zero_eps_box=1e-6, reg_placement="reference", l1_penalty=1e-5,
                   shrink_ratio=0.4, gp_beta=0.5, gp_start_epoch=3)
    config = from_dict(tiny_config(data, tmp_path / "out", method="sabr", combine="max", epochs=4, eps_start_epoch=1,
                                   eps_end_epoch=2, pgd_steps=2, eval_every=4, **options,
                                   sabr_l2_set="reference"))  # (its l2 set is fast: no ball projection)
    trainer = Trainer(config)
    assert trainer.eps("inf", 0) == 0.0 and trainer.eps("inf", trainer.steps_per_epoch) > 0
    trainer.run()
    history = trainer.history
    assert all(math.isfinite(m["train_loss"]) for m in history)
    assert [("natural_train_loss" in m) for m in history] == [False, False, False, True]
    assert history[0]["train_certified_inf"] == 0.0  # eps = 0: no robust set, no certificate counted
