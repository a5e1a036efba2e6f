"""Every bad input gives an error of the right type whose message names the problem."""
import math

import pytest
import torch
from torch import nn

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall, models
from cure_fast import functional as BF

BALLS = [LinfBall, L2Ball]
NAN, INF = math.nan, math.inf


def _mlp(features=4, classes=3):
    return nn.Sequential(nn.Linear(features, 5), nn.ReLU(), nn.Linear(5, classes))


def _propagate(model, x, specs=None, y=None):
    return BoundedModule(model).propagate(x, [LinfBall(0.1)] if specs is None else specs, y)


# ---------------------------------------------------------------- building a BoundedModule

@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Tanh()), r"layer 2 \(Tanh\(\)\) is not supported by BoundedModule"),
    (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 2))), r"layer 1\.0 \(Tanh\(\)\) is not supported"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), r"layer 0 \(Conv2d.*only padding_mode='zeros'"),
    (nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(4, 2)), r"layer 0 \(Flatten.*must keep the batch dimension"),
    (nn.Sequential(), r"at least one layer"),
], ids=["tanh", "nested-tanh", "reflect-padding", "flatten-batch", "empty"])
def test_unsupported_model(model, match):
    with pytest.raises(ValueError, match=match):
        BoundedModule(model)


@pytest.mark.parametrize("model", [nn.Linear(4, 2), nn.ModuleList([nn.Linear(4, 2)])], ids=["linear", "modulelist"])
def test_model_must_be_sequential(model):
    with pytest.raises(ValueError, match=rf"needs an nn.Sequential, got {type(model).__name__}"):
        BoundedModule(model)


def test_supported_layers_are_listed():
    with pytest.raises(ValueError, match=r"layer 0 \(Sigmoid\(\)\) is not supported by BoundedModule; supported: AvgPool2d, .*Conv2d, .*LeakyReLU, Linear, .*ReLU"):
        BoundedModule(nn.Sequential(nn.Sigmoid()))


# ---------------------------------------------------------------- input shapes

def test_input_with_the_wrong_channels():
    model = models.build("cnn3", "cifar10").eval()
    with pytest.raises(ValueError, match=r"Normalize expects 3 channels on dim 1, got input of shape \(2, 1, 28, 28\)"):
        _propagate(model, torch.rand(2, 1, 28, 28))


def test_input_with_the_wrong_image_size():
    model = models.build("cnn3", "cifar10", batchnorm=False)
    with pytest.raises(ValueError, match=r"layer 6 \(Linear.*expects per-sample input of shape \(\.\.\., 2048\), got \(1568,\)"):
        _propagate(model, torch.rand(2, 3, 28, 28))


def test_conv_given_the_wrong_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 2))
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d.*expects per-sample input of shape \(3, H, W\), got \(1, 28, 28\)"):
        _propagate(model, torch.rand(2, 1, 28, 28))


@pytest.mark.parametrize("specs", [[LinfBall(0.1)], [L2Ball(0.1)], []], ids=["linf", "l2", "none"])
def test_linear_given_the_wrong_feature_count(specs):
    with pytest.raises(ValueError, match=r"layer 0 \(Linear.*expects per-sample input of shape \(\.\.\., 4\), got \(5,\)"):
        _propagate(_mlp(), torch.rand(2, 5), specs)


@pytest.mark.parametrize("x", [torch.rand(4), torch.rand(0, 4)], ids=["1-d", "empty"])
def test_input_must_be_a_nonempty_batch(x):
    with pytest.raises(ValueError, match=r"non-empty batch of shape \(B, \.\.\.\)"):
        _propagate(_mlp(), x)


