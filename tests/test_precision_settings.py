"""Certificates whatever torch's fp32 precision settings: ``library_precision`` sets torch's libraries to
IEEE fp32 (or TF32 on CUDA) from any state the process put them in, through the legacy flags or the
per-library ``fp32_precision`` of torch 2.9+, without tripping torch's check against mixing the two,
and restores that state after."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cure_fast import BoundedModule, LinfBall, models
from cure_fast.ops import policy

per_library = pytest.mark.skipif(not policy._PER_BACKEND, reason="torch before 2.9 has no per-library settings")

STATES = {  # what a user may have run before calling us
    "default": [],
    "legacy matmul tf32": [lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True)],
    "legacy medium": [lambda: torch.set_float32_matmul_precision("medium")],
    "cuBLAS tf32": [lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32")],
    "global tf32": [lambda: setattr(torch.backends, "fp32_precision", "tf32")],
    "oneDNN conv bf16": [lambda: setattr(torch.backends.mkldnn.conv, "fp32_precision", "bf16")],
    "oneDNN matmul bf16": [lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")],
    "legacy high, cuBLAS ieee": [lambda: torch.set_float32_matmul_precision("high"),
                                 lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")],
}


def settings() -> tuple:
    """torch's fp32 settings as a user leaves them: the global one, each library's and each op's ("none"
    where one follows the level above: torch's getters return the resolved value)."""
    get = torch._C._get_fp32_precision_getter
    generic = get("generic", "all")
    libraries = {library: "none" if get(library, "all") == generic else get(library, "all")
                 for library in ("cuda", "mkldnn")}
    return generic, libraries, policy._op_settings()


@pytest.fixture
def restored():
    """Puts torch's settings back as they were (the tests leave mixed states behind otherwise)."""
    (generic, libraries, ops), legacy = settings(), torch.get_float32_matmul_precision()
    cudnn, enabled = torch._C._get_cudnn_allow_tf32(), torch.backends.cudnn.enabled
    yield
    torch._C._set_fp32_precision_setter("generic", "all", generic)
    for library, value in libraries.items():
        torch._C._set_fp32_precision_setter(library, "all", value)
    torch.set_float32_matmul_precision(legacy)
    torch._C._set_cudnn_allow_tf32(cudnn)
    for key, value in ops.items():
        torch._C._set_fp32_precision_setter(*key, value)
    torch.backends.cudnn.enabled = enabled


def cublas_tf32() -> bool:
    """torch's legacy cuBLAS flag: it raises where the legacy and the per-library settings disagree,
    as every cuBLAS matmul would."""
    return torch.backends.cuda.matmul.allow_tf32


def readable(getter):
    try:
        return getter()
    except RuntimeError:
        return None


@per_library
@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("tf32", [False, True])
def test_settings_inside_the_block_and_restored_after(state, tf32, restored):
    for apply in STATES[state]:
        apply()
    before, legacy, cublas = settings(), readable(torch.get_float32_matmul_precision), readable(cublas_tf32)
    devices = ("cuda",) if tf32 else ("cpu", "cuda")
    with policy.library_precision(tf32, devices):
        want = "tf32" if tf32 else "ieee"
        for device in devices:
            for op in ("matmul", "conv", "rnn"):
                assert policy._fp32_precision(policy._LIBRARY[device], op) == want, (device, op)
        assert cublas_tf32() is tf32 and torch.backends.cudnn.allow_tf32 is tf32  # torch's checks pass inside
        if legacy is not None or not tf32:  # (TF32 leaves the CPU's mix of the two as it was)
            assert torch.get_float32_matmul_precision() in (("high", "medium") if tf32 else ("highest",))
        if tf32:  # the CPU's settings are left alone
            assert {k: v for k, v in settings()[2].items() if k[0] == "mkldnn"} == \
                {k: v for k, v in before[2].items() if k[0] == "mkldnn"}
    assert settings() == before
    if legacy is not None:  # exactly as before, a mix that cuBLAS refuses included
        assert torch.get_float32_matmul_precision() == legacy and readable(cublas_tf32) == cublas
    else:  # torch's legacy value unreadable before: after, the one cuBLAS accepts
        assert cublas_tf32() == (policy._fp32_precision("cuda", "matmul") == "tf32")


