"""Each op of cure_fast.functional (torch backend) against the exact bounds of first-principles math:
hulls of affine images of boxes, dual norms attained on the ball, exact margins; gradients; dispatch."""
import importlib.util
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import cure_fast
from cure_fast import ops
from cure_fast.ops import policy as backends
from cure_fast import functional as BF

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-11)
MAX_CORNERS_IN = 10  # enumerate every corner of boxes with at most this many elements
SEEDS = st.integers(0, 2**31 - 1)

close = torch.testing.assert_close


def _rand(gen, *shape, low=-1.0, high=1.0):
    return torch.rand(shape, generator=gen, dtype=DT) * (high - low) + low


# ---------------------------------------------------------------- affine layers as explicit maps

class Affine:
    """An affine layer ``x -> M x + b`` on flattened samples, with ``M`` built by applying the layer to
    the identity basis; ``apply`` evaluates the layer itself on a batch of flat points."""

    def __init__(self, layer, in_shape):
        self.layer, self.in_shape = layer, tuple(in_shape)
        n = math.prod(in_shape)
        self.n = n
        zero = layer(torch.zeros((1,) + self.in_shape, dtype=DT))
        self.out_shape = tuple(zero.shape[1:])
        self.b = zero.reshape(-1)
        self.M = (layer(torch.eye(n, dtype=DT).view((n,) + self.in_shape)).reshape(n, -1) - self.b).T  # (m, n)
        self.m = self.M.shape[0]

    def apply(self, points):
        """points (..., n) -> layer outputs (..., m)."""
        lead = points.shape[:-1]
        return self.layer(points.reshape((-1,) + self.in_shape)).reshape(lead + (self.m,))

    def per_output(self, points):
        """points (R, m, n), one per output -> the k-th output at the k-th point, (R, m)."""
        return self.apply(points).diagonal(dim1=1, dim2=2)

    def box_hull(self, c, r):
        """Exact (lower, upper) of every output over each box [c - r, c + r], c, r (R, n): the layer
        evaluated at the minimizing / maximizing corner of each output's row."""
        step = r[:, None, :] * self.M.sign()
        return self.per_output(c[:, None, :] - step), self.per_output(c[:, None, :] + step)

    def corner_hull(self, c, r):
        """(lower, upper) over each box by evaluating the layer at all 2^n corners."""
        signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=self.n)), dtype=DT)  # (2^n, n)
        values = self.apply(c[:, None, :] + r[:, None, :] * signs)  # (R, 2^n, m)
        return values.amin(1), values.amax(1)

    def ball_argmax(self, eps, scale):
        """For the ellipsoid {x + s*u : |u|_2 <= eps} (s (B, n), eps (B,)): per output k the dual-norm
        radius eps * |M_k * s|_2 (B, m), and the step u = eps * (M_k * s) / |M_k * s| (B, m, n) that attains it."""
        rows = self.M[None] * scale[:, None, :]  # (B, m, n)
        norms = rows.square().sum(-1).sqrt()
        return eps[:, None] * norms, eps[:, None, None] * rows / norms.clamp_min(1e-300)[..., None]


def _linear(weight, bias):
    return Affine(lambda x: F.linear(x, weight, bias), (weight.shape[1],))


def _conv(weight, bias, in_shape, **conv):
    return Affine(lambda x: F.conv2d(x, weight, bias, **conv), in_shape)


def _assert_box_exact(affine, c, r, c_out, r_out):
    """c (N, n), r (M, n) flat; c_out (N, m), r_out (M, m): point rows map exactly, box rows to their hull."""
    points = c.shape[0] - r.shape[0]
    assert r_out.shape == (r.shape[0], affine.m)
    close(c_out[:points], affine.apply(c[:points]), **TOL)
    lower, upper = affine.box_hull(c[points:], r)
    close(c_out[points:] - r_out, lower, **TOL)
    close(c_out[points:] + r_out, upper, **TOL)
    if affine.n <= MAX_CORNERS_IN:
        close(affine.corner_hull(c[points:], r), (lower, upper), **TOL)


