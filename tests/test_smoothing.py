"""Randomized smoothing against a linear classifier whose p_A is known in closed form, and
test-time adaptive BatchNorm: only BatchNorm buffers change, mode "heldout" is a fixed function,
mode "per-batch" is flagged as not sound."""
import json

import pytest
import torch
from scipy.stats import beta, binom, norm
from torch import nn

from cure_fast.certification.smoothing import (ABSTAIN, Smooth, adapt_batchnorm, clopper_pearson_lower, fewest_samples,
                                               per_batch_batchnorm, plot_smoothing, smoothing_report)
from cure_fast.models import DATASETS, cnn3

SIGMA, ALPHA, N = 0.5, 0.001, 2000
SHAPE = (1, 4, 4)


class Halfspace(nn.Module):
    """f(x) = argmax [w.x + b, 0] with |w| = 1: class 0 on the side w.x + b > 0. Under noise
    N(0, sigma^2 I), p_0 = Phi((w.x + b) / sigma), so g's exact radius is |w.x + b|."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", w / w.norm())
        self.b = b

    def forward(self, x):
        score = x.flatten(1) @ self.w + self.b
        return torch.stack([score, torch.zeros_like(score)], 1)


def _point(model, distance):
    """A point at signed distance ``distance`` from the model's decision boundary."""
    return ((distance - model.b) * model.w).view(SHAPE)


@pytest.fixture
def halfspace():
    torch.manual_seed(0)
    return Halfspace(torch.randn(16, dtype=torch.float32), 0.3)


def _radius_bounds(distance, n, alpha=ALPHA, delta=1e-4):
    """Range the certified radius falls in with probability >= 1 - alpha - delta: at most the exact
    radius, and at least the bound computed from the delta-quantile of the count."""
    p = norm.cdf(abs(distance) / SIGMA)
    low_count = int(binom.ppf(delta, n, p))
    return SIGMA * norm.ppf(beta.ppf(alpha, low_count, n - low_count + 1)), abs(distance)


@pytest.mark.parametrize("distance", [0.4, 1.0, -0.6])
def test_certified_radius_approaches_the_exact_radius_from_below(halfspace, distance):
    torch.manual_seed(1)
    smooth = Smooth(halfspace, 2, SIGMA)
    gaps = []
    for n in (N, 50 * N):
        label, radius = smooth.certify(_point(halfspace, distance), n0=100, n=n, alpha=ALPHA, batch_size=10_000)
        low, exact = _radius_bounds(distance, n)
        assert label == (0 if distance > 0 else 1)
        assert low <= radius <= exact
        gaps.append(exact - radius)
    assert gaps[1] < gaps[0]


def test_abstains_near_the_decision_boundary(halfspace):
    torch.manual_seed(2)
    smooth = Smooth(halfspace, 2, SIGMA)
    for distance in (0.0, 0.01, -0.01):
        assert smooth.certify(_point(halfspace, distance), n=N, alpha=ALPHA) == (ABSTAIN, 0.0)
        assert smooth.predict(_point(halfspace, distance), n=N, alpha=ALPHA) == Smooth.ABSTAIN
    assert smooth.predict(_point(halfspace, 0.5), n=N, alpha=ALPHA) == 0
    assert smooth.predict(_point(halfspace, -0.5), n=N, alpha=ALPHA) == 1


def test_clopper_pearson_lower_bound_closed_forms():
    assert clopper_pearson_lower(0, 100, 0.01) == 0.0
    assert clopper_pearson_lower(100, 100, 0.01) == pytest.approx(0.01 ** (1 / 100), rel=1e-12)
    assert clopper_pearson_lower(1, 1, 0.05) == pytest.approx(0.05, rel=1e-12)


@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05, 2 ** -10, 0.3])
def test_fewest_samples_is_where_a_certificate_first_becomes_possible(alpha):
    n = fewest_samples(alpha)
    assert clopper_pearson_lower(n, n, alpha) > 0.5 >= clopper_pearson_lower(n - 1, n - 1, alpha)


