"""Per-layer bound-propagation ops on intervals ``(c, r)``, each dispatched to a backend.

The public import path of :mod:`cure_fast.ops` (where each op lives beside its pure-PyTorch twin).
Every op takes ``backend=`` (``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or None for the
default, see :mod:`cure_fast.ops.policy`). ``r`` may have fewer rows than ``c``: it then holds the
radii of the last ``r.shape[0]`` rows and the leading rows are points (the natural stream). The
ops with dot products take ``precision=`` (``"ieee"``, ``"tf32"``, ``"bf16"``, or None for the
default). ``interval_linear`` / ``interval_conv2d`` take an optional epilogue (a per-output-feature
affine ``scale``, ``shift`` and ``relu``) that the ``triton`` and ``cuda`` backends fuse into the
kernel and the ``torch`` backend applies after the op. All ops are differentiable.

Preconditions the ops do not check (the layers of :class:`cure_fast.BoundedModule` call them on every
step, and a check would read every radius again, on a GPU with a synchronization): every radius
``r >= 0`` and finite. A negative radius is no interval: its "bounds" (lower above upper) prove
nothing. :class:`cure_fast.BoundedModule` builds radii from input sets that it checks.
"""
from .ops import (Interval, batch_norm_stats, interval_affine, interval_conv2d, interval_linear, interval_relu,
                  l2_conv2d, l2_linear, l2_margins_linear, margins_linear)

__all__ = ["Interval", "interval_linear", "interval_conv2d", "interval_relu", "interval_affine", "l2_linear",
           "l2_conv2d", "margins_linear", "l2_margins_linear", "batch_norm_stats"]
