"""The process-wide defaults of the ops: which backend runs them and how precise their dot products are.

Backends: ``torch`` (pure PyTorch, the reference, runs anywhere), ``triton`` (kernels/), ``cuda``
(csrc/), and ``auto``. The default comes from :func:`set_backend`, else the environment variable
``CURE_FAST_BACKEND``, else ``auto``; :mod:`cure_fast.ops.registry` resolves it per call.

Precision (:func:`set_precision`, or ``precision=`` per call): ``ieee`` (default) computes fp32 dot
products in IEEE fp32, the mode certificates need; ``tf32`` lets them use TF32 tensor cores and
``bf16`` rounds their inputs to bfloat16, both with fp32 accumulation, for training. The
``triton`` and ``cuda`` backends use ``tf32`` / ``bf16`` in their kernels; the ``torch`` backend
computes ``ieee`` calls in IEEE fp32 whatever torch's precision settings (:func:`library_precision`) and
otherwise follows them.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Optional, Tuple

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


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend: one of ``torch``, ``triton``, ``cuda``, ``auto``; None goes
    back to ``$CURE_FAST_BACKEND`` (``auto`` when unset)."""
    global _default
    _default = None if name is None else check_backend(name, "set_backend")


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


_PER_BACKEND = hasattr(torch._C, "_get_fp32_precision_getter")  # torch 2.9+: per-library fp32_precision
_LIBRARY = {"cuda": "cuda", "cpu": "mkldnn"}  # torch's name for the settings of each device type's libraries
_OPS = ("matmul", "conv", "rnn")
_LOCK = threading.RLock()  # the settings are process-wide: one thread's block at a time


def _fp32_precision(library: str, op: str) -> str:
    """The precision torch uses for ``op`` in ``library`` (its getter resolves "none" through the
    library's and the global setting; "none" everywhere is IEEE)."""
    value = torch._C._get_fp32_precision_getter(library, op)
    return "ieee" if value == "none" else value


def _op_settings() -> Dict[Tuple[str, str], str]:
    """torch's per-op settings as a user leaves them: "none" where an op follows its library's setting
    (torch reads back the resolved value; writing that back would stop it following)."""
    get = torch._C._get_fp32_precision_getter
    return {(library, op): "none" if get(library, op) == get(library, "all") else get(library, op)
            for library in _LIBRARY.values() for op in _OPS}


def _legacy(getter) -> Optional[object]:
    """A legacy setting, or None where the process mixed it with the per-library ones so that torch
    refuses to read it."""
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def library_precision(tf32: bool, devices: Tuple[str, ...] = ("cuda",)):
    """Inside the block, fp32 matmuls and convolutions of torch's libraries on the device types ``devices``
    ("cuda": cuBLAS and cuDNN, "cpu": oneDNN) in TF32 (``tf32``; CUDA only, the CPU is left as it is)
    or in IEEE fp32 with autocast off, whatever the process set before through torch's legacy settings
    (``allow_tf32``, ``set_float32_matmul_precision``) or its per-library ``fp32_precision`` (a oneDNN
    convolution set to bf16 would make a certificate unsound); restored after the block. The settings
    are process-wide: a second thread's block waits for the first one's end."""
    with _LOCK, contextlib.ExitStack() as stack:
        if not tf32:
            for device in devices:
                if torch.is_autocast_enabled(device):
                    stack.enter_context(torch.autocast(device, enabled=False))
        stack.enter_context((_per_library_precision if _PER_BACKEND else _legacy_precision)(tf32, devices))
        yield


@contextlib.contextmanager
def _per_library_precision(tf32: bool, devices: Tuple[str, ...]):
    """:func:`library_precision`'s settings in torch 2.9+, where torch checks every cuBLAS matmul's setting
    against its legacy matmul precision (and cuDNN's against its legacy flag): both are set."""
    want, cuda = ("tf32" if tf32 else "ieee"), "cuda" in devices
    keys = [(_LIBRARY[d], op) for d in devices if not (tf32 and d == "cpu") for op in _OPS]
    legacy = cudnn = wanted_legacy = None  # torch's legacy values: checked against CUDA's settings only
    if cuda:
        legacy, cudnn = _legacy(torch.get_float32_matmul_precision), _legacy(torch._C._get_cudnn_allow_tf32)
        wanted_legacy = (legacy if legacy in ("high", "medium") else "high") if tf32 else "highest"
    agreed = (legacy, cudnn) == (wanted_legacy, tf32 if cuda else None)
    if agreed and all(_fp32_precision(*key) == want for key in keys):
        yield  # already so (the common case per op): touch nothing
        return
    saved = _op_settings()
    if cuda:  # these calls set the legacy values and some per-op settings, all set just below
        if legacy is None:  # unreadable (a mix): the values consistent with the per-library ones, as torch checks
            legacy = "high" if _fp32_precision("cuda", "matmul") == "tf32" else "highest"
        if cudnn is None:
            cudnn = _fp32_precision("cuda", "conv") == "tf32"
        torch.set_float32_matmul_precision(wanted_legacy)
        torch._C._set_cudnn_allow_tf32(tf32)
    for key, value in saved.items():
        torch._C._set_fp32_precision_setter(*key, want if key in keys else value)
    try:
        yield
    finally:
        if cuda:
            torch.set_float32_matmul_precision(legacy)
            torch._C._set_cudnn_allow_tf32(cudnn)
        for key, value in saved.items():
            torch._C._set_fp32_precision_setter(*key, value)