def _assert_ball_exact(affine, x, eps, scale, c_out, r_out):
    """x (B, n), eps (B,), scale (B, n); c_out, r_out (B, m): the centre is the image of x and both
    ends of every output's range are attained on the ellipsoid's boundary."""
    close(c_out, affine.apply(x), **TOL)
    radius, u = affine.ball_argmax(eps, scale)
    assert (u.square().sum(-1).sqrt() <= eps[:, None] * (1 + 1e-12)).all()
    step = scale[:, None, :] * u
    close(r_out, radius, **TOL)
    close(c_out - r_out, affine.per_output(x[:, None] - step), **TOL)
    close(c_out + r_out, affine.per_output(x[:, None] + step), **TOL)


# ---------------------------------------------------------------- strategies

@st.composite
def linear_cases(draw):
    gen = torch.Generator().manual_seed(draw(SEEDS))
    n_in, n_out = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    rows = draw(st.integers(1, 3))
    radii = draw(st.integers(0, rows))
    extra = draw(st.sampled_from([(), (2,), (1, 3)]))
    weight = _rand(gen, n_out, n_in)
    bias = _rand(gen, n_out) if draw(st.booleans()) else None
    c = _rand(gen, rows, *extra, n_in)
    r = _rand(gen, radii, *extra, n_in, low=0.0)
    return c, r, weight, bias


@st.composite
def conv_cases(draw, max_rows=3):
    """(in_shape, rows, weight, bias, conv arguments) of a small conv with any stride, padding, dilation, groups."""
    gen = torch.Generator().manual_seed(draw(SEEDS))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    span = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    size = [draw(st.integers(max(1, s - 2 * p), 5)) for s, p in zip(span, padding)]
    if stride == (1, 1) and all(k % 2 for k in kernel) and draw(st.integers(0, 3)) == 0:
        padding = "same"
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    weight = _rand(gen, c_out, c_in // groups, *kernel)
    bias = _rand(gen, c_out) if draw(st.booleans()) else None
    rows = draw(st.integers(1, max_rows))
    return (c_in, *size), rows, weight, bias, conv


def _eps(gen, batch, kind):
    """eps as a float, a 0-d tensor or a per-sample tensor (with a 0 entry), and as the (B,) tensor it means."""
    if kind == "float":
        return 0.7, torch.full((batch,), 0.7, dtype=DT)
    if kind == "scalar":
        return torch.tensor(0.4, dtype=DT), torch.full((batch,), 0.4, dtype=DT)
    per_sample = _rand(gen, batch, low=0.1, high=1.0)
    per_sample[0] = 0.0
    return per_sample, per_sample


EPS_KINDS = st.sampled_from(["float", "scalar", "per-sample"])


# ---------------------------------------------------------------- interval_linear / interval_conv2d

@settings(max_examples=60, deadline=None)
@given(linear_cases())
def test_interval_linear_is_the_exact_hull(case):
    c, r, weight, bias = case
    c_out, r_out = BF.interval_linear(c, r, weight, bias, backend="torch")
    assert c_out.shape == c.shape[:-1] + (weight.shape[0],)
    _assert_box_exact(_linear(weight, bias), c.reshape(-1, c.shape[-1]), r.reshape(-1, r.shape[-1]),
                      c_out.reshape(-1, weight.shape[0]), r_out.reshape(-1, weight.shape[0]))


@settings(max_examples=60, deadline=None)
@given(conv_cases(), SEEDS, st.data())
def test_interval_conv2d_is_the_exact_hull(case, seed, data):
    in_shape, rows, weight, bias, conv = case
    gen = torch.Generator().manual_seed(seed)
    radii = data.draw(st.integers(0, rows), label="radius rows")
    c, r = _rand(gen, rows, *in_shape), _rand(gen, radii, *in_shape, low=0.0)
    c_out, r_out = BF.interval_conv2d(c, r, weight, bias, **conv, backend="torch")
    affine = _conv(weight, bias, in_shape, **conv)
    assert c_out.shape == (rows,) + affine.out_shape and r_out.shape == (radii,) + affine.out_shape
    _assert_box_exact(affine, c.flatten(1), r.flatten(1), c_out.flatten(1), r_out.flatten(1))


def test_interval_conv2d_all_corners_with_groups_and_padding():
    gen = torch.Generator().manual_seed(0)
    weight, bias = _rand(gen, 4, 1, 2, 2), _rand(gen, 4)
    c, r = _rand(gen, 3, 2, 2, 2), _rand(gen, 2, 2, 2, 2, low=0.0)
    conv = dict(stride=(2, 1), padding=(1, 0), dilation=1, groups=2)
    c_out, r_out = BF.interval_conv2d(c, r, weight, bias, **conv, backend="torch")
    affine = _conv(weight, bias, (2, 2, 2), **conv)
    assert affine.n <= MAX_CORNERS_IN
    _assert_box_exact(affine, c.flatten(1), r.flatten(1), c_out.flatten(1), r_out.flatten(1))


def test_zero_radius_rows_are_points():
    gen = torch.Generator().manual_seed(1)
    weight, bias = _rand(gen, 3, 4), _rand(gen, 3)
    c = _rand(gen, 2, 4)
    c_out, r_out = BF.interval_linear(c, c[:0], weight, bias, backend="torch")
    close(c_out, c @ weight.T + bias, **TOL)
    assert r_out.shape == (0, 3)
    zero_c, zero_r = BF.interval_linear(c, torch.zeros_like(c), weight, bias, backend="torch")
    close(zero_c, c_out, **TOL)
    assert (zero_r == 0).all()


# ---------------------------------------------------------------- interval_relu / interval_affine

def test_interval_relu_matches_relu_of_the_ends():
    c = torch.tensor([[-2.0, -0.5, 0.0, 0.3, 1.0, 0.0],
                      [-1.0, 0.2, 0.5, -0.3, 2.0, 0.0],
                      [0.5, -0.5, 0.0, 1.0, -2.0, 3.0]], dtype=DT)
    r = torch.tensor([[0.5, 1.0, 0.0, 0.2, 3.0, 1.0],
                      [2.0, 0.1, 0.7, 0.3, 0.0, 0.0]], dtype=DT)
    c_out, r_out = BF.interval_relu(c, r, backend="torch")
    assert c_out.shape == c.shape and r_out.shape == r.shape
    close(c_out[:1], c[:1].clamp_min(0), rtol=0, atol=0)
    close(c_out[1:] - r_out, (c[1:] - r).clamp_min(0), **TOL)
    close(c_out[1:] + r_out, (c[1:] + r).clamp_min(0), **TOL)
    assert (r_out >= 0).all()


def test_interval_relu_point_rows_ignore_r():
    gen = torch.Generator().manual_seed(2)
    c = _rand(gen, 4, 3, 2, 2)
    first, _ = BF.interval_relu(c, _rand(gen, 2, 3, 2, 2, low=0.0), backend="torch")
    second, _ = BF.interval_relu(c, 5 * _rand(gen, 2, 3, 2, 2, low=0.0), backend="torch")
    close(first[:2], second[:2], rtol=0, atol=0)
    close(first[:2], c[:2].clamp_min(0), rtol=0, atol=0)
    points, radii = BF.interval_relu(c, c[:0], backend="torch")
    close(points, c.clamp_min(0), rtol=0, atol=0)
    assert radii.shape == (0, 3, 2, 2)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 2, 3)])
