"""Certificates whatever torch's fp32 precision settings: ``library_precision`` sets torch's libraries to
IEEE fp32 (or TF32 on CUDA) from any state the process put them in, through the legacy flags or the
per-library ``fp32_precision`` of torch 2.9+, without tripping torch's check against mixing the two,
and restores that state after."""
import pytest
import torch

from cure_fast import BoundedModule, LinfBall, models
from cure_fast.engine import rounding
from cure_fast.ops import policy

per_library = pytest.mark.skipif(not policy._PER_BACKEND, reason="torch before 2.9 has no per-library settings")
KEYS = [(library, op) for library in ("generic", "cuda", "mkldnn") for op in ("all", "matmul", "conv", "rnn")
        if (library == "generic") == (op == "all")]

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


def raw_settings() -> dict:
    return {key: torch._C._get_fp32_precision_getter(*key) for key in KEYS}


@pytest.fixture
def restored():
    """Puts torch's settings back as they were (the tests leave mixed states behind otherwise)."""
    saved, legacy = raw_settings(), torch.get_float32_matmul_precision()
    cudnn = torch.backends.cudnn.enabled
    yield
    torch.set_float32_matmul_precision(legacy)
    for key, value in saved.items():
        torch._C._set_fp32_precision_setter(*key, value)
    torch.backends.cudnn.enabled = cudnn


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
    before, legacy, cublas = raw_settings(), readable(torch.get_float32_matmul_precision), readable(cublas_tf32)
    devices = ("cuda",) if tf32 else ("cpu", "cuda")
    with policy.library_precision(tf32, devices):
        want = "tf32" if tf32 else "ieee"
        for device in devices:
            for op in ("matmul", "conv", "rnn"):
                assert policy._fp32_precision(policy._LIBRARY[device], op) == want, (device, op)
        assert cublas_tf32() is tf32  # cuBLAS's check of the two APIs passes inside
        if legacy is not None or not tf32:  # (TF32 leaves the CPU's mix of the two as it was)
            assert torch.get_float32_matmul_precision() in (("high", "medium") if tf32 else ("highest",))
        if tf32:  # the CPU's settings are left alone
            assert {k: v for k, v in raw_settings().items() if k[0] == "mkldnn"} == \
                {k: v for k, v in before.items() if k[0] == "mkldnn"}
    assert raw_settings() == before
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
    assert not rounding.flushes_subnormals() and torch.set_flush_denormal(True)
    try:
        got = margins()
        assert rounding.flushes_subnormals()
    finally:
        torch.set_flush_denormal(False)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
