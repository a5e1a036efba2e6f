"""Backend selection: ``torch`` (reference, runs anywhere), ``triton`` (kernels/), ``cuda`` (csrc/).

The default comes from :func:`set_backend`, else the environment variable ``CURE_FAST_BACKEND``,
else ``auto``, which picks per op the first available of ``cuda``, ``triton``, ``torch`` that
implements it for the tensor's device (on the CPU: ``torch``).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)
_AUTO_ORDER = ("cuda", "triton", "torch")
_default: Optional[str] = None


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


def resolve(op: str, impls: Dict[str, Callable], backend: Optional[str], device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` (None: the default) on ``device``; clear errors otherwise."""
    name = _check_name(backend, "backend=") if backend is not None else get_backend()
    if name == "auto":
        for candidate in _AUTO_ORDER:
            if candidate in impls and is_available(candidate, device):
                return impls[candidate]
        raise RuntimeError(f"no backend implements {op} on {device}")  # torch always does
    if name not in impls:
        raise NotImplementedError(
            f"backend {name!r} does not implement {op} yet; use backend='torch' or 'auto'")
    if not is_available(name, device):
        raise RuntimeError(f"backend {name!r} cannot run {op} on {device.type} tensors"
                           + (" (it needs CUDA tensors and the built extension cure_fast._C)" if name == "cuda" else
                              " (it needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU)"))
    return impls[name]
