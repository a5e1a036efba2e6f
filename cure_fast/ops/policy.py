"""The process-wide defaults of the ops: which backend runs them and how precise their dot products are.

Backends: ``torch`` (pure PyTorch, the reference, runs anywhere), ``triton`` (kernels/), ``cuda``
(csrc/), and ``auto``. The default comes from :func:`set_backend`, else the environment variable
``CURE_FAST_BACKEND``, else ``auto``; :mod:`cure_fast.ops.registry` resolves it per call.

Precision (:func:`set_precision`, or ``precision=`` per call): ``ieee`` (default) computes fp32 dot
products in IEEE fp32, the mode certificates need; ``tf32`` lets them use TF32 tensor cores and
``bf16`` rounds their inputs to bfloat16, both with fp32 accumulation, for training. The
``triton`` and ``cuda`` backends use ``tf32`` / ``bf16`` in their kernels; the ``torch`` backend
turns TF32 off for ``ieee`` calls on CUDA tensors and otherwise follows torch's own settings.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from ..validation import did_you_mean

BACKENDS = ("torch", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)
PRECISIONS = ("ieee", "tf32", "bf16")
_default: Optional[str] = None
_precision = "ieee"


def _check(kind: str, name: str, source: str, choices) -> str:
    if name not in choices:
        raise ValueError(f"unknown {kind} {name!r} (from {source}); choose one of {', '.join(choices)}"
                         f"{did_you_mean(name, choices)}")
    return name


def check_backend(name: str, source: str = "backend=") -> str:
    """``name`` if it is a backend choice, else a ValueError naming ``source`` and the choices."""
    return _check("backend", name, source, CHOICES)


def set_backend(name: str) -> None:
    """Set the process-wide default backend: one of ``torch``, ``triton``, ``cuda``, ``auto``."""
    global _default
    _default = check_backend(name, "set_backend")


def get_backend() -> str:
    """The default backend name (``set_backend`` > ``$CURE_FAST_BACKEND`` > ``auto``)."""
    if _default is not None:
        return _default
    return check_backend(os.environ.get("CURE_FAST_BACKEND", "auto"), "$CURE_FAST_BACKEND")


def check_precision(name: str, source: str = "precision=") -> str:
    """``name`` if it is a precision mode, else a ValueError naming ``source`` and the modes."""
    return _check("precision", name, source, PRECISIONS)


def set_precision(name: str) -> None:
    """Set the process-wide dot-product precision: ``ieee`` (default, sound), ``tf32`` or ``bf16`` (training)."""
    global _precision
    _precision = check_precision(name, "set_precision")


def get_precision() -> str:
    """The process-wide dot-product precision (``ieee`` unless :func:`set_precision` changed it)."""
    return _precision


def resolve_precision(precision: Optional[str]) -> str:
    """A call's precision: ``precision`` checked, or the process default for None."""
    return get_precision() if precision is None else check_precision(precision)


@contextlib.contextmanager
def library_tf32(enabled: bool):
    """cuBLAS matmuls and cuDNN convolutions with TF32 on (``enabled``) or off inside the block."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [f.allow_tf32 for f in flags]
    if all(value == enabled for value in saved):  # already so (the common case per op): touch nothing
        yield
        return
    for f in flags:
        f.allow_tf32 = enabled
    try:
        yield
    finally:
        for f, value in zip(flags, saved):
            f.allow_tf32 = value


def honoured(precision: str, device: torch.device):
    """Context in which plain torch ops honour ``precision``: TF32 off for ``ieee`` on a CUDA device."""
    if precision != "ieee" or device.type != "cuda":
        return contextlib.nullcontext()
    return library_tf32(False)
