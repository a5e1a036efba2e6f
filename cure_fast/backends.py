"""Backend selection: ``torch`` (reference, runs anywhere), ``triton`` (kernels/), ``cuda`` (csrc/),
and the precision policy of the dot products.

The default backend comes from :func:`set_backend`, else the environment variable
``CURE_FAST_BACKEND``, else ``auto``. On CUDA devices ``auto`` runs each op's call shape once on
every available backend and keeps the fastest whose outputs (and gradients) agree with the torch
backend (:mod:`cure_fast.autoselect`); without that measurement it takes the first available of
``cuda``, ``triton``, ``torch``. On the CPU ``auto`` is ``torch`` (never the Triton interpreter).

Precision (:func:`set_precision`, or ``precision=`` per call): ``ieee`` (default) computes fp32 dot
products in IEEE fp32, the mode certificates need; ``tf32`` lets them use TF32 tensor cores and
``bf16`` rounds their inputs to bfloat16, both with fp32 accumulation, for training. The
``triton`` and ``cuda`` backends use ``tf32`` / ``bf16`` in their kernels; the ``torch`` backend
turns TF32 off for ``ieee`` calls on CUDA tensors and otherwise follows torch's own settings.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)
_AUTO_ORDER = ("cuda", "triton", "torch")
PRECISIONS = ("ieee", "tf32", "bf16")
_default: Optional[str] = None
_precision = "ieee"


def _check_name(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown backend {name!r} (from {source}); choose one of {', '.join(CHOICES)}")
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend: one of ``torch``, ``triton``, ``cuda``, ``auto``."""
    global _default
    _default = _check_name(name, "set_backend")


def get_backend() -> str:
    """The default backend name (``set_backend`` > ``$CURE_FAST_BACKEND`` > ``auto``)."""
    if _default is not None:
        return _default
    return _check_name(os.environ.get("CURE_FAST_BACKEND", "auto"), "$CURE_FAST_BACKEND")


def check_precision(name: str, source: str = "precision=") -> str:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r} (from {source}); choose one of {', '.join(PRECISIONS)}")
    return name


def set_precision(name: str) -> None:
    """Set the process-wide dot-product precision: ``ieee`` (default, sound), ``tf32`` or ``bf16`` (training)."""
    global _precision
    _precision = check_precision(name, "set_precision")


def get_precision() -> str:
    """The process-wide dot-product precision (``ieee`` unless :func:`set_precision` changed it)."""
    return _precision


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


def is_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device`` in this process."""
    if name == "torch":
        return True
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return False
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "cuda":
        from . import _cuda
        return device.type == "cuda" and _cuda.available()
    raise ValueError(f"unknown backend {name!r}")


def select(op: str, impls: Dict[str, Callable], backend: Optional[str], device: torch.device,
           run: Optional[Callable[[str], object]] = None, call_args=None, precision: str = "ieee") -> str:
    """The name of the backend that runs ``op`` for ``backend`` (None: the default) on ``device``.

    On CUDA devices ``auto`` with ``run`` (``run(name)`` computes the whole op on backend ``name``;
    ``call_args`` are its arguments) takes the backend that :mod:`cure_fast.autoselect` measured
    fastest among those that agree with the torch backend; without ``run``, or with
    ``CURE_FAST_AUTOSELECT=0``, the static order. Raises NotImplementedError when the requested
    backend lacks ``op`` or cannot run on ``device``.
    """
    name = _check_name(backend, "backend=") if backend is not None else get_backend()
    if device.type == "cuda":
        from . import autoselect
        autoselect.prepare(device)  # registers the cuda backend's ops
        if name == "auto" and run is not None:
            names = [n for n in autoselect.CANDIDATES if n in impls and is_available(n, device)]
            chosen = autoselect.choose(op, names, device, call_args, run, precision)
            if chosen is not None:
                return chosen
    if name == "auto":
        for candidate in _AUTO_ORDER:
            if candidate == "triton" and device.type != "cuda":
                continue
            if candidate in impls and is_available(candidate, device):
                return candidate
        raise RuntimeError(f"no backend implements {op} on {device}")  # torch always does
    if name not in impls:
        raise NotImplementedError(
            f"backend {name!r} does not implement {op} yet; use backend='torch' or 'auto'")
    if not is_available(name, device):
        raise NotImplementedError(f"backend {name!r} cannot run {op} on {device.type} tensors"
                                  + (" (it needs CUDA tensors and the built extension cure_fast._C)" if name == "cuda"
                                     else " (it needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU)"))
    return name
