"""BoundedModule's API: natural output, one-pass stacking, BatchNorm statistics, shared
parameters, gradients, and the models."""
import copy

import pytest
import torch
from torch import nn

import cure_fast
from cure_fast import BoundedModule, L2Ball, LinfBall, models

SPECS = [LinfBall(0.05), L2Ball(0.3), L2Ball(0.2, domain=None)]


def _small_cnn(dtype=torch.float32):
    torch.manual_seed(0)
    data = models.DatasetInfo((2, 6, 6), 3, (0.4, 0.5), (0.3, 0.2))
    return models.cnn5(data, width=2, linear=5).to(dtype), torch.rand(4, 2, 6, 6, dtype=dtype)


def test_forward_is_exactly_the_model():
    model, x = _small_cnn()
    for train in (True, False):
        model.train(train)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        assert torch.equal(BoundedModule(model)(x), expected)


@pytest.mark.parametrize("train", [False, True])
def test_propagate_logits_match_the_model(train):
    model, x = _small_cnn(torch.float64)
    model.train(train)
    expected = copy.deepcopy(model)(x)
    out = BoundedModule(model).propagate(x, SPECS)
    torch.testing.assert_close(out.logits, expected)
    for lower, upper in out.bounds:
        assert (lower <= out.logits + 1e-12).all() and (out.logits <= upper + 1e-12).all()


def test_train_mode_updates_running_statistics_exactly_once_like_the_model():
    model, x = _small_cnn()
    twin = copy.deepcopy(model)
    model.train(), twin.train()
    BoundedModule(model).propagate(x, SPECS, torch.tensor([0, 1, 2, 0]))
    twin(x)
    for (name, mine), (_, theirs) in zip(model.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(mine, theirs, msg=f"buffer {name} differs")
    assert all(b.item() == 1 for n, b in model.named_buffers() if n.endswith("num_batches_tracked"))


def test_momentum_none_uses_the_cumulative_average():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=None), nn.ReLU(), nn.Linear(4, 2)).train()
    twin = copy.deepcopy(model)
    bm = BoundedModule(model)
    for seed in range(3):
        x = torch.rand(5, 3, generator=torch.Generator().manual_seed(seed))
        bm.propagate(x, [LinfBall(0.1)])
        twin(x)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


def test_eval_mode_leaves_buffers_alone():
    model, x = _small_cnn()
    model.eval()
    before = {n: b.clone() for n, b in model.named_buffers()}
    BoundedModule(model).propagate(x, SPECS)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())


def test_one_pass_equals_separate_passes_and_per_sample_eps_equals_per_sample_runs():
    model, x = _small_cnn(torch.float64)
    model.eval()
    bm = BoundedModule(model)
    together = bm.propagate(x, SPECS)
    for spec, bounds in zip(SPECS, together.bounds):
        alone = bm.bounds(x, spec)
        torch.testing.assert_close(bounds, alone)
    eps = torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64)
    batched = bm.bounds(x, L2Ball(eps))
    for b in range(4):
        single = bm.bounds(x[b:b + 1], L2Ball(eps[b].item()))
        torch.testing.assert_close(batched[0][b:b + 1], single[0])
        torch.testing.assert_close(batched[1][b:b + 1], single[1])


def test_parameters_are_shared_and_training_the_model_moves_the_bounds():
    model, x = _small_cnn()
    bm = BoundedModule(model.eval())
    assert [id(p) for p in bm.parameters()] == [id(p) for p in model.parameters()]
    before = bm.bounds(x, LinfBall(0.1))[1].detach()
    with torch.no_grad():
        model[-1].bias.add_(1.0)
    torch.testing.assert_close(bm.bounds(x, LinfBall(0.1))[1], before + 1.0)


def test_gradients_reach_every_parameter_and_the_input():
    model, x = _small_cnn()
    model.train()
    x.requires_grad_(True)
    out = BoundedModule(model).propagate(x, SPECS, torch.tensor([0, 1, 2, 1]))
    loss = sum(torch.nn.functional.cross_entropy(-m, torch.tensor([0, 1, 2, 1])) for m in out.margins)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def _as_function(model, names):
    """f(x, *tensors) -> model with the named parameters replaced by the given tensors."""
    modules = dict(model.named_modules())

    def swap(tensors):
        for name, t in zip(names, tensors):
            owner, attr = name.rsplit(".", 1)
            delattr(modules[owner], attr)
            setattr(modules[owner], attr, t)
    return swap


