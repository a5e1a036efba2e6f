"""Sound bounds of the CROWN family (``sound="fp32"`` and ``"fp64"``, cure_fast.engine.rounding): float32
never above the float64 bounds and within 1e-3 of them on random networks, never above sampled
margins; both modes never above the exact rational CROWN-IBP bound of the same relaxations nor the
true minimum on tiny nets, and below the exact minimum on nets where plain arithmetic is optimistic."""
import copy
import itertools
from decimal import Decimal, getcontext
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall, models
from cure_fast.engine import crown, passes
from cure_fast.engine.layers.activation import Relaxation
from netgen import alpha_options, draw_problem, modules_of, networks, run_layers
from test_soundness import _sample, _true_margins


pytestmark = pytest.mark.usefixtures("one_thread")


def _eval_setup(net, data):
    return draw_problem(net, data, torch.float32, lambda eps: [LinfBall(eps(0.3)), L2Ball(eps(1.0)), L1Ball(eps(1.5), domain=None)])


@settings(max_examples=100)
@given(net=networks(), data=st.data())
def test_float32_bounds_are_below_float64_close_to_them_and_below_sampled_margins(net, data):
    """α-CROWN's optimizer takes other paths in float32 than in float64 (a bound either side of the
    float64 one): only its soundness is compared. CROWN's intermediate bounds can fall either side of
    a ReLU's kink or of the intersection with IBP in the two runs (other relaxations, and a final
    bound either side): it is compared loosely; CROWN-IBP strictly."""
    bm, x, y, specs = _eval_setup(net, data)
    method = data.draw(st.sampled_from(crown.METHODS), label="method")
    reference = BoundedModule(copy.deepcopy(bm.model).double())
    for spec in specs:
        bound = crown.crown_margins(bm, x, y, spec, method=method, sound="fp32", **alpha_options(method, alpha_steps=3))
        assert bound.dtype == torch.float32 and (bound.gather(1, y[:, None]) == 0).all()
        bound = bound.double()
        if method != "alpha-crown":
            wide = crown.crown_margins(bm, x.double(), y, spec, method=method)
            slack = 1e-12 if method == "crown-ibp" else 1e-2
            assert (bound <= wide + slack * (1 + wide.abs())).all(), f"{spec} {method}: above the float64 bound"
            gap = ((wide - bound) / (1 + wide.abs())).max()
            assert gap < (1e-3 if method == "crown-ibp" else 1e-2), f"{spec} {method}: {gap:.3g} below the float64 bound"
        points = _sample(spec, x.double())
        outputs = run_layers(modules_of(reference), points.flatten(0, 1), {})
        true = _true_margins(outputs[-1].view(points.shape[:2] + outputs[-1].shape[1:]), y).amin(0)
        assert (true >= bound).all(), f"{spec} {method}: a sampled margin is below the float32 bound"


@settings(max_examples=50)
@given(net=networks(), data=st.data())
def test_penalties_cover_the_rounding_of_every_backward_pass(net, data):
    """With the float32 run's own relaxations, the float64 passes (windows, dense maps, every layer
    type) give bounds at least as tight as the float32 ones: the penalties cover the rounding."""
    bm, x, y, specs = _eval_setup(net, data)
    for spec in specs:
        narrow = crown._problem(bm, x, y, spec, "fp32", None)
        wide = crown._problem(BoundedModule(copy.deepcopy(bm.model).double()), x.double(), y, spec, False, None)
        chain = passes.relaxations(narrow, crown=True)
        same = {i: Relaxation(r.packed.double(), r.unstable, r.alpha_range) for i, r in chain.relaxations.items()}
        for i, (lower, upper) in chain.bounds.items():
            below = passes.Chain({j: r for j, r in chain.relaxations.items() if j < i}, {}, chain.weights, chain.folds)
            low32, high32 = passes.crown_bounds(narrow, below, i, lower, upper, intersect=False)
            low64, high64 = passes.crown_bounds(wide, {j: r for j, r in same.items() if j < i}, i,
                                                lower.double(), upper.double(), intersect=False)
            assert (low32.double() <= low64 + 1e-12 * (1 + low64.abs())).all(), f"{spec}: layer {i}"
            assert (high32.double() >= high64 - 1e-12 * (1 + high64.abs())).all(), f"{spec}: layer {i}"
        C, rows, _ = crown._specification(y, narrow.shapes[-1][0], torch.float32)
        bound32 = passes.linear_bound(narrow, chain, C, rows)
        bound64 = passes.linear_bound(wide, same, C.double(), rows)
        assert (bound32 <= bound64 + 1e-12 * (1 + bound64.abs())).all(), f"{spec}: the final pass"