@pytest.mark.parametrize("tf32", [False, True])
def test_torch_before_per_library_settings(tf32, monkeypatch, restored):
    monkeypatch.setattr(policy, "_PER_BACKEND", False)
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = not tf32
    with policy.library_precision(tf32, ("cpu", "cuda")):
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert tf32 or torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32 is not tf32


@per_library
@pytest.mark.parametrize("state", ["oneDNN conv bf16", "oneDNN matmul bf16", "global tf32", "cuBLAS tf32"])
def test_sound_bounds_ignore_the_process_precision_settings(state, restored, one_thread):
    """Sound fp32 CROWN and IEEE IBP give the same bounds whatever the user set: a oneDNN convolution
    in bfloat16 (on CPUs with bf16 units it is 1e-2 off) would make them optimistic."""
    torch.manual_seed(0)
    model = models.build("cnn3", "mnist").eval()
    bounded = BoundedModule(model, backend="torch", precision="ieee")
    x = torch.rand(2, 1, 28, 28)
    y = model(x).argmax(1)
    spec = LinfBall(0.01)

    def bounds():
        lower, upper = bounded.bounds(x, spec)
        return bounded.margins(x, y, spec, method="crown", sound="fp32"), lower, upper

    expected = bounds()
    for apply in STATES[state]:
        apply()
    for got, want in zip(bounds(), expected):
        assert torch.equal(got, want)
    assert torch.backends.cudnn.enabled


def test_sound_bounds_keep_subnormal_numbers_where_the_process_flushes_them(one_thread):
    """Products that underflow: the error bounds count at most the smallest subnormal number per
    rounding, not the smallest normal one that flushing to zero loses; the flushing is back after."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(2.0 ** -60)
            layer.bias.mul_(2.0 ** -125)
    bounded = BoundedModule(net)
    x, y, spec = torch.rand(3, 4) * 2.0 ** -60, torch.tensor([0, 1, 2]), LinfBall(2.0 ** -64, domain=None)

    def margins():
        return [bounded.margins(x, y, spec, method=method, sound=sound)
                for method in ("crown-ibp", "crown") for sound in ("fp32", "fp64")]

    expected = margins()
    assert not policy.flushes_subnormals() and torch.set_flush_denormal(True)
    try:
        got = margins()
        assert policy.flushes_subnormals()
    finally:
        torch.set_flush_denormal(False)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@per_library
@pytest.mark.parametrize("user, devices", [("tf32", ("cpu", "cuda")), ("bf16", ("cpu",))])
def test_an_op_setting_that_followed_its_library_follows_it_after_the_block(user, devices, restored):
    """torch reads back resolved values: written back as they read, the ops would stop following a later
    global setting (a oneDNN convolution left in bf16 for good)."""
    torch.backends.fp32_precision = user
    with policy.library_precision(False, devices):
        pass
    torch.backends.fp32_precision = "ieee"
    for library in ("cuda", "mkldnn"):
        for op in ("matmul", "conv", "rnn"):
            assert policy._fp32_precision(library, op) == "ieee", (library, op)


@per_library
def test_a_second_thread_waits_for_the_first_threads_block(restored):
    """Thread B enters its block while thread A is in one: without waiting, B would find IEEE already
    set, save nothing, and compute in the user's bf16 once A restored it."""
    import threading
    torch.manual_seed(0)
    x, w = torch.randn(4, 16, 12, 12), torch.randn(32, 16, 3, 3)
    exact = torch.nn.functional.conv2d(x.double(), w.double())
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    a_in, a_out, error = threading.Event(), threading.Event(), {}

    def first():
        with policy.library_precision(False, ("cpu",)):
            a_in.set()
            time.sleep(0.2)
        a_out.set()

    def second():
        a_in.wait()
        with policy.library_precision(False, ("cpu",)):
            a_out.wait(timeout=10)
            error["max"] = float((torch.nn.functional.conv2d(x, w).double() - exact).abs().max())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert error["max"] < 1e-3  # bf16: 0.1


