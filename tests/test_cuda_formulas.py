"""The CUDA backend's backward formulas written in PyTorch, checked on the CPU against autograd
through the reference ops (the kernels themselves need a GPU: tests/test_cuda_ops.py)."""
import pytest
import torch

from cure_fast.cuda import margins_grad
from cure_fast.ops import l2_margins_linear_ref, margins_linear_ref

DT = torch.float64


def _rand(gen, *shape, low=-1.0, high=1.0):
    return torch.rand(shape, generator=gen, dtype=DT) * (high - low) + low


def _autograd(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, g, allow_unused=True)


@pytest.mark.parametrize("rows,radii,classes,features", [(6, 4, 5, 7), (5, 5, 3, 9), (4, 0, 4, 3), (7, 7, 10, 16)])
def test_interval_margins_grad(rows, radii, classes, features):
    gen = torch.Generator().manual_seed(rows * 100 + radii)
    c, r = _rand(gen, rows, features), _rand(gen, radii, features, low=0.0)
    w, b = _rand(gen, classes, features), _rand(gen, classes)
    w[1] = w[0]  # a zero difference row: sign 0, as autograd's |.| takes it
    labels = torch.randint(0, classes, (rows,), generator=gen)
    g = _rand(gen, rows, classes)
    want = _autograd(lambda c, r, w, b: margins_linear_ref(c, r, w, b, labels), [c, r, w, b], g)
    got = margins_grad(g, c, r, w, labels, None, False, (True, True, True, True))
    assert got[4] is None
    for k, (a, e) in enumerate(zip(got[:4], want)):
        torch.testing.assert_close(a, torch.zeros_like(a) if e is None else e, msg=f"gradient {k}")


@pytest.mark.parametrize("scale_rows", [1, "all"])
@pytest.mark.parametrize("classes", [3, 10])
def test_l2_margins_grad(scale_rows, classes):
    gen = torch.Generator().manual_seed(classes)
    rows, features = 6, 8
    x, w, b = _rand(gen, rows, features), _rand(gen, classes, features), _rand(gen, classes)
    s2 = _rand(gen, 1 if scale_rows == 1 else rows, features, low=0.2, high=2.0)
    eps = _rand(gen, rows, low=0.1, high=0.9)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    g = _rand(gen, rows, classes)

    def ref(x, s2, w, b, eps):
        return l2_margins_linear_ref(x, eps, w, b, labels, s2.sqrt())

    want = _autograd(ref, [x, s2, w, b, eps], g)
    got = margins_grad(g, x, s2, w, labels, eps, True, (True,) * 5)
    for k, (a, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, e, msg=f"gradient {k}")


def test_margins_grad_skips_what_is_not_needed():
    gen = torch.Generator().manual_seed(0)
    c, r, w = _rand(gen, 3, 4), _rand(gen, 2, 4, low=0.0), _rand(gen, 5, 4)
    labels, g = torch.tensor([0, 4, 2]), _rand(gen, 3, 5)
    assert margins_grad(g, c, r, w, labels, None, False, (False,) * 5) == (None,) * 5
    d_c, d_r, d_w, d_b, d_eps = margins_grad(g, c, r, w, labels, None, False, (False, True, False, False, True))
    assert d_r.shape == r.shape and d_c is d_w is d_b is d_eps is None