def _cancelling_net(seed, shift=1e4, dtype=torch.float32):
    """Linear(4, 12), ReLU (every neuron active: bias ``shift``), Linear(12, 3): the second layer's
    weights [U, -U] meet the first's [V; V + δ] with |U|, |V| ~ 100, so the margins are small
    differences of large terms."""
    torch.manual_seed(seed)
    V, delta, U = torch.randn(6, 4) * 100, torch.randn(6, 4) * 1e-2, torch.randn(3, 6) * 100
    first, second = nn.Linear(4, 12).to(dtype), nn.Linear(12, 3).to(dtype)
    with torch.no_grad():
        first.weight.copy_(torch.cat([V, V + delta]))
        first.bias.fill_(shift)
        second.weight.copy_(torch.cat([U, -U], 1))
        second.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), second).eval()


def test_plain_float32_is_optimistic_on_cancelling_weights_and_sound_float32_is_not():
    """The network is affine on the set, so the float64 CROWN bound is its exact minimum; plain float32
    lands above it on some of these nets (not a bound), sound float32 never does."""
    optimistic = 0.0
    for seed in range(5):
        bm = BoundedModule(_cancelling_net(seed))
        x, y, spec = torch.rand(2, 4), torch.tensor([0, 1]), LinfBall(0.01)
        mask = torch.ones(2, 3, dtype=torch.bool).scatter(1, y[:, None], False)
        exact = crown.crown_margins(bm, x.double(), y, spec, method="crown")[mask]
        plain = crown.crown_margins(bm, x, y, spec, method="crown", sound=False).double()[mask]
        sound = crown.crown_margins(bm, x, y, spec, method="crown", sound="fp32").double()[mask]
        optimistic = max(optimistic, (plain - exact).max().item())
        assert (sound <= exact).all(), f"seed {seed}: sound float32 above the exact minimum"
    assert optimistic > 0.01


def _exact_box_minimum(model, x, y, eps):
    """The exact minimum of every margin off y over the box x ± eps (no domain) of a Linear, ReLU, Linear
    net whose first layer is positive on the box (affine there), in rational arithmetic."""
    (W1, b1), (W2, b2) = _linears(model)
    point, eps = _fractions(x[0]), Fraction(float(eps))
    A = [[_dot(row, [W1[o][j] for o in range(len(W1))]) for j in range(len(W1[0]))] for row in W2]
    lower, _ = _exact_interval(W1, b1, [v - eps for v in point], [v + eps for v in point])
    assert min(lower) > 0, "the first layer must be active on the whole box"
    label = y.item()
    minima = []
    for j in range(len(W2)):
        if j != label:
            a = [p - q for p, q in zip(A[label], A[j])]
            constant = _dot(W2[label], b1, b2[label]) - _dot(W2[j], b1, b2[j])
            minima.append(_dot(a, point, constant) - eps * sum(abs(v) for v in a))
    return minima


def test_float64_bounds_are_below_the_exact_minimum_where_float64_cancels():
    """The cancelling nets in float64 with a first-layer bias of 1e16 (its ulp is 2): plain float64
    lands above the exact minimum on some of these nets, no method of ``sound="fp64"`` ever does."""
    optimistic = False
    for seed in range(6):
        model = _cancelling_net(seed, shift=1e16, dtype=torch.float64).eval()
        bm, eps = BoundedModule(model), 0.01
        x, y, spec = torch.rand(1, 4, dtype=torch.float64), torch.tensor([seed % 3]), LinfBall(eps, domain=None)
        mask = torch.ones(1, 3, dtype=torch.bool).scatter(1, y[:, None], False)
        exact = _exact_box_minimum(model, x, y, eps)
        plain = crown.crown_margins(bm, x, y, spec, method="crown", sound=False)[mask]
        optimistic |= any(Fraction(float(p)) > e for p, e in zip(plain, exact))
        for method in ("ibp",) + crown.METHODS:
            options = alpha_options(method, alpha_steps=3)
            bound = crown.crown_margins(bm, x, y, spec, method=method, sound="fp64", **options)[mask]
            assert all(Fraction(float(b)) <= e for b, e in zip(bound, exact)), f"seed {seed} {method}: above the exact minimum"
    assert optimistic, "plain float64 is exact on every net: the test shows nothing"