def test_interval_affine_with_negative_scales(shape):
    gen = torch.Generator().manual_seed(3)
    c, r = _rand(gen, *shape), _rand(gen, 2, *shape[1:], low=0.0)
    scale = torch.tensor([-2.0, 0.5, 0.0, -0.25], dtype=DT)
    shift = _rand(gen, 4)
    c_out, r_out = BF.interval_affine(c, r, scale, shift, backend="torch")
    channel = (1, 4) + (1,) * (len(shape) - 2)
    s, t = scale.view(channel), shift.view(channel)
    close(c_out, c * s + t, **TOL)
    ends = torch.stack([(c[1:] - r) * s + t, (c[1:] + r) * s + t])
    close(c_out[1:] - r_out, ends.amin(0), **TOL)
    close(c_out[1:] + r_out, ends.amax(0), **TOL)


# ---------------------------------------------------------------- l2_linear / l2_conv2d

def _linear_scale(gen, kind, batch, n):
    """(scale argument, the (B, n) scale it means)."""
    if kind is None:
        return None, torch.ones(batch, n, dtype=DT)
    full = {"feature": (n,), "sample": (batch, n), "shared": (1,)}[kind]
    scale = _rand(gen, *full, low=0.2, high=2.0) * (-1) ** torch.arange(full[-1])
    return scale, scale.expand(batch, n)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.integers(1, 3), st.integers(1, 6), st.integers(1, 5), EPS_KINDS,
       st.sampled_from([None, "feature", "sample", "shared"]), st.booleans())
