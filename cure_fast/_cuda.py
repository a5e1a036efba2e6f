"""The CUDA C++ backend: the extension ``cure_fast._C`` (built from csrc/ by setup.py) as torch.library ops."""
import functools
import importlib
from typing import Tuple

import torch
from torch import Tensor

_REBUILD = ("rebuild with `CURE_FAST_BUILD_CUDA=1 pip install -e . --no-deps --no-build-isolation` "
            "(CUDA_HOME must point at the CUDA toolkit)")


@functools.cache
def extension():
    """The compiled extension ``cure_fast._C``, imported on first use."""
    try:
        return importlib.import_module("cure_fast._C")
    except ImportError as e:
        state = "was not built" if isinstance(e, ModuleNotFoundError) else "is stale or broken"
        raise RuntimeError(f"cure_fast._C {state} ({e}); {_REBUILD}") from e


def available() -> bool:
    """True when the extension imports and a CUDA device is present."""
    try:
        extension()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def _empty(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@torch.library.custom_op("cure_fast::interval_relu_cuda", mutates_args=())
def _interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    return extension().interval_relu_forward(c.contiguous(), r.contiguous())


@_interval_relu.register_fake
def _(c, r):
    return _empty(c), _empty(r)


@torch.library.custom_op("cure_fast::interval_relu_cuda_backward", mutates_args=())
def _interval_relu_backward(c: Tensor, r: Tensor, grad_c_out: Tensor, grad_r_out: Tensor) -> Tuple[Tensor, Tensor]:
    return extension().interval_relu_backward(c.contiguous(), r.contiguous(), grad_c_out.contiguous(),
                                              grad_r_out.contiguous())


@_interval_relu_backward.register_fake
def _(c, r, grad_c_out, grad_r_out):
    return _empty(c), _empty(r)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_c_out, grad_r_out):
    return _interval_relu_backward(*ctx.saved_tensors, grad_c_out, grad_r_out)


_interval_relu.register_autograd(_backward, setup_context=_setup_context)


def interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """ReLU of the interval ``(c, r)`` with the CUDA kernel (differentiable, traceable by torch.compile).

    c: (N, *) centres; r: (M, *) radii, M <= N, of the last M rows of c (the first N - M rows are
    points). Returns c_out (N, *) and r_out (M, *): ``(relu(u) + relu(l)) / 2`` and
    ``(relu(u) - relu(l)) / 2`` with ``l = c - r``, ``u = c + r``; ``relu(c)`` on point rows.
    float32, float64, float16 or bfloat16, on one CUDA device; computed in float32 (float64 for float64).
    """
    return _interval_relu(c, r)