def test_a_bias_that_absorbs_the_input_in_float64_gives_no_certificate():
    """``w x + 1e20`` then ``- 1e20`` is ``w x`` in real arithmetic and the constant 0 in float64 (the
    input term is below half an ulp of 1e20): the margin ``-1000 x + 100`` on [0.49, 0.51] is at most
    -390, which every sound method must respect (plain float64 claims +100)."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.Linear(1, 2)).double().eval()
    with torch.no_grad():
        model[0].weight.fill_(-1000.0)
        model[0].bias.fill_(1e20)
        model[2].weight.fill_(1.0)
        model[2].bias.fill_(-1e20)
        model[3].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model[3].bias.copy_(torch.tensor([100.0, 0.0]))
    bm, x, y, spec = BoundedModule(model), torch.tensor([[0.5]], dtype=torch.float64), torch.tensor([0]), LinfBall(0.01)
    assert crown.crown_margins(bm, x, y, spec, method="crown", sound=False)[0, 1] == 100.0
    for method in ("ibp",) + crown.METHODS:
        assert crown.crown_margins(bm, x, y, spec, method=method, sound="fp64")[0, 1] <= -390.0, method


def test_products_that_underflow_are_covered():
    """Four products ``2^-149 * 0.5`` round to 0 in float32 (the relative error bounds of γ_n say
    nothing there), then two layers of 2^60 make the lost ``2^-148`` worth ``2^-28``: the margin
    ``1e-9 - z`` is negative on the whole box, and no sound method may certify it (plain float32
    arithmetic claims +1e-9)."""
    model = nn.Sequential(nn.Linear(4, 1), nn.Linear(1, 1), nn.Linear(1, 1), nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(2.0 ** -149)
        for layer in model[1:3]:
            layer.weight.fill_(2.0 ** 60)
        model[3].weight.copy_(torch.tensor([[-1.0], [0.0]]))
        model[3].bias.copy_(torch.tensor([1e-9, 0.0]))
        for layer in model[:3]:
            layer.bias.zero_()
    bm, x, y, spec = BoundedModule(model), torch.full((1, 4), 0.5), torch.tensor([0]), LinfBall(0.01, domain=None)
    exact = Fraction(1e-9) - 4 * Fraction(51, 100) * Fraction(2) ** -29  # the smallest margin on the box
    assert crown.crown_margins(bm, x, y, spec, method="crown", sound=False)[0, 1] > 0
    for mode in ("fp32", "fp64"):
        for method in ("ibp",) + crown.METHODS:
            bound = crown.crown_margins(bm, x, y, spec, method=method, sound=mode)[0, 1]
            assert Fraction(float(bound)) <= exact, f"{mode} {method}: {float(bound)} certifies a false margin"


def test_a_backward_pass_that_overflows_falls_back_to_ibp():
    """Three layers of 2^80: CROWN's coefficients overflow float32 (inf, then NaN), IBP's interval does
    not; every method returns IBP's sound bound instead of NaN."""
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(4)], nn.Linear(1, 2)).eval()
    with torch.no_grad():
        for layer in model:
            layer.weight.fill_(2.0 ** 80)
            layer.bias.zero_()
        model[0].weight.fill_(3 * 2.0 ** -149)
        model[4].weight.copy_(torch.tensor([[-1.0], [0.0]]))
    bm, x, y, spec = BoundedModule(model), torch.tensor([[0.5]]), torch.tensor([0]), LinfBall(0.01, domain=None)
    smallest = -Fraction(3 * 51, 100) * Fraction(2) ** (240 - 149)  # the smallest margin on the box
    ibp = crown.crown_margins(bm, x, y, spec, method="ibp", sound="fp32")[0, 1]
    for method in crown.METHODS:
        bound = crown.crown_margins(bm, x, y, spec, method=method, sound="fp32")[0, 1]
        assert bound == ibp and Fraction(float(bound)) <= smallest, method


