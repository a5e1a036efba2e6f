"""The l1 ball: the exact first layer (attained by a vertex of the ball, padding-aware at the
border), the folded margins, and the exact projection the l1 attack uses."""
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from cure_fast import BoundedModule, L1Ball, LinfBall, ops
from cure_fast.specs import contains
from cure_fast.training import attacks

SEEDS = st.integers(0, 2**31 - 1)
DT = torch.float64


def _jacobian_rows(fn, x):
    """Rows d out_k / d x of a map of one sample x (C, H, W) -> out (K,): (K, C*H*W)."""
    return torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(), x.flatten())


@given(seed=SEEDS, kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 3),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), per_pixel=st.booleans())
def test_l1_conv_radius_is_the_dual_norm_of_each_output_row(seed, kernel, stride, padding, dilation, groups,
                                                            per_pixel):
    gen = torch.Generator().manual_seed(seed)
    size = max(dilation * (kernel - 1) + 1 - 2 * padding, 1) + 2
    x = torch.rand(1, 2, size, size, generator=gen, dtype=DT)
    weight = torch.randn(4, 2 // groups, kernel, kernel, generator=gen, dtype=DT)
    scale = torch.rand((1, 2, size, size) if per_pixel else (2, 1, 1), generator=gen, dtype=DT) + 0.1
    c, r = ops.l1_conv2d(x, 0.3, weight, None, stride, padding, dilation, groups, scale)
    rows = _jacobian_rows(lambda v: F.conv2d(v[None], weight, None, stride, padding, dilation, groups), x[0])
    axes = scale.expand_as(x).flatten()
    expected = 0.3 * (rows.abs() * axes).amax(1)  # only the inputs a neuron reads count: the border is exact
    torch.testing.assert_close(r.flatten(), expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c, F.conv2d(x, weight, None, stride, padding, dilation, groups))


@given(seed=SEEDS)
def test_l1_linear_bound_is_attained_by_a_vertex(seed):
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.rand(3, 6, generator=gen, dtype=DT), torch.randn(5, 6, generator=gen, dtype=DT)
    bias = torch.randn(5, generator=gen, dtype=DT)
    eps = torch.rand(3, generator=gen, dtype=DT)
    c, r = ops.l1_linear(x, eps, weight, bias)
    for k in range(5):
        j = weight[k].abs().argmax()
        vertex = x.clone()
        vertex[:, j] += eps * weight[k, j].sign()
        torch.testing.assert_close(F.linear(vertex, weight, bias)[:, k], (c + r)[:, k])


@given(seed=SEEDS)
def test_l1_margins_are_exact_and_attained(seed):
    gen = torch.Generator().manual_seed(seed)
    x, weight = torch.rand(4, 5, generator=gen, dtype=DT), torch.randn(3, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (4,), generator=gen)
    scale = torch.rand(5, generator=gen, dtype=DT) + 0.5
    margins = ops.l1_margins_linear(x, 0.2, weight, None, y, scale)
    for j in range(3):
        diff = weight[y] - weight[j]  # (B, in)
        i = (diff.abs() * scale).argmax(1)
        vertex = x.clone()
        vertex[torch.arange(4), i] -= 0.2 * scale[i] * diff[torch.arange(4), i].sign()
        logits = F.linear(vertex, weight)
        torch.testing.assert_close(logits.gather(1, y[:, None])[:, 0] - logits[:, j], margins[:, j])


def test_bounded_module_l1_first_layer_is_tighter_than_its_box_and_sound():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(27, 4)).double()
    x = torch.rand(2, 1, 3, 3, dtype=DT) * 0.8 + 0.1
    bm = BoundedModule(model)
    exact, box = (bm.propagate(x, [spec]).layer_bounds(0)[0] for spec in (L1Ball(0.1), L1Ball(0.1, domain=None)))
    linf = bm.propagate(x, [LinfBall(0.1)]).layer_bounds(0)[0]  # the l∞ ball of the same eps contains the l1 ball
    assert (exact[1] - exact[0] <= linf[1] - linf[0] + 1e-12).all()
    assert ((exact[1] - exact[0]) < (linf[1] - linf[0]) - 1e-6).any()
    for _ in range(200):
        point = attacks.random_point(L1Ball(0.1), x)
        out = model[0](point)
        assert (out >= exact[0] - 1e-12).all() and (out <= exact[1] + 1e-12).all()
        assert (out >= box[0] - 1e-12).all() and (out <= box[1] + 1e-12).all()


@given(seed=SEEDS, eps=st.floats(0.0, 3.0), domain=st.booleans())
def test_l1_projection_is_feasible_idempotent_and_nearest(seed, eps, domain):
    gen = torch.Generator().manual_seed(seed)
    spec = L1Ball(eps, domain=(0.0, 1.0) if domain else None)
    x = torch.rand(3, 7, generator=gen, dtype=DT)
    z = x + torch.randn(3, 7, generator=gen, dtype=DT)
    p = attacks.project(spec, x, z)
    assert contains(spec, x, p, tol=1e-9).all()
    torch.testing.assert_close(attacks.project(spec, x, p), p, rtol=0, atol=1e-9)
    for _ in range(50):  # no other point of the set is nearer to z
        other = attacks.random_point(spec, x)
        assert ((z - p).norm(dim=1) <= (z - other).norm(dim=1) + 1e-9).all()
