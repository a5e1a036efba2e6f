"""The index maps of the CUDA interval GEMM problems, checked without a GPU.

tests/cuda_host/harness.cu compiles csrc/interval_conv.cu and csrc/interval_linear.cu for the host
with CURE_FAST_HOST_EMULATION defined: every kernel launch of gemm::run then runs the block schedule
of the FMA or the WMMA kernel on the host (tests/cuda_host/emulate.h), through the real tile loads,
operands (implicit im2col / col2im, strided matrices) and epilogues, with bounds-checked loads and
stores and NaN-filled shared-memory tiles. The outputs (NaN-filled first) are compared with torch in
float64: conv forward with every epilogue option, input gradient, split-K weight gradient, the l2
first layer and the linear problem. The arithmetic of the kernels (FMA, tensor cores) is not
covered; test_cuda_ops.py does that on a GPU.
"""
import ctypes
import os
import random
import subprocess
import time
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from cure_fast._toolkit import cuda_home

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "cuda_host", "harness.cu")
RTOL = 1e-10
SCHEDULES = {"fma": 1, "wmma": 2}  # host_emulation::Schedule
F64 = torch.float64


class Emulator:
    """The harness library: each call registers the buffers that it may load from (reads) and
    store to (writes), runs the problem and raises AssertionError with the harness's message."""

    P, L, I = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    SIGNATURES = {
        "cure_emu_conv_forward": [P, L] + [P] * 6 + [I] + [P] * 4,
        "cure_emu_l2_forward": [P, L, P, P, I, P, P, P, P, P],
        "cure_emu_conv_grad_input": [P, L] + [P] * 5,
        "cure_emu_conv_grad_weight": [P, L] + [P] * 7 + [I],
        "cure_emu_linear_forward": [L] * 4 + [P] * 6 + [I] + [P] * 4,
        "cure_emu_linear_grad_input": [L] * 4 + [P] * 5,
        "cure_emu_linear_grad_weight": [L] * 4 + [P] * 6,
    }

    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(path)
        for name, args in self.SIGNATURES.items():
            getattr(lib, name).argtypes = args
            getattr(lib, name).restype = ctypes.c_int
        lib.cure_emu_error.restype = ctypes.c_char_p
        lib.cure_emu_set_schedule.argtypes = [ctypes.c_int]
        lib.cure_emu_add_buffer.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
        lib.cure_emu_counters.argtypes = [ctypes.c_void_p]
        lib.cure_emu_conv_grad_weight_splits.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cure_emu_conv_grad_weight_splits.restype = ctypes.c_longlong
        lib.cure_emu_set_sm_count.argtypes = [ctypes.c_int]
        lib.cure_emu_linear_splits.argtypes = [ctypes.c_longlong] * 3 + [ctypes.c_int]
        lib.cure_emu_linear_splits.restype = ctypes.c_longlong

    def schedule(self, name):
        self.lib.cure_emu_set_schedule(SCHEDULES[name])

    def counters(self):
        out = (ctypes.c_longlong * 7)()
        self.lib.cure_emu_counters(out)
        return dict(zip(["launches", "blocks", "ksteps", "ksteps2", "grid_x", "grid_y", "grid_z"], out))

    def splits(self, geom, sm_count):
        return self.lib.cure_emu_conv_grad_weight_splits(geom, sm_count)

    def __call__(self, name, *args, reads=(), writes=()):
        self.lib.cure_emu_clear_buffers()
        self.lib.cure_emu_reset_counters()
        for ts, writable in ((reads, 0), (writes, 1)):
            for t in ts:
                if t is not None and t.numel():
                    assert t.is_contiguous() and t.dtype == F64
                    self.lib.cure_emu_add_buffer(t.data_ptr(), t.numel() * t.element_size(), writable)
        args = [ptr(a) if a is None or isinstance(a, torch.Tensor) else a for a in args]
        if getattr(self.lib, name)(*args) != 0:
            raise AssertionError(f"{name}: {self.lib.cure_emu_error().decode()}")


