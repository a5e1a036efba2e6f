"""CROWN family (cure_fast.engine.crown): sound on random architectures (sampling and PGD), ordered
(IBP <= CROWN-IBP, CROWN-IBP <= CROWN on average, CROWN <= α-CROWN), exact where the network is affine
on the input set, per-sample eps, eval mode only."""
import copy
import types

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall
from cure_fast.engine import alpha, crown, passes
from cure_fast.training import attacks
from cure_fast.nn import Normalize
from netgen import alpha_options, draw_problem, modules_of, networks, run_layers
from test_soundness import _sample, _tol, _true_margins

METHODS = crown.METHODS
EXACT = dict(rtol=1e-9, atol=1e-9)
pytestmark = pytest.mark.usefixtures("one_thread")


def _eval_setup(net, data):
    return draw_problem(net, data, torch.float64, lambda eps: [
        LinfBall(eps(0.3)), L2Ball(eps(1.0)), L2Ball(eps(0.5), domain=None), LinfBall(eps(0.2), domain=None),
        L1Ball(eps(1.5)), L1Ball(eps(0.7), domain=None)])


def _all_margins(bm, x, y, spec):
    margins = {"ibp": bm.margins(x, y, spec)}
    margins.update({method: bm.margins(x, y, spec, method=method, **alpha_options(method, alpha_steps=5))
                    for method in METHODS})
    return margins


def _assert_ordered(margins):
    assert (margins["crown-ibp"] >= margins["ibp"] - _tol(margins["ibp"])).all()  # sound: lowered by rounding
    assert (margins["alpha-crown"] >= margins["crown"] - 1e-9).all()


@settings(max_examples=30)
@given(net=networks(), data=st.data())
def test_sampled_points_respect_every_method(net, data):
    bm, x, y, specs = _eval_setup(net, data)
    for spec in specs:
        margins = _all_margins(bm, x, y, spec)
        _assert_ordered(margins)
        points = _sample(spec, x)
        outputs = run_layers(modules_of(bm), points.flatten(0, 1), {})
        true = _true_margins(outputs[-1].view(points.shape[:2] + outputs[-1].shape[1:]), y).amin(0)
        for method, bound in margins.items():
            assert (true >= bound - _tol(bound)).all(), f"{spec} {method}: a sampled margin is below its bound"
            assert (bound.gather(1, y[:, None]) == 0).all()
        relus = [i for i, layer in enumerate(bm.layers) if layer.activation]
        ibp = crown.preactivation_bounds(bm, x, spec, method="crown-ibp")
        for i, (lower, upper), (ibp_lower, ibp_upper) in zip(relus, crown.preactivation_bounds(bm, x, spec), ibp):
            assert (lower >= ibp_lower - _tol(ibp_lower)).all() and (upper <= ibp_upper + _tol(ibp_upper)).all()
            value = outputs[i - 1].view(points.shape[:2] + lower.shape[1:]) if i else points
            assert (value >= lower - _tol(lower)).all() and (value <= upper + _tol(upper)).all(), \
                f"{spec}: a sampled pre-activation of layer {bm.layer_names[i]} is outside its CROWN bounds"


@settings(max_examples=20)
@given(net=networks(), data=st.data())
def test_pgd_never_crosses_the_certified_margins(net, data):
    bm, x, y, specs = _eval_setup(net, data)
    other = torch.randint(0, modules_of(bm)[-1].out_features, (x.shape[0], 1))
    margin = lambda p: _true_margins(bm(p), y).gather(1, other)[:, 0]  # noqa: E731
    for spec in specs:
        point = attacks.pgd(lambda p: -margin(p), x, spec, steps=15)
        for method, bound in _all_margins(bm, x, y, spec).items():
            bound = bound.gather(1, other)[:, 0]
            assert (margin(point) >= bound - _tol(bound)).all(), f"{spec} {method}: PGD crossed the certified margin"


def _pure_crown(bm, x, y, spec):
    """Pure CROWN (intermediate bounds by CROWN alone, no intersection with IBP), off-label entries."""
    problem = crown._problem(bm, x, y, spec, True, None)
    C, rows, mask = crown._specification(y, problem.shapes[-1][0], torch.float64)
    pure = passes.relaxations(problem, crown=True, intersect=False)
    return passes.linear_bound(problem, pure, C, rows), mask