def test_l2_linear_radius_is_the_dual_norm_and_attained(seed, batch, n_in, n_out, eps_kind, scale_kind, has_bias):
    gen = torch.Generator().manual_seed(seed)
    weight, x = _rand(gen, n_out, n_in), _rand(gen, batch, n_in)
    bias = _rand(gen, n_out) if has_bias else None
    eps, eps_b = _eps(gen, batch, eps_kind)
    scale, scale_b = _linear_scale(gen, scale_kind, batch, n_in)
    c_out, r_out = BF.l2_linear(x, eps, weight, bias, scale, backend="torch")
    assert c_out.shape == r_out.shape == (batch, n_out)
    _assert_ball_exact(_linear(weight, bias), x, eps_b, scale_b, c_out, r_out)


def _conv_scale(gen, kind, batch, in_shape):
    """(scale argument, the (B, C, H, W) scale it means)."""
    if kind is None:
        return None, torch.ones((batch,) + in_shape, dtype=DT)
    full = {"channel": (in_shape[0], 1, 1), "element": in_shape, "sample": (batch,) + in_shape}[kind]
    scale = _rand(gen, *full, low=0.2, high=2.0)
    return scale, scale.expand((batch,) + in_shape)


@settings(max_examples=60, deadline=None)
@given(conv_cases(max_rows=2), SEEDS, EPS_KINDS, st.sampled_from([None, "channel", "element", "sample"]))
def test_l2_conv2d_radius_is_the_dual_norm_and_attained(case, seed, eps_kind, scale_kind):
    in_shape, batch, weight, bias, conv = case
    gen = torch.Generator().manual_seed(seed)
    x = _rand(gen, batch, *in_shape)
    eps, eps_b = _eps(gen, batch, eps_kind)
    scale, scale_b = _conv_scale(gen, scale_kind, batch, in_shape)
    c_out, r_out = BF.l2_conv2d(x, eps, weight, bias, **conv, scale=scale, backend="torch")
    affine = _conv(weight, bias, in_shape, **conv)
    assert c_out.shape == r_out.shape == (batch,) + affine.out_shape
    _assert_ball_exact(affine, x.flatten(1), eps_b, scale_b.flatten(1), c_out.flatten(1), r_out.flatten(1))


