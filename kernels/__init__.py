"""Fused Triton kernels of cure_fast, installed as ``cure_fast.kernels``.

Each op family lives in its own module (kernels -> launchers -> autograd.Function -> public
function), and each public function registers itself with :mod:`cure_fast.ops.registry` as the
``triton`` implementation of its op. cure_fast imports this package (and triton) only when the
``triton`` backend first runs.

- :mod:`.affine`: ``interval_linear``, ``interval_conv2d`` (implicit GEMM, fused BatchNorm / ReLU
  epilogue), ``l2_linear``, ``l2_conv2d`` (the first layer under an l2 ball).
- :mod:`.elementwise`: ``interval_relu``, ``interval_affine`` (+ ReLU), ``batch_norm_stats``.
- :mod:`.margins`: ``margins_linear``, ``l2_margins_linear``.
"""
import os

from .affine import interval_conv2d, interval_linear, l2_conv2d, l2_linear
from .elementwise import batch_norm_stats, interval_affine, interval_relu
from .margins import l2_margins_linear, margins_linear

__all__ = ["interval_linear", "interval_conv2d", "l2_linear", "l2_conv2d", "interval_relu", "interval_affine",
           "margins_linear", "l2_margins_linear", "batch_norm_stats", "available"]


def available(device) -> bool:
    """Whether the kernels can run on ``device``: CUDA tensors (or any, under TRITON_INTERPRET=1)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
