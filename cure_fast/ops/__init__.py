"""The functional bound-propagation ops (each op family in one file with its pure-PyTorch ``*_ref``
twin beside it), the one registry of their backend implementations, the backend / precision policy
and the one tuner (:mod:`.autoselect`).

Every op takes ``backend=`` (``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or None for the
default) and the ops with dot products ``precision=`` (``"ieee"``, ``"tf32"``, ``"bf16"``, or None
for the default); see :mod:`.policy`. All ops are differentiable.
"""
from .affine import apply_epilogue, interval_conv2d, interval_conv2d_ref, interval_linear, interval_linear_ref
from .common import Interval
from .elementwise import (batch_norm_stats, batch_norm_stats_grad, batch_norm_stats_ref, interval_affine,
                          interval_affine_ref, interval_relu, interval_relu_ref)
from .l1 import l1_conv2d, l1_conv2d_ref, l1_linear, l1_linear_ref, l1_margins_linear, l1_margins_linear_ref
from .l2 import l2_conv2d, l2_conv2d_ref, l2_linear, l2_linear_ref
from .margins import l2_margins_linear, l2_margins_linear_ref, margins_linear, margins_linear_ref
from .registry import implementations, register

OPS = ("interval_linear", "interval_conv2d", "interval_relu", "interval_affine", "l2_linear", "l2_conv2d",
       "margins_linear", "l2_margins_linear", "batch_norm_stats")
TORCH_ONLY = ("l1_linear", "l1_conv2d", "l1_margins_linear")  # no kernels: plain PyTorch on every backend

__all__ = list(OPS + TORCH_ONLY) + [op + "_ref" for op in OPS + TORCH_ONLY] + ["Interval", "apply_epilogue", "batch_norm_stats_grad",
                                                     "implementations", "register"]
