"""The CUDA backend's ops against their pure-PyTorch ``*_ref`` twins, forward and backward (GPU only)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from cure_fast import BoundedModule, L2Ball, LinfBall, cuda, functional
from cure_fast.ops import (autoselect, interval_affine_ref, interval_conv2d_ref, interval_linear_ref, interval_relu_ref,
                           l2_conv2d_ref, l2_linear_ref, l2_margins_linear_ref, margins_linear_ref)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison():
    """Every output of the extension starts as NaN: an element a kernel does not write fails the test."""
    cuda.set_poison(True)
    yield
    cuda.set_poison(False)


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


LINEAR_SHAPES = [(1, 0, 1, 1), (5, 3, 7, 4), (67, 67, 129, 65), (130, 40, 33, 70), (64, 64, 64, 64), (3, 0, 300, 9),
                 (96, 64, 4100, 70), (1100, 300, 9, 6),  # split-K of the forward, of the weight gradient
                 (0, 0, 7, 5), (3, 1, 0, 4), (3, 1, 5, 0)]  # empty: batch, features, outputs


@pytest.mark.parametrize("method", ["fused_gemm", "cublas"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,k,o", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("epilogue", ["none", "bias", "affine", "affine_relu", "relu"])
def test_interval_linear(n, m, k, o, dtype, epilogue, method):
    c, r, w = _rand((n, k), dtype, 0), _rand((m, k), dtype, 1, True), _rand((o, k), dtype, 2) / k ** 0.5
    bias = _rand((o,), dtype, 3) if epilogue != "none" else None
    scale, shift = (_rand((o,), dtype, 4), _rand((o,), dtype, 5)) if "affine" in epilogue else (None, None)
    relu = "relu" in epilogue
    gc, gr = _rand((n, o), dtype, 6), _rand((m, o), dtype, 7)

    def fn(c, r, w, b, s, t):
        return cuda.interval_linear(c, r, w, b, scale=s, shift=t, relu=relu, method=method)

    def ref(c, r, w, b, s, t):
        return _epilogue_ref(*interval_linear_ref(c, r, w, b), s, t, relu, -1)

    # cuBLAS picks its batched kernels by shape; allow it a little more than the 2x of the fused kernel.
    _check(fn, ref, [c, r, w, bias, scale, shift], [gc, gr], slack=2.0 if method == "fused_gemm" else 4.0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_interval_linear_auto(requires_grad):
    """method="auto" measures both methods once per key and returns what one of them returns."""
    autoselect.clear()
    c, r, w = _rand((96, 200), torch.float32, 0), _rand((64, 200), torch.float32, 1, True), _rand((70, 200), torch.float32, 2)
    w.requires_grad_(requires_grad)
    with torch.no_grad():
        by_method = [cuda.interval_linear(c, r, w, relu=True, method=m) for m in ("fused_gemm", "cublas")]
    auto = cuda.interval_linear(c, r, w, relu=True)
    assert any(all(torch.equal(a, b) for a, b in zip(auto, outs)) for outs in by_method)
    (results,) = autoselect.measurements.values()
    assert set(results) == {"fused_gemm", "cublas"} and all(isinstance(ms, float) for ms in results.values())
    if requires_grad:
        (g_w,) = torch.autograd.grad(auto, [w], (torch.ones(96, 70, device="cuda"), torch.ones(64, 70, device="cuda")))
        assert not g_w.isnan().any()
    with pytest.raises(ValueError, match="method"):
        cuda.interval_linear(c, r, w, method="fastest")


@pytest.mark.parametrize("method", ["fused_gemm", "cublas"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_interval_linear_tensor_cores(precision, method):
    """Training precisions: close to the fp64 result within the input rounding of TF32 / bf16."""
    c, r, w = _rand((70, 96), torch.float32, 0), _rand((50, 96), torch.float32, 1, True), _rand((40, 96), torch.float32, 2)
    c_out, r_out = cuda.interval_linear(c, r, w, precision=precision, method=method)
    c64, r64 = interval_linear_ref(c.double(), r.double(), w.double())
    rel = 2.0 ** -10 if precision == "tf32" else 2.0 ** -7
    for out, ref in ((c_out, c64), (r_out, r64)):
        assert not out.isnan().any()
        bound = 2 * rel * (c.double().abs() @ w.double().abs().t()).max().item()
        assert (out.double() - ref).abs().max().item() <= bound
    assert (r_out >= 0).all()


def test_interval_linear_leading_dims():
    c, r, w = _rand((4, 3, 5, 8), torch.float32, 0), _rand((2, 3, 5, 8), torch.float32, 1, True), _rand((6, 8), torch.float32, 2)
    for out, ref in zip(cuda.interval_linear(c, r, w), interval_linear_ref(c, r, w)):
        torch.testing.assert_close(out, ref)


CONV_CASES = [  # (n, m, channels, (height, width), out, kernel, stride, padding, dilation, groups)
    (3, 3, 3, (9, 9), 5, 3, 1, 1, 1, 1),             # every sample with a radius
    (4, 2, 4, (8, 8), 6, 3, 2, 0, 1, 2),             # groups: cuDNN only
    (5, 0, 2, (7, 7), 3, 2, 1, 2, 2, 1),             # no radius rows; even kernel, padding 2, dilation 2
    (2, 1, 3, (5, 5), 4, 1, 1, 0, 1, 1),             # 1x1 kernel
    (3, 2, 3, (7, 9), 5, 3, 2, 1, 1, 1),             # 3 -> 5 channels on 7x9, stride 2
    (2, 2, 5, (9, 7), 7, 5, 2, 2, 1, 1),             # 5x5 kernel
    (3, 1, 3, (11, 10), 4, 3, 2, 2, 2, 1),           # stride 2 with dilation 2
    (3, 2, 2, (8, 9), 3, (3, 2), (2, 1), (1, 0), (1, 2), 1),  # every parameter different per dimension
    (6, 4, 5, (13, 11), 70, 3, 1, 1, 1, 1),          # several row and column tiles; radii from row 286
    (2, 2, 3, (6, 6), 4, 3, 3, 2, 1, 1),             # stride 3: input pixels that no tap reaches
]


def _conv_out(image, kernel, stride, padding, dilation):
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, p, d in zip(image, pair(kernel), pair(stride), pair(padding), pair(dilation)))


def _conv_inputs(case, dtype):
    n, m, ch, image, out, kernel, stride, padding, dilation, groups = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    c, r = _rand((n, ch) + image, dtype, 0), _rand((m, ch) + image, dtype, 1, True)
    w = _rand((out, ch // groups, kh, kw), dtype, 2) / (ch * kh * kw) ** 0.5
    p, q = _conv_out(image, kernel, stride, padding, dilation)
    grads = _rand((n, out, p, q), dtype, 6), _rand((m, out, p, q), dtype, 7)
    return c, r, w, (stride, padding, dilation, groups), *grads


@pytest.mark.parametrize("method", ["implicit_gemm", "cudnn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("epilogue", ["none", "bias", "affine_relu", "relu"])
def test_interval_conv2d(case, dtype, epilogue, method):
    c, r, w, geom, gc, gr = _conv_inputs(case, dtype)
    out = w.shape[0]
    bias = _rand((out,), dtype, 3) if epilogue != "none" else None
    scale, shift = (_rand((out,), dtype, 4), _rand((out,), dtype, 5)) if "affine" in epilogue else (None, None)
    relu = "relu" in epilogue

    def fn(c, r, w, b, s, t):
        return cuda.interval_conv2d(c, r, w, b, *geom, scale=s, shift=t, relu=relu, method=method)

    def ref(c, r, w, b, s, t):
        return _epilogue_ref(*interval_conv2d_ref(c, r, w, b, *geom), s, t, relu, 1)

    if method == "implicit_gemm" and geom[3] != 1:
        with pytest.raises(ValueError, match="groups == 1"):
            fn(c, r, w, bias, scale, shift)
        return
    # cuDNN picks algorithms by dtype; allow it a little more than the 2x of the fused kernels.
    _check(fn, ref, [c, r, w, bias, scale, shift], [gc, gr], slack=2.0 if method == "implicit_gemm" else 4.0)


@pytest.mark.parametrize("method", ["implicit_gemm", "cudnn"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_interval_conv2d_tensor_cores(precision, method):
    """Training precisions, forward and backward: every output within twice the input rounding of
    TF32 / bf16 times the sum of |products| behind it, of the fp64 result."""
    c, r, w, geom, gc, gr = _conv_inputs((6, 4, 5, (9, 11), 70, 3, 2, 1, 1, 1), torch.float32)
    leaves = [t.detach().requires_grad_() for t in (c, r, w)]
    outs = cuda.interval_conv2d(*leaves, None, *geom, precision=precision, method=method)
    grads = torch.autograd.grad(outs, leaves, (gc, gr))
    c64, r64, w64, gc64, gr64 = (t.double() for t in (c, r, w, gc, gr))
    ca, ra, wa, gca, gra = (t.abs() for t in (c64, r64, w64, gc64, gr64))
    conv_geom = geom[:3]
    grad_input, grad_weight = torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight
    want = [*interval_conv2d_ref(c64, r64, w64, None, *geom), grad_input(c.shape, w64, gc64, *conv_geom),
            grad_input(r.shape, wa, gr64, *conv_geom),
            grad_weight(c64, w.shape, gc64, *conv_geom) + w64.sign() * grad_weight(r64, w.shape, gr64, *conv_geom)]
    sums = [F.conv2d(ca, wa, None, *geom), F.conv2d(ra, wa, None, *geom), grad_input(c.shape, wa, gca, *conv_geom),
            grad_input(r.shape, wa, gra, *conv_geom),
            grad_weight(ca, w.shape, gca, *conv_geom) + grad_weight(ra, w.shape, gra, *conv_geom)]
    rel = 2.0 ** -10 if precision == "tf32" else 2.0 ** -7
    for i, (got, ref, s) in enumerate(zip(list(outs) + list(grads), want, sums)):
        assert not got.isnan().any(), i
        if method == "cudnn":  # FFT / Winograd algorithms: only a bound on the whole output
            s = s.max()
        assert ((got.double() - ref).abs() <= 2 * rel * s + 1e-6).all(), i
    assert (outs[1] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_interval_conv2d_split_k(dtype):
    """A long reduction (8 x 32 x 32 output pixels) over three weight tiles: the weight gradient
    splits it over blockIdx.z (16 splits on a GPU with 4 or more SMs), with radius rows from the
    fourth sample on, so that the first splits have no radius terms."""
    c, r, w, geom, gc, gr = _conv_inputs((8, 5, 16, (32, 32), 16, 3, 1, 1, 1, 1), dtype)
    bias = _rand((16,), dtype, 3)
    _check(lambda c, r, w, b: cuda.interval_conv2d(c, r, w, b, *geom, method="implicit_gemm"),
           lambda c, r, w, b: interval_conv2d_ref(c, r, w, b, *geom), [c, r, w, bias], [gc, gr])


@pytest.mark.parametrize("requires_grad", [False, True])
def test_interval_conv2d_auto(requires_grad):
    """method="auto" measures both methods once per key and returns what one of them returns."""
    autoselect.clear()
    c, r, w, geom, gc, gr = _conv_inputs((4, 2, 8, (12, 12), 16, 3, 1, 1, 1, 1), torch.float32)
    w.requires_grad_(requires_grad)
    with torch.no_grad():
        by_method = [cuda.interval_conv2d(c, r, w, None, *geom, relu=True, method=m)
                     for m in ("implicit_gemm", "cudnn")]
    auto = cuda.interval_conv2d(c, r, w, None, *geom, relu=True, method="auto")
    assert any(all(torch.equal(a, b) for a, b in zip(auto, outs)) for outs in by_method)
    (results,) = autoselect.measurements.values()
    assert set(results) == {"implicit_gemm", "cudnn"} and all(isinstance(ms, float) for ms in results.values())
    if requires_grad:
        (g_w,) = torch.autograd.grad(auto, [w], (gc, gr))
        assert not g_w.isnan().any()
    with pytest.raises(ValueError, match="method"):
        cuda.interval_conv2d(c, r, w, method="fastest")


L2_CONV_GEOMS = [(3, 1, 1, 1), (3, 2, 0, 1), (5, 1, 2, 2), (2, 2, 1, 1)]  # kernel, stride, padding, dilation


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geom", L2_CONV_GEOMS, ids=str)
@pytest.mark.parametrize("scaled", [None, "channel", "pixel", "sample"])
@pytest.mark.parametrize("per_sample_eps", [False, True])
def test_l2_conv2d(dtype, geom, scaled, per_sample_eps):
    b_, ch, image, out = 4, 3, (7, 9), 5
    kernel, stride, padding, dilation = geom
    x, w = _rand((b_, ch) + image, dtype, 0), _rand((out, ch, kernel, kernel), dtype, 1) / (ch * kernel) ** 0.5
    bias = _rand((out,), dtype, 2)
    eps = _rand((b_,), dtype, 3, True) + 0.1 if per_sample_eps else 0.3
    scale = {None: None, "channel": _rand((ch, 1, 1), dtype, 4, True) + 0.1,
             "pixel": _rand((ch,) + image, dtype, 4, True) + 0.1,
             "sample": _rand((b_, ch) + image, dtype, 4, True) + 0.1}[scaled]
    p, q = _conv_out(image, kernel, stride, padding, dilation)
    grads = [_rand((b_, out, p, q), dtype, 5), _rand((b_, out, p, q), dtype, 6)]
    conv = (stride, padding, dilation, 1)
    _check(lambda x, w, b, e, s: cuda.l2_conv2d(x, e, w, b, *conv, s),
           lambda x, w, b, e, s: l2_conv2d_ref(x, e, w, b, *conv, s), [x, w, bias, eps, scale], grads, slack=4.0)


def test_conv_input_checks():
    ext = cuda.load()
    c, r = _rand((3, 4, 6, 6), torch.float32, 0), _rand((2, 4, 6, 6), torch.float32, 1)
    w = _rand((5, 4, 3, 3), torch.float32, 2)
    geom = ([1, 1], [1, 1], [1, 1])
    args = (None, None, None, False, *geom, "ieee", False)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.interval_conv2d_forward(c, r.double(), w, *args)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.interval_conv2d_forward(c, r, w.transpose(2, 3), *args)
    with pytest.raises(RuntimeError, match="groups == 1"):
        ext.interval_conv2d_forward(c, r, w[:, :2].contiguous(), *args)
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.interval_conv2d_forward(c, r, _rand((5, 4, 9, 9), torch.float32, 3), *args)
    with pytest.raises(RuntimeError, match="stride"):
        ext.interval_conv2d_forward(c, r, w, None, None, None, False, [0, 1], [1, 1], [1, 1], "ieee", False)
    with pytest.raises(RuntimeError, match="'CPU' backend"):  # the operators have CUDA kernels only
        ext.interval_conv2d_forward(c.cpu(), r.cpu(), w.cpu(), *args)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ext.interval_conv2d_forward(c.cpu(), r, w, *args)
    g = _rand((3, 5, 6, 6), torch.float32, 4)
    with pytest.raises(RuntimeError, match="pixels for input size"):
        ext.interval_conv2d_grad_input(g, g[:2], w, [9, 9], *geom, "ieee")
    with pytest.raises(RuntimeError, match="grad_c must have shape"):
        ext.interval_conv2d_grad_weight(g[:, :4].contiguous(), g[:2], c, r, w, *geom, "ieee")
    with pytest.raises(RuntimeError, match="s2 must have shape"):
        ext.l2_conv2d_forward(c, r, w, None, None, *geom, "ieee")


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

    _check(lambda c, r, s, t: cuda.interval_affine(c, r, s, t, relu=relu), ref, [c, r, scale, shift], [gc, gr],
           slack=4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,k,f", [(5, 3, 10, 33), (4, 0, 3, 7), (9, 9, 2, 300), (1, 1, 1, 1)], ids=str)
def test_margins_linear(n, m, k, f, dtype):
    c, r, w, b = _rand((n, f), dtype, 0), _rand((m, f), dtype, 1, True), _rand((k, f), dtype, 2), _rand((k,), dtype, 3)
    labels = torch.randint(0, k, (n,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
    g = _rand((n, k), dtype, 5)
    fn = lambda c, r, w, b: cuda.margins_linear(c, r, w, b, labels)  # noqa: E731
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
    _check(lambda x, w, b: cuda.l2_margins_linear(x, eps, w, b, labels, scale),
           lambda x, w, b: l2_margins_linear_ref(x, eps, w, b, labels, scale), [x, w, bias], [_rand((b_, k), dtype, 6)],
           slack=4.0)
    _check(lambda x, w, b: cuda.l2_linear(x, eps, w, b, scale), lambda x, w, b: l2_linear_ref(x, eps, w, b, scale),
           [x, w, bias], [_rand((b_, k), dtype, 7), _rand((b_, k), dtype, 8)], slack=4.0)


@pytest.mark.parametrize("shape,rows", [((6, 5), 2), ((9, 3, 4, 4), 3), ((4, 70, 2, 2), 4)], ids=str)
def test_batch_norm_stats(shape, rows):
    x = _rand(shape, torch.float32, 0)
    mean, var = cuda.channel_moments(x, rows)
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
    xc, xr, wc = _rand((3, 2, 5, 6), torch.float32, 8), _rand((2, 2, 5, 6), torch.float32, 9, True), \
        _rand((4, 2, 3, 2), torch.float32, 10)
    for args in [(xc, xr, wc, b, s, t, True, [1, 1], [1, 1], [1, 1], "ieee", True),
                 (xc, xr, wc, None, None, None, False, [2, 1], [0, 1], [1, 2], "ieee", False)]:
        torch.library.opcheck(torch.ops.cure_fast.interval_conv2d_cuda.default,
                              tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args))
    eps = _rand((3,), torch.float32, 11, True)
    for s2, e in [(xc[:1].abs(), None), (xc.abs(), eps)]:
        torch.library.opcheck(torch.ops.cure_fast.l2_conv2d_cuda.default,
                              (xc.detach().requires_grad_(), s2.detach().requires_grad_(), wc.detach().requires_grad_(),
                               b.detach().requires_grad_(), e, [1, 1], [1, 0], [1, 1], "ieee"))
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
        h = cuda.interval_linear(c, r, w1, None, scale=s, shift=t, relu=True)
        return cuda.margins_linear(*h, w2, None, labels)

    def model_ref(c, r):
        h = _epilogue_ref(*interval_linear_ref(c, r, w1), s, t, True, -1)
        return margins_linear_ref(*h, w2, None, labels)

    g = _rand((6, 5), torch.float32, 6)
    got = _run(torch.compile(model, fullgraph=True), [c, r], [g])
    want = _run(model_ref, [c, r], [g])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_torch_compile_conv_fullgraph():
    """method="auto" does not measure while torch.compile traces: the graph holds the implicit GEMM."""
    c, r = _rand((4, 3, 8, 8), torch.float32, 0), _rand((2, 3, 8, 8), torch.float32, 1, True)
    w1, w2 = _rand((6, 3, 3, 3), torch.float32, 2), _rand((5, 6, 3, 3), torch.float32, 3)
    s, t = _rand((6,), torch.float32, 4), _rand((6,), torch.float32, 5)

    def model(c, r):
        h = cuda.interval_conv2d(c, r, w1, None, 1, 1, scale=s, shift=t, relu=True)
        out = cuda.interval_conv2d(*h, w2, None, 2, 0)
        return (*out, *cuda.l2_conv2d(c, 0.5, w1, None, 1, 1))

    def model_ref(c, r):
        h = _epilogue_ref(*interval_conv2d_ref(c, r, w1, None, 1, 1), s, t, True, 1)
        return (*interval_conv2d_ref(*h, w2, None, 2, 0), *l2_conv2d_ref(c, 0.5, w1, None, 1, 1))

    grads = [_rand((4, 5, 3, 3), torch.float32, 6), _rand((2, 5, 3, 3), torch.float32, 7),
             _rand((4, 6, 8, 8), torch.float32, 8), _rand((4, 6, 8, 8), torch.float32, 9)]
    got = _run(torch.compile(model, fullgraph=True), [c, r], grads)
    saved, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # an fp32 reference
    try:
        want = _run(model_ref, [c, r], grads)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
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
    backend_choices = {k: v for k, v in autoselect.measurements.items() if k[0] == "interval_linear"}
    assert len(backend_choices) == 2  # (the cuda backend's own method choices have keys of their own)
    for results in backend_choices.values():
        assert isinstance(results["torch"], float) and isinstance(results["cuda"], float), results
    monkeypatch.setenv("CURE_FAST_AUTOSELECT", "0")
    assert autoselect.choose("interval_linear", ["cuda", "torch"], c.device, (c, r, w), lambda n: None) is None


# The foundation's soundness property with backend="cuda": sampled points stay inside the bounds.
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_soundness_with_cuda_backend(data):
    from netgen import modules_of, networks, run_layers

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
            outputs = run_layers(modules_of(bm), point, stats)
            for value, (lower, upper) in zip(outputs, out.layer_bounds(k)):
                tol = 1e-9 * (1 + lower.abs() + upper.abs())
                assert (value >= lower - tol).all() and (value <= upper + tol).all()