@pytest.mark.parametrize("n, alpha", [(10, 2 ** -10), (5, 2 ** -5), (1, 0.5)])
def test_a_lower_bound_of_exactly_one_half_abstains(halfspace, n, alpha):
    """Every sample on the class with ``alpha ** (1/n) = 1/2``: p_A = 1/2 certifies nothing (Cohen et al.
    need p_A > 1/2); the class at radius 0 was returned."""
    x = _point(halfspace, 5.0)  # far on class 0's side: every noise sample votes for it
    assert clopper_pearson_lower(n, n, alpha) == 0.5
    assert Smooth(halfspace, 2, SIGMA).certify(x, n0=1, n=n, alpha=alpha, batch_size=n) == (ABSTAIN, 0.0)


def test_certify_is_reproducible_under_a_seed(halfspace):
    x = _point(halfspace, 0.2)
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        results.append(Smooth(halfspace, 2, SIGMA).certify(x, n=N, batch_size=300))
    generator = torch.Generator().manual_seed(4)
    first = Smooth(halfspace, 2, SIGMA, generator).certify(x, n=N, batch_size=300)
    generator.manual_seed(4)
    assert results[0] == results[1]
    assert first == Smooth(halfspace, 2, SIGMA, generator).certify(x, n=N, batch_size=300)


def test_sample_counts_add_up_and_follow_the_noise_in_batches(halfspace):
    counts = Smooth(halfspace, 2, SIGMA).sample_counts(_point(halfspace, 0.0), 1001, batch_size=250)
    assert counts.sum() == 1001
    assert counts.min() > 400


def _bn_model():
    torch.manual_seed(5)
    model = cnn3(DATASETS["mnist"], width=2)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def _images(count, seed):
    return torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def test_adapt_batchnorm_changes_only_batchnorm_buffers():
    model = _bn_model()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    adapt_batchnorm(model, _images(40, 0), sigma=0.25, batch_size=16)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key.endswith(BN_BUFFERS):
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert not any(m.training for m in model.modules())


def test_adapt_batchnorm_is_the_cumulative_average_over_the_data():
    model = _bn_model()
    images = _images(32, 1)
    adapt_batchnorm(model, images, sigma=0.0, batch_size=8)
    with torch.no_grad():
        features = model[1](model[0](images.float() / 255))
    torch.testing.assert_close(model[2].running_mean, features.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[2].num_batches_tracked.item() == 4


def test_heldout_mode_leaves_a_fixed_function():
    model = adapt_batchnorm(_bn_model(), _images(32, 2), sigma=0.25, batch_size=16)
    x = _images(6, 3).float() / 255
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        torch.testing.assert_close(model(x.flip(0)).flip(0), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x[2:3])[0], out[2], rtol=1e-5, atol=1e-5)


def test_per_batch_mode_depends_on_the_batch_and_leaves_the_model_untouched():
    model = _bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adaptive = per_batch_batchnorm(model)
    x = _images(6, 4).float() / 255
    with torch.no_grad():
        assert not torch.allclose(adaptive(x)[:3], adaptive(x[:3]), atol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_adapting_a_model_without_batchnorm_is_an_error():
    with pytest.raises(ValueError, match="BatchNorm"):
        adapt_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), _images(4, 0), 0.25)