def ptr(t):
    return t.data_ptr() if t is not None and t.numel() else None


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    home = cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) in $CUDA_HOME, $CUDA_PATH, beside the "
                    "nvcc on PATH or in /usr/local/cuda*: the host emulation is compiled with nvcc")
    out = str(tmp_path_factory.mktemp("cuda_host") / "harness.so")
    # sm_80: the arch of the tensor-core declarations in interval_gemm.cuh (no kernel is instantiated).
    cmd = [os.path.join(home, "bin", "nvcc"), "-std=c++17", "-O2", "-arch=sm_80", "-x", "cu", "-shared",
           "-Xcompiler", "-fPIC", "-DCURE_FAST_HOST_EMULATION", "-I", os.path.join(ROOT, "csrc"), HARNESS, "-o", out]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the host emulation failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    print(f"\nhost emulation built in {time.perf_counter() - start:.1f} s")
    return Emulator(out)


def nan(*shape):
    return torch.full(shape, float("nan"), dtype=F64)


def close(got, want, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert not got.isnan().any(), f"{what}: elements not written (NaN)"
    if got.numel():
        err = (got - want).abs().max().item()
        assert err <= RTOL * (1 + want.abs().max().item()), f"{what}: max error {err}"


# ---------------------------------------------------------------------------------------------
# Convolutions

class Conv(NamedTuple):
    N: int  # batch
    R: int  # radius rows: the last R samples are intervals
    C: int
    H: int
    W: int
    O: int
    KH: int
    KW: int
    stride: tuple = (1, 1)
    pad: tuple = (0, 0)
    dil: tuple = (1, 1)

    @property
    def out_size(self):
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.pad, self.dil
        return ((self.H + 2 * ph - dh * (self.KH - 1) - 1) // sh + 1,
                (self.W + 2 * pw - dw * (self.KW - 1) - 1) // sw + 1)

    def geometry(self):
        P, Q = self.out_size
        return (ctypes.c_longlong * 15)(self.N, self.C, self.H, self.W, self.O, P, Q, self.KH, self.KW, *self.stride,
                                        *self.pad, *self.dil)

    def args(self):
        return self.stride, self.pad, self.dil


FIXED_CONV = {
    "3x3": Conv(3, 3, 3, 9, 9, 5, 3, 3, (1, 1), (1, 1)),
    "no-radius-dilated": Conv(5, 0, 2, 7, 7, 3, 2, 2, (1, 1), (2, 2), (2, 2)),
    "1x1": Conv(2, 1, 3, 5, 5, 4, 1, 1),
    "stride2-rect-image": Conv(3, 2, 3, 7, 9, 5, 3, 3, (2, 2), (1, 1)),
    "5x5-stride2": Conv(2, 2, 5, 9, 7, 7, 5, 5, (2, 2), (2, 2)),
    "stride2-dil2": Conv(3, 1, 3, 11, 10, 4, 3, 3, (2, 2), (2, 2), (2, 2)),
    "rect-params": Conv(3, 2, 2, 8, 9, 3, 3, 2, (2, 1), (1, 0), (1, 2)),
    "70-out-channels": Conv(6, 4, 5, 13, 11, 70, 3, 3, (1, 1), (1, 1)),
    "20-channels-no-pad": Conv(4, 3, 20, 6, 6, 9, 3, 3),
    "stride3-gaps": Conv(2, 2, 3, 6, 6, 4, 3, 3, (3, 3), (2, 2)),  # pixels that no tap reaches
    "1x1-stride2": Conv(2, 1, 3, 7, 8, 4, 1, 1, (2, 2)),  # three of four stride phases without a tap
    "patchify-4x4-stride4": Conv(2, 2, 3, 12, 10, 5, 4, 4, (4, 4)),  # one tap per phase
    "pad4-beyond-kernel": Conv(2, 1, 2, 5, 5, 3, 3, 3, (1, 1), (4, 4)),
    "split-k": Conv(8, 5, 16, 32, 32, 16, 3, 3, (1, 1), (1, 1)),
    "empty-batch": Conv(0, 0, 3, 5, 5, 4, 3, 3, (1, 1), (1, 1)),
    "stride-past-image": Conv(2, 1, 3, 2, 3, 4, 1, 1, (5, 4)),  # stride phases past the image's edge
}

# bias, scale, shift, relu, save_pre
EPILOGUES = {
    "plain": (False, False, False, False, True),
    "bias": (True, False, False, False, True),
    "affine-relu": (True, True, True, True, True),
    "relu-no-pre": (True, False, False, True, False),
    "scale-relu": (False, True, False, True, False),
    "shift": (False, False, True, False, True),
}


def conv_forward(emu, cv, gen, bias=True, scale=False, shift=False, relu=False, save=True):
    c = torch.randn(cv.N, cv.C, cv.H, cv.W, dtype=F64, generator=gen)
    r = torch.rand(cv.R, cv.C, cv.H, cv.W, dtype=F64, generator=gen)
    w = torch.randn(cv.O, cv.C, cv.KH, cv.KW, dtype=F64, generator=gen)
    b, sc, sh = (torch.randn(cv.O, dtype=F64, generator=gen) if on else None for on in (bias, scale, shift))
    P, Q = cv.out_size
    oc, orr = nan(cv.N, cv.O, P, Q), nan(cv.R, cv.O, P, Q)
    pc, pr = (nan(cv.N, cv.O, P, Q), nan(cv.R, cv.O, P, Q)) if save else (None, None)
    emu("cure_emu_conv_forward", cv.geometry(), cv.R, c, r, w, b, sc, sh, int(relu), oc, orr, pc, pr,
        reads=[c, r, w, b, sc, sh], writes=[oc, orr, pc, pr])
    a1, a2 = F.conv2d(c, w, None, *cv.args()), F.conv2d(r, w.abs(), None, *cv.args())
    if save:
        close(pc, a1, "pre_c")
        close(pr, a2, "pre_r")
    sh4 = (1, -1, 1, 1)
    zc, zr = a1 + (b.view(sh4) if bias else 0), a2
    if scale:
        zc, zr = zc * sc.view(sh4), zr * sc.abs().view(sh4)
    if shift:
        zc = zc + sh.view(sh4)
    if relu:
        points = cv.N - cv.R
        lo, up = (zc[points:] - zr).relu(), (zc[points:] + zr).relu()
        zc, zr = torch.cat([zc[:points].relu(), (up + lo) / 2]), (up - lo) / 2
    close(oc, zc, "out_c")
    close(orr, zr, "out_r")


def conv_grad_input(emu, cv, gen):
    P, Q = cv.out_size
    w = torch.randn(cv.O, cv.C, cv.KH, cv.KW, dtype=F64, generator=gen)
    gc = torch.randn(cv.N, cv.O, P, Q, dtype=F64, generator=gen)
    gr = torch.randn(cv.R, cv.O, P, Q, dtype=F64, generator=gen)
    dc, dr = nan(cv.N, cv.C, cv.H, cv.W), nan(cv.R, cv.C, cv.H, cv.W)
    emu("cure_emu_conv_grad_input", cv.geometry(), cv.R, gc, gr, w, dc, dr, reads=[gc, gr, w], writes=[dc, dr])
    close(dc, torch.nn.grad.conv2d_input(tuple(dc.shape), w, gc, *cv.args()), "d_c")
    close(dr, torch.nn.grad.conv2d_input(tuple(dr.shape), w.abs(), gr, *cv.args()), "d_r")


def conv_grad_weight(emu, cv, gen, sm_count):
    """The weight gradient with the split-K of `sm_count` SMs; returns the number of splits."""
    P, Q = cv.out_size
    c = torch.randn(cv.N, cv.C, cv.H, cv.W, dtype=F64, generator=gen)
    r = torch.rand(cv.R, cv.C, cv.H, cv.W, dtype=F64, generator=gen)
    w = torch.randn(cv.O, cv.C, cv.KH, cv.KW, dtype=F64, generator=gen)
    gc = torch.randn(cv.N, cv.O, P, Q, dtype=F64, generator=gen)
    gr = torch.randn(cv.R, cv.O, P, Q, dtype=F64, generator=gen)
    splits = emu.splits(cv.geometry(), sm_count)
    dw = nan(*w.shape)
    ws = nan(splits * w.numel()) if splits > 1 else None
    emu("cure_emu_conv_grad_weight", cv.geometry(), cv.R, gc, gr, c, r, w, dw, ws, sm_count,
        reads=[gc, gr, c, r, w], writes=[dw, ws])
    if cv.N * P * Q:
        assert emu.counters()["grid_z"] == splits
    ref = torch.nn.grad.conv2d_weight(c, w.shape, gc, *cv.args())
    if cv.R:
        ref = ref + w.sign() * torch.nn.grad.conv2d_weight(r, w.shape, gr, *cv.args())
    close(dw, ref, f"d_w ({splits} splits)")
    return splits


def l2_forward(emu, cv, gen, shared, eps, bias=True):
    """shared: one squared scale image for all samples (else one per radius sample, R == N)."""
    x = torch.randn(cv.N, cv.C, cv.H, cv.W, dtype=F64, generator=gen)
    w = torch.randn(cv.O, cv.C, cv.KH, cv.KW, dtype=F64, generator=gen)
    b = torch.randn(cv.O, dtype=F64, generator=gen) if bias else None
    s2 = torch.rand(1 if shared else cv.R, cv.C, cv.H, cv.W, dtype=F64, generator=gen) + 0.1
    e = torch.rand(cv.R, dtype=F64, generator=gen) + 0.1 if eps else None
    P, Q = cv.out_size
    centre, radius = nan(cv.N, cv.O, P, Q), nan(cv.R, cv.O, P, Q)
    emu("cure_emu_l2_forward", cv.geometry(), cv.R, x, s2, int(shared), w, b, e, centre, radius,
        reads=[x, s2, w, b, e], writes=[centre, radius])
    close(centre, F.conv2d(x, w, b, *cv.args()), "centre")
    want = F.conv2d(s2, w.square(), None, *cv.args()).sqrt().expand(cv.R, -1, -1, -1)
    close(radius, want * (e.view(-1, 1, 1, 1) if eps else 1), "radius")


@pytest.fixture(params=list(SCHEDULES))
def schedule(request, emu):
    emu.schedule(request.param)
    return request.param


@pytest.mark.parametrize("name", list(FIXED_CONV))
def test_conv_forward_every_epilogue(emu, schedule, name):
    cv = FIXED_CONV[name]
    gen = torch.Generator().manual_seed(1)
    for epi, (bias, scale, shift, relu, save) in EPILOGUES.items():
        try:
            conv_forward(emu, cv, gen, bias, scale, shift, relu, save)
        except AssertionError as e:
            raise AssertionError(f"epilogue {epi}: {e}") from None


@pytest.mark.parametrize("name", list(FIXED_CONV))
def test_conv_grad_input(emu, schedule, name):
    conv_grad_input(emu, FIXED_CONV[name], torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(FIXED_CONV))
def test_conv_grad_weight(emu, schedule, name):
    gen = torch.Generator().manual_seed(3)
    splits = {sms: conv_grad_weight(emu, FIXED_CONV[name], gen, sms) for sms in (1, 4, 132)}
    if name == "split-k":  # several splits, the last one short, the radius samples starting inside a split
        assert splits[132] > splits[4] > 2, splits


@pytest.mark.parametrize("name", [n for n in FIXED_CONV if n != "split-k"])
def test_l2_forward(emu, schedule, name):
    cv = FIXED_CONV[name]
    gen = torch.Generator().manual_seed(4)
    for shared, eps, rows in [(True, False, cv.N), (True, True, cv.N), (True, True, min(cv.N, 1)), (True, False, 0),
                              (False, False, cv.N), (False, True, cv.N)]:
        l2_forward(emu, cv._replace(R=rows), gen, shared, eps, bias=not eps)


def _random_conv(rng):
    KH, KW = rng.randint(1, 5), rng.randint(1, 5)
    dil = (rng.randint(1, 2), rng.randint(1, 2))
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    pad = (rng.randint(0, 3), rng.randint(0, 3))
    H = rng.randint(max(1, dil[0] * (KH - 1) + 1 - 2 * pad[0]), 14)
    W = rng.randint(max(1, dil[1] * (KW - 1) + 1 - 2 * pad[1]), 14)
    N = rng.randint(1, 6)
    return Conv(N, rng.randint(0, N), rng.randint(1, 7), H, W, rng.randint(1, 70), KH, KW, stride, pad, dil)


RANDOM_CONV = [_random_conv(random.Random(seed)) for seed in range(60)]


@pytest.mark.parametrize("index", range(len(RANDOM_CONV)))
def test_random_conv(emu, schedule, index):
    """Forward (random epilogue), both gradients and the l2 forward of a random geometry."""
    cv, rng = RANDOM_CONV[index], random.Random(1000 + index)
    gen = torch.Generator().manual_seed(index)
    conv_forward(emu, cv, gen, *(rng.random() < 0.5 for _ in range(5)))
    conv_grad_input(emu, cv, gen)
    conv_grad_weight(emu, cv, gen, rng.choice([1, 4, 132]))
    shared = rng.random() < 0.5
    l2_forward(emu, cv._replace(R=rng.randint(0, cv.N) if shared else cv.N), gen, shared, rng.random() < 0.5)


def test_grad_input_multiplies_no_inserted_zeros(emu, schedule):
    """The input gradient of a strided convolution reduces each stride phase over the taps that reach
    it only: stride 2, 3x3 kernel, padding 1 -> phases with 1, 2, 2 and 4 taps (9 taps per 4 pixels,
    not 9 per pixel), one launch per phase."""
    cv = Conv(2, 2, 3, 16, 16, 64, 3, 3, (2, 2), (1, 1))
    conv_grad_input(emu, cv, torch.Generator().manual_seed(6))
    c = emu.counters()
    k_step = 16 if schedule == "fma" else 32
    phase_blocks = 2 * 8 * 8 // 64  # 128 rows per phase, 64 per block, one block of 3 input channels
    assert c["launches"] == 4
    assert c["ksteps"] == phase_blocks * cv.O * (1 + 2 + 2 + 4) // k_step


def test_empty_problems_are_not_split(emu):
    """An empty output (no rows, no columns) or reduction is one split, not a division by zero."""
    for sm_count in (1, 132):
        for shape in [(0, 3, 5000), (3, 0, 5000), (0, 0, 0), (3, 4, 0)]:
            assert emu.lib.cure_emu_linear_splits(*shape, sm_count) == 1, (shape, sm_count)
        assert emu.splits(Conv(2, 1, 3, 40, 40, 0, 3, 3, (1, 1), (1, 1)).geometry(), sm_count) == 1


def test_grad_input_launches_no_phase_past_the_image(emu, schedule):
    """Stride phases at or past the image's edge have no pixels and get no launch: a 2 x 3 image
    with stride (5, 4) has 2 x 3 phases, not 5 x 4 (one with the tap, five storing zeros)."""
    conv_grad_input(emu, FIXED_CONV["stride-past-image"], torch.Generator().manual_seed(7))
    assert emu.counters()["launches"] == 2 * 3


def test_second_product_only_where_radius_rows_are(emu, schedule):
    """The radius tiles are loaded only for the k-steps / row blocks that have radius terms."""
    gen = torch.Generator().manual_seed(5)
    cv = Conv(4, 0, 3, 16, 16, 8, 3, 3, (1, 1), (1, 1))  # 1024 rows: 16 row blocks, R/N of them with radii
    conv_forward(emu, cv, gen)
    assert emu.counters()["ksteps2"] == 0
    conv_forward(emu, cv._replace(R=4), gen)
    c = emu.counters()
    assert c["ksteps2"] == c["ksteps"] > 0
    conv_forward(emu, cv._replace(R=1), gen)
    c = emu.counters()
    assert c["ksteps2"] * 4 == c["ksteps"]


# ---------------------------------------------------------------------------------------------
# The linear problem (interval_gemm_cuda, called like the bindings do)

LINEAR = {  # n rows, m radius rows, k features, o outputs
    "1x1": (1, 0, 1, 1),
    "small": (5, 3, 7, 4),
    "odd-tiles": (67, 67, 129, 65),
    "radius-rows-inside-a-block": (130, 40, 33, 70),
    "exact-tiles": (64, 64, 64, 64),
    "long-k-no-radius": (3, 0, 300, 9),
    "radius-k-inside-a-step": (45, 7, 20, 3),  # the weight gradient's radius terms start at k = 38
    "split-k-forward": (5, 3, 2100, 7),  # 4 reduction splits of the forward with 132 SMs
    "split-k-weight-grad": (1100, 300, 9, 6),  # 2 splits of the weight gradient, radius rows from k = 800
    "empty-batch": (0, 0, 5, 3),
    "no-outputs": (3, 1, 5, 0),
    "no-features": (3, 1, 0, 4),
}
SPLIT_K = {"split-k-forward": ((5, 7, 2100), 4), "split-k-weight-grad": ((6, 9, 1100), 2)}  # (M, N, K), splits


def _random_linear(rng):
    n = rng.randint(1, 150)
    return n, rng.randint(0, n), rng.randint(1, 200), rng.randint(1, 140)


LINEAR.update({f"random-{seed}": _random_linear(random.Random(seed)) for seed in range(20)})


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear(emu, schedule, name):
    n, m, k, o = LINEAR[name]
    emu.lib.cure_emu_set_sm_count(132)
    if name in SPLIT_K:
        shape, splits = SPLIT_K[name]
        assert emu.lib.cure_emu_linear_splits(*shape, 132) == splits
    gen = torch.Generator().manual_seed(6)
    c, r, w = (torch.randn(n, k, dtype=F64, generator=gen), torch.rand(m, k, dtype=F64, generator=gen),
               torch.randn(o, k, dtype=F64, generator=gen))
    points = n - m
    for epi, (bias, scale, shift, relu, save) in EPILOGUES.items():
        b, s, t = (torch.randn(o, dtype=F64, generator=gen) if on else None for on in (bias, scale, shift))
        oc, orr = nan(n, o), nan(m, o)
        pc, pr = (nan(n, o), nan(m, o)) if save else (None, None)
        emu("cure_emu_linear_forward", n, m, k, o, c, r, w, b, s, t, int(relu), oc, orr, pc, pr,
            reads=[c, r, w, b, s, t], writes=[oc, orr, pc, pr])
        a1, a2 = c @ w.t(), r @ w.abs().t()
        if save:
            close(pc, a1, f"{epi}: pre_c")
            close(pr, a2, f"{epi}: pre_r")
        zc, zr = a1 + (b if bias else 0), a2
        if scale:
            zc, zr = zc * s, zr * s.abs()
        if shift:
            zc = zc + t
        if relu:
            lo, up = (zc[points:] - zr).relu(), (zc[points:] + zr).relu()
            zc, zr = torch.cat([zc[:points].relu(), (up + lo) / 2]), (up - lo) / 2
        close(oc, zc, f"{epi}: out_c")
        close(orr, zr, f"{epi}: out_r")

    gc, gr = torch.randn(n, o, dtype=F64, generator=gen), torch.randn(m, o, dtype=F64, generator=gen)
    dc, dr = nan(n, k), nan(m, k)
    emu("cure_emu_linear_grad_input", n, m, o, k, gc, gr, w, dc, dr, reads=[gc, gr, w], writes=[dc, dr])
    close(dc, gc @ w, "d_c")
    close(dr, gr @ w.abs(), "d_r")

    dw = nan(o, k)
    emu("cure_emu_linear_grad_weight", n, m, k, o, gc, gr, c, r, w, dw, reads=[gc, gr, c, r, w], writes=[dw])
    close(dw, gc.t() @ c + w.sign() * (gr.t() @ r), "d_w")


# ---------------------------------------------------------------------------------------------
# The checks of the emulation itself

def test_out_of_bounds_load_is_reported(emu):
    cv = FIXED_CONV["3x3"]
    P, Q = cv.out_size
    c, r = torch.randn(cv.N, cv.C, cv.H, cv.W, dtype=F64), torch.rand(cv.R, cv.C, cv.H, cv.W, dtype=F64)
    w = torch.randn(cv.O, cv.C, cv.KH, cv.KW, dtype=F64)
    oc, orr = nan(cv.N, cv.O, P, Q), nan(cv.R, cv.O, P, Q)
    with pytest.raises(AssertionError, match="load of 8 bytes .* outside every buffer"):
        emu("cure_emu_conv_forward", cv.geometry(), cv.R, c, r, w, None, None, None, 0, oc, orr, None, None,
            reads=[c, r, w[:-1]], writes=[oc, orr])
    with pytest.raises(AssertionError, match="store into a read-only buffer"):
        emu("cure_emu_conv_forward", cv.geometry(), cv.R, c, r, w, None, None, None, 0, oc, orr, None, None,
            reads=[c, r, w, oc], writes=[orr])