@settings(max_examples=40)
@given(net=networks(), data=st.data())
def test_crown_is_never_looser_than_pure_crown(net, data):
    bm, x, y, specs = _eval_setup(net, data)
    for spec in specs:
        pure, mask = _pure_crown(bm, x, y, spec)
        for method in ("crown", "alpha-crown"):
            bound = bm.margins(x, y, spec, method=method, **alpha_options(method, alpha_steps=3))[mask]
            assert (bound >= pure - 1e-12 * (1 + pure.abs())).all(), f"{spec} {method} is looser than pure CROWN"


def test_a_net_where_the_intersection_alone_is_looser_than_pure_crown():
    """Seed 1167: CROWN's intermediate bounds intersected with IBP give a final bound 0.0078 below pure
    CROWN's (the tighter bounds change the adaptive slopes); the method keeps the better one."""
    model = _seed_1167_net()
    x, y = torch.rand(1, 4, dtype=torch.float64), torch.tensor([0])
    bm = BoundedModule(model)
    pure, mask = _pure_crown(bm, x, y, LinfBall(0.1))
    problem = crown._problem(bm, x, y, LinfBall(0.1), True, None)
    C, rows, _ = crown._specification(y, 3, torch.float64)
    intersected = passes.linear_bound(problem, passes.relaxations(problem, crown=True), C, rows)
    assert (pure - intersected).max() > 1e-3
    for method in ("crown", "alpha-crown"):
        assert (bm.margins(x, y, LinfBall(0.1), method=method)[mask] >= pure - 1e-12).all()


def _seed_1167_net():
    torch.manual_seed(1167)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                         nn.Linear(6, 3)).double().eval()


def test_target_runs_pure_crown_only_below_it():
    """On the seed-1167 net (where pure CROWN is the tighter): ``target`` above the bounds -> pure CROWN
    runs, as without a target; below them -> it is skipped (the intersected bound alone)."""
    bm, x, y = BoundedModule(_seed_1167_net()), torch.rand(1, 4, dtype=torch.float64), torch.tensor([0])
    pure, mask = _pure_crown(bm, x, y, LinfBall(0.1))
    full = bm.margins(x, y, LinfBall(0.1), method="crown")
    assert torch.equal(bm.margins(x, y, LinfBall(0.1), method="crown", target=1e9), full)
    skipped = bm.margins(x, y, LinfBall(0.1), method="crown", target=-1e9)[mask]
    assert (pure - skipped).max() > 1e-4 and (full[mask] >= pure - 1e-12).all()


def test_pure_crown_chain_for_some_samples_only():
    """``relaxations(samples=...)``: the chosen samples get pure CROWN's bounds, the others keep the
    reused chain's."""
    bm = BoundedModule(_seed_1167_net())
    x, y = torch.rand(2, 4, dtype=torch.float64), torch.tensor([0, 1])
    problem = crown._problem(bm, x, y, LinfBall(0.1), True, None)
    chain = passes.relaxations(problem, crown=True)
    full = passes.relaxations(problem, crown=True, intersect=False, reuse=chain)
    part = passes.relaxations(problem, crown=True, intersect=False, reuse=chain, samples=torch.tensor([True, False]))
    for i in part.bounds:
        for mine, pure, kept in zip(part.bounds[i], full.bounds[i], chain.bounds[i]):
            assert torch.allclose(mine[0], pure[0], rtol=1e-12, atol=1e-12) and torch.equal(mine[1], kept[1])


@settings(max_examples=30)
@given(net=networks(), data=st.data())
def test_pure_crown_from_the_divergence_record_is_pure_crown(net, data):
    """The intersected chain records, per sample, where its relaxations leave pure CROWN's and pure
    CROWN's bounds until there; pure CROWN rebuilt from that record has the relaxations of pure CROWN
    computed from scratch, and a sample recorded as never diverging has them in the intersected chain."""
    bm, x, y, specs = _eval_setup(net, data)
    for spec in specs:
        problem = crown._problem(bm, x, y, spec, True, None)
        chain = passes.relaxations(problem, crown=True)
        rebuilt = passes.relaxations(problem, crown=True, intersect=False, reuse=chain)
        scratch = passes.relaxations(problem, crown=True, intersect=False)
        never = chain.diverged == len(problem.ops)
        for i, relaxation in scratch.relaxations.items():
            assert torch.allclose(rebuilt.relaxations[i].packed, relaxation.packed, rtol=1e-9, atol=1e-12), \
                f"{spec}: {i}"
            assert torch.allclose(chain.relaxations[i].packed[never], relaxation.packed[never], rtol=1e-9, atol=1e-12)