@pytest.mark.parametrize("groups", [1, 2])
def test_l2_conv2d_is_tighter_at_the_zero_padded_border(groups):
    gen = torch.Generator().manual_seed(4)
    weight = _rand(gen, 4, 4 // groups, 3, 3, low=0.5, high=1.0)
    x, eps = _rand(gen, 2, 4, 5, 5), 0.3
    _, r_out = BF.l2_conv2d(x, eps, weight, None, padding=1, groups=groups, backend="torch")
    full = eps * weight.flatten(1).norm(dim=1)[None, :, None, None]
    full = full.expand_as(r_out)
    interior = torch.zeros(5, 5, dtype=torch.bool)
    interior[1:-1, 1:-1] = True
    close(r_out[..., interior], full[..., interior], **TOL)
    assert (r_out[..., ~interior] < full[..., ~interior] * (1 - 1e-6)).all()


def _zero_row_cases():
    gen = torch.Generator().manual_seed(5)
    weight = _rand(gen, 3, 4)
    weight[1] = 0
    conv_weight = _rand(gen, 3, 2, 2, 2)
    conv_weight[0] = 0
    return {"l2_linear": (lambda w, x: sum(BF.l2_linear(x, 0.5, w, None, backend="torch")), weight, _rand(gen, 2, 4)),
            "l2_conv2d": (lambda w, x: sum(BF.l2_conv2d(x, 0.5, w, None, padding=1, backend="torch")),
                          conv_weight, _rand(gen, 2, 2, 3, 3)),
            "l2_margins_linear": (lambda w, x: BF.l2_margins_linear(x, 0.5, w, None, torch.tensor([0, 2]),
                                                                    backend="torch"), weight, _rand(gen, 2, 4))}


ZERO_ROWS = _zero_row_cases()


@pytest.mark.parametrize("op", list(ZERO_ROWS))
def test_l2_gradients_are_finite_where_a_row_is_zero(op):
    fn, weight, x = ZERO_ROWS[op]
    weight, x = weight.clone().requires_grad_(), x.clone().requires_grad_()
    out = fn(weight, x)
    assert (out == 0).any()
    out.sum().backward()
    assert torch.isfinite(weight.grad).all() and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- margins

def _margins_at(weight, bias, points, labels):
    """points (R, K, n), the j-th one for class j -> z_y - z_j at the j-th point, (R, K)."""
    logits = F.linear(points, weight, bias)  # (R, K, K): the logits at each of the K points
    at_label = logits.gather(2, labels[:, None, None].expand(-1, weight.shape[0], 1)).squeeze(2)
    return at_label - logits.diagonal(dim1=1, dim2=2)


def _exact_box_margins(weight, bias, c, r, labels):
    """min over each box of z_y - z_j: the margin at the minimizing corner of each (W_y - W_j)."""
    diff = weight[labels][:, None, :] - weight[None]  # (R, K, n)
    return _margins_at(weight, bias, c[:, None, :] - r[:, None, :] * diff.sign(), labels)


def _exact_ball_margins(weight, bias, x, eps, scale, labels):
    """min over {x + s*u : |u|_2 <= eps} of z_y - z_j: the margin at the minimizing point."""
    diff = (weight[labels][:, None, :] - weight[None]) * scale[:, None, :]
    norms = diff.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-300)
    return _margins_at(weight, bias, x[:, None, :] - scale[:, None, :] * eps[:, None, None] * diff / norms, labels)


def _assert_zero_at_label(margins, labels):
    assert (margins.gather(1, labels[:, None]) == 0).all()


def _looser_margins(c, r, labels):
    """lower_y - upper_j from an interval (c, r) on the logits, 0 at j = y."""
    margins = (c - r).gather(1, labels[:, None]) - (c + r)
    return margins.scatter(1, labels[:, None], 0.0)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.integers(1, 3), st.data(), st.integers(1, 6), st.integers(2, 5), st.booleans())
def test_margins_linear_is_the_exact_minimum(seed, rows, data, n_in, classes, has_bias):
    gen = torch.Generator().manual_seed(seed)
    radii = data.draw(st.integers(0, rows), label="radius rows")
    weight, bias = _rand(gen, classes, n_in), (_rand(gen, classes) if has_bias else None)
    c, r = _rand(gen, rows, n_in), _rand(gen, radii, n_in, low=0.0)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    margins = BF.margins_linear(c, r, weight, bias, labels, backend="torch")
    assert margins.shape == (rows, classes)
    full_r = torch.cat([torch.zeros(rows - radii, n_in, dtype=DT), r])
    close(margins, _exact_box_margins(weight, bias, c, full_r, labels), **TOL)
    _assert_zero_at_label(margins, labels)
    logit_c, logit_r = BF.interval_linear(c, full_r, weight, bias, backend="torch")
    assert (margins >= _looser_margins(logit_c, logit_r, labels) - 1e-12).all()


def test_margins_linear_all_corners():
    gen = torch.Generator().manual_seed(6)
    weight, bias = _rand(gen, 3, 4), _rand(gen, 3)
    c, r, labels = _rand(gen, 2, 4), _rand(gen, 2, 4, low=0.0), torch.tensor([2, 0])
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=4)), dtype=DT)
    logits = F.linear(c[:, None] + r[:, None] * signs, weight, bias)  # (2, 16, 3)
    expected = (logits.gather(2, labels[:, None, None].expand(-1, 16, 1)) - logits).amin(1)
    close(BF.margins_linear(c, r, weight, bias, labels, backend="torch"), expected, **TOL)


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.integers(1, 3), st.integers(1, 6), st.integers(2, 5), EPS_KINDS,
       st.sampled_from([None, "feature", "sample"]), st.booleans())
