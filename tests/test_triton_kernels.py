"""Every Triton kernel against its pure-PyTorch twin, forward and backward, with outputs poisoned
with NaN, odd shapes (not multiples of the block sizes), and r with as many, fewer and no rows
than c. Errors are measured against float64 and must stay within twice those of PyTorch in the
same dtype (plus a small floor). On the CPU the kernels run in the Triton interpreter
(TRITON_INTERPRET=1) on tiny shapes; on a GPU on larger ones, in every dtype and precision."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from cure_fast import functional as BF  # noqa: E402
from cure_fast.kernels import _common  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
pytestmark = [pytest.mark.gpu] if CUDA else []
# (dtype, precision): the interpreter multiplies bfloat16 tiles as integers, so bf16 runs on a GPU only
# (and tf32 is plain fp32 there).
MODES = [(torch.float32, "ieee"), (torch.float64, "ieee"), (torch.float16, "ieee")]
if CUDA:
    MODES += [(torch.float32, "tf32"), (torch.float32, "bf16"), (torch.bfloat16, "ieee")]
ELEMENTWISE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SCALE = 4 if CUDA else 1  # shapes grow on a GPU


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Kernel outputs start as NaN; reductions split into several pieces even at small sizes."""
    monkeypatch.setattr(_common, "POISON", True)
    monkeypatch.setattr(_common, "MIN_SPLIT_WORK", 16)


def _mode_id(mode):
    return f"{str(mode[0])[6:]}-{mode[1]}"


def _rand(gen, *shape, low=-1.0, high=1.0):
    return (torch.rand(shape, generator=gen, dtype=torch.float64, device=DEVICE) * (high - low) + low)