def test_a_sample_whose_relaxations_the_intersection_changes_is_recorded():
    """Seed 1167 (the intersection changes a slope and loosens the bound): the sample diverges."""
    bm, x, y = BoundedModule(_seed_1167_net()), torch.rand(1, 4, dtype=torch.float64), torch.tensor([0])
    problem = crown._problem(bm, x, y, LinfBall(0.1), True, None)
    chain = passes.relaxations(problem, crown=True)
    assert int(chain.diverged[0]) < len(problem.ops)


def test_tighter_on_average_crown_ibp_then_crown_then_alpha():
    torch.manual_seed(0)
    model = nn.Sequential(Normalize([0.5], [0.3]), nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 20), nn.ReLU(),
                          nn.Linear(20, 5)).double()
    with torch.no_grad():
        model(torch.rand(64, 1, 8, 8, dtype=torch.float64))  # running statistics of the BatchNorm
    bm = BoundedModule(model.eval())
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    for spec in (LinfBall(0.02), L2Ball(0.3)):
        margins = _all_margins(bm, x, y, spec)
        _assert_ordered(margins)
        means = {method: m.mean().item() for method, m in margins.items()}
        assert means["ibp"] < means["crown-ibp"] < means["crown"] < means["alpha-crown"], means



def test_alpha_crown_on_intermediate_bounds_tightens_them_and_the_margins():
    """α-CROWN with the pre-activation bounds optimized layer by layer: every pre-activation bound
    inside CROWN's and inside IBP from the optimized bounds below, tighter somewhere, the margins tighter on average than with the final slopes
    only, and never above the margin at any sampled point."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 5)).double()
    bm = BoundedModule(model.eval())
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    y = model(x).argmax(1)
    spec = LinfBall(0.03)
    problem = crown._problem(bm, x, y, spec, True, None)
    chain = passes.relaxations(problem, crown=True)
    optimized = alpha.optimized_chain(problem, chain, 20, 0.5)
    gained, previous = 0.0, None
    for i, (lower, upper) in chain.bounds.items():
        low, high = optimized.bounds[i]
        assert (low >= lower).all() and (high <= upper).all() and (low <= high).all()
        gained += float((low - lower).sum() + (upper - high).sum())
        if previous is not None:  # already inside IBP from the optimized bounds below
            forwarded = passes.forwarded(problem, i, (low, high), (previous, optimized.bounds[previous]))
            assert torch.equal(forwarded[0], low) and torch.equal(forwarded[1], high)
        previous = i
    assert gained > 1e-3
    final_only = bm.margins(x, y, spec, method="alpha-crown", alpha_intermediate=False)
    both = bm.margins(x, y, spec, method="alpha-crown")
    mask = torch.ones_like(both, dtype=torch.bool).scatter(1, y[:, None], False)
    assert both[mask].mean() > final_only[mask].mean() + 1e-6
    points = (x[None] + spec.eps * (2 * torch.rand(256, *x.shape, dtype=torch.float64) - 1)).clamp(0, 1)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(256, *both.shape)
    true = logits.gather(2, y[None, :, None].expand(256, -1, 1))
    assert (both <= (true - logits).amin(0) + 1e-9).all()



def test_target_stops_rows_once_above_it():
    """``target``: below every bound at once -> the first pass (CROWN's slopes) is the answer;
    above every bound -> all the steps, as without a target; 0 -> at least CROWN's certificates."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                          nn.Linear(24, 4)).double()
    bm = BoundedModule(model.eval())
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = model(x).argmax(1)
    spec = LinfBall(0.05)
    crown_only = bm.margins(x, y, spec, method="crown")
    options = dict(method="alpha-crown", alpha_steps=6)
    assert torch.equal(bm.margins(x, y, spec, target=-1e9, **options), crown_only)
    assert torch.equal(bm.margins(x, y, spec, target=1e9, **options), bm.margins(x, y, spec, **options))
    mask = torch.ones_like(crown_only, dtype=torch.bool).scatter(1, y[:, None], False)
    enough = bm.margins(x, y, spec, target=0.0, **options)
    assert (enough[mask] >= crown_only[mask]).all()
    assert ((enough > 0) | ~mask).all(1).sum() >= ((crown_only > 0) | ~mask).all(1).sum()


def _affine_minimum(model, x, y, spec):
    """The exact minimum of every margin of a network that is affine on the input set, attained at the
    box corner (LinfBall) or sphere point (L2Ball without domain) of the gradient's direction; (B, K)."""
    x = x.clone().requires_grad_(True)
    rows = []
    for j in range(model[-1].out_features):
        grad, = torch.autograd.grad(_true_margins(model(x), y)[:, j].sum(), x)
        if isinstance(spec, LinfBall):
            centre, radius = spec.domain_box(x.detach())
            point = centre - grad.sign() * radius
        else:
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-300).view((-1,) + (1,) * (x.dim() - 1))
            point = x.detach() - spec.per_sample_eps(x) * grad / norm
        rows.append(_true_margins(model(point), y)[:, j].detach())
    return torch.stack(rows, 1)


