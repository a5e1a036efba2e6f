"""Bound layers one by one: LeakyReLU's exact interval step and sound relaxation, settings that are
refused with a clear error, and no method writing into its inputs (layers with ``inplace=True``)."""
import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall
from cure_fast.engine import crown
from cure_fast.engine.layers import bound_layer
from cure_fast.nn import Normalize

SEEDS = st.integers(0, 2**31 - 1)


@given(seed=SEEDS, slope=st.floats(0.0, 1.0))
def test_leaky_relu_interval_step_is_the_exact_image(seed, slope):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 5, generator=gen, dtype=torch.float64) * 2 - 1
    model = nn.Sequential(nn.LeakyReLU(slope))
    out = BoundedModule(model).propagate(x, [LinfBall(0.3, domain=(-1.0, 1.0))])
    lower, upper = out.bounds[0]
    f = nn.LeakyReLU(slope)
    torch.testing.assert_close(lower, f((x - 0.3).clamp(min=-1)), rtol=0, atol=1e-15)
    torch.testing.assert_close(upper, f((x + 0.3).clamp(max=1)), rtol=0, atol=1e-15)
    torch.testing.assert_close(out.logits, f(x), rtol=0, atol=0)


@given(seed=SEEDS, slope=st.floats(0.0, 1.0))
def test_leaky_relu_relaxation_bounds_the_function_for_every_alpha(seed, slope):
    gen = torch.Generator().manual_seed(seed)
    a, b = (torch.rand(2, 50, generator=gen, dtype=torch.float64) * 4 - 2)
    lower, upper = torch.minimum(a, b), torch.maximum(a, b)
    layer = bound_layer(nn.LeakyReLU(slope), "0")
    relaxation = layer.relaxation(lower, upper)
    t = torch.rand(200, 1, generator=gen, dtype=torch.float64)
    h = lower + t * (upper - lower)  # points of [l, u]
    value = nn.functional.leaky_relu(h, slope)
    low_slope, up_slope, offset = relaxation.packed.unbind(-1)
    assert (up_slope * h + offset >= value - 1e-12).all()
    for alpha in relaxation.alpha_range:
        slope_used = torch.where(relaxation.unstable, torch.full_like(lower, alpha), low_slope)
        assert (slope_used * h <= value + 1e-12).all()
    image_lower, image_upper = layer.image(lower, upper)
    assert (value >= image_lower - 1e-15).all() and (value <= image_upper + 1e-15).all()


def test_leaky_relu_certifies_like_relu_at_slope_zero():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3)).double().eval()
    leaky = nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.LeakyReLU(0.0), nn.Linear(12, 3)).double().eval()
    leaky.load_state_dict(relu.state_dict())
    x, y = torch.rand(4, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
        options = {} if method == "ibp" else {"sound": False}
        torch.testing.assert_close(BoundedModule(leaky).margins(x, y, LinfBall(0.05), method, **options),
                                   BoundedModule(relu).margins(x, y, LinfBall(0.05), method, **options))


@pytest.mark.parametrize("module, message", [
    (nn.LeakyReLU(-0.1), r"negative_slope must lie in \[0, 1\]"),
    (nn.LeakyReLU(1.5), r"negative_slope must lie in \[0, 1\]"),
    (nn.AvgPool2d(2, divisor_override=-4), "divisor_override must be positive"),
    (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "only padding_mode='zeros'"),
    (nn.Flatten(0), "Flatten must keep the batch dimension"),
    (nn.Sigmoid(), r"layer 0 \(Sigmoid\(\)\) is not supported"),
])
def test_unboundable_settings_are_refused_naming_the_layer(module, message):
    with pytest.raises(ValueError, match=message):
        BoundedModule(nn.Sequential(module))


def test_a_set_centre_outside_the_domain_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.rand(2, 4)
    with pytest.raises(ValueError, match=r"center values span .* outside the domain"):
        BoundedModule(model).propagate(x, [LinfBall(0.1, center=x + 2)])
    with pytest.raises(ValueError, match=r"center values span .* outside the domain"):
        BoundedModule(model).propagate(x, [L2Ball(0.1, center=x - 2)])
    BoundedModule(model).propagate(x, [L2Ball(0.1, center=x - 2, domain=None)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_a_set_centre_that_is_not_finite_is_refused(bad, method):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    x = torch.rand(2, 4)
    center = x.clone()
    center[1, 2] = bad
    for spec in (LinfBall(0.1, center=center, domain=None), L1Ball(0.1, center=center, domain=None)):
        with pytest.raises(ValueError, match="center contains NaN or Inf"):
            BoundedModule(model).margins(x, torch.tensor([0, 1]), spec, method=method)


INPLACE = {
    "relu-first": lambda: [nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16, 3)],
    "leaky-first": lambda: [nn.LeakyReLU(0.2, inplace=True), nn.Flatten(), nn.Linear(16, 3)],
    "dropout-first": lambda: [nn.Dropout(0.5, inplace=True), nn.Flatten(), nn.Linear(16, 3)],
    "after-identity": lambda: [nn.Identity(), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(16, 3)],
    "after-flatten": lambda: [nn.Flatten(), nn.ReLU(inplace=True), nn.Linear(16, 3)],
    "inside": lambda: [Normalize([0.1], [0.5]), nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 5),
                       nn.LeakyReLU(0.1, inplace=True), nn.Dropout(0.2, inplace=True), nn.Linear(5, 3)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(INPLACE))
def test_no_method_writes_into_its_inputs(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(*INPLACE[name]()).to(dtype).eval()
    bm = BoundedModule(model)
    x = torch.rand(2, 1, 4, 4, dtype=dtype) * 2 - 1  # negative values, which an in-place ReLU would overwrite
    y = torch.tensor([0, 2])
    kept_x, kept_y = x.clone(), y.clone()
    specs = [LinfBall(0.1, domain=(-1.0, 1.0)), L2Ball(0.2, domain=(-1.0, 1.0))]
    bm(x)
    bm.propagate(x, specs, y).layer_bounds(0)
    for spec in specs:
        for method in ("ibp", "crown-ibp", "crown", "alpha-crown"):
            for sound in ((None,) if method == "ibp" else (True, False)):
                options = {} if sound is None else {"sound": sound}
                if method == "alpha-crown":
                    options["alpha_steps"] = 2
                bm.margins(x, y, spec, method, **options)
        crown.preactivation_bounds(bm, x, spec, sound=False)
    model.train()
    bm.propagate(x, specs, y)
    assert torch.equal(x, kept_x) and torch.equal(y, kept_y)
