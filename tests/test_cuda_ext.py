"""The CUDA interval ReLU against the pure-PyTorch reference (GPU only)."""
import pytest
import torch

from cure_fast import cuda
from cure_fast.ops import interval_relu_ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [((7, 13), 0), ((7, 13), 3), ((7, 13), 7), ((3, 5, 9, 11), 0), ((3, 5, 9, 11), 2), ((3, 5, 9, 11), 3),
          ((1, 1), 1), ((4, 0, 3), 2)]


def _interval(shape, m, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = torch.randn(shape, generator=g, device="cuda", dtype=torch.float64).to(dtype)
    r = torch.rand((m,) + shape[1:], generator=g, device="cuda", dtype=torch.float64).to(dtype)
    return c, r


def _poison(*like):
    """Free NaN blocks of these sizes into the caching allocator: outputs allocated next start as NaN."""
    poison = [torch.full_like(t, float("nan")) for t in like]
    del poison


def _grads(fn, c, r, grad_c_out, grad_r_out):
    c, r = c.detach().requires_grad_(), r.detach().requires_grad_()
    outs = fn(c, r)
    return outs, torch.autograd.grad(outs, (c, r), (grad_c_out, grad_r_out))


def _assert_close_to_fp64(out, out_torch, ref64):
    """Error against fp64 at most 2x that of plain PyTorch in the same dtype, plus one ulp."""
    assert out.dtype == out_torch.dtype and out.shape == ref64.shape
    assert not out.isnan().any()
    if out.numel() == 0:
        return
    err = (out.double() - ref64).abs().max().item()
    err_torch = (out_torch.double() - ref64).abs().max().item()
    assert err <= 2 * err_torch + torch.finfo(out.dtype).eps * ref64.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,m", SHAPES, ids=str)
def test_forward_backward(shape, m, dtype):
    c, r = _interval(shape, m, dtype)
    grad_c_out, grad_r_out = _interval(shape, m, dtype, seed=1)
    grad_r_out = grad_r_out - 0.5
    _poison(c, r, c, r)
    outs, grads = _grads(cuda.interval_relu, c, r, grad_c_out, grad_r_out)
    outs_torch, grads_torch = _grads(interval_relu_ref, c, r, grad_c_out, grad_r_out)
    outs64, grads64 = _grads(interval_relu_ref, *(t.double() for t in (c, r, grad_c_out, grad_r_out)))
    for out, out_torch, ref64 in zip(outs + grads, outs_torch + grads_torch, outs64 + grads64):
        _assert_close_to_fp64(out, out_torch, ref64)


def test_grid_stride_loop():
    """More elements than one grid covers (8192 blocks x 256 threads)."""
    c, r = _interval((5, 700_001), 2, torch.float32)
    _poison(c, r)
    c_out, r_out = cuda.interval_relu(c, r)
    c_ref, r_ref = interval_relu_ref(c, r)
    torch.testing.assert_close(c_out, c_ref)
    torch.testing.assert_close(r_out, r_ref)


def test_noncontiguous_inputs():
    c, r = _interval((6, 8, 5), 4, torch.float32)
    c, r = c.transpose(1, 2), r.transpose(1, 2)
    for out, ref in zip(cuda.interval_relu(c, r), interval_relu_ref(c, r)):
        torch.testing.assert_close(out, ref)


def test_input_checks():
    c, r = _interval((4, 3), 2, torch.float32)
    with pytest.raises(RuntimeError, match="at most as many rows"):
        cuda.load().interval_relu_forward(c[:1].contiguous(), r)
    with pytest.raises(RuntimeError, match="trailing shapes"):
        cuda.load().interval_relu_forward(c, r[:, :2].contiguous())
    with pytest.raises(RuntimeError, match="dtype"):
        cuda.load().interval_relu_forward(c, r.double())
    with pytest.raises(RuntimeError, match="'CPU' backend"):  # the operators have CUDA kernels only
        cuda.load().interval_relu_forward(c.cpu(), r.cpu())
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        cuda.load().interval_relu_forward(c.cpu(), r)
    with pytest.raises(RuntimeError, match="contiguous"):
        cuda.load().interval_relu_forward(c.t(), r.t())


@pytest.mark.parametrize("m", [0, 2, 4])
def test_opcheck(m):
    c, r = _interval((4, 3, 5), m, torch.float32)
    grad_c_out, grad_r_out = _interval((4, 3, 5), m, torch.float32, seed=1)
    torch.library.opcheck(torch.ops.cure_fast.interval_relu_cuda_backward.default, (c, r, grad_c_out, grad_r_out))
    torch.library.opcheck(torch.ops.cure_fast.interval_relu_cuda.default, (c.requires_grad_(), r.requires_grad_()))


def _model(relu):
    def fn(c, r):
        c_out, r_out = relu(2 * c, r)
        return c_out + 1, r_out
    return fn


def test_torch_compile_fullgraph():
    c, r = _interval((6, 3, 7), 4, torch.float32)
    grad_c_out, grad_r_out = _interval((6, 3, 7), 4, torch.float32, seed=1)
    outs, grads = _grads(torch.compile(_model(cuda.interval_relu), fullgraph=True), c, r, grad_c_out, grad_r_out)
    ref_outs, ref_grads = _grads(_model(interval_relu_ref), c, r, grad_c_out, grad_r_out)
    for out, ref in zip(outs + grads, ref_outs + ref_grads):
        torch.testing.assert_close(out, ref)