def _run(fn, inputs, grads_out):
    """fn's outputs and the gradients of every floating input (None where it gets none)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grads_out, outs)], allow_unused=True)
    return list(outs) + list(grads)


def _emulated(dtype, precision):
    """How plain PyTorch computes the baseline for a precision mode: TF32 on, or inputs rounded to bf16."""
    def prepare(t):
        if precision == "bf16" and isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(torch.bfloat16).to(dtype)
        return t
    return prepare


def check(op_fn, inputs, mode, what=""):
    """op_fn(*inputs, backend=..., precision=...) on the triton backend against the torch backend in
    the same dtype and in float64: forward values and the gradients of every floating input."""
    dtype, precision = mode
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    wide = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
    probe = op_fn(*wide, backend="torch", precision="ieee")
    probe = probe if isinstance(probe, tuple) else (probe,)
    gen = torch.Generator(device=DEVICE).manual_seed(99)
    grads_out = [_rand(gen, *o.shape) for o in probe]

    def call(backend, prec):
        return lambda *xs: op_fn(*xs, backend=backend, precision=prec)

    got = _run(call("triton", precision), cast, grads_out)
    ref64 = _run(call("torch", "ieee"), wide, grads_out)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        baseline = _run(call("torch", "ieee" if precision == "ieee" else "tf32"),
                        [_emulated(dtype, precision)(t) for t in cast], grads_out)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert len(got) == len(ref64)
    for k, (out, base, ref) in enumerate(zip(got, baseline, ref64)):
        name = f"{what} output {k}"
        if ref is None:
            assert out is None, name
            continue
        assert out is not None and out.shape == ref.shape and out.dtype == dtype, name
        assert not out.isnan().any(), f"{name}: NaN (an element was not written)"
        if out.numel() == 0:
            continue
        err = (out.double() - ref).abs().max().item()
        err_torch = (base.double() - ref).abs().max().item()
        # One ulp at the largest magnitude; for float64 the reference is PyTorch's own result, so a
        # few ulps for the different summation order.
        floor = (32 if dtype == torch.float64 else 1) * torch.finfo(dtype).eps * (1 + ref.abs().max().item())
        assert err <= 2 * err_torch + floor, f"{name}: error {err:.3g} vs torch {err_torch:.3g} (floor {floor:.3g})"


# ---------------------------------------------------------------- interval_linear

LINEAR_CASES = {  # name: (rows of c, rows of r, in, out, extra dims)
    "odd": (7, 4, 37, 19, ()),
    "all-radius": (5, 5, 20, 33, ()),
    "no-radius": (6, 0, 18, 17, ()),
    "one-row": (1, 1, 3, 2, ()),
    "extra-dims": (5, 2, 17, 9, (3,)),
    "long-reduction": (4, 3, 150, 9, ()),  # few output tiles: the reduction is split over the grid
    "empty-batch": (0, 0, 7, 5, ()),
    "no-features": (3, 1, 0, 4, ()),  # outputs from the epilogue alone; the bias gradient still sums
}


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("epilogue", ["bias", "bn-relu", "relu"])
def test_interval_linear(case, epilogue, mode):
    n, m, k, o, extra = LINEAR_CASES[case]
    n, k, o = n * SCALE, k * SCALE, o * SCALE
    m = m * SCALE
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    c, r = _rand(gen, n, *extra, k), _rand(gen, m, *extra, k, low=0.0)
    weight, bias = _rand(gen, o, k) / k ** 0.5, _rand(gen, o)
    scale, shift = _rand(gen, o, low=-2.0, high=2.0), _rand(gen, o)
    if epilogue == "bias":
        check(lambda c, r, w, b, **kw: BF.interval_linear(c, r, w, b, **kw), (c, r, weight, bias), mode, case)
    elif epilogue == "relu":
        check(lambda c, r, w, **kw: BF.interval_linear(c, r, w, relu=True, **kw), (c, r, weight), mode, case)
    else:
        check(lambda c, r, w, b, s, t, **kw: BF.interval_linear(c, r, w, b, scale=s, shift=t, relu=True, **kw),
              (c, r, weight, bias, scale, shift), mode, case)


# ---------------------------------------------------------------- interval_conv2d

CONV_CASES = {  # name: (rows of c, rows of r, C, O, H, W, kernel, conv arguments)
    "3x3-pad1": (3, 2, 5, 17, 7, 6, (3, 3), dict(padding=1)),
    "stride2-dilated": (2, 1, 3, 6, 9, 8, (3, 2), dict(stride=2, padding=(1, 0), dilation=(1, 2))),
    "stride-2x3": (2, 2, 18, 5, 8, 9, (2, 3), dict(stride=(2, 3), padding=2, dilation=2)),
    "same": (2, 1, 4, 7, 5, 6, (3, 3), dict(padding="same")),
    "no-radius-1x1": (3, 0, 6, 5, 4, 5, (1, 1), dict()),
    "1x1-stride2": (2, 1, 3, 4, 7, 6, (1, 1), dict(stride=2)),  # input pixels that no tap reaches
    "2x2-stride3": (2, 2, 3, 5, 8, 7, (2, 2), dict(stride=3, padding=1)),
    "33-channels-by-tap": (2, 1, 33, 4, 5, 4, (2, 3), dict(stride=(1, 2), padding=1)),  # C >= 32: tap by tap
    "stride-past-image": (2, 1, 3, 4, 2, 3, (2, 1), dict(stride=(5, 4), padding=(1, 0))),  # phases past the edge
}


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("epilogue", ["bias", "bn-relu"])
def test_interval_conv2d(case, epilogue, mode):
    n, m, ch, o, h, w, kernel, conv = CONV_CASES[case]
    ch, o = ch * SCALE, o * SCALE
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    c, r = _rand(gen, n, ch, h, w), _rand(gen, m, ch, h, w, low=0.0)
    weight = _rand(gen, o, ch, *kernel) / (ch * kernel[0] * kernel[1]) ** 0.5
    bias, scale, shift = _rand(gen, o), _rand(gen, o, low=-2.0, high=2.0), _rand(gen, o)
    if epilogue == "bias":
        check(lambda c, r, w, b, **kw: BF.interval_conv2d(c, r, w, b, **conv, **kw), (c, r, weight, bias), mode, case)
    else:
        check(lambda c, r, w, s, t, **kw: BF.interval_conv2d(c, r, w, None, **conv, scale=s, shift=t, relu=True, **kw),
              (c, r, weight, scale, shift), mode, case)


def test_interval_conv2d_groups_fall_back_to_torch_with_one_warning():
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    c, r, weight = _rand(gen, 2, 4, 5, 5), _rand(gen, 1, 4, 5, 5, low=0.0), _rand(gen, 6, 2, 3, 3)
    _common._warned.discard("interval_conv2d groups")
    with pytest.warns(UserWarning, match="groups > 1 runs on the torch backend"):
        got = BF.interval_conv2d(c, r, weight, groups=2, relu=True, backend="triton")
    want = BF.interval_conv2d(c, r, weight, groups=2, relu=True, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BF.interval_conv2d(c, r, weight, groups=2, backend="triton")


# ---------------------------------------------------------------- elementwise

ELEMENTWISE_SHAPES = {"2d": ((9, 37), 5), "4d": ((4, 3, 5, 7), 3), "no-radius": ((3, 6, 2, 2), 0),
                      "points-none": ((3, 11), 3)}


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES if CUDA else [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", list(ELEMENTWISE_SHAPES))
def test_interval_relu(shape, dtype):
    full, m = ELEMENTWISE_SHAPES[shape]
    full = (full[0] * SCALE,) + full[1:]
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    c, r = _rand(gen, *full), _rand(gen, m * SCALE, *full[1:], low=0.0)
    check(lambda c, r, **kw: BF.interval_relu(c, r, backend=kw["backend"]), (c, r), (dtype, "ieee"), shape)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES if CUDA else [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", list(ELEMENTWISE_SHAPES))
@pytest.mark.parametrize("relu", [False, True])
def test_interval_affine(shape, relu, dtype):
    full, m = ELEMENTWISE_SHAPES[shape]
    full = (full[0] * SCALE,) + full[1:]
    gen = torch.Generator(device=DEVICE).manual_seed(4)
    c, r = _rand(gen, *full), _rand(gen, m * SCALE, *full[1:], low=0.0)
    scale, shift = _rand(gen, full[1], low=-2.0, high=2.0), _rand(gen, full[1])
    scale[0] = 0.0
    check(lambda c, r, s, t, **kw: BF.interval_affine(c, r, s, t, relu=relu, backend=kw["backend"]),
          (c, r, scale, shift), (dtype, "ieee"), shape)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES if CUDA else [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,offset", [((7, 3), 0.0), ((5, 4, 3, 5), 0.0), ((6, 2, 9, 7), 100.0), ((1, 3, 2, 2), 0.0)],
                         ids=str)
def test_batch_norm_stats(shape, offset, dtype):
    """Train-mode BatchNorm statistics, split over rows; an offset far from 0 checks the shifted sums."""
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    x = _rand(gen, shape[0] * SCALE, *shape[1:]) + offset
    check(lambda x, **kw: BF.batch_norm_stats(x, backend=kw["backend"]), (x,), (dtype, "ieee"), str(shape))


# ---------------------------------------------------------------- l2 first layer

@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("scale_kind", [None, "feature", "sample", "shared"])
@pytest.mark.parametrize("eps_kind", ["float", "per-sample"])
def test_l2_linear(scale_kind, eps_kind, mode):
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    b, k, o = 5 * SCALE, 41 * SCALE, 19 * SCALE  # k long enough for a split reduction
    x, weight, bias = _rand(gen, b, k), _rand(gen, o, k) / k ** 0.5, _rand(gen, o)
    scale = {None: None, "feature": _rand(gen, k, low=0.2, high=2.0), "sample": _rand(gen, b, k, low=0.2, high=2.0),
             "shared": _rand(gen, 1, low=0.2, high=2.0)}[scale_kind]
    eps = 0.4 if eps_kind == "float" else _rand(gen, b, low=0.0, high=1.0)
    if eps_kind != "float":
        eps[0] = 0.0
    check(lambda x, e, w, bb, s, **kw: BF.l2_linear(x, e, w, bb, s, **kw), (x, eps, weight, bias, scale), mode,
          "l2_linear")


@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("scale_kind", [None, "channel", "sample"])
@pytest.mark.parametrize("conv", [dict(padding=1), dict(stride=2, padding=2, dilation=(2, 1))], ids=["pad1", "stride2"])
def test_l2_conv2d(scale_kind, conv, mode):
    gen = torch.Generator(device=DEVICE).manual_seed(6)
    b, ch, o = 3, 3, 6 * SCALE
    x, weight, bias = _rand(gen, b, ch, 7, 9), _rand(gen, o, ch, 3, 3) / 27 ** 0.5, _rand(gen, o)
    scale = {None: None, "channel": _rand(gen, ch, 1, 1, low=0.2, high=2.0),
             "sample": _rand(gen, b, ch, 7, 9, low=0.2, high=2.0)}[scale_kind]
    eps = _rand(gen, b, low=0.1, high=1.0)
    check(lambda x, e, w, bb, s, **kw: BF.l2_conv2d(x, e, w, bb, **conv, scale=s, **kw),
          (x, eps, weight, bias, scale), mode, "l2_conv2d")


# ---------------------------------------------------------------- margins

@pytest.mark.parametrize("mode", MODES[:2] + MODES[4:], ids=_mode_id)
@pytest.mark.parametrize("rows,radii,classes", [(7, 4, 10), (5, 5, 3), (6, 0, 17), (3, 3, 40)])
def test_margins_linear(rows, radii, classes, mode):
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    k = 37 * SCALE
    c, r = _rand(gen, rows * SCALE, k), _rand(gen, radii * SCALE, k, low=0.0)
    weight, bias = _rand(gen, classes, k) / k ** 0.5, _rand(gen, classes)
    labels = torch.randint(0, classes, (rows * SCALE,), generator=gen, device=DEVICE)
    check(lambda c, r, w, b, **kw: BF.margins_linear(c, r, w, b, labels, **kw), (c, r, weight, bias), mode, "margins")


@pytest.mark.parametrize("mode", MODES[:2] + MODES[4:], ids=_mode_id)
@pytest.mark.parametrize("scale_kind", [None, "feature", "sample"])
def test_l2_margins_linear(scale_kind, mode):
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    b, k, classes = 6 * SCALE, 29 * SCALE, 10
    x, weight, bias = _rand(gen, b, k), _rand(gen, classes, k) / k ** 0.5, _rand(gen, classes)
    labels = torch.randint(0, classes, (b,), generator=gen, device=DEVICE)
    scale = {None: None, "feature": _rand(gen, k, low=0.2, high=2.0),
             "sample": _rand(gen, b, k, low=0.2, high=2.0)}[scale_kind]
    eps = _rand(gen, b, low=0.1, high=1.0)
    check(lambda x, e, w, bb, s, **kw: BF.l2_margins_linear(x, e, w, bb, labels, s, **kw),
          (x, eps, weight, bias, scale), mode, "l2_margins")


def test_margins_are_exactly_zero_at_the_label():
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    c, r, weight = _rand(gen, 5, 13), _rand(gen, 3, 13, low=0.0), _rand(gen, 4, 13)
    labels = torch.tensor([0, 3, 1, 2, 3], device=DEVICE)
    for margins in (BF.margins_linear(c, r, weight, _rand(gen, 4), labels, backend="triton"),
                    BF.l2_margins_linear(c, 0.3, weight, None, labels, backend="triton")):
        assert (margins.gather(1, labels[:, None]) == 0).all()


# ---------------------------------------------------------------- TF32 rounding of the dot tiles

def test_round_to_tf32_rounds_to_nearest_ties_away_like_cvt_rna():
    import triton
    import triton.language as tl

    @triton.jit
    def rounded(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, _common.round_to_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    ulp = 2.0 ** -10  # of TF32 at 1
    special = [1 + ulp / 2, 1 + ulp / 2 - 2 ** -23, -(1 + ulp / 2), 1 + 3 * ulp / 2, 2 ** -149, -0.0, 0.0,
               torch.finfo(torch.float32).max, float("inf"), float("-inf"), float("nan"), 3.0e38, 1e-40]
    expect = [1 + ulp, 1.0, -(1 + ulp), 1 + 2 * ulp, 0.0, -0.0, 0.0, float("inf"), float("inf"), float("-inf"),
              float("nan"), None, None]
    bits = torch.randint(-2 ** 31, 2 ** 31, (1000,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    x = torch.cat([torch.tensor(special), bits.to(torch.int32).view(torch.float32)]).to(DEVICE)
    out = torch.empty_like(x)
    rounded[(triton.cdiv(x.numel(), 256),)](x, out, x.numel(), BLOCK=256)
    out = out.cpu()
    for value, want, got in zip(special, expect, out):
        if want is not None:  # bit for bit (the sign of zero too), any NaN for NaN
            assert torch.equal(got.view(torch.int32), torch.tensor(want).view(torch.int32)) or (want != want and got != got), \
                f"{value!r}: {got.item()!r}"
    # Rounded to nearest: at most half a TF32 ulp away, 13 low bits clear; NaN stays NaN.
    x, finite = x.cpu(), out.isfinite() & x.isfinite()
    assert (out.view(torch.int32)[finite] & 0x1FFF == 0).all()
    exponent = torch.frexp(x[finite].double())[1].clamp(min=-125)  # subnormals: the ulp of the smallest binade
    half_ulp = torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 12)
    assert ((out[finite].double() - x[finite].double()).abs() <= half_ulp).all()
    assert (out[x.isnan()].isnan()).all()


def test_the_tf32_dot_multiplies_tiles_rounded_to_tf32(monkeypatch):
    """The rounding a GPU's tf32 dot gets (ROUND_TF32, off in the interpreter, which multiplies in full
    float32), on here: 1 + 2^-12 rounds to 1, so sixteen products sum to exactly 16, not 16.0039."""
    import triton
    import triton.language as tl

    @triton.jit
    def product(a_ptr, b_ptr, out_ptr, DOT: tl.constexpr):
        i = tl.arange(0, 16)
        a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
        b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
        tl.store(out_ptr + i[:, None] * 16 + i[None, :], _common.dot(a, b, tl.zeros((16, 16), tl.float32), DOT, False))

    a, b = torch.full((16, 16), 1 + 2.0 ** -12, device=DEVICE), torch.ones(16, 16, device=DEVICE)
    out = torch.empty(16, 16, device=DEVICE)
    if not CUDA:
        monkeypatch.setattr(_common, "ROUND_TF32", tl.constexpr(True))
    product[(1,)](a, b, out, DOT="tf32")
    assert (out == 16).all(), out.unique()
    if not CUDA:
        product[(1,)](a, b, out, DOT="ieee")
        assert (out == 16 * (1 + 2.0 ** -12)).all()