@contextlib.contextmanager
def _legacy_precision(tf32: bool, devices: Tuple[str, ...]):
    """:func:`library_precision`'s settings for torch before 2.9 (``allow_tf32`` flags and the matmul precision)."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn) if "cuda" in devices else ()
    saved, matmul = [f.allow_tf32 for f in flags], torch.get_float32_matmul_precision()
    for f in flags:
        f.allow_tf32 = tf32
    if not tf32:
        torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        for f, value in zip(flags, saved):
            f.allow_tf32 = value
        torch.set_float32_matmul_precision(matmul)


def flushes_subnormals() -> bool:
    """Whether any of torch's CPU threads flushes subnormal numbers to zero (``torch.set_flush_denormal``
    sets the calling thread's flag; intra-op threads started after it copied it): a product of
    subnormal numbers spread over every thread."""
    size = 2 * 32768 * torch.get_num_threads()  # two grains of torch's parallel loops per thread
    return bool((torch.full((size,), 2.0 ** -140) * 1.0 == 0).any())


@contextlib.contextmanager
def _subnormals_kept():
    """Subnormal numbers kept inside the block: flushing off on this thread, and where other threads
    still flush (their flag cannot be reached from here), the block computed on this thread alone."""
    if not flushes_subnormals():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_flush_denormal(False)
    if flushes_subnormals():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)


_KEEPS_SUBNORMALS: Dict[str, bool] = {}
# The probes of keeps_subnormals: (op, input shape, weight shape); F.linear with a bias is addmm.
_PROBE_OPS = ((torch.matmul, (4, 32), (32, 4)), (torch.bmm, (2, 4, 16), (2, 16, 4)),
              (lambda v, w: torch.nn.functional.linear(v, w, torch.zeros_like(w[:, 0])), (4, 32), (4, 32)),
              (lambda v, w: torch.nn.functional.conv2d(v, w, padding=1), (1, 2, 5, 5), (3, 2, 3, 3)),
              (torch.nn.functional.conv_transpose2d, (1, 3, 5, 5), (3, 2, 3, 3)))
# dtype: (its bits, the exponents of its smallest subnormal and normal numbers, the probes' (input, weight)
# exponents: products that are subnormal, then subnormal inputs whose products are normal).
_PROBE_DTYPES = {torch.float32: (torch.int32, -149, -126, ((-70, -70), (-140, 30))),
                 torch.float64: (torch.int64, -1074, -1022, ((-535, -535), (-1070, 60)))}


def keeps_subnormals(device: torch.device) -> bool:
    """Whether torch's matrix products (matmul, bmm, addmm) and convolutions (forward and transposed) on
    ``device`` keep subnormal numbers in float32 and float64, as results and as inputs: each probed on
    powers of two, the results compared bit for bit with the exact ones (integers: no float arithmetic
    on the host, which may flush them itself)."""
    device = torch.device(device)
    for dtype, (ints, tiniest, normal, exponents) in _PROBE_DTYPES.items():
        for e_input, e_weight in exponents:
            for op, input_shape, weight_shape in _PROBE_OPS:
                count = op(torch.ones(input_shape, dtype=torch.float64), torch.ones(weight_shape, dtype=torch.float64))
                got = op(torch.full(input_shape, 2.0 ** e_input, dtype=dtype, device=device),
                         torch.full(weight_shape, 2.0 ** e_weight, dtype=dtype, device=device)).cpu().view(ints)
                e = e_input + e_weight
                want = (count.long() << (e - tiniest)).to(ints) if e < normal else (count * 2.0 ** e).to(dtype).view(ints)
                if not torch.equal(got, want):
                    return False
    return True


def _require_subnormals(device: torch.device) -> None:
    """A ValueError where ``device`` flushes subnormal numbers (CUDA only: the CPU threads are handled by
    :func:`_subnormals_kept`); probed once per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if str(device) not in _KEEPS_SUBNORMALS:
        _KEEPS_SUBNORMALS[str(device)] = keeps_subnormals(device)
    if not _KEEPS_SUBNORMALS[str(device)]:
        raise ValueError(f"sound bounds on {device}: its matrix products or convolutions flush subnormal numbers "
                         f"to zero, which the rounding-error bounds do not cover; certify on the CPU, or with "
                         f"sound=False (not a certificate)")


@contextlib.contextmanager
def _cudnn_off():
    enabled = torch._C._get_cudnn_enabled()  # not torch.backends.cudnn.enabled: refused after disable_global_flags
    torch._C._set_cudnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_cudnn_enabled(enabled)


@contextlib.contextmanager
def strict(enabled: bool, device: Optional[torch.device] = None):
    """IEEE float32 dot products inside the block when ``enabled``: torch's libraries in IEEE fp32 on the
    CPU and CUDA and autocast off, whatever the process's settings (:func:`library_precision`;
    one thread's block at a time), cuDNN off (its heuristics may pick Winograd or FFT convolutions), and
    subnormal numbers kept (the error bounds count an underflow as at most the smallest subnormal, not
    the smallest normal number): on the CPU by :func:`_subnormals_kept`, on a CUDA ``device`` checked
    (:func:`keeps_subnormals`; a ValueError where it flushes them)."""
    if not enabled:
        yield
        return
    with library_precision(False, ("cpu", "cuda")), _cudnn_off(), _subnormals_kept():
        if device is not None:
            _require_subnormals(device)
        yield


def honoured(precision: str, device: torch.device):
    """Context in which plain torch ops honour ``precision``: IEEE fp32 in torch's libraries for
    ``ieee`` on a CPU or CUDA device (:func:`library_precision`); else torch's own settings."""
    if precision != "ieee" or device.type not in _LIBRARY:
        return contextlib.nullcontext()
    return library_precision(False, (device.type,))
