"""The CUDA C++ backend: the extension ``cure_fast._C`` (built from csrc/ by setup.py) as torch.library ops.

One module per op family, each laid out as custom ops -> fake implementations -> autograd ->
documented public functions:

- :mod:`.extension`: loading ``cure_fast._C`` (:func:`load`, :func:`use` for a stand-in),
  :func:`set_poison`, and the tensor helpers the op modules share.
- :mod:`.elementwise`: ``interval_relu``, ``interval_affine`` (the per-channel epilogue kernel, also
  run after the library routes of the affine ops), ``channel_moments`` / ``batch_norm_stats``.
- :mod:`.linear`: ``interval_linear`` (fused interval GEMM, or cuBLAS + epilogue).
- :mod:`.conv`: ``interval_conv2d`` (implicit GEMM, or cuDNN + epilogue).
- :mod:`.l2`: ``l2_linear``, ``l2_conv2d`` (the first layer under an l2 ball).
- :mod:`.margins`: ``margins_linear``, ``l2_margins_linear`` and their backward ``margins_grad``.

Every kernel entry point is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile`` traces through it, and an autograd formula built from the backward kernels. Each
public op function registers itself as the ``cuda`` implementation of its op with
:func:`cure_fast.ops.registry.register`; importing this package (which the registry does on the
first call on a CUDA device) registers them all and makes no CUDA call. Dot products honour
``precision``: ``ieee`` (fp32 FMA, certification), ``tf32`` and ``bf16`` (tensor cores with fp32
accumulation); fp64 is always IEEE, fp16 / bf16 inputs use tensor cores in their own type.
"""
from typing import Optional

import torch

from . import conv, elementwise, extension, l2, linear, margins
from .conv import interval_conv2d
from .elementwise import batch_norm_stats, channel_moments, interval_affine, interval_relu
from .extension import load, set_poison, use
from .l2 import l2_conv2d, l2_linear
from .linear import interval_linear
from .margins import l2_margins_linear, margins_grad, margins_linear

__all__ = ["interval_linear", "interval_conv2d", "interval_relu", "interval_affine", "l2_linear", "l2_conv2d",
           "margins_linear", "l2_margins_linear", "batch_norm_stats", "channel_moments", "margins_grad", "available",
           "load", "use", "set_poison"]


def available(device: Optional[torch.device] = None) -> bool:
    """Whether the kernels can run on ``device`` (None: on some CUDA device): a CUDA device is
    present, ``device`` is one, and the extension imports."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return extension.available()
