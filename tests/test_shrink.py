"""The shrinking box (training only, unsound by design): what it does to a ReLU's box, by hand as the
CURE reference code does it; shrunk bounds lie inside the sound ones; other sets and the recorded
pre-activation bounds are untouched; gradients flow; the fused groups are split at the ReLU; and
certification never asks for it."""
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from cure_fast import BoundedModule, L2Ball, LinfBall
from cure_fast.engine.shrink import ShrinkBox

ROOT = Path(__file__).resolve().parents[1]


def _one_relu():
    """x (1, 1) -> pre-activations [x - 1.5 + ..]: with x in [0.5, 1.5] (LinfBall 0.5 around 1, no
    domain) the three neurons get [-1, 2] (crossing), [1, 3] (active) and [-3, -1] (dead)."""
    linear = nn.Linear(1, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0], [2.0], [2.0]]))
        linear.bias.copy_(torch.tensor([-2.5, -0.0, -4.0]))
    return BoundedModule(nn.Sequential(linear, nn.ReLU()), backend="torch"), torch.ones(1, 1)


def _relu_box(shrink):
    model, x = _one_relu()
    pre = model.propagate(x, [LinfBall(0.5, domain=None)])
    assert [v.tolist() for v in pre.preactivation_bounds(0)[0]] == [[[-1.0, 1.0, -3.0]], [[2.0, 3.0, -1.0]]]
    lower, upper = model.propagate(x, [LinfBall(0.5, domain=None)], shrink=shrink).bounds[0]
    return lower[0].tolist(), upper[0].tolist()


@pytest.mark.parametrize("method, state, lower, upper", [
    # reference to_zero on crossing ReLUs: u <- u (1 - ratio / 2) = 2 * 0.8; the stable ones unchanged
    ("to_zero", "cross", [0.0, 1.0, 0.0], [1.6, 3.0, 0.0]),
    ("std", "cross", [0.0, 1.0, 0.0], [1.4, 3.0, 0.0]),          # [-1, 2] -> [-0.4, 1.4]
    ("std_upper", "cross", [0.0, 1.0, 0.0], [1.4, 3.0, 0.0]),    # [-1, 2] -> [-1, 1.4]
    ("to_zero", "above", [0.0, 1.0, 0.0], [2.0, 2.4, 0.0]),      # only [1, 3] -> [1, 2.4]
    ("std", "all", [0.0, 1.4, 0.0], [1.4, 2.6, 0.0]),            # [1, 3] -> [1.4, 2.6], [-3, -1] -> [-2.6, -1.4]
])
def test_the_relu_box_shrinks_as_the_reference_code_does(method, state, lower, upper):
    got_lower, got_upper = _relu_box(ShrinkBox(0.4, method, state))
    assert got_lower == pytest.approx(lower) and got_upper == pytest.approx(upper)


def test_the_upper_end_never_goes_below_the_lower_one():
    lower, upper = ShrinkBox(1.0, "to_zero", "above").interval(torch.tensor([2.0]), torch.tensor([3.0]))
    assert lower.item() == 2.0 and upper.item() == 2.0  # 3 * (1 - 1/2) = 1.5 < 2: held at the lower end


def _network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16),
                          nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("state", ["cross", "above", "all"])
def test_shrunk_bounds_lie_inside_the_sound_ones_and_other_sets_are_untouched(state):
    bounded = BoundedModule(_network(), backend="torch")
    x, y = torch.rand(6, 1, 6, 6), torch.randint(0, 5, (6,))
    specs = [LinfBall(0.1), L2Ball(0.5)]
    sound = bounded.propagate(x, specs, y)
    shrunk = bounded.propagate(x, specs, y, shrink=ShrinkBox(0.4, "to_zero", state, specs=(0,)))
    assert sound.sound and not shrunk.sound
    lower, upper = sound.bounds[0]
    s_lower, s_upper = shrunk.bounds[0]
    assert (s_lower >= lower - 1e-5).all() and (s_upper <= upper + 1e-5).all()
    assert (s_upper - s_lower).sum() < (upper - lower).sum()
    assert (shrunk.margins[0] >= sound.margins[0] - 1e-5).all()
    assert torch.equal(shrunk.logits, sound.logits)
    for a, b in zip(sound.bounds[1], shrunk.bounds[1]):  # the l2 set is not shrunk
        assert torch.allclose(a, b, atol=1e-6)
    first_sound, first_shrunk = sound.preactivation_bounds(0)[0], shrunk.preactivation_bounds(0)[0]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(first_sound, first_shrunk))  # recorded unshrunk


