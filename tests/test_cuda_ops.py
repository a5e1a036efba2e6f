"""The CUDA backend's ops against their pure-PyTorch ``*_ref`` twins, forward and backward (GPU only)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cure_fast import BoundedModule, L2Ball, LinfBall, _cuda, autoselect, functional
from cure_fast.reference import (interval_affine_ref, interval_conv2d_ref, interval_linear_ref, interval_relu_ref,
                                 l2_linear_ref, l2_margins_linear_ref, margins_linear_ref)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison():
    """Every output of the extension starts as NaN: an element a kernel does not write fails the test."""
    _cuda.set_poison(True)
    yield
    _cuda.set_poison(False)


def _rand(shape, dtype, seed, positive=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.rand(shape, generator=g, device="cuda", dtype=torch.float64) if positive else \
        torch.randn(shape, generator=g, device="cuda", dtype=torch.float64)
    return x.to(dtype)


def _run(fn, inputs, grads_out):
    """Outputs of fn(*inputs) and the gradients of <outputs, grads_out> w.r.t. the tensor inputs."""
    inputs = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    outs = fn(*inputs)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, grads_out, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return list(outs) + list(grads)


def _check(fn, ref, inputs, grads_out, slack=2.0):
    """Error against fp64 at most `slack` x that of the torch reference in the same dtype, plus one ulp."""
    got = _run(fn, inputs, grads_out)
    torch_ = _run(ref, inputs, grads_out)
    as64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    exact = _run(ref, as64, [g.double() for g in grads_out])
    assert len(got) == len(torch_) == len(exact)
    for i, (out, out_t, out64) in enumerate(zip(got, torch_, exact)):
        assert out.shape == out64.shape and out.dtype == out_t.dtype, i
        assert not out.isnan().any(), f"output {i} has NaN (unwritten?)"
        if out.numel() == 0:
            continue
        err = (out.double() - out64).abs().max().item()
        err_t = (out_t.double() - out64).abs().max().item()
        bound = slack * err_t + torch.finfo(out.dtype).eps * max(out64.abs().max().item(), 1e-30)
        assert err <= bound, f"output {i}: error {err:.3g} > {bound:.3g} (torch: {err_t:.3g})"


def _epilogue_ref(c, r, scale, shift, relu, channel_dim):
    if scale is not None:
        shape = [1] * c.dim()
        shape[channel_dim] = -1
        c, r = c * scale.view(shape) + shift.view(shape), r * scale.abs().view(shape)
    return interval_relu_ref(c, r) if relu else (c, r)


LINEAR_SHAPES = [(1, 0, 1, 1), (5, 3, 7, 4), (67, 67, 129, 65), (130, 40, 33, 70), (64, 64, 64, 64), (3, 0, 300, 9)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,k,o", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("epilogue", ["none", "bias", "affine", "affine_relu", "relu"])
def test_interval_linear(n, m, k, o, dtype, epilogue):
    c, r, w = _rand((n, k), dtype, 0), _rand((m, k), dtype, 1, True), _rand((o, k), dtype, 2) / k ** 0.5
    bias = _rand((o,), dtype, 3) if epilogue != "none" else None
    scale, shift = (_rand((o,), dtype, 4), _rand((o,), dtype, 5)) if "affine" in epilogue else (None, None)
    relu = "relu" in epilogue
    gc, gr = _rand((n, o), dtype, 6), _rand((m, o), dtype, 7)

    def fn(c, r, w, b, s, t):
        return _cuda.interval_linear(c, r, w, b, scale=s, shift=t, relu=relu)

    def ref(c, r, w, b, s, t):
        return _epilogue_ref(*interval_linear_ref(c, r, w, b), s, t, relu, -1)

    _check(fn, ref, [c, r, w, bias, scale, shift], [gc, gr])


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_interval_linear_tensor_cores(precision):
    """Training precisions: close to the fp64 result within the input rounding of TF32 / bf16."""
    c, r, w = _rand((70, 96), torch.float32, 0), _rand((50, 96), torch.float32, 1, True), _rand((40, 96), torch.float32, 2)
    c_out, r_out = _cuda.interval_linear(c, r, w, precision=precision)
    c64, r64 = interval_linear_ref(c.double(), r.double(), w.double())
    rel = 2.0 ** -10 if precision == "tf32" else 2.0 ** -7
    for out, ref in ((c_out, c64), (r_out, r64)):
        assert not out.isnan().any()
        bound = 2 * rel * (c.double().abs() @ w.double().abs().t()).max().item()
        assert (out.double() - ref).abs().max().item() <= bound
    assert (r_out >= 0).all()


def test_interval_linear_leading_dims():
    c, r, w = _rand((4, 3, 5, 8), torch.float32, 0), _rand((2, 3, 5, 8), torch.float32, 1, True), _rand((6, 8), torch.float32, 2)
    for out, ref in zip(_cuda.interval_linear(c, r, w), interval_linear_ref(c, r, w)):
        torch.testing.assert_close(out, ref)


CONV_CASES = [  # (n, m, channels, size, out, kernel, stride, padding, dilation, groups)
    (3, 3, 3, 9, 5, 3, 1, 1, 1, 1),   # grouped cuDNN call over [c; r]
    (4, 2, 4, 8, 6, 3, 2, 0, 1, 2),   # two calls, groups
    (5, 0, 2, 7, 3, 2, 1, 2, 2, 1),   # no radius rows
    (2, 1, 3, 5, 4, 1, 1, 0, 1, 1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("epilogue", ["none", "affine_relu", "relu"])
def test_interval_conv2d(case, dtype, epilogue):
    n, m, ch, size, out, kernel, stride, padding, dilation, groups = case
    c, r = _rand((n, ch, size, size), dtype, 0), _rand((m, ch, size, size), dtype, 1, True)
    w = _rand((out, ch // groups, kernel, kernel), dtype, 2) / (ch * kernel) ** 0.5
    bias = _rand((out,), dtype, 3)
    scale, shift = (_rand((out,), dtype, 4), _rand((out,), dtype, 5)) if "affine" in epilogue else (None, None)
    relu = "relu" in epilogue
    p = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    gc, gr = _rand((n, out, p, p), dtype, 6), _rand((m, out, p, p), dtype, 7)
    geom = (stride, padding, dilation, groups)

    def fn(c, r, w, b, s, t):
        return _cuda.interval_conv2d(c, r, w, b, *geom, scale=s, shift=t, relu=relu)

    def ref(c, r, w, b, s, t):
        return _epilogue_ref(*interval_conv2d_ref(c, r, w, b, *geom), s, t, relu, 1)

    # cuDNN picks algorithms by dtype; allow a little more than the 2x of the fused kernels.
    _check(fn, ref, [c, r, w, bias, scale, shift], [gc, gr], slack=4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,m", [((6, 5), 4), ((6, 37), 0), ((5, 3, 4, 4), 5), ((7, 2, 3, 5), 2), ((1, 70), 1)],
                         ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_interval_affine(shape, m, dtype, relu):
    c, r = _rand(shape, dtype, 0), _rand((m,) + shape[1:], dtype, 1, True)
    scale, shift = _rand((shape[1],), dtype, 2), _rand((shape[1],), dtype, 3)
    gc, gr = _rand(shape, dtype, 4), _rand((m,) + shape[1:], dtype, 5)

    def ref(c, r, s, t):
        out = interval_affine_ref(c, r, s, t)
        return interval_relu_ref(*out) if relu else out

    _check(lambda c, r, s, t: _cuda.interval_affine(c, r, s, t, relu=relu), ref, [c, r, scale, shift], [gc, gr],
           slack=4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,k,f", [(5, 3, 10, 33), (4, 0, 3, 7), (9, 9, 2, 300), (1, 1, 1, 1)], ids=str)
def test_margins_linear(n, m, k, f, dtype):
    c, r, w, b = _rand((n, f), dtype, 0), _rand((m, f), dtype, 1, True), _rand((k, f), dtype, 2), _rand((k,), dtype, 3)
    labels = torch.randint(0, k, (n,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    g = _rand((n, k), dtype, 5)
    fn = lambda c, r, w, b: _cuda.margins_linear(c, r, w, b, labels)  # noqa: E731
    ref = lambda c, r, w, b: margins_linear_ref(c, r, w, b, labels)  # noqa: E731
    _check(fn, ref, [c, r, w, b], [g], slack=4.0)
    out = fn(c, r, w, b)
    assert (out.gather(1, labels[:, None]) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("scaled", [None, "shared", "per_sample"])
def test_l2_margins_and_linear(dtype, per_sample, scaled):
    b_, f, k = 5, 24, 7
    x, w, bias = _rand((b_, f), dtype, 0), _rand((k, f), dtype, 1), _rand((k,), dtype, 2)
    eps = _rand((b_,), dtype, 3, True) if per_sample else 0.3
    scale = {None: None, "shared": _rand((f,), dtype, 4, True) + 0.1,
             "per_sample": _rand((b_, f), dtype, 4, True) + 0.1}[scaled]
    labels = torch.randint(0, k, (b_,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))
    _check(lambda x, w, b: _cuda.l2_margins_linear(x, eps, w, b, labels, scale),
           lambda x, w, b: l2_margins_linear_ref(x, eps, w, b, labels, scale), [x, w, bias], [_rand((b_, k), dtype, 6)],
           slack=4.0)
    _check(lambda x, w, b: _cuda.l2_linear(x, eps, w, b, scale), lambda x, w, b: l2_linear_ref(x, eps, w, b, scale),
           [x, w, bias], [_rand((b_, k), dtype, 7), _rand((b_, k), dtype, 8)], slack=4.0)


@pytest.mark.parametrize("shape,rows", [((6, 5), 2), ((9, 3, 4, 4), 3), ((4, 70, 2, 2), 4)], ids=str)
def test_batch_norm_stats(shape, rows):
    x = _rand(shape, torch.float32, 0)
    mean, var = _cuda.channel_moments(x, rows)
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(mean, x[:rows].mean(dims))
    torch.testing.assert_close(var, x[:rows].var(dims, unbiased=False))


def test_opcheck():
    c, r, w, b = (_rand((5, 7), torch.float32, 0), _rand((3, 7), torch.float32, 1, True), _rand((4, 7), torch.float32, 2),
                  _rand((4,), torch.float32, 3))
    s, t = _rand((4,), torch.float32, 4), _rand((4,), torch.float32, 5)
    for args in [(c, r, w, b, s, t, True, "ieee", True), (c, r, w, None, None, None, False, "ieee", False)]:
        torch.library.opcheck(torch.ops.cure_fast.interval_linear_cuda.default,
                              tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args))
    xc, xr = _rand((5, 4, 3, 3), torch.float32, 6), _rand((2, 4, 3, 3), torch.float32, 7, True)
    torch.library.opcheck(torch.ops.cure_fast.channel_epilogue_cuda.default,
                          (xc.requires_grad_(), xr.requires_grad_(), b, s, t, True))
    labels = torch.tensor([0, 3, 1, 2, 2], device="cuda")
    torch.library.opcheck(torch.ops.cure_fast.margins_linear_cuda.default,
                          (c.detach().requires_grad_(), r.detach().requires_grad_(), w.requires_grad_(), b, labels, None,
                           False))


def test_torch_compile_fullgraph():
    c, r = _rand((6, 16), torch.float32, 0), _rand((4, 16), torch.float32, 1, True)
    w1, w2 = _rand((12, 16), torch.float32, 2), _rand((5, 12), torch.float32, 3)
    s, t = _rand((12,), torch.float32, 4), _rand((12,), torch.float32, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0], device="cuda")

    def model(c, r):
        h = _cuda.interval_linear(c, r, w1, None, scale=s, shift=t, relu=True)
        return _cuda.margins_linear(*h, w2, None, labels)

    def model_ref(c, r):
        h = _epilogue_ref(*interval_linear_ref(c, r, w1), s, t, True, -1)
        return margins_linear_ref(*h, w2, None, labels)

    g = _rand((6, 5), torch.float32, 6)
    got = _run(torch.compile(model, fullgraph=True), [c, r], [g])
    want = _run(model_ref, [c, r], [g])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_functional_dispatch_and_autoselect(monkeypatch):
    c, r, w = _rand((8, 16), torch.float32, 0), _rand((4, 16), torch.float32, 1, True), _rand((6, 16), torch.float32, 2)
    for out, ref in zip(functional.interval_linear(c, r, w, backend="cuda"), interval_linear_ref(c, r, w)):
        torch.testing.assert_close(out, ref)
    autoselect.clear()
    for requires_grad in (False, True):  # forward-only and training calls are measured separately
        w.requires_grad_(requires_grad)
        for out, ref in zip(functional.interval_linear(c, r, w, backend="auto"), interval_linear_ref(c, r, w)):
            torch.testing.assert_close(out, ref)
    assert len(autoselect.measurements) == 2
    for results in autoselect.measurements.values():
        assert isinstance(results["torch"], float) and isinstance(results["cuda"], float), results
    monkeypatch.setenv("CURE_FAST_AUTOSELECT", "0")
    assert autoselect.choose("interval_linear", ["cuda", "torch"], c.device, (c, r, w), lambda n: None) is None


# The foundation's soundness property with backend="cuda": sampled points stay inside the bounds.
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_soundness_with_cuda_backend(data):
    from netgen import networks, run_layers

    model, shape = data.draw(networks(), label="net")
    model = model.to("cuda", torch.float64)
    model.eval()
    batch = 2
    x = torch.rand((batch,) + shape, dtype=torch.float64, device="cuda")
    y = torch.randint(0, model[-1].out_features, (batch,), device="cuda")
    specs = [LinfBall(0.1), L2Ball(0.3)]
    bm = BoundedModule(model, backend="cuda")
    out = bm.propagate(x, specs, y)
    stats = {}
    for k, spec in enumerate(specs):
        for _ in range(8):
            noise = torch.randn_like(x)
            if isinstance(spec, LinfBall):
                point = (x + spec.per_sample_eps(x) * noise.sign()).clamp(0, 1)
            else:
                point = x + spec.per_sample_eps(x) * noise / noise.flatten(1).norm(dim=1).view((-1,) + (1,) * (x.dim() - 1))
                point = point.clamp(0, 1)
            outputs = run_layers(bm._layers, point, stats)
            for value, (lower, upper) in zip(outputs, out.layer_bounds(k)):
                tol = 1e-9 * (1 + lower.abs() + upper.abs())
                assert (value >= lower - tol).all() and (value <= upper + tol).all()
