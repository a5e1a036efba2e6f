"""The measured choice behind ``backend="auto"`` on CUDA devices.

For each (op, argument shapes / dtypes / options, device) key, :func:`choose` runs every available
backend that implements the op on the actual arguments, keeps those whose result matches the
``torch`` reference within the dtype's tolerance, times them with CUDA events (median of a few runs
after warm-up, forward only, no grad) and caches the fastest for the process. On the CPU, while
``torch.compile`` traces, or with ``CURE_FAST_AUTOSELECT=0``, it returns None and the caller falls
back to the static order of :mod:`cure_fast.backends`.
"""
from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, Hashable, List, Optional, Tuple

import torch

CANDIDATES = ("cuda", "triton", "torch")
WARMUP = 2
REPEATS = 7

_cache: Dict[Hashable, str] = {}
# Per key, what was measured: {backend: median ms, or the reason it was not eligible}.
measurements: Dict[Hashable, Dict[str, object]] = {}


def enabled() -> bool:
    return os.environ.get("CURE_FAST_AUTOSELECT", "1") != "0"


def prepare(device: torch.device) -> None:
    """Register the CUDA backend's ops (on CUDA devices, once); makes no CUDA call."""
    if device.type == "cuda":
        from . import _cuda
        _cuda.register_ops()


def _describe(value) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return type(value).__name__


def key(op: str, device: torch.device, args: tuple, kwargs: dict) -> Hashable:
    return (op, str(device), _describe(args), tuple(sorted((k, _describe(v)) for k, v in kwargs.items())))


def _tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol): 10x torch.testing's defaults for the dtype (room for TF32 / summation order)."""
    base = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
            torch.float64: (1e-7, 1e-7)}.get(dtype, (1.3e-6, 1e-5))
    return 10 * base[0], 10 * base[1]


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _matches(out, ref) -> bool:
    outs, refs = _tensors(out), _tensors(ref)
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if o.shape != r.shape or o.dtype != r.dtype:
            return False
        rtol, atol = _tolerance(r.dtype)
        scale = r.abs().max().item() if r.numel() else 0.0
        if not torch.allclose(o, r, rtol=rtol, atol=atol * max(1.0, scale), equal_nan=False):
            return False
    return True


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    with torch.cuda.device(device):
        for _ in range(WARMUP):
            fn()
        times = []
        for _ in range(REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(op: str, impls: Dict[str, Callable], device: torch.device, args: tuple, kwargs: dict,
            available: Callable[[str], bool]) -> Dict[str, object]:
    """Median milliseconds per eligible backend, or the reason a backend is not eligible."""
    results: Dict[str, object] = {}
    with torch.no_grad():
        reference = impls["torch"](*args, **kwargs)
        for name in CANDIDATES:
            if name not in impls or not available(name):
                continue
            impl = impls[name]
            try:
                out = impl(*args, **kwargs)
                torch.cuda.synchronize(device)
            except Exception as e:  # a backend that fails on these arguments is not eligible
                results[name] = f"error: {type(e).__name__}: {e}"
                continue
            if not _matches(out, reference):
                results[name] = "mismatch against the torch reference"
                continue
            results[name] = _median_ms(lambda: impl(*args, **kwargs), device)
    return results


def choose(op: str, impls: Dict[str, Callable], device: torch.device, args: tuple, kwargs: Optional[dict],
           available: Callable[[str], bool]) -> Optional[str]:
    """The fastest correct backend for this call (measured once per key), or None to use the static order."""
    kwargs = kwargs or {}
    if device.type != "cuda" or not enabled() or torch.compiler.is_compiling():
        return None
    k = key(op, device, args, kwargs)
    if k not in _cache:
        results = measure(op, impls, device, args, kwargs, available)
        measurements[k] = results
        timed = {name: ms for name, ms in results.items() if isinstance(ms, float)}
        _cache[k] = min(timed, key=timed.get) if timed else "torch"
    return _cache[k]


def clear() -> None:
    """Forget every measured choice."""
    _cache.clear()
    measurements.clear()