def test_the_fused_group_is_split_at_the_relu_and_matches_a_hand_computation():
    """Linear -> BatchNorm (eval) -> ReLU -> Linear runs fused without shrinking; with it the ReLU runs
    on its own after the box is shrunk: the output equals shrinking the recorded pre-activation box by
    hand, then the ReLU and the last Linear in interval arithmetic."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)).eval()
    bounded = BoundedModule(model, backend="torch")
    x = torch.rand(5, 1, 8)
    shrink = ShrinkBox(0.4)
    lower, upper = bounded.propagate(x, [LinfBall(0.2)]).preactivation_bounds(0)[0]
    lower, upper = shrink.interval(lower, upper)
    c, r = (upper.relu() + lower.relu()) / 2, (upper.relu() - lower.relu()) / 2
    last = model[-1]
    c, r = c @ last.weight.T + last.bias, r @ last.weight.abs().T
    got_lower, got_upper = bounded.propagate(x, [LinfBall(0.2)], shrink=shrink).bounds[0]
    assert torch.allclose(got_lower, c - r, atol=1e-5) and torch.allclose(got_upper, c + r, atol=1e-5)


def test_gradients_flow_through_the_shrunk_box():
    model = _network().train()
    bounded = BoundedModule(model, backend="torch")
    x = torch.rand(6, 1, 6, 6)

    def grads(shrink):
        model.zero_grad()
        lower, upper = bounded.propagate(x, [LinfBall(0.1)], shrink=shrink).bounds[0]
        (upper - lower).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    shrunk, sound = grads(ShrinkBox(0.4)), grads(None)
    assert all(torch.isfinite(g).all() for g in shrunk)
    assert any(g.abs().sum() > 0 for g in shrunk)
    assert any(not torch.allclose(a, b) for a, b in zip(shrunk, sound))


@pytest.mark.parametrize("make, error", [
    (lambda: ShrinkBox(0.0), "ratio must lie in \\(0, 1\\]"), (lambda: ShrinkBox(1.5), "ratio"),
    (lambda: ShrinkBox(0.4, method="random_loc"), "method must be one of to_zero"),
    (lambda: ShrinkBox(0.4, relu_state="wide"), "relu_state must be one of cross"),
])
def test_bad_shrink_boxes_are_clear_errors(make, error):
    with pytest.raises(ValueError, match=error):
        make()


def test_propagate_checks_its_shrink_argument():
    bounded = BoundedModule(_network(), backend="torch")
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(ValueError, match="name specs that were not given"):
        bounded.propagate(x, [LinfBall(0.1)], shrink=ShrinkBox(0.4, specs=(1,)))
    with pytest.raises(TypeError, match="ShrinkBox or None"):
        bounded.propagate(x, [LinfBall(0.1)], shrink=0.4)


def test_certification_never_asks_for_a_shrinking_box():
    """The certification package and CROWN neither build a ShrinkBox nor pass ``shrink=``: the shrunk
    box cannot reach a certificate."""
    sources = list((ROOT / "cure_fast" / "certification").glob("*.py")) + [ROOT / "cure_fast" / "engine" / "crown.py"]
    assert sources
    for path in sources:
        assert not re.search(r"ShrinkBox|shrink\s*=|engine\.shrink|shrink_ratio", path.read_text()), path