AFFINE_SPECS = [LinfBall(0.1), LinfBall(torch.tensor([0.0, 0.05, 0.3]), domain=None), L2Ball(0.7, domain=None)]


@pytest.mark.parametrize("spec", AFFINE_SPECS)
def test_exact_on_one_layer_nets(spec):
    torch.manual_seed(1)
    model = nn.Sequential(Normalize([0.3, 0.5], [0.2, 0.7]), nn.Flatten(), nn.Linear(2 * 3 * 3, 4)).double().eval()
    x = torch.rand(3, 2, 3, 3, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    weight = model[2].weight.view(4, 2, 3, 3) / model[0].std.double().view(1, 2, 1, 1)
    rows = weight[y][:, None] - weight[None]  # (B, K, 2, 3, 3): the margin rows in pixel space
    logits = model(x)
    centre = logits.gather(1, y[:, None]) - logits
    if isinstance(spec, LinfBall):
        box_centre, radius = spec.domain_box(x)
        spread = ((box_centre - x)[:, None] * rows).flatten(2).sum(2) - (rows.abs() * radius[:, None]).flatten(2).sum(2)
    else:
        spread = -spec.eps * rows.flatten(2).norm(dim=2)
    bm = BoundedModule(model)
    for method in METHODS:
        torch.testing.assert_close(bm.margins(x, y, spec, method=method), centre + spread, **EXACT)


@pytest.mark.parametrize("spec", AFFINE_SPECS)
def test_exact_on_networks_without_relu(spec):
    torch.manual_seed(2)
    model = nn.Sequential(Normalize([0.4], [0.3]), nn.Conv2d(1, 3, 3, 1, 1), nn.BatchNorm2d(3), nn.AvgPool2d(2, 1),
                          nn.Conv2d(3, 2, 2, 2, 1, groups=1), nn.Flatten(), nn.Linear(2 * 3 * 3, 6), nn.Dropout(0.5),
                          nn.Linear(6, 4)).double()
    with torch.no_grad():
        model[2].running_mean.uniform_(-1, 1)
        model[2].running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.rand(3, 1, 5, 5, dtype=torch.float64)
    y = torch.tensor([2, 0, 3])
    exact = _affine_minimum(model, x, y, spec)
    for method in METHODS:
        torch.testing.assert_close(crown.crown_margins(BoundedModule(model), x, y, spec, method=method), exact, **EXACT)


@pytest.mark.parametrize("spec", AFFINE_SPECS)
def test_exact_when_every_relu_is_stable(spec):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    model = model.double().eval()
    with torch.no_grad():
        for linear in (model[1], model[3]):
            linear.weight.mul_(0.05)
            linear.bias.copy_(torch.where(torch.rand_like(linear.bias) < 0.5, -3.0, 3.0))
    x = torch.rand(3, 1, 2, 3, dtype=torch.float64)
    y = torch.tensor([1, 2, 0])
    bm = BoundedModule(model)
    for lower, upper in crown.preactivation_bounds(bm, x, spec, method="crown-ibp"):
        assert ((lower > 0) | (upper < 0)).all()
    exact = _affine_minimum(model, x, y, spec)
    for method in METHODS:
        torch.testing.assert_close(bm.margins(x, y, spec, method=method), exact, **EXACT)


def _small_cnn():
    torch.manual_seed(4)
    model = nn.Sequential(Normalize([0.5, 0.4], [0.25, 0.3]), nn.Conv2d(2, 4, 3, 1, 1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, 2, 1, dilation=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 3, 2, 1, 0, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 1 * 1, 4))
    with torch.no_grad():
        model[4].running_mean.uniform_(-0.5, 0.5)
    return model.double().eval()


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_eps_matches_separate_runs_and_zero_eps_is_exact(method):
    model = _small_cnn()
    bm = BoundedModule(model)
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 2, 3])
    for kind in (LinfBall, L2Ball):
        eps = torch.tensor([0.0, 0.02, 0.2], dtype=torch.float64)
        together = bm.margins(x, y, kind(eps), method=method)
        for b in range(3):
            alone = bm.margins(x[b:b + 1], y[b:b + 1], kind(float(eps[b])), method=method)
            torch.testing.assert_close(together[b:b + 1], alone, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(together[0], _true_margins(model(x[:1]), y[:1])[0], **EXACT)


def test_windowed_and_whole_map_backward_passes_agree():
    model = _small_cnn()
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    problem = crown._problem(BoundedModule(model), x, None, LinfBall(0.1), True, None)
    relaxations = passes.relaxations(problem, crown=True)
    for end in relaxations.relaxations:
        shape = problem.shapes[end]
        n = shape.numel()
        neurons = torch.arange(n).repeat(4)
        signs = torch.cat([torch.ones(2 * n), -torch.ones(2 * n)]).double()
        rows = torch.arange(2).repeat_interleave(n).repeat(2)
        windowed = passes.unit_bound(problem, relaxations, end, neurons, signs, rows)
        A = torch.zeros(4 * n, n, dtype=torch.float64)
        A[torch.arange(4 * n), neurons] = signs
        whole = passes.backward(problem, relaxations, end, A.view((-1,) + shape), rows)
        torch.testing.assert_close(windowed, whole, rtol=1e-12, atol=1e-12)


def test_chunking_does_not_change_the_bounds():
    model = _small_cnn()
    bm = BoundedModule(model)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([1, 3])
    for method in METHODS:
        default = crown.crown_margins(bm, x, y, L2Ball(0.3), method=method)
        small = crown.crown_margins(bm, x, y, L2Ball(0.3), method=method, max_rows=3)
        tolerance = 1e-6 if method == "alpha-crown" else 1e-12  # α's slopes: a float32 search, rounded per chunk
        torch.testing.assert_close(small, default, rtol=tolerance, atol=tolerance)


def test_sound_mode_computes_in_float64_and_rounds_down():
    model = _small_cnn().float()
    bm = BoundedModule(model)
    x = torch.rand(2, 2, 5, 5)
    y = torch.tensor([1, 3])
    reference = crown.crown_margins(BoundedModule(copy.deepcopy(model).double()), x.double(), y, LinfBall(0.05))
    sound = crown.crown_margins(bm, x, y, LinfBall(0.05))
    assert sound.dtype == torch.float32
    assert (sound.double() <= reference).all() and (reference - sound.double()).abs().max() < 1e-5
    fast = crown.crown_margins(bm, x, y, LinfBall(0.05), sound=False)
    assert fast.dtype == torch.float32 and (fast.double() - reference).abs().max() < 1e-3


def test_train_mode_and_bad_arguments_give_clear_errors():
    model = _small_cnn().train()
    bm = BoundedModule(model)
    x = torch.rand(2, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([1, 3])
    with pytest.raises(ValueError, match="training mode.*eval"):
        bm.margins(x, y, LinfBall(0.1), method="crown")
    bm.eval()
    with pytest.raises(ValueError, match="unknown method 'zonotope'"):
        bm.margins(x, y, LinfBall(0.1), method="zonotope")
    with pytest.raises(TypeError, match="no_such_option"):
        bm.margins(x, y, LinfBall(0.1), no_such_option=3)
    with pytest.raises(TypeError, match="unexpected option 'alpha_step'; did you mean 'alpha_steps'"):
        bm.margins(x, y, LinfBall(0.1), method="alpha-crown", alpha_step=3)
    with pytest.raises(ValueError, match="max_rows"):
        bm.margins(x, y, LinfBall(0.1), method="crown", max_rows=0)
    for bad in ("0", float("nan"), True):
        with pytest.raises(ValueError, match="target must be a number .* or None"):
            bm.margins(x, y, LinfBall(0.1), method="crown", target=bad)
    for bad in (float("nan"), -0.1, 0, float("inf")):
        with pytest.raises(ValueError, match="alpha_lr must be a finite number > 0"):
            bm.margins(x, y, LinfBall(0.1), method="alpha-crown", alpha_lr=bad)
    with pytest.warns(UserWarning, match="alpha_steps=5, alpha_intermediate=False: α-CROWN's options, ignored by "
                                         "method='crown'"):
        bm.margins(x, y, LinfBall(0.1), method="crown", alpha_steps=5, alpha_intermediate=False)
    with pytest.raises(TypeError, match="LinfBall, L2Ball or L1Ball"):
        crown.crown_margins(bm, x, y, [LinfBall(0.1)])
    with torch.no_grad():
        model[1].weight[0, 0, 0, 0] = float("nan")
    for sound in (True, "fp32", False):  # a NaN weight was "not float32-representable" (fp32) or silently -inf
        with pytest.raises(ValueError, match=r"model's 1.weight contains NaN or Inf"):
            bm.margins(x, y, LinfBall(0.1), method="crown", sound=sound)


@settings(max_examples=60, deadline=None)
@given(channels=st.integers(1, 6), out=st.integers(1, 5), kernel=st.integers(1, 4), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), size=st.sampled_from([(1, 1), (1, 3), (4, 2)]),
       taps=st.booleans())
def test_window_transpose_equals_the_transposed_convolution(channels, out, kernel, stride, dilation, groups, size,
                                                           taps):
    """Every path of the window step through a Conv2d (one-pixel matrix product, few-channel fold,
    ``conv_transpose2d``, and the taps of CUDA with cuDNN off, ``taps``) is the transposed convolution,
    with the window size it announces."""
    from unittest import mock
    from cure_fast.engine.layers import affine
    conv = nn.Conv2d(channels * groups, out * groups, kernel, stride, 0, dilation, groups).double()
    op = affine.ConvOperator(conv, torch.Size([channels * groups, 9, 9]))
    A = torch.randn(3, out * groups, *size, dtype=torch.float64)
    expected = nn.functional.conv_transpose2d(A, conv.weight, None, stride, 0, 0, groups, dilation)
    with mock.patch.object(affine, "transposes_by_taps", lambda A: taps):
        got = op._transpose_window(A)
    assert got.shape[2:] == op.window_size(*size)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2), padding=st.integers(0, 2),
       height=st.integers(4, 9), width=st.integers(4, 9))