def test_reports_flag_per_batch_as_not_sound_and_summarize(tmp_path):
    model = _bn_model()
    images, labels = _images(3, 5), torch.tensor([0, 1, 2])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(sigma=0.25, n0=10, n=60, alpha=0.01, batch_size=30)
    with pytest.raises(ValueError, match="heldout_images"):
        smoothing_report(model, images, labels, adapt="heldout", **settings)
    with pytest.raises(ValueError, match="adapt mode"):
        smoothing_report(model, images, labels, adapt="online", **settings)
    heldout = _images(20, 6)
    with pytest.raises(ValueError, match="1 of the images to certify are among heldout_images"):
        smoothing_report(model, images, labels, adapt="heldout", heldout_images=torch.cat([heldout, images[1:2]]),
                         **settings)
    reports = {str(adapt): smoothing_report(model, images, labels, adapt=adapt, heldout_images=heldout, **settings)
               for adapt in (None, "heldout", "per-batch")}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [r["sound"] for r in reports.values()] == [True, True, False]
    for report in reports.values():
        json.dumps(report)
        assert report["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert report["certified_accuracy"] == sorted(report["certified_accuracy"], reverse=True)
        samples = report["samples"]
        assert [s["index"] for s in samples] == [0, 1, 2]
        assert report["acr"] == pytest.approx(sum(s["radius"] * s["correct"] for s in samples) / 3)
        assert all(s["radius"] == 0.0 for s in samples if s["prediction"] == ABSTAIN)
    plot_smoothing(reports, str(tmp_path / "smoothing.png"))
    assert (tmp_path / "smoothing.png").stat().st_size > 0


def test_report_of_the_halfspace_matches_the_exact_radii(halfspace):
    torch.manual_seed(7)
    distances = [0.3, -0.8, 0.0]
    images = torch.stack([_point(halfspace, d) for d in distances])
    report = smoothing_report(halfspace, images, torch.tensor([0, 1, 0]), SIGMA, n=N, batch_size=N, radii=(0, 0.5))
    radii = [s["radius"] for s in report["samples"]]
    for radius, distance in zip(radii[:2], distances):
        low, exact = _radius_bounds(distance, N)
        assert low <= radius <= exact
    assert report["samples"][2]["prediction"] == ABSTAIN
    assert report["certified_accuracy"] == [2 / 3, 1 / 3]
    assert report["acr"] == pytest.approx(sum(radii) / 3)
    assert report["sound"]


def test_a_float64_model_is_evaluated_in_float64(halfspace):
    """Inputs (float32 or uint8) and noise follow the model's dtype, in Smooth, adapt_batchnorm and
    smoothing_report alike."""
    model = Halfspace(halfspace.w.double(), halfspace.b)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    torch.manual_seed(8)
    label, radius = Smooth(model, 2, SIGMA).certify(_point(halfspace, 0.6), n=N, batch_size=500)
    low, exact = _radius_bounds(0.6, N)
    assert label == 0 and low <= radius <= exact
    assert seen and set(seen) == {torch.float64}
    bn = _bn_model().double()
    adapt_batchnorm(bn, _images(16, 9), sigma=0.25, batch_size=8)
    assert bn[2].running_mean.dtype == torch.float64 and bn[2].num_batches_tracked.item() == 2
    report = smoothing_report(bn, _images(2, 10), torch.tensor([0, 1]), 0.25, n0=10, n=20, batch_size=20)
    assert [s["index"] for s in report["samples"]] == [0, 1]


def test_what_would_make_no_certificate_is_refused(halfspace):
    """A non-finite input, alpha outside (0, 1), a num_classes the model does not have, a batch for one
    input, a BatchNorm in train mode: one clear error each, never a class and radius."""
    smooth, x = Smooth(halfspace, 2, SIGMA), _point(halfspace, 0.5)
    for bad in (torch.full(SHAPE, float("nan")), torch.full(SHAPE, float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            smooth.certify(bad, n0=10, n=100)
    for alpha in (2.0, -1.0, 0.0, 1.0):
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            smooth.certify(x, n0=10, n=100, alpha=alpha)
        with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\)"):
            smooth.predict(x, n=100, alpha=alpha)
    with pytest.raises(ValueError, match="num_classes=5"):
        Smooth(halfspace, 5, SIGMA).certify(x, n0=10, n=100)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        smooth.certify(x, n0=10, n=100, batch_size=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    statistics = model[2].running_mean.clone()
    with pytest.raises(ValueError, match=r"layer 2 is in train mode: call \.eval\(\) on the base classifier"):
        Smooth(model, 2, SIGMA).certify(x, n0=10, n=100)
    assert torch.equal(model[2].running_mean, statistics)
    assert Smooth(model.eval(), 2, SIGMA).certify(x, n0=10, n=100)[0] in (ABSTAIN, 0, 1)
    for sigma in (float("inf"), float("nan"), 0.0, "0.5", True):
        with pytest.raises(ValueError, match="sigma, a finite number > 0"):
            Smooth(halfspace, 2, sigma)
    for classes in (10.0, "10", 1):
        with pytest.raises(ValueError, match="num_classes, an int >= 2"):
            Smooth(halfspace, classes, SIGMA)
    assert Smooth(halfspace, 2, torch.tensor(SIGMA)).sigma == SIGMA
    conv = nn.Sequential(nn.Conv2d(SHAPE[0], 2, 3), nn.Flatten(), nn.LazyLinear(2)).eval()
    with pytest.raises(ValueError, match=r"10 noisy copies of x \(3, .*\): .* \(x is one input: is it a batch\?\)"):
        Smooth(conv, 2, SIGMA).certify(torch.rand(3, *SHAPE), n0=10, n=100)
