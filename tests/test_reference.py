"""The reference code's procedures: its l2 attack stays in the l∞ box of radius eps₂ (not the l2
ball), its small box, and the PGD step decay."""
import torch
from torch import nn

from cure_fast.specs import LinfBall
from cure_fast.training import reference
from cure_fast.training.attacks import pgd_batched


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
