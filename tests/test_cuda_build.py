"""The CUDA extension compiled with every entry point the cuda backend uses (runs without a GPU)."""
import os

import pytest
import torch

from cure_fast._toolkit import cuda_home

pytestmark = pytest.mark.skipif(
    os.environ.get("CURE_FAST_BUILD_CUDA") == "0" or torch.version.cuda is None or cuda_home() is None,
    reason="no CUDA toolchain / CUDA build of torch (or CURE_FAST_BUILD_CUDA=0)")


def test_every_entry_point_is_exported():
    """Every entry point the cuda backend calls (read from its sources) is in the built extension."""
    import cuda_emulator
    from cure_fast import cuda

    ext = cuda.load()
    used = cuda_emulator.entry_points()
    assert "interval_linear_forward" in used
    missing = [name for name in used if not callable(getattr(ext.module, name, None))]
    assert not missing, f"cure_fast._C lacks {missing}"


def test_every_operator_has_a_cuda_kernel_and_a_caller():
    """The schemas of csrc/ops/library.cpp, the CUDA kernels the op family files register for them
    and the entry points the cuda backend calls name the same operators."""
    import cuda_emulator
    from cure_fast import cuda

    cuda.load()
    defined = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
               if name.startswith("cure_fast_C::")}
    assert defined == set(cuda_emulator.entry_points())
    hooks = {"set_poison"}  # no tensor arguments: one kernel for every device
    assert not [name for name in defined - hooks
                if not torch._C._dispatch_has_kernel_for_dispatch_key(f"cure_fast_C::{name}", "CUDA")]
    torch.ops.cure_fast_C.set_poison(False)


def test_ops_are_registered_with_torch_library():
    import cure_fast.cuda  # noqa: F401

    for name in ("interval_relu_cuda", "interval_linear_cuda", "interval_linear_cuda_grad_input",
                 "interval_linear_cuda_grad_weight", "interval_conv2d_cuda", "interval_conv2d_cuda_grad_input",
                 "interval_conv2d_cuda_grad_weight", "l2_conv2d_cuda", "channel_epilogue_cuda",
                 "channel_epilogue_cuda_backward", "margins_linear_cuda", "l2_row_norms_cuda", "channel_moments_cuda"):
        assert hasattr(torch.ops.cure_fast, name), name


def test_cuda_backend_registers_every_functional_op():
    from cure_fast import cuda, ops
    from cure_fast.ops import registry

    for op in ops.OPS:
        assert registry.implementation(op, "cuda") is getattr(cuda, op), op


def test_fake_implementations_trace_on_meta():
    """The fake (meta) implementations give the output shapes without a GPU."""
    import cure_fast.cuda  # noqa: F401
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


def test_conv_fake_implementations_trace_on_meta():
    """Output shapes of the implicit-GEMM conv ops (stride, padding, dilation per dimension)."""
    import cure_fast.cuda  # noqa: F401
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.cure_fast
    geom = ([2, 1], [1, 0], [1, 2])  # stride, padding, dilation
    with FakeTensorMode():
        c, r, w = torch.empty(5, 3, 9, 8), torch.empty(2, 3, 9, 8), torch.empty(4, 3, 3, 2)
        outs = ops.interval_conv2d_cuda(c, r, w, None, None, None, True, *geom, "ieee", True)
        assert [tuple(t.shape) for t in outs] == [(5, 4, 5, 6), (2, 4, 5, 6), (5, 4, 5, 6), (2, 4, 5, 6)]
        outs = ops.interval_conv2d_cuda(c, r, w, None, None, None, False, *geom, "ieee", False)
        assert [tuple(t.shape) for t in outs[2:]] == [(0,), (0,)]
        g_c, g_r = torch.empty(5, 4, 5, 6), torch.empty(2, 4, 5, 6)
        d_c, d_r = ops.interval_conv2d_cuda_grad_input(g_c, g_r, w, [9, 8], *geom, "ieee")
        assert (tuple(d_c.shape), tuple(d_r.shape)) == ((5, 3, 9, 8), (2, 3, 9, 8))
        assert tuple(ops.interval_conv2d_cuda_grad_weight(g_c, g_r, c, r, w, *geom, "ieee").shape) == (4, 3, 3, 2)
        centre, radius = ops.l2_conv2d_cuda(c, c[:1], w, None, None, *geom, "ieee")
        assert (tuple(centre.shape), tuple(radius.shape)) == ((5, 4, 5, 6), (1, 4, 5, 6))
        radius = ops.l2_conv2d_cuda(c, c[:1], w, None, torch.empty(5), *geom, "ieee")[1]
        assert tuple(radius.shape) == (5, 4, 5, 6)


def test_implicit_gemm_geometry():
    """Which convolutions the implicit GEMM takes, and their numeric padding (no GPU needed)."""
    from cure_fast.cuda.conv import implicit_geometry

    x, w = torch.empty(2, 3, 9, 8), torch.empty(4, 3, 3, 3)
    assert implicit_geometry(x, w, 1, 1, 1, 1) == ([1, 1], [1, 1], [1, 1])
    assert implicit_geometry(x, w, (2, 1), "valid", (1, 2), 1) == ([2, 1], [0, 0], [1, 2])
    assert implicit_geometry(x, w, 1, "same", 2, 1) == ([1, 1], [2, 2], [2, 2])
    assert implicit_geometry(x, torch.empty(4, 3, 2, 2), 1, "same", 1, 1) is None  # odd span: asymmetric
    assert implicit_geometry(x, torch.empty(4, 1, 3, 3), 1, 1, 1, 3) is None  # groups
    assert implicit_geometry(x, torch.empty(4, 3, 11, 3), 1, 0, 1, 1) is None  # does not fit