def test_l2_margins_linear_is_the_exact_minimum(seed, batch, n_in, classes, eps_kind, scale_kind, has_bias):
    gen = torch.Generator().manual_seed(seed)
    weight, bias = _rand(gen, classes, n_in), (_rand(gen, classes) if has_bias else None)
    x, labels = _rand(gen, batch, n_in), torch.randint(0, classes, (batch,), generator=gen)
    eps, eps_b = _eps(gen, batch, eps_kind)
    scale, scale_b = _linear_scale(gen, scale_kind, batch, n_in)
    margins = BF.l2_margins_linear(x, eps, weight, bias, labels, scale, backend="torch")
    close(margins, _exact_ball_margins(weight, bias, x, eps_b, scale_b, labels), **TOL)
    _assert_zero_at_label(margins, labels)
    logit_c, logit_r = BF.l2_linear(x, eps, weight, bias, scale, backend="torch")
    assert (margins >= _looser_margins(logit_c, logit_r, labels) - 1e-12).all()


# ---------------------------------------------------------------- gradients

def _relu_interval():
    """(c, r) whose ends stay at least 0.1 away from the ReLU kink; the first row is a point."""
    lower = torch.tensor([[-1.5, -0.8, 0.3, -2.0], [-0.6, 0.2, -1.0, 0.4]], dtype=DT)
    upper = torch.tensor([[-0.4, 0.6, 1.1, 0.9], [0.5, 0.9, -0.2, 1.3]], dtype=DT)
    point = torch.tensor([[0.7, -0.3, 1.2, -0.9]], dtype=DT)
    return torch.cat([point, (upper + lower) / 2]), (upper - lower) / 2


def _gradcheck_cases():
    gen = torch.Generator().manual_seed(7)
    w, b, x = _rand(gen, 3, 4), _rand(gen, 3), _rand(gen, 3, 4)
    cw, cb = _rand(gen, 4, 1, 2, 2), _rand(gen, 4)
    img = _rand(gen, 2, 2, 3, 3)
    eps = _rand(gen, 3, low=0.1, high=1.0)
    labels = torch.tensor([0, 2, 1])
    conv = dict(stride=(1, 2), padding=1, dilation=(2, 1), groups=2)
    relu_c, relu_r = _relu_interval()
    return {
        "interval_linear": (lambda c, r, w, b: BF.interval_linear(c, r, w, b, backend="torch"),
                            (x, x[1:].abs(), w, b)),
        "interval_conv2d": (lambda c, r, w, b: BF.interval_conv2d(c, r, w, b, **conv, backend="torch"),
                            (img, img[1:].abs(), cw, cb)),
        "interval_relu": (lambda c, r: BF.interval_relu(c, r, backend="torch"), (relu_c, relu_r)),
        "interval_affine": (lambda c, r, s, t: BF.interval_affine(c, r, s, t, backend="torch"),
                            (img, img.abs(), torch.tensor([-1.5, 0.7], dtype=DT), b[:2])),
        "l2_linear": (lambda x, e, w, b, s: BF.l2_linear(x, e, w, b, s, backend="torch"),
                      (x, eps, w, b, _rand(gen, 4, low=0.5))),
        "l2_conv2d": (lambda x, e, w, b, s: BF.l2_conv2d(x, e, w, b, **conv, scale=s, backend="torch"),
                      (img, eps[:2], cw, cb, _rand(gen, 2, 1, 1, low=0.5))),
        "margins_linear": (lambda c, r, w, b: BF.margins_linear(c, r, w, b, labels, backend="torch"),
                           (x, x[1:].abs(), w, b)),
        "l2_margins_linear": (lambda x, e, w, b, s: BF.l2_margins_linear(x, e, w, b, labels, s, backend="torch"),
                              (x, eps, w, b, _rand(gen, 3, 4, low=0.5))),
        "batch_norm_stats": (lambda x: BF.batch_norm_stats(x, backend="torch"), (img,)),
    }


GRADCHECK = _gradcheck_cases()


@pytest.mark.parametrize("op", list(GRADCHECK))
def test_gradcheck(op):
    fn, inputs = GRADCHECK[op]
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_covers_every_op():
    assert set(GRADCHECK) == set(cure_fast.ops.OPS)


# ---------------------------------------------------------------- backend dispatch