def test_the_taps_transpose_of_a_whole_map_is_the_gradient_of_the_convolution(kernel, stride, dilation, padding,
                                                                             height, width):
    """The dense backward step by taps (CUDA with cuDNN off), cropped to the map, is conv2d_input, also
    where the convolution leaves rows or columns of its input unread."""
    from unittest import mock
    from hypothesis import assume
    from cure_fast.engine.layers import affine
    assume(min(height, width) + 2 * padding >= dilation * (kernel - 1) + 1)
    conv = nn.Conv2d(5, 3, kernel, stride, padding, dilation).double()
    op = affine.ConvOperator(conv, torch.Size([5, height, width]))
    out_shape = conv(torch.zeros(1, 5, height, width, dtype=torch.float64)).shape[1:]
    A = torch.randn(2, *out_shape, dtype=torch.float64)
    expected, _ = op.back(A)
    with mock.patch.object(affine, "transposes_by_taps", lambda A: True):
        got, _ = op.back(A)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sound", [True, "fp32"])
def test_sound_crown_by_taps_equals_crown_by_transposed_convolutions(sound):
    """The sound CROWN of CUDA (the taps; run here on the CPU) gives the CPU's margins up to rounding."""
    from unittest import mock
    from cure_fast.engine.layers import affine
    model = _small_cnn().float()
    bm = BoundedModule(model)
    x, y = torch.rand(2, 2, 5, 5), torch.tensor([1, 3])
    expected = crown.crown_margins(bm, x, y, LinfBall(0.05), method="crown", sound=sound)
    with mock.patch.object(affine, "transposes_by_taps", lambda A: True):
        got = crown.crown_margins(bm, x, y, LinfBall(0.05), method="crown", sound=sound)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def _alpha_in_float64_and_searched_in_float32(bm, x, y, spec, intermediate):
    problem = crown._problem(bm, x, y, spec, True, None)
    chain = passes.relaxations(problem, crown=True)
    C, rows, mask = crown._specification(y, problem.shapes[-1][0], torch.float64)
    searched = alpha.optimized_bound(problem, chain, C, rows, 20, 0.5, intermediate, None,
                                      crown._float32_search(bm, x, y, spec, None, chain))
    full = alpha.optimized_bound(problem, chain, C, rows, 20, 0.5, intermediate, None)
    return searched, full, passes.linear_bound(problem, chain, C, rows)


