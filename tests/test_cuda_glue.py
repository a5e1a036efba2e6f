"""The Python side of the cuda backend on the CPU: custom ops, fake implementations, autograd
formulas, shape handling and the conv method choice, with the extension replaced by its
pure-PyTorch stand-in (tests/cuda_emulator.py). Each public function of cure_fast.cuda must give
the torch backend's outputs and gradients (float64). The kernels themselves: tests/test_cuda_ops.py
(GPU) and tests/test_cuda_host_emulation.py (their index maps, on the host)."""
import pytest
import torch

import cuda_emulator
from cure_fast import cuda
from cure_fast import functional as BF
from cure_fast.ops import autoselect, registry

DT = torch.float64


@pytest.fixture(autouse=True)
def emulated():
    autoselect.clear()
    with cuda.use(cuda_emulator.extension):
        yield
    autoselect.clear()


def _rand(gen, *shape, low=-1.0, high=1.0):
    return torch.rand(shape, generator=gen, dtype=DT) * (high - low) + low


def _outputs_and_grads(fn, inputs, seed=1):
    leaves = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    outs = fn(*leaves)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    gen = torch.Generator().manual_seed(seed)
    cotangents = [_rand(gen, *o.shape) for o in outs]
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, wrt, cotangents, allow_unused=True)
    return list(outs) + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


def check(cuda_fn, torch_fn, inputs):
    got, want = _outputs_and_grads(cuda_fn, inputs), _outputs_and_grads(torch_fn, inputs)
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda m: f"output / gradient {k}: {m}")


def test_the_emulator_has_every_entry_point():
    used = cuda_emulator.entry_points()
    assert {"interval_relu_forward", "interval_linear_forward", "margins_linear", "set_poison"} <= set(used)
    missing = [name for name in used if not hasattr(cuda_emulator.extension, name)]
    assert not missing


def test_a_missing_entry_point_names_itself():
    """An extension built from older sources fails at the first call of what it lacks, in one line."""
    c, r = torch.zeros(2, 3, dtype=DT), torch.zeros(1, 3, dtype=DT)
    with cuda.use(object()):
        with pytest.raises(RuntimeError, match=r"^cure_fast\._C is stale \(it lacks interval_relu_forward\); rebuild "
                                               r"with `CURE_FAST_BUILD_CUDA=1 pip install[^\n]*$"):
            cuda.interval_relu(c, r)


EPILOGUES = {"none": (False, False), "bn": (True, False), "relu": (False, True), "bn+relu": (True, True)}


