"""Loading the compiled extension ``cure_fast._C`` (built from csrc/ by setup.py), and the small
tensor helpers the op modules share.

Importing ``cure_fast._C`` registers its operators, ``torch.ops.cure_fast_C.*`` (schemas in
csrc/ops/library.cpp, CUDA kernels in the op family files of csrc/ops/). :func:`load` imports it
on first use and wraps that namespace in an :class:`Extension`, through which the op modules call
the entry points (``load().interval_relu_forward(...)``). No list of entry points is kept: an
extension built from older sources that lacks one raises a one-line RuntimeError naming it when it
is first called. :func:`use` swaps in a stand-in with the same entry points (the tests'
pure-PyTorch ``tests/cuda_emulator.py``). Importing this module makes no CUDA call.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator, List, Optional, Union

import torch
from torch import Tensor

REBUILD = ("rebuild with `CURE_FAST_BUILD_CUDA=1 pip install -e . --no-deps --no-build-isolation` "
           "(CUDA_HOME must point at the CUDA toolkit)")


class Extension:
    """The extension's entry points as attributes of ``module`` (the operator namespace
    ``torch.ops.cure_fast_C``, or a stand-in); one it lacks is a RuntimeError naming it."""

    def __init__(self, module, name: str = "cure_fast._C"):
        self.module, self.name = module, name

    def __getattr__(self, entry: str):
        if entry.startswith("__"):
            raise AttributeError(entry)
        try:
            return getattr(self.module, entry)
        except AttributeError:
            raise RuntimeError(f"{self.name} is stale (it lacks {entry}); {REBUILD}") from None

    def __repr__(self) -> str:
        return f"Extension({self.module!r})"


_loaded: Optional[Extension] = None


def load() -> Extension:
    """The operators of ``cure_fast._C`` (or the stand-in of :func:`use`), imported on first use."""
    global _loaded
    if _loaded is None:
        try:
            importlib.import_module("cure_fast._C")  # registers torch.ops.cure_fast_C.*
        except ImportError as e:
            state = "was not built" if isinstance(e, ModuleNotFoundError) else "is stale or broken"
            raise RuntimeError(f"cure_fast._C {state} ({e}); {REBUILD}") from e
        _loaded = Extension(torch.ops.cure_fast_C)
    return _loaded


@contextlib.contextmanager
def use(stand_in) -> Iterator[Extension]:
    """Inside the block, the cuda backend calls ``stand_in`` (any object with the extension's entry
    points) instead of ``cure_fast._C``."""
    global _loaded
    saved, _loaded = _loaded, Extension(stand_in)
    try:
        yield _loaded
    finally:
        _loaded = saved


def available() -> bool:
    """True when the extension imports and a CUDA device is present."""
    try:
        load()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def set_poison(on: bool) -> None:
    """Test hook: while on, every output of the extension starts as NaN (an unwritten element shows up)."""
    load().set_poison(bool(on))


# ---------------------------------------------------------------------------------------------
# Tensor helpers of the op modules

def empty_like(t: Tensor) -> Tensor:
    """An uninitialised contiguous tensor like ``t`` (the fake implementations' outputs)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def contiguous(*tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    """The tensors made contiguous (None stays None)."""
    return [t.contiguous() if t is not None else None for t in tensors]


def zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    """The incoming gradient ``g`` made contiguous, or zeros like ``like`` when autograd gives None."""
    return torch.zeros_like(like, memory_format=torch.contiguous_format) if g is None else g.contiguous()


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd records a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eps_rows(eps: Union[float, Tensor], x: Tensor) -> Tensor:
    """eps (a float or (B,)) as a contiguous (B,) tensor of x's dtype and device."""
    return torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0]).contiguous()