@pytest.mark.parametrize("intermediate", [True, False])
def test_alpha_slopes_searched_in_float32_give_the_float64_search_bounds(intermediate):
    """The sound fp64 mode searches α-CROWN's slopes in float32 and computes the bound in float64 with
    the slopes of each row's best step: never below CROWN, and the float64 search's bound up to the
    float32 rounding of the search (measured: within 5e-8)."""
    model = _small_cnn()
    bm = BoundedModule(model)
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    y = model(x).argmax(1)
    for spec in (LinfBall(0.1), L2Ball(0.5)):
        searched, full, crown_bound = _alpha_in_float64_and_searched_in_float32(bm, x, y, spec, intermediate)
        assert (searched >= crown_bound).all() and (full - crown_bound).sum() > 1e-2
        assert (searched - full).abs().max() < 1e-6, (searched - full).abs().max()


def test_the_keeper_holds_the_slopes_of_every_rows_best_step():
    """Row 0 is best at step 0, row 1 at step 2: the kept table holds step 0's slopes in row 0 and
    step 2's in row 1; with a target, a row above it keeps the first step there; a NaN bound (none)
    loses to any later step."""
    def kept_steps(target, values):
        slopes = passes.Slopes()
        relaxation = passes.Relaxation.of(torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 1.0]]))
        slope = slopes.dense(3, relaxation, torch.tensor([0, 0]))
        keeper = alpha.Keeper(slopes, target=target)
        for step, value in enumerate(values):
            with torch.no_grad():
                slope.fill_(step / 10)
            keeper.update(torch.tensor(value, dtype=torch.float64))
        return (keeper.best.table[3][0][:, 0] * 10).round().int().tolist(), keeper.value.tolist()

    assert kept_steps(None, ([1.0, 0.0], [0.5, 0.5], [0.2, 0.9])) == ([0, 2], [1.0, 0.9])
    assert kept_steps(0.4, ([0.5, 0.5], [0.6, 0.7])) == ([0, 0], [0.5, 0.5])  # value: the kept step's, uncapped
    assert kept_steps(None, ([float("nan"), 0.5], [0.1, 0.4])) == ([1, 0], [0.1, 0.5])