def _two_relus(w1, b1, w2, b2, w3, dtype):
    """Linear(1, 1), ReLU, Linear(1, 1), ReLU, Linear(1, 2) with margin ``z0 - z1 = 1 - w3 h2``."""
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)).to(dtype).eval()
    with torch.no_grad():
        model[0].weight.fill_(w1)
        model[0].bias.fill_(b1)
        model[2].weight.fill_(w2)
        model[2].bias.fill_(b2)
        model[4].weight.copy_(torch.tensor([[0.0], [w3]], dtype=dtype))
        model[4].bias.copy_(torch.tensor([1.0, 0.0], dtype=dtype))
    return model


@pytest.mark.parametrize("dtype, weights, eps, modes", [
    (torch.float32, (1e25, 0.0, 1e25, -5e34, 1e-30), 1e-15, ["fp32", False]),
    (torch.float64, (3.0056302211996516e+224, -3.68436280393947e-36, 1.4791057930591257e+245,
                     -1.0729426063720253e+210, 1.0343503768463839e-210), 4.349381789419529e-260, [True, False]),
], ids=["float32", "float64"])
def test_a_pre_activation_bound_that_overflows_to_nan_is_no_dead_neuron(dtype, weights, eps, modes):
    """Pure CROWN's bound on the second ReLU's input overflows (-inf + inf = NaN): read as ``NaN < 0``
    is False the neuron looked dead and the margin bound was 1, above the margin the net reaches at
    x + eps (exact rational arithmetic; plain arithmetic within 1e-6 of it); a NaN bound is unknown
    (-inf / +inf), every bound through it NaN and discarded."""
    w1, b1, w2, b2, w3 = weights
    bm = BoundedModule(_two_relus(w1, b1, w2, b2, w3, dtype))
    x, y, spec = torch.zeros(1, 1, dtype=dtype), torch.tensor([0]), LinfBall(eps, domain=None)
    h1 = max(Fraction(w1) * Fraction(eps) + Fraction(b1), Fraction(0))
    reached = 1 - Fraction(w3) * max(Fraction(w2) * h1 + Fraction(b2), Fraction(0))
    for method, sound in itertools.product(crown.METHODS, modes):
        bound = crown.crown_margins(bm, x, y, spec, method=method, sound=sound)[0, 1]
        slack = 0 if sound else Fraction(1, 10 ** 6) * abs(reached)
        assert Fraction(float(bound)) <= reached + slack, (method, sound, float(bound), float(reached))


@pytest.mark.parametrize("spec", [L2Ball(0.05), L1Ball(0.05)])
def test_an_exact_first_layer_that_overflows_gives_no_certificate(spec):
    """Weights of 3e38 on two inputs of 0.9: the l2 / l1 first layer overflows float32 (NaN bounds);
    every method of plain float32 returned a margin of 1 where the net's margin is -5.4e8."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3e38, 3e38], [-3e38, -3e38]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[0.0, 0.0], [1e-30, 0.0]]))
        model[2].bias.copy_(torch.tensor([1.0, 0.0]))
    bm, x, y = BoundedModule(model), torch.tensor([[0.9, 0.9]]), torch.tensor([0])
    for method, sound in itertools.product(crown.METHODS, [False, "fp32", True]):
        assert crown.crown_margins(bm, x, y, spec, method=method, sound=sound)[0, 1] < -5e8, (method, sound)
    for lower, upper in crown.preactivation_bounds(bm, x, spec, method="crown-ibp", sound=False):
        assert not (lower.isnan().any() or upper.isnan().any())


@pytest.mark.parametrize("slope", [0.01, 0.7])
def test_alpha_crown_slopes_searched_in_float32_stay_in_the_real_range(slope):
    """float32(0.01) and float32(0.7) lie below 0.01 and 0.7: a lower line with such a slope is above
    the LeakyReLU for h < 0. α-CROWN searches its slopes in float32; the fp64 bound must clamp them
    back into [a↑, 1] of float64. At x = -1e7 (in the set) the margin is exactly ``a (-1e7 - 1) + b``,
    with b chosen just above the margin's size."""
    model = nn.Sequential(nn.Linear(1, 1), nn.LeakyReLU(slope), nn.Linear(1, 2)).eval()
    eps, b = 1e7, round(slope * 1e7) + 0.0078125
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-1.0)
        model[2].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model[2].bias.copy_(torch.tensor([b, 0.0]))
    exact = Fraction(slope) * (-Fraction(eps) - 1) + Fraction(model[2].bias[0].item())
    for mode in ("fp64", "fp32"):
        bound = crown.crown_margins(BoundedModule(model), torch.zeros(1, 1), torch.tensor([0]),
                                    LinfBall(eps, domain=None), method="alpha-crown", sound=mode)[0, 1]
        assert Fraction(float(bound)) <= exact, f"{mode}: {float(bound)} above the margin {float(exact)} at x = -eps"


