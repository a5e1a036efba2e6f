"""The measured ``auto`` choice: a backend whose outputs or gradients disagree with the torch
backend is never eligible, and measuring leaves the caller's autograd graph intact (CPU)."""
import pytest
import torch

from cure_fast import functional
from cure_fast.ops import autoselect
from cure_fast.ops import interval_linear_ref


class _WrongGradient(torch.autograd.Function):
    """Identity forward, gradient scaled by 1.01: right outputs, wrong backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 1.01 * g


def _inputs(requires_grad=True):
    g = torch.Generator().manual_seed(0)
    c, w = torch.randn(6, 5, generator=g), torch.randn(4, 5, generator=g)
    r = torch.rand(3, 5, generator=g)
    return [t.requires_grad_(requires_grad) for t in (c, r, w)]


def _runner(c, r, w):
    def run(name):
        out_c, out_r = interval_linear_ref(c, r, w)
        if name == "bad-output":
            return out_c, out_r * 0.999  # a radius 0.1% too small: unsound
        if name == "bad-gradient":
            return _WrongGradient.apply(out_c), out_r
        if name == "raises":
            raise RuntimeError("kernel launch failed")
        return out_c, out_r
    return run


def test_measure_keeps_only_backends_that_agree():
    c, r, w = _inputs()
    results = autoselect.measure(_runner(c, r, w), ["good", "bad-output", "bad-gradient", "raises"],
                                 torch.device("cpu"), [c, r, w])
    assert isinstance(results["good"], float)
    assert results["bad-output"] == "output mismatch against the torch backend"
    assert results["bad-gradient"] == "gradient mismatch against the torch backend"
    assert results["raises"].startswith("error: RuntimeError: kernel launch failed")


def test_measure_without_gradients_checks_outputs_only():
    c, r, w = _inputs(requires_grad=False)
    results = autoselect.measure(_runner(c, r, w), ["bad-gradient", "bad-output"], torch.device("cpu"),
                                 autoselect.grad_inputs((c, r, w)))
    assert isinstance(results["bad-gradient"], float)
    assert isinstance(results["bad-output"], str)


def test_measure_leaves_the_callers_graph_and_grads_alone():
    leaf = torch.randn(6, 5, requires_grad=True)
    c = leaf.tanh()  # an intermediate: its graph must survive the measurement
    _, r, w = _inputs()
    out_c, out_r = functional.interval_linear(c, r, w, backend="torch")
    autoselect.measure(_runner(c, r, w), ["good"], torch.device("cpu"), [c, r, w])
    assert leaf.grad is None and w.grad is None
    (out_c.sum() + out_r.sum()).backward()
    expected = torch.autograd.grad((leaf.tanh() @ w.t()).sum(), leaf)[0]
    torch.testing.assert_close(leaf.grad, expected)


def test_key_ignores_float_values_but_not_shapes_or_grad():
    x = torch.zeros(2, 3)
    k = autoselect.key("l2_linear", x.device, ((x, 0.1), {}))
    assert k == autoselect.key("l2_linear", x.device, ((x, 0.2), {}))
    assert k != autoselect.key("l2_linear", x.device, ((torch.zeros(3, 3), 0.1), {}))
    assert k != autoselect.key("l2_linear", x.device, ((x.requires_grad_(), 0.1), {}))
    assert k != autoselect.key("l2_linear", x.device, ((x, 0.1), {"relu": True}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tolerance_widens_for_reduced_precision_dot_products(dtype):
    ieee, tf32, bf16 = (autoselect.tolerance(dtype, p) for p in ("ieee", "tf32", "bf16"))
    assert ieee <= tf32 <= bf16
    assert autoselect.tolerance(torch.float64, "bf16") == autoselect.tolerance(torch.float64, "ieee")


def test_choose_is_static_on_the_cpu():
    c, r, w = _inputs()
    assert autoselect.choose("interval_linear", ["torch"], c.device, (c, r, w), _runner(c, r, w)) is None


def test_grad_inputs_deduplicates_nested_tensors():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2)
    assert autoselect.grad_inputs(((a, b, [a]), {"scale": a})) == [a]


def test_choices_count_what_each_op_chose_per_call_shape():
    autoselect.clear()
    c, r, w = _inputs()
    methods = {"torch": lambda *t: interval_linear_ref(*t), "good": lambda *t: interval_linear_ref(*t),
               "bad-output": lambda c, r, w: (c @ w.t(), 0.999 * (r @ w.abs().t()))}
    for rows in (6, 2):
        tensors = [c[:rows], r, w]
        key = autoselect.key("linear_method", c.device, tensors)
        assert autoselect.choose_method(key, methods, tensors, "ieee", c.device, "fallback") == "good"
    assert autoselect.choices() == {"linear_method": {"good": 2}}
    autoselect.clear()
    assert autoselect.choices() == {}