def test_a_row_whose_sound_bound_misses_the_target_is_searched_again():
    """A search bound ``k - sum(α)`` per row, the sound bound 0.25 lower, target 0. Row 1 passes the
    target in the search one step after CROWN's (kept there, its sound bound below 0) and is searched
    again, alone, until it is certified; row 0 can never pass it, row 2 passes it at CROWN's slopes:
    neither is searched again."""
    relaxation = passes.Relaxation.of(-torch.ones(3, 4), 2 * torch.ones(3, 4))  # unstable: slopes from 1
    rows, k = torch.arange(3), torch.tensor([-1.0, 3.9, 10.0])
    sound, search, calls = types.SimpleNamespace(dtype=torch.float64), types.SimpleNamespace(), []

    def bound(problem, chain, slopes, picked):
        calls.append((problem is sound, None if picked is None else picked.tolist()))
        picked = rows if picked is None else picked
        slope = slopes.dense(0, relaxation, rows[picked])
        return k[picked].to(slope.dtype) - slope.sum(1) - (0.25 if problem is sound else 0.0)

    value = alpha.optimized_rows(bound, sound, None, (search, None), steps=40, lr=0.05, target=0.0)
    assert value[1] > 0 and [c for c in calls if c[0]] == [(True, None), (True, [1])], value
    assert {tuple(picked) for _, picked in calls[calls.index((True, None)) + 1:]} == {(1,)}  # row 1 alone again
    assert value[0] == pytest.approx(-1.25, abs=0.05) and value[2] == pytest.approx(5.75)
    first_round = alpha.optimize(lambda slopes: bound(search, None, slopes, None), 40, 0.05, 0.0, keep=True)[1]
    assert first_round.value[1] < 0.5  # the first round alone stops short of the raised target