def _dispatch_calls():
    gen = torch.Generator().manual_seed(8)
    w, x = _rand(gen, 3, 4), _rand(gen, 2, 4)
    img, cw = _rand(gen, 2, 2, 3, 3), _rand(gen, 2, 2, 2, 2)
    labels = torch.tensor([0, 1])
    return {
        "interval_linear": lambda **kw: BF.interval_linear(x, x.abs(), w, None, **kw),
        "interval_conv2d": lambda **kw: BF.interval_conv2d(img, img.abs(), cw, None, **kw),
        "interval_relu": lambda **kw: BF.interval_relu(x, x.abs(), **kw),
        "interval_affine": lambda **kw: BF.interval_affine(img, img.abs(), w[0, :2], w[1, :2], **kw),
        "l2_linear": lambda **kw: BF.l2_linear(x, 0.3, w, None, **kw),
        "l2_conv2d": lambda **kw: BF.l2_conv2d(img, 0.3, cw, None, **kw),
        "margins_linear": lambda **kw: BF.margins_linear(x, x.abs(), w, None, labels, **kw),
        "l2_margins_linear": lambda **kw: BF.l2_margins_linear(x, 0.3, w, None, labels, **kw),
        "batch_norm_stats": lambda **kw: BF.batch_norm_stats(img, **kw),
    }


CALLS = _dispatch_calls()
OPS = list(CALLS)


@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv("CURE_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "_default", None)
    yield monkeypatch


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("op", OPS)
def test_triton_backend_without_interpreter_names_the_device(clean_backend, op):
    with pytest.raises(NotImplementedError, match=rf"'triton' cannot run {op} on cpu tensors \(it needs CUDA tensors"):
        CALLS[op](backend="triton")


@pytest.mark.parametrize("op", OPS)
def test_cuda_backend_names_the_device(clean_backend, op):
    with pytest.raises(NotImplementedError, match=rf"'cuda' cannot run {op} on cpu tensors \(it needs CUDA tensors"):
        CALLS[op](backend="cuda")


@pytest.mark.parametrize("op", OPS)
def test_every_backend_registers_every_op(op):
    assert set(ops.implementations(op)) >= {"torch", "cuda"}
    assert "triton" in ops.implementations(op) or importlib.util.find_spec("triton") is None


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_name(clean_backend, op):
    with pytest.raises(ValueError, match=r"unknown backend 'cpu'"):
        CALLS[op](backend="cpu")


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu_is_the_torch_result(clean_backend, op):
    for got, want in zip(_as_tuple(CALLS[op](backend="auto")), _as_tuple(CALLS[op](backend="torch"))):
        close(got, want, rtol=0, atol=0)
    for got, want in zip(_as_tuple(CALLS[op]()), _as_tuple(CALLS[op](backend="torch"))):
        close(got, want, rtol=0, atol=0)


def test_default_backend_is_auto(clean_backend):
    assert cure_fast.get_backend() == "auto"


def test_set_backend_sets_the_default(clean_backend):
    cure_fast.set_backend("triton")
    assert cure_fast.get_backend() == "triton"
    with pytest.raises(NotImplementedError, match="interval_linear"):
        CALLS["interval_linear"]()
    CALLS["interval_linear"](backend="torch")
    cure_fast.set_backend("torch")
    assert cure_fast.get_backend() == "torch"
    with pytest.raises(ValueError, match=r"unknown backend 'fast' \(from set_backend\)"):
        cure_fast.set_backend("fast")
    assert cure_fast.get_backend() == "torch"
    clean_backend.setenv("CURE_FAST_BACKEND", "triton")
    cure_fast.set_backend(None)  # back to the environment's default
    assert cure_fast.get_backend() == "triton"


def test_environment_variable_sets_the_default(clean_backend):
    clean_backend.setenv("CURE_FAST_BACKEND", "triton")
    assert cure_fast.get_backend() == "triton"
    with pytest.raises(NotImplementedError, match="l2_linear"):
        CALLS["l2_linear"]()
    cure_fast.set_backend("torch")
    assert cure_fast.get_backend() == "torch"
    CALLS["l2_linear"]()


def test_bad_environment_variable_is_named(clean_backend):
    clean_backend.setenv("CURE_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"unknown backend 'gpu' \(from \$CURE_FAST_BACKEND\)"):
        CALLS["interval_relu"]()