@pytest.mark.parametrize("train", [False, True])
def test_gradcheck_bounds_margins_and_propagate(train):
    torch.manual_seed(0)
    model = nn.Sequential(cure_fast.nn.Normalize([0.5], [0.3]), nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    model.train(train)
    x = (torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    y = torch.tensor([0, 2, 1])
    names = ["1.weight", "5.weight", "7.bias"]
    weights = [dict(model.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]
    swap = _as_function(model, names)
    bm = BoundedModule(model)
    specs = [LinfBall(0.05), L2Ball(0.1)]

    def everything(x, *tensors):
        swap(tensors)
        out = bm.propagate(x, specs, y)
        flat = [out.logits] + [b for pair in out.bounds for b in pair] + out.margins
        return tuple(t for t in flat) + tuple(lo for lo, _ in out.preactivation_bounds(1))

    def bounds_only(x, *tensors):
        swap(tensors)
        return bm.bounds(x, specs[1])

    def margins_only(x, *tensors):
        swap(tensors)
        return bm.margins(x, y, specs[0])

    for fn in (everything, bounds_only, margins_only):
        assert torch.autograd.gradcheck(fn, (x, *weights), eps=1e-6, atol=1e-5, fast_mode=True)


def test_propagate_accepts_one_spec_or_none():
    model, x = _small_cnn()
    bm = BoundedModule(model.eval())
    assert len(bm.propagate(x, LinfBall(0.1)).bounds) == 1
    out = bm.propagate(x)
    assert out.bounds == [] and out.margins is None
    torch.testing.assert_close(out.logits, model(x))


def test_layer_and_preactivation_bounds_have_layer_shapes():
    model, x = _small_cnn()
    bm = BoundedModule(model.eval())
    out = bm.propagate(x, SPECS)
    layers = out.layer_bounds(1)
    h = x
    for (lower, upper), module in zip(layers, model):
        h = module(h)
        assert lower.shape == h.shape == upper.shape
    relus = [i for i, m in enumerate(model) if isinstance(m, nn.ReLU)]
    pre = out.preactivation_bounds(1)
    assert len(pre) == len(relus)
    for (lower, upper), i in zip(pre, relus):
        assert torch.equal(lower, layers[i - 1][0]) and torch.equal(upper, layers[i - 1][1])


def test_nested_sequentials_are_flattened():
    inner = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    model = nn.Sequential(nn.Flatten(), nn.Sequential(inner, nn.Identity()), nn.Linear(3, 2))
    bm = BoundedModule(model)
    assert bm.layer_names == ["0", "1.0.0", "1.0.1", "1.1", "2"]
    x = torch.rand(2, 2, 2)
    lower, upper = bm.bounds(x, LinfBall(0.1))
    assert lower.shape == (2, 2) and (lower <= model(x)).all()


class _Stack(nn.Sequential):
    """A subclass that only names the container: its output is its layers' in order."""


class _Negated(nn.Sequential):
    def forward(self, x):
        return -super().forward(x)


def test_a_model_whose_output_is_not_its_layers_in_order_is_refused():
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    for model in (_Negated(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
                  nn.Sequential(nn.Linear(4, 3), _Negated(nn.ReLU(), nn.Linear(3, 2)))):
        with pytest.raises(ValueError, match=r"\(_Negated\) defines _Negated.forward, which the bounds would not"):
            BoundedModule(model.eval())
    plain = _Stack(nn.Linear(4, 3), _Stack(nn.ReLU(), nn.Linear(3, 2))).eval()
    bm = BoundedModule(plain)
    assert bm.layer_names == ["0", "1.0", "1.1"]
    lower, upper = bm.bounds(x, LinfBall(0.0))
    assert torch.allclose(lower, plain(x)) and torch.allclose(upper, plain(x))
    for register in (lambda m: m.register_forward_hook(lambda module, args, out: -out),
                     lambda m: m.register_forward_pre_hook(lambda module, args: (2 * args[0],))):
        handle = register(plain[1][1])  # after wrapping: found at the next call
        for call in (lambda: bm.bounds(x, LinfBall(0.1)), lambda: bm.margins(x, y, LinfBall(0.1), method="crown")):
            with pytest.raises(ValueError, match=r"1.1 \(Linear\) has a forward hook.*handle.remove\(\)"):
                call()
        handle.remove()
    plain[0].forward = lambda x: 2 * x
    with pytest.raises(ValueError, match=r"0 \(Linear\) has a forward of its own, set on the instance"):
        bm.bounds(x, LinfBall(0.1))
    del plain[0].forward
    for method in ("__call__", "__iter__", "_call_impl"):
        stack = type("Stack", (nn.Sequential,), {method: lambda self, *args: None})(nn.Linear(4, 2))
        with pytest.raises(ValueError, match=rf"the model \(Stack\) defines Stack.{method}, which"):
            BoundedModule(stack)
    conv = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten())
    wrapped = BoundedModule(conv)
    conv[0].padding_mode = "reflect"  # changed in place after wrapping: checked again at the next call
    with pytest.raises(ValueError, match="only padding_mode='zeros'"):
        wrapped.bounds(torch.rand(1, 1, 4, 4), LinfBall(0.1))
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, out: out)
    try:
        with pytest.raises(ValueError, match="a global module forward hook"):
            bm.bounds(x, LinfBall(0.1))
    finally:
        handle.remove()
    assert (bm.margins(x, y, LinfBall(0.1), method="crown") <= bm.margins(x, y, LinfBall(0.0))).all()


def test_parametrized_layers_bound_their_computed_weights_and_train_the_originals():
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Conv2d(1, 3, 3)), nn.ReLU(), nn.Flatten(),
                          parametrizations.orthogonal(nn.Linear(12, 12)), nn.ReLU(), nn.Linear(12, 3)).eval()
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    bm = BoundedModule(model)
    assert bm.layer_names == ["0", "1", "2", "3", "4", "5"]
    lower, upper = bm.bounds(x, LinfBall(0.0))
    torch.testing.assert_close(lower, model(x))
    torch.testing.assert_close(upper, model(x))
    points = (x + 0.05 * (2 * torch.rand(64, *x.shape) - 1)).clamp(0, 1)
    logits = model(points.flatten(0, 1)).view(64, 4, 3)
    reached = (logits.gather(2, y[None, :, None].expand(64, -1, 1)) - logits).amin(0)
    for method in ("ibp", "crown"):
        assert (bm.margins(x, y, LinfBall(0.05), method=method, sound=True) <= reached).all(), method
    original = model[3].parametrizations.weight.original
    out = bm.propagate(x, [LinfBall(0.05)], y)  # the sound modes' copies left the model's weights computed
    out.margins[0].sum().backward()
    assert original.grad is not None and original.grad.abs().sum() > 0
    from cure_fast.training import objectives
    before = original.detach().clone()
    with pytest.warns(UserWarning, match="ibp_init leaves the parametrized weight"):
        objectives.ibp_init(model)
    assert torch.equal(original, before)