def test_alpha_crown_with_an_eps_beyond_float32_searches_in_float64():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    x, y = torch.rand(2, 4, dtype=torch.float64), torch.tensor([0, 1])
    spec = LinfBall(1e39, domain=None)
    alpha = crown.crown_margins(BoundedModule(model), x, y, spec, method="alpha-crown", alpha_steps=3)
    assert torch.isfinite(alpha).all()
    assert (alpha >= crown.crown_margins(BoundedModule(model), x, y, spec, method="crown")).all()


@pytest.mark.parametrize("mode", ["fp64", "fp32"])
def test_batchnorm_is_certified_as_the_real_function_of_its_parameters(mode):
    """BatchNorm1d with running mean 1e20, variance 2 and bias ≈ 1e20 / sqrt(2): its shift
    ``bias - mean / sqrt(2)`` is a difference of two numbers near 7e19, so the float64 derivation of
    (scale, shift) is off by about 1e4. The head's bias puts the real margin at -2000 (60-digit decimal
    arithmetic): a certificate for the float64-derived affine (3816) would be false for the layer."""
    getcontext().prec = 60
    bn = nn.BatchNorm1d(1, eps=0.0)
    model = nn.Sequential(nn.Linear(1, 1), bn, nn.Linear(1, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        bn.running_mean.fill_(1e20)
        bn.running_var.fill_(2.0)
        bn.weight.fill_(1.0)
        bn.bias.fill_(float(Decimal(1e20) / Decimal(2).sqrt()))
    if mode == "fp64":
        model = model.double()
    mean, bias = Decimal(bn.running_mean.item()), Decimal(bn.bias.item())
    real = lambda x, c: (Decimal(x) - mean) / Decimal(2).sqrt() + bias + Decimal(c)  # noqa: E731
    head = float(-real(0.49, 0.0)) - 2000.0
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0], [0.0]]))
        model[2].bias.copy_(torch.tensor([head, 0.0]))
    smallest = min(real(0.49, model[2].bias[0].item()), real(0.51, model[2].bias[0].item()))
    assert smallest < -1000
    x = torch.tensor([[0.5]], dtype=torch.float64 if mode == "fp64" else torch.float32)
    for method in ("ibp", "crown"):
        bound = crown.crown_margins(BoundedModule(model), x, torch.tensor([0]), LinfBall(0.01, domain=None),
                                    method=method, sound=mode)[0, 1]
        assert Decimal(bound.item()) <= smallest, f"{method}: {bound.item()} above the real margin {smallest:.6g}"


def _fractions(t):
    """A tensor as nested lists of exact Fractions."""
    return [_fractions(row) for row in t] if t.dim() else Fraction(float(t))


def _linears(model):
    return [(_fractions(m.weight.detach()), _fractions(m.bias.detach())) for m in model if isinstance(m, nn.Linear)]


def _dot(a, b, start=Fraction(0)):
    return sum((u * v for u, v in zip(a, b)), start)


def _exact_first_bounds(spec, x, W, b):
    """The input box (lo, hi) and the exact IBP bounds of the first Linear over the input set (l∞ box in
    the domain; l1 ball by the dual norm, intersected with its box) for one sample x."""
    eps = Fraction(float(spec.eps))
    lo = [max(v - eps, Fraction(0)) if spec.domain else v - eps for v in x]
    hi = [min(v + eps, Fraction(1)) if spec.domain else v + eps for v in x]
    lower, upper = _exact_interval(W, b, lo, hi)
    if isinstance(spec, L1Ball):
        centre = [_dot(row, x, c) for row, c in zip(W, b)]
        spread = [eps * max(abs(w) for w in row) for row in W]
        lower = [max(a, c - s) for a, c, s in zip(lower, centre, spread)]
        upper = [min(a, c + s) for a, c, s in zip(upper, centre, spread)]
    return lo, hi, lower, upper


