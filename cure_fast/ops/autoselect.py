"""The measured choice behind ``backend="auto"`` on CUDA devices.

For each (op, argument shapes / dtypes / options, device) key, :func:`choose` runs the whole op
(epilogue included) on every available backend that implements it, with the call's actual
arguments, and keeps the backends whose result matches the ``torch`` backend's within the
tolerance of the dtype and precision. When the call needs gradients it also compares the
gradients of every input that requires them (for one random cotangent), and times forward plus
backward; otherwise the forward. The fastest eligible backend (median of a few runs after a
warm-up, CUDA events) is cached for the process. A backend that raises or disagrees is never
chosen, so an untested or broken kernel cannot slip into a training run through ``auto``.

On the CPU, while ``torch.compile`` traces, or with ``CURE_FAST_AUTOSELECT=0``, :func:`choose`
returns None and the caller falls back to the static order of :mod:`cure_fast.ops.registry`.

The same measurement chooses between a backend's alternative methods for one op
(:func:`choose_method`: the CUDA backend's fused kernels against cuBLAS / cuDNN calls).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

import torch

CANDIDATES = ("cuda", "triton", "torch")
WARMUP = 2
REPEATS = 7

_cache: Dict[Hashable, str] = {}
# Per key, what was measured: {backend: median ms, or the reason it was not eligible}.
measurements: Dict[Hashable, Dict[str, object]] = {}

Runner = Callable[[str], object]  # backend name -> the op's result on that backend


def enabled() -> bool:
    return os.environ.get("CURE_FAST_AUTOSELECT", "1") != "0"


def _describe(value) -> Hashable:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.requires_grad)
    if isinstance(value, dict):
        return tuple(sorted((k, _describe(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_describe(v) for v in value)
    if isinstance(value, float):
        return "float"  # values such as eps change every step; kernels do not depend on them
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return type(value).__name__


def key(op: str, device: torch.device, call_args) -> Hashable:
    """The cache key of a call: the op, the device, and the shapes / dtypes / options of its arguments."""
    return (op, str(device), _describe(call_args))


# Relative precision of the dot products' inputs per precision mode: results of a backend that
# computes in TF32 or bfloat16 differ from an IEEE fp32 reference by a few of these.
_INPUT_EPS = {"ieee": 0.0, "tf32": 2.0 ** -10, "bf16": 2.0 ** -7}


def tolerance(dtype: torch.dtype, precision: str = "ieee") -> Tuple[float, float]:
    """(rtol, atol relative to the reference's largest magnitude) for comparing with the torch backend:
    10x torch.testing's defaults for the dtype (room for summation order), widened to 16 input
    roundings for ``tf32`` / ``bf16`` dot products."""
    base = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
            torch.float64: (1e-7, 1e-7)}.get(dtype, (1.3e-6, 1e-5))
    widen = 16 * _INPUT_EPS.get(precision, 0.0) if dtype != torch.float64 else 0.0
    return max(10 * base[0], widen), max(10 * base[1], widen)


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _matches(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], precision: str) -> bool:
    if len(outs) != len(refs):
        return False
    for o, r in zip(outs, refs):
        if o.shape != r.shape or o.dtype != r.dtype:
            return False
        rtol, atol = tolerance(r.dtype, precision)
        scale = r.abs().max().item() if r.numel() else 0.0
        if not torch.allclose(o, r, rtol=rtol, atol=atol * max(1.0, scale), equal_nan=False):
            return False
    return True


def grad_inputs(call_args) -> List[torch.Tensor]:
    """The tensors among ``call_args`` (nested tuples / lists / dicts) that require gradients, once each."""
    found: Dict[int, torch.Tensor] = {}

    def walk(value):
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                found.setdefault(id(value), value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
    walk(call_args)
    return list(found.values())


class _Trial:
    """One evaluation of the op on a backend: its outputs and, in training, its input gradients."""

    def __init__(self, run: Runner, name: str, inputs: Sequence[torch.Tensor],
                 cotangents: Optional[List[torch.Tensor]] = None):
        self.outputs = _tensors(run(name))
        self.grads: List[torch.Tensor] = []
        if inputs:
            differentiable = [o for o in self.outputs if o.requires_grad]
            if cotangents is None:
                generator = torch.Generator(device=differentiable[0].device).manual_seed(0) if differentiable else None
                cotangents = [torch.randn(o.shape, generator=generator, device=o.device, dtype=o.dtype)
                              for o in differentiable]
            self.cotangents = cotangents
            grads = (torch.autograd.grad(differentiable, inputs, cotangents, retain_graph=True, allow_unused=True)
                     if differentiable else [None] * len(inputs))
            self.grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
        self.outputs = [o.detach() for o in self.outputs]


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` runs after ``warmup`` (CUDA
    events on a CUDA device, ``time.perf_counter`` elsewhere)."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device.type != "cuda":
                start = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - start))
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(run: Runner, names: Iterable[str], device: torch.device, inputs: Sequence[torch.Tensor] = (),
            precision: str = "ieee") -> Dict[str, object]:
    """Median milliseconds per eligible backend in ``names``, or the reason a backend is not eligible.

    ``run(name)`` computes the op on backend ``name``; ``inputs`` are the tensors whose gradients
    are checked and timed (none: forward only, without autograd).
    """
    results: Dict[str, object] = {}
    training = bool(inputs) and torch.is_grad_enabled()
    inputs = list(inputs) if training else []
    with torch.set_grad_enabled(training):
        reference = _Trial(run, "torch", inputs)
        for name in names:
            try:
                trial = _Trial(run, name, inputs, getattr(reference, "cotangents", None))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as e:  # a backend that fails on these arguments is not eligible
                results[name] = f"error: {type(e).__name__}: {e}"
                continue
            if not _matches(trial.outputs, reference.outputs, precision):
                results[name] = "output mismatch against the torch backend"
                continue
            if not _matches(trial.grads, reference.grads, precision):
                results[name] = "gradient mismatch against the torch backend"
                continue
            results[name] = median_ms(lambda: _Trial(run, name, inputs, reference.cotangents) if training
                                       else run(name), device)
    return results


def choose(op: str, names: Sequence[str], device: torch.device, call_args, run: Runner,
           precision: str = "ieee") -> Optional[str]:
    """The fastest correct backend among ``names`` for this call (measured once per key), or None
    to use the static order. ``call_args`` holds the call's arguments (for the key and the
    gradient check); ``run(name)`` computes the op on backend ``name``."""
    if device.type != "cuda" or not enabled() or torch.compiler.is_compiling():
        return None
    k = key(op, device, (call_args, precision, torch.is_grad_enabled()))
    if k not in _cache:
        results = measure(run, names, device, grad_inputs(call_args), precision)
        measurements[k] = results
        timed = {name: ms for name, ms in results.items() if isinstance(ms, float)}
        _cache[k] = min(timed, key=timed.get) if timed else "torch"
    return _cache[k]


def choose_method(key: Hashable, methods: Dict[str, Callable], tensors: Sequence, precision: str,
                  device: torch.device, fallback: str) -> str:
    """The faster of a backend's alternative methods for one op (e.g. a fused kernel or library
    calls), among those whose outputs (and gradients, when the caller records them) agree with
    ``methods["torch"]``; measured once per ``key`` with :func:`measure` and cached beside the
    backend choices. ``fallback`` when none could be timed. Callers skip this under torch.compile."""
    if key not in _cache:
        results = measure(lambda name: methods[name](*tensors), [n for n in methods if n != "torch"], device,
                          grad_inputs(tensors), precision)
        measurements[key] = results
        timed = {name: ms for name, ms in results.items() if isinstance(ms, float)}
        _cache[key] = min(timed, key=timed.get) if timed else fallback
    return _cache[key]


def choices() -> Dict[str, Dict[str, int]]:
    """What was chosen so far, per op: {op: {backend or method: how many call shapes chose it}}."""
    counts: Dict[str, Dict[str, int]] = {}
    for k, chosen in _cache.items():
        per_op = counts.setdefault(k[0], {})
        per_op[chosen] = per_op.get(chosen, 0) + 1
    return counts


def clear() -> None:
    """Forget every measured choice."""
    _cache.clear()
    measurements.clear()
