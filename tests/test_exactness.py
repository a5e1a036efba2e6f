"""Exactness: for one affine layer the bounds equal the true extremes, attained at a box corner or
at ``x ± eps W_i / |W_i|_2`` (padded convs under l2 included, border positions too)."""
import pytest
import torch
from torch import nn

from cure_fast import BoundedModule, L2Ball, LinfBall
from cure_fast.nn import Normalize

EXACT = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _rows(model, x):
    """The network as an explicit affine map around one sample x (1, ...): rows (out, in)."""
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view_as(x)).flatten(), x.flatten())
    return jac


def _attained(model, x, points, bound, maximize=True):
    """Check the bound of output neuron o is reached at points[o]."""
    values = model(points).flatten(1)
    diag = values.diagonal()
    torch.testing.assert_close(diag, bound.flatten(), **EXACT)


def test_linear_linf_upper_and_lower_attained_at_corners():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4)).eval()
    x = torch.rand(1, 6) * 0.6 + 0.2
    lower, upper = BoundedModule(model).bounds(x, LinfBall(0.15))
    w = model[0].weight
    _attained(model, x, x + 0.15 * w.sign(), upper)
    _attained(model, x, x - 0.15 * w.sign(), lower)


def test_linear_linf_clipped_by_the_domain_is_exact():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4))
    x = torch.tensor([[0.0, 0.05, 0.5, 0.97, 1.0, 0.3]])
    lower, upper = BoundedModule(model).bounds(x, LinfBall(0.1))
    box_low, box_high = (x - 0.1).clamp(min=0), (x + 0.1).clamp(max=1)
    w = model[0].weight
    _attained(model, x, torch.where(w > 0, box_high, box_low), upper)
    _attained(model, x, torch.where(w > 0, box_low, box_high), lower)


def test_linear_l2_extremes_attained_on_the_sphere_under_normalize():
    torch.manual_seed(2)
    model = nn.Sequential(Normalize([0.3, 0.5], [0.2, 0.7]), nn.Flatten(), nn.Linear(2 * 3 * 3, 5))
    x = torch.rand(1, 2, 3, 3)
    eps = 0.4
    lower, upper = BoundedModule(model).bounds(x, L2Ball(eps, domain=None))
    rows = _rows(model, x)  # (5, 18): the Normalize is folded in
    direction = (rows / rows.norm(dim=1, keepdim=True)).view(5, 2, 3, 3)
    _attained(model, x, x + eps * direction, upper)
    _attained(model, x, x - eps * direction, lower)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 2, 1, 1), (1, 2, 2, 2), (1, 0, 1, 1)])
def test_padded_conv_l2_is_exact_at_every_position(stride, padding, dilation, groups):
    torch.manual_seed(3)
    model = nn.Sequential(Normalize([0.4, 0.6], [0.3, 0.5]),
                          nn.Conv2d(2, 4, 3, stride, padding, dilation, groups))
    x = torch.rand(1, 2, 6, 6)
    eps = 0.3
    lower, upper = BoundedModule(model).bounds(x, L2Ball(eps, domain=None))
    rows = _rows(model, x)
    norms = rows.norm(dim=1)
    torch.testing.assert_close(upper.flatten(), model(x).flatten() + eps * norms, **EXACT)
    torch.testing.assert_close(lower.flatten(), model(x).flatten() - eps * norms, **EXACT)
    points = x + eps * (rows / norms[:, None]).view(-1, *x.shape[1:])
    _attained(model, x, points, upper)


def test_padding_aware_radius_is_smaller_at_the_border_only():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1))
    x = torch.rand(1, 1, 5, 5)
    lower, upper = BoundedModule(model).bounds(x, L2Ball(1.0, domain=None))
    radius = (upper - lower) / 2
    full = model[0].weight.flatten(1).norm(dim=1).view(1, 2, 1, 1).expand_as(radius)
    interior = torch.zeros_like(radius, dtype=torch.bool)
    interior[..., 1:-1, 1:-1] = True
    torch.testing.assert_close(radius[interior], full[interior], **EXACT)
    assert (radius[~interior] < full[~interior] - 1e-6).all()


def test_l2_with_domain_is_the_intersection_of_ball_and_box_bounds():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6))
    x = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.45, 0.55]])  # a corner: the box is tighter; the middle: the ball
    bm = BoundedModule(model)
    ball = bm.bounds(x, L2Ball(0.5, domain=None))
    box = bm.bounds(x, LinfBall(0.5))
    both = bm.bounds(x, L2Ball(0.5))
    torch.testing.assert_close(both[0], torch.maximum(ball[0], box[0]), **EXACT)
    torch.testing.assert_close(both[1], torch.minimum(ball[1], box[1]), **EXACT)
    assert (both[1] < ball[1] - 1e-9).any() and (both[1] < box[1] - 1e-9).any()


@pytest.mark.parametrize("spec", [LinfBall(0.1, domain=None), L2Ball(0.3, domain=None)])
def test_one_layer_margins_are_exact(spec):
    torch.manual_seed(6)
    model = nn.Sequential(Normalize([0.5], [0.25]), nn.Flatten(), nn.Linear(9, 4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[3].running_mean.uniform_(-1, 1)
        model[3].running_var.uniform_(0.5, 2)
        model[3].weight.uniform_(-2, 2)
    x = torch.rand(3, 1, 3, 3)
    y = torch.tensor([0, 2, 3])
    margins = BoundedModule(model).margins(x, y, spec)
    for b in range(3):
        rows = _rows(model, x[b:b + 1])  # logits' affine map, BatchNorm folded
        spec_rows = rows[y[b]] - rows  # (4, 9)
        centre = model(x[b:b + 1])[0]
        centre = centre[y[b]] - centre
        if isinstance(spec, LinfBall):
            exact = centre - spec.eps * spec_rows.abs().sum(1)
            worst = x[b] - spec.eps * spec_rows.sign().view(4, 1, 3, 3)
        else:
            norms = spec_rows.norm(dim=1)
            exact = centre - spec.eps * norms
            worst = x[b] - spec.eps * (spec_rows / norms.clamp_min(1e-30)[:, None]).view(4, 1, 3, 3)
        torch.testing.assert_close(margins[b], exact, **EXACT)
        logits = model(worst)
        reached = logits[:, y[b]] - logits.diagonal()
        torch.testing.assert_close(reached, exact, **EXACT)
        assert margins[b, y[b]] == 0