@pytest.mark.parametrize("method", ["fused_gemm", "cublas", "auto"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("rows,radii,extra", [(5, 3, ()), (4, 4, (2,)), (3, 0, ())], ids=str)
def test_interval_linear(rows, radii, extra, epilogue, method):
    gen = torch.Generator().manual_seed(rows + radii)
    bn, relu = EPILOGUES[epilogue]
    c, r = _rand(gen, rows, *extra, 6), _rand(gen, radii, *extra, 6, low=0.0)
    w, b, s, t = _rand(gen, 4, 6), _rand(gen, 4), _rand(gen, 4, low=-2.0, high=2.0), _rand(gen, 4)
    kw = lambda s, t: dict(scale=s if bn else None, shift=t if bn else None, relu=relu)  # noqa: E731
    check(lambda c, r, w, b, s, t: cuda.interval_linear(c, r, w, b, **kw(s, t), method=method),
          lambda c, r, w, b, s, t: BF.interval_linear(c, r, w, b, **kw(s, t), backend="torch"), [c, r, w, b, s, t])


CONVS = {  # (rows, radii, channels, out, image, kernel, stride, padding, dilation)
    "plain": (3, 2, 2, 3, (5, 6), 3, 1, 1, 1),
    "strided": (2, 2, 3, 2, (7, 5), 3, 2, 2, 1),
    "dilated": (3, 1, 2, 2, (8, 8), 3, (1, 2), (2, 1), 2),
    "points-only": (2, 0, 1, 2, (4, 4), 1, 1, 0, 1),
}


@pytest.mark.parametrize("method", ["implicit_gemm", "cudnn", "auto"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("case", list(CONVS))
def test_interval_conv2d(case, epilogue, method):
    rows, radii, channels, out, image, k, stride, padding, dilation = CONVS[case]
    gen = torch.Generator().manual_seed(len(case))
    bn, relu = EPILOGUES[epilogue]
    c, r = _rand(gen, rows, channels, *image), _rand(gen, radii, channels, *image, low=0.0)
    w, b = _rand(gen, out, channels, k, k), _rand(gen, out)
    s, t = _rand(gen, out, low=-2.0, high=2.0), _rand(gen, out)
    geom = (stride, padding, dilation)
    kw = lambda s, t: dict(scale=s if bn else None, shift=t if bn else None, relu=relu)  # noqa: E731
    check(lambda c, r, w, b, s, t: cuda.interval_conv2d(c, r, w, b, *geom, **kw(s, t), method=method),
          lambda c, r, w, b, s, t: BF.interval_conv2d(c, r, w, b, *geom, **kw(s, t), backend="torch"),
          [c, r, w, b, s, t])


def _conv_call(c, r, w, **kw):
    return cuda.interval_conv2d(c, r, w, None, 1, 1, **kw)


AUTO_CASES = {  # op, (c, r, w) shapes, its fused method and entry point, the call
    "conv": ((3, 2, 5, 5), (2, 2, 5, 5), (3, 2, 3, 3), "implicit_gemm", "interval_conv2d_forward", _conv_call),
    "linear": ((5, 6), (3, 6), (4, 6), "fused_gemm", "interval_linear_forward", cuda.interval_linear),
}


def _auto_inputs(case):
    gen = torch.Generator().manual_seed(0)
    c_shape, r_shape, w_shape = AUTO_CASES[case][:3]
    return _rand(gen, *c_shape), _rand(gen, *r_shape, low=0.0), _rand(gen, *w_shape)


@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_leaves_out_a_method_that_disagrees(monkeypatch, case):
    c, r, w = _auto_inputs(case)
    fused, entry, call = AUTO_CASES[case][3:]
    real = getattr(cuda_emulator.extension, entry)

    def shrunk(*args):
        out = real(*args)
        return (out[0], out[1] * 0.999, *out[2:])  # radii 0.1% too small: unsound
    monkeypatch.setattr(cuda_emulator.extension, entry, shrunk)
    got = call(c, r, w, relu=True)
    (results,) = autoselect.measurements.values()
    assert results[fused] == "output mismatch against the torch backend"
    (library,) = set(results) - {fused}
    assert isinstance(results[library], float)
    monkeypatch.setattr(cuda_emulator.extension, entry, real)
    for a, b in zip(got, call(c, r, w, relu=True, method=fused)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_measures_once_per_key(case):
    c, r, w = _auto_inputs(case)
    call = AUTO_CASES[case][-1]
    for _ in range(3):
        call(c, r, w)
    call(c, r, w.requires_grad_())  # training calls have their own key
    assert len(autoselect.measurements) == 2


@pytest.mark.parametrize("scale_kind", [None, "channel", "pixel", "sample"])
@pytest.mark.parametrize("eps_kind", ["float", "sample"])
@pytest.mark.parametrize("case", ["plain", "strided", "dilated"])
def test_l2_conv2d(case, scale_kind, eps_kind):
    _, _, channels, out, image, k, stride, padding, dilation = CONVS[case]
    gen = torch.Generator().manual_seed(3)
    batch = 3
    x, w, b = _rand(gen, batch, channels, *image), _rand(gen, out, channels, k, k), _rand(gen, out)
    scale = {None: None, "channel": _rand(gen, channels, 1, 1, low=0.5), "pixel": _rand(gen, channels, *image, low=0.5),
             "sample": _rand(gen, batch, channels, *image, low=0.5)}[scale_kind]
    eps = 0.3 if eps_kind == "float" else _rand(gen, batch, low=0.1, high=0.9)
    inputs = [x, w, b] + ([scale] if scale is not None else []) + ([eps] if eps_kind == "sample" else [])

    def call(fn):
        def run(x, w, b, *rest):
            s = rest[0] if scale is not None else None
            e = rest[-1] if eps_kind == "sample" else eps
            return fn(x, e, w, b, stride, padding, dilation, 1, s)
        return run
    check(call(cuda.l2_conv2d), call(lambda *a: BF.l2_conv2d(*a, backend="torch")), inputs)


@pytest.mark.parametrize("scale_kind", [None, "feature", "sample"])
def test_l2_linear(scale_kind):
    gen = torch.Generator().manual_seed(4)
    x, w, b, eps = _rand(gen, 3, 5), _rand(gen, 4, 5), _rand(gen, 4), _rand(gen, 3, low=0.1)
    scale = {None: None, "feature": _rand(gen, 5, low=0.5), "sample": _rand(gen, 3, 5, low=0.5)}[scale_kind]
    inputs = [x, eps, w, b] + ([scale] if scale is not None else [])
    check(lambda *a: cuda.l2_linear(*a), lambda *a: BF.l2_linear(*a, backend="torch"), inputs)


@pytest.mark.parametrize("radii", [4, 2, 0])
def test_margins_linear(radii):
    gen = torch.Generator().manual_seed(radii)
    c, r, w, b = _rand(gen, 4, 6), _rand(gen, radii, 6, low=0.0), _rand(gen, 5, 6), _rand(gen, 5)
    labels = torch.tensor([0, 4, 2, 2])
    check(lambda c, r, w, b: cuda.margins_linear(c, r, w, b, labels),
          lambda c, r, w, b: BF.margins_linear(c, r, w, b, labels, backend="torch"), [c, r, w, b])


@pytest.mark.parametrize("scale_kind", [None, "feature", "sample"])
def test_l2_margins_linear(scale_kind):
    gen = torch.Generator().manual_seed(5)
    x, w, b, eps = _rand(gen, 3, 6), _rand(gen, 4, 6), _rand(gen, 4), _rand(gen, 3, low=0.1)
    scale = {None: None, "feature": _rand(gen, 6, low=0.5), "sample": _rand(gen, 3, 6, low=0.5)}[scale_kind]
    labels = torch.tensor([1, 0, 3])
    inputs = [x, eps, w, b] + ([scale] if scale is not None else [])
    check(lambda x, e, w, b, *s: cuda.l2_margins_linear(x, e, w, b, labels, *s),
          lambda x, e, w, b, *s: BF.l2_margins_linear(x, e, w, b, labels, *s, backend="torch"), inputs)


@pytest.mark.parametrize("relu", [False, True])
def test_interval_affine_and_relu(relu):
    gen = torch.Generator().manual_seed(6)
    c, r = _rand(gen, 4, 3, 2, 5), _rand(gen, 2, 3, 2, 5, low=0.0)
    s, t = torch.tensor([-1.5, 0.0, 0.7], dtype=DT), _rand(gen, 3)
    check(lambda c, r, s, t: cuda.interval_affine(c, r, s, t, relu=relu),
          lambda c, r, s, t: BF.interval_affine(c, r, s, t, relu=relu, backend="torch"), [c, r, s, t])
    check(cuda.interval_relu, lambda c, r: BF.interval_relu(c, r, backend="torch"), [c, r])


def test_batch_norm_stats():
    gen = torch.Generator().manual_seed(7)
    x = _rand(gen, 5, 3, 4, 2) + 10
    check(cuda.batch_norm_stats, lambda x: BF.batch_norm_stats(x, backend="torch"), [x])


def _op_cases():
    gen = torch.Generator().manual_seed(8)
    c, r, w = _rand(gen, 3, 2, 5, 5), _rand(gen, 2, 2, 5, 5, low=0.0), _rand(gen, 3, 2, 3, 3)
    b, s, t = _rand(gen, 3), _rand(gen, 3), _rand(gen, 3)
    lc, lr, lw = _rand(gen, 4, 6), _rand(gen, 2, 6, low=0.0), _rand(gen, 5, 6)
    geom = ([1, 1], [1, 1], [1, 1])
    return {
        "interval_conv2d": (cuda.conv.interval_conv2d_op, (c, r, w, b, s, t, True, *geom, "ieee", True)),
        "interval_conv2d_grad_input": (cuda.conv.conv_grad_input_op,
                                       (c[:, :1].repeat(1, 3, 1, 1), r[:, :1].repeat(1, 3, 1, 1), w, [5, 5], *geom,
                                        "ieee")),
        "l2_conv2d": (cuda.l2.l2_conv2d_op, (c, r[:1].abs(), w, b, None, *geom, "ieee")),
        "l2_row_norms": (cuda.l2.row_norms_op, (lw, lr[0].abs())),
        "interval_linear": (cuda.linear.interval_linear_op, (lc, lr, lw, None, None, None, True, "ieee", False)),
        "margins": (cuda.margins.margins_op, (lc, lr, lw, None, torch.tensor([0, 1, 4, 2]), None, False)),
        "channel_epilogue": (cuda.elementwise.channel_epilogue_op, (c, r, b[:2], s[:2], t[:2], True)),
        "channel_moments": (cuda.elementwise.channel_moments_op, (c, 2)),
        "interval_relu": (cuda.elementwise.interval_relu_op, (c, r)),
    }


OP_CASES = _op_cases()


@pytest.mark.parametrize("name", list(OP_CASES))
def test_opcheck(name):
    """Schema, fake (meta) implementation and autograd registration of each custom op."""
    op, args = OP_CASES[name]
    differentiable = "grad" not in name  # the backward ops have no backward of their own
    args = tuple(a.detach().clone().requires_grad_(differentiable) if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in args)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                                "test_aot_dispatch_static"))


def test_autoselect_measures_the_cpu_stand_in_like_any_backend():
    """The stand-in's results go through the same validation as on a GPU (timing on the CPU)."""
    gen = torch.Generator().manual_seed(9)
    c, r, w = _rand(gen, 4, 6), _rand(gen, 2, 6, low=0.0), _rand(gen, 5, 6).requires_grad_()
    impls = {"torch": registry.implementation("interval_linear", "torch"), "cuda": cuda.interval_linear}
    results = autoselect.measure(lambda name: impls[name](c, r, w), ["cuda"], c.device, [w])
    assert isinstance(results["cuda"], float)


def test_every_operator_name_the_code_and_tests_use_is_registered():
    """The GPU-only tests name the custom ops directly; a misspelt name would only fail on a GPU."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    names = {m.group(1) for folder in ("cure_fast", "tests", "bench") for path in (root / folder).rglob("*.py")
             for m in re.finditer(r"torch\.ops\.cure_fast\.(\w+)", path.read_text())}
    assert "interval_linear_cuda" in names
    for name in sorted(names):
        assert hasattr(torch.ops.cure_fast, name), f"torch.ops.cure_fast.{name} is not registered"