def _with_margin_sign_between(d32, d64, gen):
    """A float32 point x in [0, 1]^4 with d64·x > 0 > d32·x (exact in float64), or None: points on the
    float64 boundary, their first coordinate moved by up to 40 steps of 6e-8."""
    x = torch.rand(20000, 4, generator=gen).double() * 0.5 + 0.25
    x[:, 0] -= (x @ d64) / d64[0]
    points = x.float()[:, None, :].repeat(1, 81, 1)
    points[..., 0] += torch.arange(-40, 41, dtype=torch.float32) * 6e-8
    exact = points.double()
    between = (exact @ d64 > 0) & (exact @ d32 < 0) & (points.amin(2) >= 0) & (points.amax(2) <= 1)
    found = between.flatten().nonzero()
    return points.flatten(0, 1)[found[0, 0]] if len(found) else None


def test_sound_float64_bounds_a_parametrized_layer_with_the_weights_the_model_computes():
    """Cast to float64, a spectral-normalized weight would be computed anew in float64 (1.9e-8 off):
    a point between the two decision boundaries was certified for the class the model does not give."""
    from torch.nn.utils import parametrizations
    torch.manual_seed(1)
    layer = parametrizations.spectral_norm(nn.Linear(4, 2, bias=False)).eval()
    w32, w64 = layer.weight.detach().double(), copy.deepcopy(layer).double().weight.detach()
    d32, d64 = w32[0] - w32[1], w64[0] - w64[1]
    point = _with_margin_sign_between(d32, d64, torch.Generator().manual_seed(0))
    assert point is not None
    margins = BoundedModule(nn.Sequential(layer)).margins(point[None], torch.tensor([0]), LinfBall(0.0),
                                                          method="crown", sound=True)
    assert margins[0, 1] <= d32 @ point.double() < 0


def test_a_layer_placed_twice_is_bounded_twice():
    torch.manual_seed(0)
    shared, block = nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    model = nn.Sequential(shared, nn.ReLU(), shared, block, block, nn.Linear(3, 2)).eval()
    bm = BoundedModule(model)
    assert bm.layer_names == ["0", "1", "2", "3.0", "3.1", "4.0", "4.1", "5"]
    x = torch.rand(4, 3)
    y = model(x).argmin(1)  # the wrong class: no margin may be certified
    for bound in bm.bounds(x, LinfBall(0.0)):
        torch.testing.assert_close(bound, model(x))
    for method in ("ibp", "crown", "alpha-crown"):
        assert (bm.margins(x, y, LinfBall(0.01), method=method, sound=True) <= 0).all(), method


