"""Soundness: every reachable output (sampled, and driven to its extremes by PGD) lies inside the
bounds, at every layer, for random architectures, in train and eval mode."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall
from cure_fast.training import attacks
from cure_fast.specs import contains
from netgen import batch_stats, modules_of, networks, run_layers

SAMPLES = 24


def _setup(net, data, dtype=torch.float64):
    model, shape = net
    model = model.to(dtype)
    train = data.draw(st.booleans(), label="train")
    model.train(train)
    for m in model.modules():  # the points are evaluated with dropout off, so keep it off in the bounds too
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    batch = data.draw(st.integers(2, 3), label="batch")
    x = torch.rand((batch,) + shape, dtype=dtype)
    per_sample = data.draw(st.booleans(), label="per-sample eps")
    eps = lambda top: (torch.rand(batch, dtype=dtype) * top) if per_sample else data.draw(  # noqa: E731
        st.floats(0.0, top), label="eps")
    specs = [LinfBall(eps(0.3)), L2Ball(eps(1.0)), L2Ball(eps(0.5), domain=None), LinfBall(eps(0.2), domain=None),
             L1Ball(eps(1.5)), L1Ball(eps(0.7), domain=None)]
    y = torch.randint(0, model[-1].out_features, (batch,))
    bm = BoundedModule(model)
    stats = batch_stats(modules_of(bm), x) if train else {}
    return bm, x, y, specs, stats


def _tol(bound):
    return 1e-9 * (1 + bound.abs())


def _assert_inside(values, lower, upper, what):
    below = values < lower - _tol(lower)
    above = values > upper + _tol(upper)
    assert not below.any(), f"{what}: a reachable value is below its lower bound by {(lower - values)[below].max():.3g}"
    assert not above.any(), f"{what}: a reachable value is above its upper bound by {(values - upper)[above].max():.3g}"


def _true_margins(logits, y):
    return logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)) - logits


def _sample(spec, x):
    """Points of the input set: box corners, sphere points, l1 vertices, random interior points; (SAMPLES, B, ...)."""
    points = []
    for i in range(SAMPLES):
        if i % 3 == 2:
            points.append(attacks.random_point(spec, x))
        elif isinstance(spec, LinfBall):
            lower, upper = x - spec.per_sample_eps(x), x + spec.per_sample_eps(x)
            if spec.domain is not None:
                lower, upper = lower.clamp(min=spec.domain[0]), upper.clamp(max=spec.domain[1])
            points.append(torch.where(torch.rand_like(x) < 0.5, lower, upper))
        elif isinstance(spec, L1Ball):  # a vertex x ± eps e_i (clipped to the domain)
            flat = torch.zeros_like(x).flatten(1)
            flat[torch.arange(x.shape[0]), torch.randint(0, flat.shape[1], (x.shape[0],))] = 1.0
            point = x + spec.per_sample_eps(x) * flat.view_as(x) * (2.0 * (torch.rand(()) < 0.5) - 1)
            points.append(point if spec.domain is None else point.clamp(*spec.domain))
        else:
            direction = torch.randn_like(x)
            direction /= direction.flatten(1).norm(dim=1).view((-1,) + (1,) * (x.dim() - 1))
            point = x + spec.per_sample_eps(x) * direction
            points.append(point if spec.domain is None else point.clamp(*spec.domain))
    points = torch.stack(points)
    assert all(contains(spec, x, p, tol=1e-9).all() for p in points)
    return points


def check_sampled_points(bm, x, y, specs, stats):
    """Sampled points of every input set stay inside the bounds at every layer and the margins."""
    out = bm.propagate(x, specs, y)
    for k, spec in enumerate(specs):
        points = _sample(spec, x)
        outputs = run_layers(modules_of(bm), points.flatten(0, 1), stats)
        for name, value, (lower, upper) in zip(bm.layer_names, outputs, out.layer_bounds(k)):
            _assert_inside(value.view(points.shape[:2] + value.shape[1:]), lower, upper, f"{spec} layer {name}")
        logits = outputs[-1].view(points.shape[:2] + outputs[-1].shape[1:])
        _assert_inside(_true_margins(logits, y), out.margins[k], torch.full_like(logits, float("inf")), f"{spec} margins")


def check_pgd_extremes(bm, x, y, specs, stats, steps=15, every_relu=True):
    """PGD inside each input set, maximizing and minimizing a random neuron (at every ReLU when
    ``every_relu``, and at the output), and minimizing a random margin, never crosses a bound."""
    out = bm.propagate(x, specs, y)
    last = len(modules_of(bm)) - 1
    watched = [i for i, layer in enumerate(bm.layers) if every_relu and layer.activation] + [last]
    for k, spec in enumerate(specs):
        bounds = out.layer_bounds(k)
        for i in watched:
            lower, upper = (b.flatten(1) for b in bounds[i])
            neuron = torch.randint(0, lower.shape[1], (x.shape[0], 1))
            value = lambda p: run_layers(modules_of(bm)[: i + 1], p, stats)[-1].flatten(1).gather(1, neuron)[:, 0]  # noqa: E731
            for sign in (1.0, -1.0):
                point = attacks.pgd(lambda p: sign * value(p), x, spec, steps=steps)
                assert contains(spec, x, point, tol=1e-9).all()
                _assert_inside(value(point), lower.gather(1, neuron)[:, 0], upper.gather(1, neuron)[:, 0],
                               f"{spec} PGD on layer {bm.layer_names[i]}")
        other = torch.randint(0, out.logits.shape[1], (x.shape[0], 1))
        margin = lambda p: _true_margins(run_layers(modules_of(bm), p, stats)[-1], y).gather(1, other)[:, 0]  # noqa: E731
        point = attacks.pgd(lambda p: -margin(p), x, spec, steps=steps)
        bound = out.margins[k].gather(1, other)[:, 0]
        assert (margin(point) >= bound - _tol(bound)).all(), f"{spec}: PGD crossed the certified margin"


def check_margins_vs_logit_differences(bm, x, y, specs):
    """Folded margins are never looser than differences of logit bounds, and 0 at the label."""
    out = bm.propagate(x, specs, y)
    for (lower, upper), margins in zip(out.bounds, out.margins):
        naive = lower.gather(1, y[:, None]) - upper
        assert (margins >= naive - _tol(naive)).all()
        assert (margins.gather(1, y[:, None]) == 0).all()


@given(net=networks(), data=st.data())
def test_sampled_points_stay_inside_bounds_at_every_layer(net, data):
    check_sampled_points(*_setup(net, data))


@given(net=networks(), data=st.data())
def test_pgd_extremes_stay_inside_bounds(net, data):
    check_pgd_extremes(*_setup(net, data))


@given(net=networks(), data=st.data())
def test_margins_never_looser_than_logit_bound_differences(net, data):
    check_margins_vs_logit_differences(*_setup(net, data)[:4])


@pytest.mark.parametrize("train", [False, True])
def test_float32_bounds_contain_float64_points(train):
    """In fp32 the bounds are off only by rounding: checked against fp64 evaluations of the points."""
    from cure_fast.models import DATASETS, cnn3
    torch.manual_seed(0)
    model = cnn3(DATASETS["mnist"]).train(train)
    x = torch.rand(4, 1, 28, 28)
    spec = L2Ball(0.3)
    bm = BoundedModule(model)
    out = bm.propagate(x, [spec])
    reference = BoundedModule(copy.deepcopy(model).double())
    stats = batch_stats(modules_of(reference), x.double()) if train else {}
    points = _sample(spec, x.double())
    logits = run_layers(modules_of(reference), points.flatten(0, 1), stats)[-1].view(SAMPLES, 4, -1)
    lower, upper = out.bounds[0]
    slack = 1e-4 * (1 + upper.abs().double())
    assert (logits >= lower.double() - slack).all() and (logits <= upper.double() + slack).all()
