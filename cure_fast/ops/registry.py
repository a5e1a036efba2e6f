"""The one registry of op implementations, and the dispatch of every op call to a backend.

Each backend registers its implementation of an op with :func:`register` (a decorator) where the
implementation is defined: the ``torch`` twins in ``cure_fast.ops`` (plain functions of the op's
tensors), the Triton kernels in ``cure_fast.kernels`` and the CUDA ops in ``cure_fast.cuda``
(these take ``precision=`` and, for the affine ops, the epilogue keywords, which they fuse). No
list of ops is kept anywhere else: the Triton and CUDA packages are imported (and so register) the
first time a call on a device they can serve asks for them, so neither triton nor the extension is
imported on a machine that never uses them. Each of those packages has ``available(device)``.

:func:`select` resolves ``backend=`` (or the default of :mod:`cure_fast.ops.policy`): on CUDA
devices ``auto`` keeps the fastest backend whose results agree with ``torch``, as measured by
:mod:`cure_fast.ops.autoselect`; otherwise (or with ``CURE_FAST_AUTOSELECT=0``) the first
available of ``cuda``, ``triton``, ``torch``. On the CPU ``auto`` is ``torch`` (never the Triton
interpreter).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from . import autoselect
from .policy import check_backend, get_backend, honoured, resolve_precision

_IMPLS: Dict[str, Dict[str, Callable]] = {}
_PROVIDERS = {"triton": "cure_fast.kernels", "cuda": "cure_fast.cuda"}
_AUTO_ORDER = ("cuda", "triton", "torch")
_NEEDS = {"cuda": " (it needs CUDA tensors and the built extension cure_fast._C)",
          "triton": " (it needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU)"}


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator making ``fn`` the ``backend`` implementation of ``op``."""
    check_backend(backend, "register")

    def wrap(fn: Callable) -> Callable:
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn
    return wrap


def _may_run(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` could run on ``device``, decided without importing it."""
    if name == "torch":
        return True
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return (device.type == "cuda" or interpreted) and importlib.util.find_spec("triton") is not None
    return device.type == "cuda"


@functools.cache
def provider(name: str):
    """The package of backend ``name`` (``cure_fast.kernels`` or ``cure_fast.cuda``), imported once."""
    return importlib.import_module(_PROVIDERS[name])


def is_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on ``device`` in this process."""
    check_backend(name, "is_available")
    if name == "auto" or not _may_run(name, device):
        return name == "auto"
    return name == "torch" or provider(name).available(device)


def check_runs(name: Optional[str], device: torch.device, what: str = "backend") -> None:
    """A ValueError naming ``what`` when backend ``name`` (None: the process default) cannot run on
    ``device`` here."""
    name = name or get_backend()
    if not is_available(name, device):
        raise ValueError(f"{what}={name!r} cannot run on {device.type} here{_NEEDS.get(name, '')}; "
                         f"use torch or auto")


def implementations(op: str, device: Optional[torch.device] = None) -> Dict[str, Callable]:
    """{backend: implementation} of ``op``, after importing the backends that may run on ``device``
    (None: every backend whose package imports here)."""
    for name in _PROVIDERS:
        if device is None or _may_run(name, device):
            provider(name)
    if op not in _IMPLS:
        raise KeyError(f"no op named {op!r}; ops: {', '.join(sorted(_IMPLS))}")
    return _IMPLS[op]


def implementation(op: str, backend: str) -> Callable:
    """The registered ``backend`` implementation of ``op`` (after :func:`select` chose it)."""
    return _IMPLS[op][backend]


def select(op: str, backend: Optional[str], device: torch.device, run: Optional[Callable[[str], object]] = None,
           call_args=None, precision: str = "ieee") -> str:
    """The name of the backend that runs ``op`` for ``backend`` (None: the default) on ``device``.

    With ``auto`` on a CUDA device and ``run`` (``run(name)`` computes the whole op on backend
    ``name``; ``call_args`` are its arguments) the measured choice of :mod:`.autoselect`. Raises
    NotImplementedError when the requested backend cannot run on ``device`` or lacks ``op``.
    """
    name = check_backend(backend) if backend is not None else get_backend()
    if name == "auto":
        impls = implementations(op, device)
        names = [n for n in _AUTO_ORDER if n in impls and is_available(n, device)
                 and (n != "triton" or device.type == "cuda")]
        if run is not None and device.type == "cuda":
            chosen = autoselect.choose(op, names, device, call_args, run, precision)
            if chosen is not None:
                return chosen
        return names[0]  # torch is always there
    if not is_available(name, device):
        raise NotImplementedError(f"backend {name!r} cannot run {op} on {device.type} tensors{_NEEDS.get(name, '')}")
    if name not in implementations(op, device):
        raise NotImplementedError(f"backend {name!r} does not implement {op}; use backend='torch' or 'auto'")
    return name


def dispatch(op: str, backend: Optional[str], like: Tensor, call: Callable[[str], object], call_args,
             precision: str = "ieee"):
    """Run ``op``: ``call(name)`` computes it on backend ``name``; ``auto`` may measure every
    backend on this call (``call_args`` are its arguments)."""
    return call(select(op, backend, like.device, call, call_args, precision))


def dispatch_simple(op: str, backend: Optional[str], like: Tensor, *args):
    """Run ``op`` on ``args`` with the implementation of the selected backend (no options)."""
    return dispatch(op, backend, like, lambda name: _IMPLS[op][name](*args), args)


def dispatch_dot(op: str, backend: Optional[str], like: Tensor, precision: Optional[str], args: tuple,
                 epilogue: Optional[dict] = None, unfused: Optional[Callable] = None):
    """Run an op with dot products. Non-torch backends get ``precision=`` and the ``epilogue``
    keywords (which they fuse); the torch twin runs under :func:`~.policy.honoured` and then
    ``unfused(out, backend_name)`` applies the epilogue as separate ops."""
    precision = resolve_precision(precision)
    epilogue = epilogue or {}

    def call(name: str):
        impl = _IMPLS[op][name]
        if name != "torch":
            return impl(*args, **epilogue, precision=precision)
        with honoured(precision, like.device):
            out = impl(*args)
        return unfused(out, name) if unfused is not None else out

    return dispatch(op, backend, like, call, (args, epilogue), precision)