def test_fixed_slopes_refuse_a_pass_they_do_not_hold():
    table = passes.Slopes()
    relaxation = passes.Relaxation.of(torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 1.0]]))
    table.dense(3, relaxation, torch.tensor([0]))
    fixed = table.frozen(torch.float64)
    assert fixed.dense(3, relaxation, torch.tensor([0])).dtype == torch.float64
    with pytest.raises(RuntimeError, match="no slopes for these rows at activation 5"):
        fixed.dense(5, relaxation, torch.tensor([0]))
    with pytest.raises(RuntimeError, match="no slopes for these rows at activation 3"):
        fixed.dense(3, relaxation, torch.tensor([1]))


@pytest.mark.parametrize("sound", [True, False])
def test_alpha_crown_rows_are_separable_so_chunks_do_not_change_the_bounds(sound):
    """α-CROWN optimizes every row (a margin row, or one side of a pre-activation bound) over its own
    slopes, so the chunks of rows it runs in (what bounds its memory) do not change the result: one
    row per chunk gives the bounds of the default chunks (within rounding)."""
    model = _small_cnn()
    bm = BoundedModule(model)
    torch.manual_seed(5)
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    y = model(x).argmax(1)
    for spec in (LinfBall(0.1), L2Ball(0.5)):
        default = bm.margins(x, y, spec, method="alpha-crown", alpha_steps=8, sound=sound)
        one_row = bm.margins(x, y, spec, method="alpha-crown", alpha_steps=8, sound=sound, max_rows=1)
        crown_only = bm.margins(x, y, spec, method="crown", sound=sound)
        assert (default - crown_only).max() > 1e-3
        torch.testing.assert_close(one_row, default, rtol=0, atol=1e-5 if sound else 1e-9)


@pytest.mark.parametrize("sound", [False, "fp32", "fp64"])
def test_linear_on_a_sequence_of_vectors(sound):
    """Linear on (B, L, F) inputs (its bias term sums over L as well): every CROWN method runs and
    stays below the margins at sampled points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(15, 3)).eval()
    x = torch.rand(2, 3, 4)
    y = model(x).argmax(1)
    spec = LinfBall(0.05)
    points = (x[None] + spec.eps * (2 * torch.rand(256, *x.shape) - 1)).clamp(0, 1)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(256, 2, 3)
    true = (logits.gather(2, y[None, :, None].expand(256, -1, 1)) - logits).amin(0)
    for method in crown.METHODS:
        options = alpha_options(method, alpha_steps=3)
        margins = BoundedModule(model).margins(x, y, spec, method=method, sound=sound, **options)
        assert margins.shape == (2, 3) and (margins <= true + 1e-5).all(), method


def test_an_asymmetric_same_padding_is_refused_naming_what_supports_it():
    model = nn.Sequential(nn.Conv2d(1, 2, 2, padding="same"), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).eval()
    bm, x, y = BoundedModule(model), torch.rand(2, 1, 4, 4), torch.tensor([0, 2])
    for method in ("ibp",) + crown.METHODS:
        with pytest.raises(ValueError, match="asymmetric padding .* BoundedModule.propagate's IBP supports it"):
            crown.crown_margins(bm, x, y, LinfBall(0.1), method=method)
    assert bm.propagate(x, [LinfBall(0.1)], y).margins[0].shape == (2, 3)
