"""The CUDA extension compiled with every entry point the cuda backend uses (runs without a GPU)."""
import os
import shutil

import pytest
import torch


def _toolchain() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    return bool(nvcc and os.path.isfile(nvcc)) or any(
        os.path.isfile(f"{p}/bin/nvcc") for p in ["/usr/local/cuda"] + sorted(__import__("glob").glob("/usr/local/cuda-*")))


pytestmark = pytest.mark.skipif(
    os.environ.get("CURE_FAST_BUILD_CUDA") == "0" or torch.version.cuda is None or not _toolchain(),
    reason="no CUDA toolchain / CUDA build of torch (or CURE_FAST_BUILD_CUDA=0)")


def test_every_entry_point_is_exported():
    from cure_fast import _cuda

    ext = _cuda.extension()
    for name in _cuda.ENTRY_POINTS:
        assert callable(getattr(ext, name)), name


def test_ops_are_registered_with_torch_library():
    from cure_fast import _cuda  # noqa: F401

    for name in ("interval_relu_cuda", "interval_linear_cuda", "interval_linear_cuda_grad_input",
                 "interval_linear_cuda_grad_weight", "channel_epilogue_cuda", "channel_epilogue_cuda_backward",
                 "margins_linear_cuda", "l2_row_norms_cuda", "channel_moments_cuda"):
        assert hasattr(torch.ops.cure_fast, name), name


def test_cuda_backend_registers_every_functional_op():
    from cure_fast import _cuda, functional

    for op in _cuda.register_ops():
        assert functional._IMPLS[op]["cuda"] is _cuda._IMPLEMENTATIONS[op]


def test_fake_implementations_trace_on_meta():
    """The fake (meta) implementations give the output shapes without a GPU."""
    from cure_fast import _cuda  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        c, r, w = torch.empty(5, 7), torch.empty(3, 7), torch.empty(4, 7)
        outs = torch.ops.cure_fast.interval_linear_cuda(c, r, w, None, None, None, True, "ieee", True)
        assert [tuple(t.shape) for t in outs] == [(5, 4), (3, 4), (5, 4), (3, 4)]
        m = torch.ops.cure_fast.margins_linear_cuda(c, r, w, None, torch.empty(5, dtype=torch.long), None, False)
        assert tuple(m.shape) == (5, 4)
        xc, xr = torch.empty(5, 4, 3, 3), torch.empty(2, 4, 3, 3)
        g = torch.ops.cure_fast.channel_epilogue_cuda_backward(xc, xr, None, None, None, True, xc, xr)
        assert [tuple(t.shape) for t in g] == [(5, 4, 3, 3), (2, 4, 3, 3), (2, 4)]