def _exact_interval(W, b, lo, hi):
    """The exact interval image of the box [lo, hi] under ``W h + b``."""
    lower = [sum((min(w * l, w * h) for w, l, h in zip(row, lo, hi)), c) for row, c in zip(W, b)]
    upper = [sum((max(w * l, w * h) for w, l, h in zip(row, lo, hi)), c) for row, c in zip(W, b)]
    return lower, upper


def _exact_backward(row, linears, relaxations):
    """``A`` on the input and the bias of CROWN-IBP from the specification row with the given relaxations
    (lower slope, upper slope, offset per ReLU), in exact arithmetic."""
    A, bias = row, Fraction(0)
    for k in reversed(range(len(linears))):
        W, b = linears[k]
        bias += _dot(A, b)
        A = [_dot(A, [W[o][j] for o in range(len(W))]) for j in range(len(W[0]))]
        if k:
            lower, upper, offset = relaxations[k - 1]
            bias += _dot([min(a, 0) for a in A], offset)
            A = [a * (s if a >= 0 else t) for a, s, t in zip(A, lower, upper)]
    return A, bias


def _exact_margins(linears, point, label):
    h = point
    for k, (W, b) in enumerate(linears):
        h = [_dot(row, h, c) for row, c in zip(W, b)]
        h = [max(v, 0) for v in h] if k + 1 < len(linears) else h
    return [h[label] - h[j] for j in range(len(h)) if j != label]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spec", [LinfBall(0.15), L1Ball(0.4, domain=None)])
@pytest.mark.parametrize("mode, dtype", [("fp32", torch.float32), ("fp64", torch.float64)])
@pytest.mark.parametrize("scale", [1.0, 1e4], ids=["plain", "large"])
def test_sound_bounds_are_below_exact_rational_crown_ibp_and_the_true_minimum(seed, spec, mode, dtype, scale):
    """Tiny Linear/ReLU nets (``large``: weights times 1e4, biases times 1e12, so that the biases
    absorb much of the input terms), the sound run checked in exact rational arithmetic: its IBP
    bounds contain the exact IBP bounds, each relaxation holds at both ends of its bounds, the exact
    CROWN-IBP bound with those relaxations is >= the sound one, and the margins at the vertices of the
    l1 ball or on a grid of the box (exact) are >= the returned margins."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype).eval()
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.mul_(scale)
            layer.bias.mul_(scale ** 3)
    bm = BoundedModule(model)
    x, y = torch.rand(1, 3, dtype=dtype), torch.tensor([seed % 3])
    problem = crown._problem(bm, x, y, spec, mode, None)
    chain = passes.relaxations(problem, crown=False)
    C, rows, mask = crown._specification(y, 3, dtype)
    bound = passes.linear_bound(problem, chain, C, rows)
    margins = crown.crown_margins(bm, x, y, spec, method="crown-ibp", sound=mode)[mask]
    linears, point = _linears(model), _fractions(x[0])
    lo, hi, lower, upper = _exact_first_bounds(spec, point, *linears[0])
    relaxations = []
    for k, i in enumerate(sorted(chain.bounds)):
        low32, high32 = (_fractions(t[0]) for t in chain.bounds[i])
        assert all(a <= e for a, e in zip(low32, lower)) and all(e <= a for a, e in zip(high32, upper))
        relaxations.append([_fractions(t[0]) for t in chain.relaxations[i].packed.unbind(-1)])
        for s, t, o, l, u in zip(*relaxations[-1], low32, high32):
            assert all(s * h <= max(h, 0) <= t * h + o for h in (l, u)), "a relaxation fails at an end"
        if k + 1 < len(linears):
            lower, upper = _exact_interval(*linears[k + 1], [max(v, 0) for v in lower], [max(v, 0) for v in upper])
    eps = Fraction(float(spec.eps))
    for n, row in enumerate(_fractions(C)):
        A, bias = _exact_backward(row, linears, relaxations)
        if isinstance(spec, L1Ball):
            exact = _dot(A, point, bias) - eps * max(abs(a) for a in A)
        else:
            exact = sum((min(a * l, a * h) for a, l, h in zip(A, lo, hi)), bias)
        assert exact >= Fraction(float(bound[n])), f"row {n}: the exact CROWN-IBP bound is below the sound one"
    if isinstance(spec, L1Ball):  # x and the vertices x ± eps e_i of the l1 ball
        points = [point] + [[v + sign * eps * (i == j) for j, v in enumerate(point)] for i in range(3) for sign in (-1, 1)]
    else:
        points = itertools.product(*[[l + (h - l) * Fraction(t, 4) for t in range(5)] for l, h in zip(lo, hi)])
    for p in points:
        assert all(t >= Fraction(float(m)) for t, m in zip(_exact_margins(linears, list(p), y.item()), margins))


@pytest.mark.parametrize("mode", ["fp32", "fp64"])
def test_dead_relus_leave_no_subnormal_numbers(mode):
    """ReLUs whose input is never positive have the image [0, 0]; rounded outwards by one ulp that is
    ± the smallest subnormal, and products with it are subnormal (50x slower on CPUs, on every layer
    after). The sound IBP and CROWN bounds, the error weights of every layer (activations included)
    and the relaxations hold no subnormal number, and the margins stay below sampled ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 3)).eval()
    with torch.no_grad():
        model[0].bias[:2] = -10.0  # two channels dead on the whole input set
    bm, x = BoundedModule(model), torch.rand(2, 1, 4, 4)
    y, spec = model(x).argmax(1), LinfBall(0.05)
    problem = crown._problem(bm, x, y, spec, mode, None)
    chain = passes.relaxations(problem, crown=True)
    tiny = torch.finfo(problem.dtype).tiny
    tensors = ([t for pair in problem.arithmetic.ibp for t in pair] + [t for pair in chain.bounds.values() for t in pair]
               + [w for w in chain.weights.values() if w is not None] + [r.packed for r in chain.relaxations.values()])
    assert all(not ((t != 0) & (t.abs() < tiny)).any() for t in tensors)
    assert (problem.arithmetic.ibp[1][1][:, :2] < 0).all()  # two channels dead: pre-activation upper bounds < 0
    margins = crown.crown_margins(bm, x, y, spec, method="crown", sound=mode)
    points = (x[None] + spec.eps * (2 * torch.rand(128, *x.shape) - 1)).clamp(0, 1)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(128, 2, 3)
    true = (logits.gather(2, y[None, :, None].expand(128, -1, 1)) - logits).amin(0)
    assert (margins <= true).all()


