"""The triton backend behind the library: dispatch and lazy import, the precision API, the
torch.library ops (opcheck, torch.compile), BoundedModule(backend="triton") against the torch
backend, and the soundness properties of tests/test_soundness.py with backend="triton".
On the CPU through the Triton interpreter (TRITON_INTERPRET=1) on tiny networks."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

import cure_fast  # noqa: E402
from cure_fast import BoundedModule, L2Ball, LinfBall, kernels, models  # noqa: E402
from cure_fast import ops  # noqa: E402
from cure_fast.ops import policy as backends, registry  # noqa: E402
from cure_fast import functional as BF  # noqa: E402
from cure_fast.kernels import _common, elementwise, implicit_gemm, margins  # noqa: E402
from netgen import networks  # noqa: E402
from test_soundness import (_setup, check_margins_vs_logit_differences, check_pgd_extremes,  # noqa: E402
                            check_sampled_points)

DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu] if CUDA else []
EXAMPLES = int(os.environ.get("CURE_FAST_GPU_EXAMPLES", "50")) if CUDA else 6  # bench/gpu_quick.sh: 5
SPECS = [LinfBall(0.05), L2Ball(0.3), L2Ball(0.2, domain=None)]


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


# ---------------------------------------------------------------- dispatch, lazy import, precision

def test_importing_cure_fast_does_not_import_triton():
    code = ("import sys, torch, cure_fast\n"
            "cure_fast.functional.interval_linear(torch.ones(2, 3), torch.ones(1, 3), torch.ones(4, 3))\n"
            "assert 'triton' not in sys.modules and 'cure_fast.kernels' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_the_triton_backend_runs_the_registered_kernels():
    c = torch.rand(3, 4, device=DEVICE)
    BF.interval_relu(c, c[1:], backend="triton")
    for op in ops.OPS:
        assert ops.implementations(op)["triton"] is getattr(kernels, op)


@pytest.mark.skipif(CUDA, reason="the CPU case")
def test_auto_never_picks_the_interpreter():
    assert registry.select("interval_linear", "auto", torch.device("cpu")) == "torch"


def test_precision_api(monkeypatch):
    monkeypatch.setattr(backends, "_precision", "ieee")
    assert cure_fast.get_precision() == "ieee"
    cure_fast.set_precision("tf32")
    assert cure_fast.get_precision() == "tf32"
    with pytest.raises(ValueError, match=r"unknown precision 'fp8' \(from set_precision\)"):
        cure_fast.set_precision("fp8")
    x = torch.rand(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"unknown precision 'half' \(from precision=\)"):
        BF.interval_linear(x, x, torch.rand(4, 3, device=DEVICE), precision="half", backend="triton")
    with pytest.raises(ValueError, match="unknown precision"):
        BoundedModule(nn.Sequential(nn.Linear(3, 2)), precision="fast")


@pytest.mark.skipif(not CUDA, reason="TF32 exists on CUDA devices only")
def test_torch_backend_turns_tf32_off_for_ieee(monkeypatch):
    seen = []
    real = ops.implementations("interval_linear")["torch"]
    monkeypatch.setitem(ops.implementations("interval_linear"), "torch", lambda *a: seen.append(
        torch.backends.cuda.matmul.allow_tf32) or real(*a))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x = torch.rand(2, 3, device="cuda")
    BF.interval_linear(x, x, torch.rand(4, 3, device="cuda"), backend="torch", precision="ieee")
    BF.interval_linear(x, x, torch.rand(4, 3, device="cuda"), backend="torch", precision="tf32")
    assert seen == [False, True] and torch.backends.cuda.matmul.allow_tf32


def test_input_checks():
    x = torch.rand(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"interval_linear \(triton\): every tensor must be torch.float32"):
        kernels.interval_linear(x, x, torch.rand(4, 3, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match=r"interval_relu \(triton\): dtype torch.int64 is not supported"):
        kernels.interval_relu(x.long(), x.long())
    with pytest.raises(ValueError, match="give both scale and shift"):
        BF.interval_linear(x, x, torch.rand(4, 3, device=DEVICE), scale=torch.ones(4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="does not fit the padded input"):
        BF.interval_conv2d(torch.rand(1, 1, 2, 2, device=DEVICE), torch.rand(1, 1, 2, 2, device=DEVICE),
                           torch.rand(1, 1, 3, 3, device=DEVICE), backend="triton")


# ---------------------------------------------------------------- torch.library ops and torch.compile

def _op_cases():
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.rand(shape, generator=gen, device=DEVICE) - 0.5

    c, r, w = rand(3, 5, 6, 6), rand(2, 5, 6, 6).abs(), rand(4, 5, 3, 3)
    g, gr = rand(3, 4, 3, 3), rand(2, 4, 3, 3)
    geometry = ([2, 2], [1, 1], [1, 1])
    x, s2, lw, labels = rand(4, 7), rand(4, 7).abs(), rand(3, 7), torch.tensor([0, 2, 1, 1], device=DEVICE)
    return {
        "affine": (implicit_gemm.affine_products, (c, r, w, rand(4), rand(4), *geometry, [3, 3], False, False, True, False, "ieee")),
        "affine-transposed": (implicit_gemm.affine_products, (g, gr, w, None, None, *geometry, [6, 6], True, True, False, False,
                                               "ieee")),
        "weight-grad": (implicit_gemm.affine_weight_grad, (g, gr, c, r, w, *geometry, False, True, "ieee")),
        "relu": (elementwise._interval_relu, (c, r)),
        "relu-grad": (elementwise.relu_grad, (c, r, c, r)),
        "channel-affine": (elementwise._channel_affine, (c, r, rand(5), rand(5), True)),
        "channel-affine-grad": (elementwise._channel_affine_grad, (c, r, c, r, c, r, rand(5), True)),
        "margins": (margins._margins, (x, s2[1:], lw, rand(3), labels, False)),
        "margins-grad": (margins._margins_grad, (rand(4, 3), rand(4, 3), x, s2, lw, labels, rand(4, 3).abs(), True,
                                                 True)),
    }


OPS = _op_cases()


@pytest.mark.parametrize("case", list(OPS))
def test_opcheck(case, monkeypatch):
    monkeypatch.setattr(_common, "POISON", False)
    op, args = OPS[case]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_torch_compile_fullgraph_forward_and_backward():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    conv_w = torch.rand(4, 2, 3, 3, generator=gen, device=DEVICE) - 0.5
    lin_w = torch.rand(3, 4 * 25, generator=gen, device=DEVICE) - 0.5
    scale, shift = torch.rand(4, generator=gen, device=DEVICE) + 0.5, torch.rand(4, generator=gen, device=DEVICE)
    labels = torch.tensor([0, 2, 1, 2], device=DEVICE)

    def step(ops, **backend):
        def fn(c, r):
            c, r = ops.interval_conv2d(c, r, conv_w, None, 1, 1, scale=scale, shift=shift, relu=True, **backend)
            c, r = ops.interval_affine(c, r, scale, shift, relu=True, **backend)
            m = ops.margins_linear(c.flatten(1), r.flatten(1), lin_w, None, labels, **backend)
            return m.sum() + ops.interval_relu(c, r, **backend)[1].sum()
        return fn

    c = torch.rand(4, 2, 5, 5, generator=gen, device=DEVICE)
    r = torch.rand(2, 2, 5, 5, generator=gen, device=DEVICE) / 10
    results = []
    for fn in (torch.compile(step(kernels), fullgraph=True), step(BF, backend="torch")):
        cc, rr = c.clone().requires_grad_(), r.clone().requires_grad_()
        out = fn(cc, rr)
        results.append([out] + list(torch.autograd.grad(out, (cc, rr))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- BoundedModule

def _small_cnn(dtype):
    torch.manual_seed(0)
    data = models.DatasetInfo((2, 6, 6), 3, (0.4, 0.5), (0.3, 0.2))
    model = models.cnn5(data, width=2, linear=5).to(dtype).to(DEVICE)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.3, 0.3), m.running_var.uniform_(0.5, 1.5)
    return model, torch.rand(4, 2, 6, 6, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("train", [False, True])
def test_bounded_module_triton_equals_torch(train):
    """Logits, bounds, margins, every layer's bounds (those inside fused groups computed on request),
    the gradients of the parameters and the running statistics: the triton backend as the torch one."""
    model, x = _small_cnn(torch.float64)
    model.train(train)
    y = torch.tensor([0, 1, 2, 0], device=DEVICE)
    results = []
    for backend in ("torch", "triton"):
        twin = copy.deepcopy(model)
        out = BoundedModule(twin, backend=backend).propagate(x, SPECS, y)
        loss = sum(m.sum() for m in out.margins) + sum(lo.sum() - hi.sum() for lo, hi in out.bounds)
        grads = torch.autograd.grad(loss, list(twin.parameters()))
        layers = [b for k in range(len(SPECS)) for pair in out.layer_bounds(k) for b in pair]
        results.append([out.logits, *out.margins, *layers, *grads, *twin.buffers()])
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_bounded_module_runs_the_fused_kernels(monkeypatch):
    """Conv+BatchNorm+ReLU in eval mode is one fused call: the torch backend is never asked for it."""
    model, x = _small_cnn(torch.float32)
    model.eval()
    calls = []
    for op in ("interval_conv2d", "interval_relu", "interval_affine"):
        real = ops.implementations(op)["triton"]
        monkeypatch.setitem(ops.implementations(op), "triton",
                            lambda *a, _op=op, _real=real, **k: calls.append(_op) or _real(*a, **k))
    BoundedModule(model, backend="triton").propagate(x, SPECS[:1])
    # Normalize (no ReLU after it), then Conv2d + BatchNorm + ReLU three times as one call each
    assert calls == ["interval_affine"] + ["interval_conv2d"] * 3


def _triton_setup(net, data):
    bm, x, y, specs, stats = _setup(net, data)
    bm.backend = "triton"
    bm.model.to(DEVICE)
    stats = {i: tuple(t.to(DEVICE) for t in pair) for i, pair in stats.items()}
    return bm, x.to(DEVICE), y.to(DEVICE), specs, stats


@settings(max_examples=EXAMPLES, deadline=None)
@given(net=networks(), data=st.data())
def test_sampled_points_stay_inside_triton_bounds_at_every_layer(net, data):
    check_sampled_points(*_triton_setup(net, data))


@settings(max_examples=EXAMPLES, deadline=None)
@given(net=networks(), data=st.data())
def test_pgd_extremes_stay_inside_triton_bounds(net, data):
    check_pgd_extremes(*_triton_setup(net, data), steps=10, every_relu=False)


@settings(max_examples=EXAMPLES, deadline=None)
@given(net=networks(), data=st.data())
def test_triton_margins_never_looser_than_logit_bound_differences(net, data):
    check_margins_vs_logit_differences(*_triton_setup(net, data)[:4])