def test_margins_fall_back_to_logit_bounds_when_the_network_does_not_end_in_linear():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    x, y = torch.rand(2, 4), torch.tensor([0, 2])
    bm = BoundedModule(model)
    lower, upper = bm.bounds(x, LinfBall(0.1))
    expected = (lower.gather(1, y[:, None]) - upper).scatter(1, y[:, None], 0.0)
    torch.testing.assert_close(bm.margins(x, y, LinfBall(0.1)), expected)


@pytest.mark.parametrize("dataset", sorted(models.DATASETS))
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_build_and_bound(name, dataset):
    info = models.DATASETS[dataset]
    model = models.build(name, dataset).eval()
    assert isinstance(model[0], cure_fast.nn.Normalize)
    x = torch.rand((2,) + info.shape)
    lower, upper = BoundedModule(model).bounds(x, LinfBall(1 / 255))
    assert lower.shape == (2, info.classes) and (lower <= upper).all()


def test_cnn7_architecture():
    model = models.build("cnn7", "cifar10")
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 128]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 1]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(128 * 16 * 16, 512), (512, 10)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model) == 5
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model) == 1


@pytest.mark.parametrize("train", [False, True])
def test_specs_with_their_own_centre_equal_propagating_from_that_centre(train):
    """A set around another point (small-box training) bounds like propagating that point itself,
    while the natural stream (and so train-mode BatchNorm statistics) stays on x."""
    model, x = _small_cnn(torch.float64)
    model.eval()
    centre = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    bm = BoundedModule(model)
    specs = [LinfBall(0.02, center=centre), L2Ball(0.1, center=centre), L2Ball(0.1, domain=None, center=centre)]
    moved = bm.propagate(x, specs)
    direct = bm.propagate(centre, [LinfBall(0.02), L2Ball(0.1), L2Ball(0.1, domain=None)])
    for a, b in zip(moved.bounds, direct.bounds):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(moved.logits, model(x))
    if train:
        model.train()
        stats_from_x = copy.deepcopy(model)
        out = BoundedModule(model).propagate(x, specs)
        torch.testing.assert_close(out.logits, stats_from_x(x))


def test_bounds_follow_a_layer_replaced_added_or_removed_after_wrapping():
    """A new head for fine-tuning, an appended layer, a dropped one: every method bounds the model as
    it is now (not the layers seen when it was wrapped), and an unsupported new layer is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    bm = BoundedModule(model)
    x, y = torch.rand(2, 4), torch.tensor([0, 1])
    bm.bounds(x, LinfBall(0.01))
    for change in (lambda: model.__setitem__(3, nn.Linear(8, 3)), lambda: model.append(nn.ReLU()),
                   lambda: model.append(nn.Linear(3, 2)), lambda: model.__delitem__(slice(4, 6))):
        change()
        out = model(x)
        lower, upper = bm.bounds(x, LinfBall(0.0))
        assert torch.allclose(lower, out, atol=1e-6) and torch.allclose(upper, out, atol=1e-6)
        actual = out.gather(1, y[:, None]) - out
        for method in ("ibp", "crown", "alpha-crown"):
            margins = bm.margins(x, y, LinfBall(0.0), method=method)
            assert (margins <= actual + 1e-6).all() and (margins >= actual - 1e-5).all(), method
    model.append(nn.MaxPool1d(2))
    with pytest.raises(ValueError, match="MaxPool1d"):
        bm.bounds(x, LinfBall(0.01))


def test_ibp_margins_with_sound_are_the_sound_ibp_of_crown_margins():
    from cure_fast.engine.crown import crown_margins
    model, x = _small_cnn()
    model.eval()
    bm, y = BoundedModule(model), torch.zeros(len(x), dtype=torch.long)
    for sound in (True, "fp32"):
        got = bm.margins(x, y, LinfBall(0.01), sound=sound)
        assert torch.equal(got, crown_margins(bm, x, y, LinfBall(0.01), method="ibp", sound=sound))
        assert (got <= bm.margins(x, y, LinfBall(0.01)) + 1e-5).all()


def test_input_bounds_of_a_layer_that_does_not_exist_is_a_clear_error():
    bm = BoundedModule(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    out = bm.propagate(torch.rand(2, 4), [LinfBall(0.1)])
    assert out.input_bounds(0, 2)[0].shape == (2, 3)
    for layer in (3, -1, 99, 1.0):
        with pytest.raises(ValueError, match=r"one of the model's 3 layers \(0 to 2\)"):
            out.input_bounds(0, layer)