@pytest.mark.parametrize("spec", [LinfBall(0.05), L2Ball(0.05), L1Ball(0.05)])
def test_ibp_margins_lost_to_an_overflow_are_minus_infinity_and_zero_at_the_label(spec):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(3e38)
    margins = BoundedModule(model).propagate(torch.tensor([[0.9, 0.9]]), [spec], torch.tensor([1])).margins[0]
    assert margins.tolist() == [[-float("inf"), 0.0, -float("inf")]]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", [pytest.param(d, marks=[pytest.mark.gpu] if d == "cuda" else []) for d in DEVICES])
@pytest.mark.parametrize("mode", ["fp32", "fp64"])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_sound_bounds_on_each_device_are_below_plain_float64_on_the_cpu_and_sampled_margins(device, mode, method):
    """The sound modes where the model lives (on CUDA: cuBLAS and torch's own convolutions, cuDNN off):
    below the plain float64 bound computed on the CPU (IBP, CROWN-IBP: the same relaxations up to
    rounding; CROWN's relaxations move with its intermediate bounds, so it is compared loosely), within
    1e-3 of it, and below the margins at points of the set."""
    torch.manual_seed(0)
    model = models.build("cnn3", "mnist").eval()
    x = torch.rand(3, 1, 28, 28)
    y = model(x).argmax(1)
    wide = copy.deepcopy(model).double()
    reference, bm = BoundedModule(wide), BoundedModule(model.to(device))
    for spec in (LinfBall(0.02), L2Ball(0.2)):
        exact = crown.crown_margins(reference, x.double(), y, spec, method=method, sound=False)
        bound = crown.crown_margins(bm, x.to(device), y.to(device), spec, method=method, sound=mode).cpu().double()
        assert bound.isfinite().all() and (bound - exact).abs().max() < 1e-3, f"{spec}: far from float64"
        if method != "crown":
            assert (bound <= exact).all(), f"{spec}: above the float64 bound by {(bound - exact).max():.3g}"
        for point in _sample(spec, x.double()):
            assert (_true_margins(wide(point), y) >= bound).all(), f"{spec}: unsound"