def test_sound_bounds_and_ieee_ibp_ignore_autocast(restored, one_thread):
    torch.manual_seed(0)
    model = models.build("cnn3", "mnist").eval()
    bounded = BoundedModule(model, backend="torch", precision="ieee")
    x, spec = torch.rand(2, 1, 28, 28), LinfBall(0.01)
    y = model(x).argmax(1)

    def bounds():
        return (*bounded.bounds(x, spec), bounded.margins(x, y, spec, method="crown", sound="fp32"),
                bounded.margins(x, y, spec, method="crown-ibp", sound=True))

    expected = bounds()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bounds()
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and torch.equal(g, e)


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_sound_bounds_where_torchs_worker_threads_flush_subnormals():
    """set_flush_denormal(True) before torch's intra-op threads start: they copy the flag, which no call
    from this thread can clear; the certificate was +333.8 for a net whose margin is -1 everywhere
    (ReLU input at most -6.04e-35: 32768 subnormal products of -1.1e-38 against a bias of 3e-34)."""
    out = _run_python("""
        import numpy as np, torch
        torch.set_flush_denormal(True)  # the user's start-up setting
        torch.set_num_threads(2)
        (torch.ones(1 << 20) * 2).sum()  # starts the worker threads: they copy the flag
        torch.set_flush_denormal(False)  # for this thread only
        from torch import nn
        from cure_fast import BoundedModule, LinfBall
        n = 1 << 16
        weight = np.zeros((1, n), np.float32)
        weight[0, n // 2:] = np.float32(-1.1e-38)  # before flushing: it would make this 0
        net = nn.Sequential(nn.Linear(n, 1), nn.ReLU(), nn.Linear(1, 2)).eval()
        net[0].weight.data, net[0].bias.data = torch.from_numpy(weight), torch.tensor([3e-34])
        net[2].weight.data, net[2].bias.data = torch.tensor([[2.0 ** 120], [0.0]]), torch.tensor([-1.0, 0.0])
        x = torch.ones(1, n)
        torch.set_flush_denormal(True)
        for method in ("crown-ibp", "crown"):
            margin = BoundedModule(net).margins(x, torch.tensor([0]), LinfBall(2.0 ** -40, domain=None),
                                                method=method, sound="fp32")[0, 1]
            print(method, float(margin), torch.get_num_threads())
        """)
    for line in out.splitlines():
        method, margin, threads = line.split()
        assert float(margin) <= -1 and threads == "2", line


def test_sound_bounds_after_torch_freezes_its_global_flags():
    out = _run_python("""
        import torch
        from torch import nn
        from cure_fast import BoundedModule, LinfBall
        torch.backends.disable_global_flags()  # torch's tests do this: cudnn.enabled = ... raises
        net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
        print(BoundedModule(net).margins(torch.rand(2, 3), torch.tensor([0, 1]), LinfBall(0.1), method="crown").shape)
        """)
    assert "torch.Size([2, 2])" in out


def test_the_subnormal_probe_sees_a_device_that_flushes_and_sound_bounds_refuse_it(monkeypatch, one_thread):
    """On CUDA the sound modes check that torch's GEMMs and convolutions keep subnormal numbers (their
    error bound counts an underflow as the smallest subnormal); the probe itself, on the CPU: each op
    made to flush float64 inputs (DAZ) or results (FTZ) in turn, then the thread's own flag."""
    assert policy.keeps_subnormals(torch.device("cpu"))
    tiny = torch.finfo(torch.float64).tiny
    for k, (op, *shapes) in enumerate(policy._PROBE_OPS):
        for flush in (lambda v, w, op=op: op(torch.where(v.abs() < tiny, 0, v), w),
                      lambda v, w, op=op: (lambda r: torch.where(r.abs() < tiny, 0, r))(op(v, w))):
            probes = list(policy._PROBE_OPS)
            probes[k] = (lambda v, w, flush=flush, op=op: flush(v, w) if v.dtype == torch.float64 else op(v, w), *shapes)
            monkeypatch.setattr(policy, "_PROBE_OPS", tuple(probes))
            assert not policy.keeps_subnormals(torch.device("cpu")), f"probe {k} missed a flush"
    monkeypatch.undo()
    monkeypatch.setitem(policy._KEEPS_SUBNORMALS, "cuda:0", False)
    with pytest.raises(ValueError, match=r"sound bounds on cuda:0: .*flush subnormal numbers.*certify on the CPU"):
        with policy.strict(True, torch.device("cuda", 0)):
            pass
    with policy.strict(False, torch.device("cuda", 0)):  # not a sound mode: nothing to check
        pass
    if torch.set_flush_denormal(True):
        try:
            assert not policy.keeps_subnormals(torch.device("cpu"))
        finally:
            torch.set_flush_denormal(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gemms_and_convolutions_keep_subnormal_numbers():
    with policy.strict(True):
        assert policy.keeps_subnormals(torch.device("cuda")), "the sound modes refuse this GPU"
