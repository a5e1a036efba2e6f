"""Sound float32 bounds of the CROWN family (``sound="fp32"``, cure_fast.engine.rounding): never above
the float64 bounds and within 1e-3 of them on random networks, never above sampled margins, never
above the exact rational CROWN-IBP bound of the same relaxations nor the true minimum on tiny nets,
and below the float64 bound on a net where plain float32 is optimistic."""
import copy
import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from cure_fast import BoundedModule, L1Ball, L2Ball, LinfBall
from cure_fast.engine import crown
from netgen import modules_of, networks, run_layers
from test_soundness import _sample, _true_margins


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _eval_setup(net, data):
    model, shape = net
    model = model.float().eval()
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    batch = data.draw(st.integers(1, 2), label="batch")
    x = torch.rand((batch,) + shape)
    per_sample = data.draw(st.booleans(), label="per-sample eps")
    eps = lambda top: (torch.rand(batch) * top) if per_sample else data.draw(  # noqa: E731
        st.floats(0.0, top), label="eps")
    specs = [LinfBall(eps(0.3)), L2Ball(eps(1.0)), L1Ball(eps(1.5), domain=None)]
    y = torch.randint(0, model[-1].out_features, (batch,))
    return BoundedModule(model), x, y, specs


@settings(max_examples=40)
@given(net=networks(), data=st.data())
def test_float32_bounds_are_below_float64_close_to_them_and_below_sampled_margins(net, data):
    """α-CROWN's optimizer takes other paths in float32 than in float64 (a bound either side of the
    float64 one): only its soundness is compared."""
    bm, x, y, specs = _eval_setup(net, data)
    method = data.draw(st.sampled_from(crown.METHODS), label="method")
    reference = BoundedModule(copy.deepcopy(bm.model).double())
    for spec in specs:
        bound = crown.crown_margins(bm, x, y, spec, method=method, alpha_steps=3, sound="fp32")
        assert bound.dtype == torch.float32 and (bound.gather(1, y[:, None]) == 0).all()
        bound = bound.double()
        if method != "alpha-crown":
            wide = crown.crown_margins(bm, x.double(), y, spec, method=method)
            assert (bound <= wide + 1e-12 * (1 + wide.abs())).all(), f"{spec} {method}: above the float64 bound"
            gap = (wide - bound).max()
            assert gap < 1e-3, f"{spec} {method}: {gap:.3g} below the float64 bound"
        points = _sample(spec, x.double())
        outputs = run_layers(modules_of(reference), points.flatten(0, 1), {})
        true = _true_margins(outputs[-1].view(points.shape[:2] + outputs[-1].shape[1:]), y).amin(0)
        assert (true >= bound).all(), f"{spec} {method}: a sampled margin is below the float32 bound"