def test_input_must_be_floating():
    with pytest.raises(TypeError, match=r"input must be a floating tensor, got torch.int64"):
        _propagate(_mlp(), torch.ones(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- input sets

@pytest.mark.parametrize("ball", BALLS)
@pytest.mark.parametrize("eps, match", [
    (-0.1, r"eps must be finite and non-negative, got -0.1"),
    (NAN, r"eps must be finite and non-negative, got nan"),
    (INF, r"eps must be finite and non-negative, got inf"),
    (torch.tensor([0.1, -0.2]), r"eps must be finite and non-negative"),
    (torch.tensor([0.1, NAN]), r"eps must be finite and non-negative"),
    (torch.tensor([INF, 0.1]), r"eps must be finite and non-negative"),
    (torch.full((2, 2), 0.1), r"per-sample tensor of shape \(B,\), got shape \(2, 2\)"),
    (torch.tensor([1, 2]), r"eps must be a floating tensor, got dtype torch.int64"),
    ("0.1", r"eps must be a float or a tensor, got str"),
    (None, r"eps must be a float or a tensor, got NoneType"),
    (True, r"eps must be a float or a tensor, got bool"),
], ids=["negative", "nan", "inf", "t-negative", "t-nan", "t-inf", "2-d", "int-tensor", "str", "none", "bool"])
def test_bad_eps(ball, eps, match):
    with pytest.raises(ValueError, match=match):
        ball(eps)


@pytest.mark.parametrize("ball", BALLS)
@pytest.mark.parametrize("domain", [(0.0, 1.0), None])
def test_per_sample_eps_with_the_wrong_batch(ball, domain):
    spec = ball(torch.tensor([0.1, 0.2, 0.3]), domain=domain)
    with pytest.raises(ValueError, match=rf"{ball.__name__}: eps has 3 entries but the batch has 2 samples"):
        _propagate(_mlp(), torch.rand(2, 4), [spec])


@pytest.mark.parametrize("ball", BALLS)
@pytest.mark.parametrize("domain, match", [
    ((1.0, 0.0), r"finite with low < high"),
    ((0.5, 0.5), r"finite with low < high"),
    ((0.0, INF), r"finite with low < high"),
    ((NAN, 1.0), r"finite with low < high"),
    ((0.0,), r"must be a pair \(low, high\) or None"),
    ((0.0, 0.5, 1.0), r"must be a pair \(low, high\) or None"),
    (1.0, r"must be a pair \(low, high\) or None"),
    (("a", "b"), r"must be a pair \(low, high\) or None"),
], ids=["reversed", "empty", "inf", "nan", "single", "triple", "scalar", "strings"])
def test_bad_domain(ball, domain, match):
    with pytest.raises(ValueError, match=match):
        ball(0.1, domain=domain)


@pytest.mark.parametrize("ball", BALLS + [L1Ball])
def test_eps_that_overflows_the_input_dtype(ball):
    with pytest.raises(ValueError, match=rf"{ball.__name__}: eps 1e\+39 overflows the input's dtype float32"):
        _propagate(_mlp(), torch.rand(2, 4), [ball(1e39, domain=None)])


def test_bounds_of_a_spec_that_was_not_propagated():
    out = _propagate(_mlp(), torch.rand(2, 4), [LinfBall(0.1), L2Ball(0.2)])
    for get in (out.preactivation_bounds, out.layer_bounds, lambda k: out.input_bounds(k, 1)):
        with pytest.raises(ValueError, match=r"spec must be the number of one of the 2 specs propagated \(0 to 1\), got 5"):
            get(5)


def test_a_misspelt_backend_is_caught_when_the_bounded_module_is_built():
    with pytest.raises(ValueError, match=r"unknown backend 'trtion'.*did you mean 'triton'"):
        BoundedModule(_mlp(), backend="trtion")


def test_a_domain_given_as_a_string():
    with pytest.raises(ValueError, match=r"domain must be a pair \(low, high\) or None, got '01'"):
        LinfBall(0.1, domain="01")


def test_input_and_model_of_different_dtypes():
    with pytest.raises(TypeError, match=r"the input is float64 but the model is float32: convert one of them"):
        _propagate(_mlp(), torch.rand(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_a_one_class_model_has_no_margin_to_bound(method):
    margins = BoundedModule(_mlp(classes=1).eval()).margins(torch.rand(2, 4), torch.tensor([0, 0]), LinfBall(0.1),
                                                             method=method)
    assert torch.equal(margins, torch.zeros(2, 1))


def test_specs_must_be_balls():
    with pytest.raises(TypeError, match=r"specs must be LinfBall / L2Ball / L1Ball objects, got float"):
        _propagate(_mlp(), torch.rand(2, 4), [0.1])


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("spec", [LinfBall(0.1), L2Ball(0.1, domain=None)], ids=["domain", "no-domain"])
def test_non_finite_input(value, spec):
    x = torch.rand(2, 4)
    x[1, 2] = value
    with pytest.raises(ValueError, match=r"input contains NaN or Inf"):
        _propagate(_mlp(), x, [spec])


@pytest.mark.parametrize("ball", BALLS)
@pytest.mark.parametrize("value, domain", [(1.5, (0.0, 1.0)), (-0.25, (0.0, 1.0)), (0.9, (-1.0, 0.5))])
def test_input_outside_the_domain(ball, value, domain):
    x = torch.full((2, 4), 0.25)
    x[0, 1] = value
    with pytest.raises(ValueError, match=r"input values span \[.*\], outside the domain"):
        _propagate(_mlp(), x, [ball(0.1, domain=domain)])


# ---------------------------------------------------------------- labels

@pytest.mark.parametrize("y, match", [
    (torch.tensor([[0], [1]]), r"labels must be an integer tensor of shape \(2,\)"),
    (torch.tensor([0, 1, 2]), r"labels must be an integer tensor of shape \(2,\)"),
    (torch.tensor([0.0, 1.0]), r"labels must be an integer tensor of shape \(2,\)"),
    ([0, 1], r"labels must be an integer tensor of shape \(2,\)"),
    (torch.tensor([0, 3]), r"labels must lie in \[0, 3\), got values in \[0, 3\]"),
    (torch.tensor([-1, 2]), r"labels must lie in \[0, 3\), got values in \[-1, 2\]"),
    (torch.tensor([True, False]), r"labels must be an integer tensor of shape \(2,\), got \(2,\) bool"),
], ids=["2-d", "too-long", "float", "list", "too-high", "negative", "bool"])
def test_bad_labels(y, match):
    with pytest.raises(ValueError, match=match):
        _propagate(_mlp(), torch.rand(2, 4), [LinfBall(0.1), L2Ball(0.2)], y)


def test_a_spec_that_is_no_set_or_list_of_sets_is_named():
    for specs in (0.1, "LinfBall"):
        with pytest.raises(TypeError, match="specs must be a LinfBall / L2Ball / L1Ball or a list of them"):
            _propagate(_mlp(), torch.rand(2, 4), specs)


def test_batchnorm_in_train_mode_needs_more_than_one_value():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).train()
    with pytest.raises(ValueError, match=r"expected more than 1 value per channel when training"):
        _propagate(model, torch.rand(1, 4))


# ---------------------------------------------------------------- functional ops

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.rand(shape, dtype=dtype, device=device)


C2, R2, W = _t(3, 4), _t(2, 4), _t(5, 4)
C4, R4, CW = _t(3, 2, 5, 5), _t(2, 2, 5, 5), _t(4, 2, 3, 3)
LABELS = torch.tensor([0, 1, 4])

FUNCTIONAL_ERRORS = {
    "linear-dtype": (lambda: BF.interval_linear(C2, R2.double(), W), ValueError,
                     r"interval_linear: c and r must share dtype and device, got torch.float32/cpu and torch.float64/cpu"),
    "linear-device": (lambda: BF.interval_linear(C2, R2.to("meta"), W), ValueError,
                      r"interval_linear: c and r must share dtype and device.*meta"),
    "linear-integer": (lambda: BF.interval_linear(C2.long(), R2.long(), W), TypeError,
                       r"interval_linear: c and r must be floating tensors"),
    "linear-r-rows": (lambda: BF.interval_linear(R2, C2, W), ValueError,
                      r"at most as many rows; got c \(2, 4\), r \(3, 4\)"),
    "linear-r-trailing": (lambda: BF.interval_linear(C2, _t(2, 3), W), ValueError,
                          r"r must have c's trailing shape"),
    "linear-r-dims": (lambda: BF.interval_linear(C2, _t(2, 1, 4), W), ValueError, r"r must have c's trailing shape"),
    "linear-features": (lambda: BF.interval_linear(_t(3, 6), _t(2, 6), W), ValueError,
                        r"interval_linear: the weight expects 4 input features, the input has 6"),
    "linear-weight-dtype": (lambda: BF.interval_linear(C2, R2, W.double()), RuntimeError, r"dtype"),
    "conv-weight-dtype": (lambda: BF.interval_conv2d(C4, R4, CW.double()), RuntimeError, r"type"),
    "conv-dtype": (lambda: BF.interval_conv2d(C4.double(), R4, CW), ValueError, r"interval_conv2d: c and r must share"),
    "conv-r-rows": (lambda: BF.interval_conv2d(R4, C4, CW), ValueError, r"interval_conv2d: .*at most as many rows"),
    "conv-r-trailing": (lambda: BF.interval_conv2d(C4, _t(2, 2, 5, 4), CW), ValueError,
                        r"interval_conv2d: r must have c's trailing shape"),
    "conv-3d": (lambda: BF.interval_conv2d(C2[:, None], R2[:, None], CW), ValueError,
                r"interval_conv2d: expected 4-d input, got shape \(3, 1, 4\)"),
    "conv-channels": (lambda: BF.interval_conv2d(C4, R4, _t(4, 3, 3, 3)), ValueError,
                      r"interval_conv2d: the weight expects 3 input channels, the input has 2"),
    "conv-group-channels": (lambda: BF.interval_conv2d(C4, R4, _t(4, 2, 3, 3), groups=2), ValueError,
                            r"interval_conv2d: the weight expects 4 input channels, the input has 2"),
    "relu-dtype": (lambda: BF.interval_relu(C2, R2.double()), ValueError, r"interval_relu: c and r must share"),
    "relu-r-rows": (lambda: BF.interval_relu(R2, C2), ValueError, r"interval_relu: .*at most as many rows"),
    "relu-r-trailing": (lambda: BF.interval_relu(C2, _t(2, 5)), ValueError, r"interval_relu: r must have c's trailing"),
    "affine-r-rows": (lambda: BF.interval_affine(R4, C4, _t(2), _t(2)), ValueError,
                      r"interval_affine: .*at most as many rows"),
    "affine-scale": (lambda: BF.interval_affine(C4, R4, _t(3), _t(2)), ValueError,
                     r"interval_affine: scale and shift must have shape \(2,\), got \(3,\) and \(2,\)"),
    "affine-shift": (lambda: BF.interval_affine(C2, R2, _t(4), _t(1, 4)), ValueError,
                     r"scale and shift must have shape \(4,\), got \(4,\) and \(1, 4\)"),
    "affine-scale-2d": (lambda: BF.interval_affine(C4, R4, _t(2, 1, 1), _t(2)), ValueError,
                        r"scale and shift must have shape \(2,\), got \(2, 1, 1\)"),
    "affine-1d": (lambda: BF.interval_affine(C2[0], R2[0], _t(4), _t(4)), ValueError,
                  r"scale and shift must have shape \(\?,\)"),
    "l2-linear-eps-shape": (lambda: BF.l2_linear(C2, torch.rand(2), W), ValueError,
                            r"l2_linear: eps must be a float or a tensor of shape \(3,\), got \(2,\)"),
    "l2-linear-eps-2d": (lambda: BF.l2_linear(C2, torch.rand(3, 1), W), ValueError,
                         r"l2_linear: eps must be .* shape \(3,\), got \(3, 1\)"),
    "l2-linear-3d": (lambda: BF.l2_linear(C2[:, None], 0.1, W), ValueError,
                     r"l2_linear: expected x of shape \(B, in\), got \(3, 1, 4\)"),
    "l2-linear-features": (lambda: BF.l2_linear(_t(3, 6), 0.1, W), ValueError,
                           r"l2_linear: the weight expects 4 input features, the input has 6"),
    "l2-linear-integer": (lambda: BF.l2_linear(C2.long(), 0.1, W), TypeError, r"l2_linear: x must be a floating"),
    "l2-conv-eps-shape": (lambda: BF.l2_conv2d(C4, torch.rand(4), CW), ValueError,
                          r"l2_conv2d: eps must be a float or a tensor of shape \(3,\), got \(4,\)"),
    "l2-conv-2d": (lambda: BF.l2_conv2d(C2, 0.1, CW), ValueError, r"l2_conv2d: expected x of shape \(B, C, H, W\)"),
    "l2-conv-channels": (lambda: BF.l2_conv2d(C4, 0.1, _t(4, 1, 3, 3)), ValueError,
                         r"l2_conv2d: the weight expects 1 input channels, the input has 2"),
    "margins-r-rows": (lambda: BF.margins_linear(R2, C2, W, None, LABELS[:2]), ValueError,
                       r"margins_linear: .*at most as many rows"),
    "margins-dtype": (lambda: BF.margins_linear(C2.double(), R2, W, None, LABELS), ValueError,
                      r"margins_linear: c and r must share"),
    "margins-3d": (lambda: BF.margins_linear(C2[:, None], R2[:, None], W, None, LABELS), ValueError,
                   r"margins_linear: expected 2-d input"),
    "margins-features": (lambda: BF.margins_linear(_t(3, 6), _t(2, 6), W, None, LABELS), ValueError,
                         r"margins_linear: the weight expects 4 input features, the input has 6"),
    "margins-label-shape": (lambda: BF.margins_linear(C2, R2, W, None, LABELS[:2]), ValueError,
                            r"margins_linear: labels must be integers of shape \(3,\), got torch.int64 \(2,\)"),
    "margins-label-float": (lambda: BF.margins_linear(C2, R2, W, None, LABELS.float()), ValueError,
                            r"margins_linear: labels must be integers of shape \(3,\), got torch.float32"),
    "l2-margins-eps-shape": (lambda: BF.l2_margins_linear(C2, torch.rand(1), W, None, LABELS), ValueError,
                             r"l2_margins_linear: eps must be .* shape \(3,\), got \(1,\)"),
    "l2-margins-labels": (lambda: BF.l2_margins_linear(C2, 0.1, W, None, LABELS[None]), ValueError,
                          r"l2_margins_linear: labels must be integers of shape \(3,\)"),
    "l2-margins-features": (lambda: BF.l2_margins_linear(_t(3, 6), 0.1, W, None, LABELS), ValueError,
                            r"l2_margins_linear: the weight expects 4 input features, the input has 6"),
    "bn-stats-integer": (lambda: BF.batch_norm_stats(C4.long()), TypeError, r"batch_norm_stats: x must be a floating"),
    "bn-stats-1d": (lambda: BF.batch_norm_stats(_t(5)), ValueError,
                    r"batch_norm_stats: expected a non-empty \(N, C, \*\) input, got shape \(5,\)"),
    "bn-stats-empty": (lambda: BF.batch_norm_stats(_t(0, 3)), ValueError,
                       r"batch_norm_stats: expected a non-empty .* got shape \(0, 3\)"),
}


@pytest.mark.parametrize("case", list(FUNCTIONAL_ERRORS))
def test_functional_bad_input(case):
    call, error, match = FUNCTIONAL_ERRORS[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("scale, shift", [(_t(2, dtype=torch.float64), _t(2)), (_t(2), _t(2, dtype=torch.float64))],
                         ids=["scale", "shift"])
def test_interval_affine_dtype_mismatch(scale, shift):
    with pytest.raises((TypeError, ValueError), match=r"interval_affine: .*dtype"):
        BF.interval_affine(C4, R4, scale, shift)


@pytest.mark.parametrize("call, match", [
    (lambda: BF.l2_linear(torch.rand(2, 3), -0.1, torch.rand(4, 3)), "eps must be finite and non-negative"),
    (lambda: BF.l2_conv2d(torch.rand(1, 1, 4, 4), float("nan"), torch.rand(2, 1, 3, 3)), "eps must be finite"),
    (lambda: BF.l2_linear(torch.rand(2, 3), torch.tensor([0.1, -0.1]), torch.rand(4, 3)), "non-negative"),
    (lambda: BF.l2_linear(torch.rand(2, 3), 0.1, torch.rand(4, 3), scale=torch.rand(5)), "does not broadcast"),
    (lambda: BF.l2_conv2d(torch.rand(1, 2, 4, 4), 0.1, torch.rand(2, 2, 3, 3), scale=torch.rand(3, 1, 1)),
     "does not broadcast"),
    (lambda: BF.margins_linear(torch.rand(2, 3), torch.rand(2, 3), torch.rand(4, 3), None, torch.tensor([0, 7])),
     r"labels must lie in \[0, 4\)"),
    (lambda: BF.l2_margins_linear(torch.rand(2, 3), 0.1, torch.rand(4, 3), None, torch.tensor([-1, 0])),
     r"labels must lie in \[0, 4\)"),
])
def test_l2_and_margin_ops_reject_bad_eps_scale_and_labels(call, match):
    with pytest.raises(ValueError, match=match):
        call()
