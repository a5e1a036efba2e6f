"""Helpers shared by the kernels: interpreter mode, precision flags, autotune lists, output
allocation, torch.library registration, and small Triton device functions."""

import functools
import os
import warnings
from typing import Callable, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# On a GPU tl.dot reads float32 tiles as TF32 by dropping their low 13 bits (a bias in every product's
# sign direction, which grows with the reduction length); cuBLAS rounds. The interpreter multiplies in
# full float32, so there the tiles stay as they are.
ROUND_TF32 = tl.constexpr(not INTERPRET)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Tests set this: every output then starts as NaN, so an element a kernel fails to write shows up.
POISON = False


def empty(shape: Sequence[int], like: torch.Tensor, dtype: torch.dtype = None) -> torch.Tensor:
    """A new output tensor (contiguous) on ``like``'s device; NaN-filled when :data:`POISON` is set."""
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=like.device)
    return torch.empty(tuple(shape), dtype=dtype, device=like.device)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a kernel on ``dtype`` inputs: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_flags(dtype: torch.dtype, precision: str) -> dict:
    """The ``DOT`` (tl.dot input_precision) and ``BF16`` kernel flags for ``precision`` on ``dtype`` inputs.

    fp32 inputs: ``ieee`` (IEEE fp32 products), ``tf32`` (TF32 tensor cores) or ``bf16`` (tiles
    rounded to bfloat16); fp32 accumulation in every case. fp64 is always IEEE; fp16 / bf16 inputs
    multiply in their own type.
    """
    if precision not in ("ieee", "tf32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose one of ieee, tf32, bf16")
    if dtype == torch.float32:
        return dict(DOT="tf32" if precision == "bf16" else precision, BF16=precision == "bf16")
    return dict(DOT="ieee" if dtype == torch.float64 else "tf32", BF16=False)


def autotune(configs: List[triton.Config], key: List[str], interpreter: triton.Config):
    """``triton.autotune`` over ``configs`` (the first one a sound default) keyed on model dimensions.
    Under TRITON_INTERPRET=1 the single ``interpreter`` config; with CURE_FAST_AUTOTUNE=0 the first
    config only (no tuning runs, one compilation per variant: tests)."""
    if INTERPRET:
        configs = [interpreter]
    elif os.environ.get("CURE_FAST_AUTOTUNE") == "0":
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key)


def _on_the_inputs_device(fn: Callable) -> Callable:
    """``fn`` run with its first tensor's GPU as the current device: a Triton launch goes to the current
    device, whatever its tensors' (an illegal address on another GPU)."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda" or first.device.index in (None, torch.cuda.current_device()):
            return fn(*args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(*args, **kwargs)
    return run


def library_op(name: str, fake: Callable):
    """Decorator: the launcher becomes the op ``cure_fast::<name>``, traceable by torch.compile.

    On a GPU it is a ``torch.library.triton_op`` (Inductor sees the kernels inside); under the
    interpreter or a torch without triton_op, an opaque ``custom_op`` whose output shapes come from
    ``fake`` (a function with the launcher's signature that only allocates the outputs).
    """
    def wrap(fn: Callable):
        fn = _on_the_inputs_device(fn)
        if hasattr(torch.library, "triton_op") and not INTERPRET:
            return torch.library.triton_op(f"cure_fast::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"cure_fast::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return wrap


def launch(kernel):
    """``kernel`` as called inside a :func:`library_op`: wrapped by ``torch.library.wrap_triton``
    on a GPU so that tracing sees it."""
    if INTERPRET or not hasattr(torch.library, "wrap_triton"):
        return kernel
    return torch.library.wrap_triton(kernel)


def check_inputs(op: str, *tensors: torch.Tensor) -> None:
    """Every tensor (None skipped) floating, of one supported dtype and on one device."""
    tensors = [t for t in tensors if t is not None]
    first = tensors[0]
    if first.dtype not in DTYPES:
        raise TypeError(f"{op} (triton): dtype {first.dtype} is not supported; use one of "
                        f"{', '.join(str(d) for d in DTYPES)}")
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"{op} (triton): every tensor must be {first.dtype} on {first.device}, "
                             f"got {t.dtype} on {t.device}")
    if first.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"{op} (triton): needs CUDA tensors (or TRITON_INTERPRET=1), got {first.device}")


# The least work (reduction items) per piece of a split reduction; tests lower it to exercise splits.
MIN_SPLIT_WORK = 1024


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits(work: int, tiles: int, device: torch.device) -> int:
    """How many pieces to cut a reduction of ``work`` items into, over ``tiles`` output tiles, so
    that the grid fills the device (about 4 programs per SM, one SM off the GPU) with at least
    :data:`MIN_SPLIT_WORK` items each."""
    sms = 1
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(triton.cdiv(4 * sms, max(tiles, 1)), work // MIN_SPLIT_WORK))


_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value}")
    return int(value[0]), int(value[1])


@triton.jit
def load(ptr, mask, FP64: tl.constexpr):
    """Masked load (0 where masked) in the compute type: float64 for float64 data, else float32."""
    x = tl.load(ptr, mask=mask, other=0.0)
    if not FP64:
        x = x.to(tl.float32)
    return x


@triton.jit
def acc_zeros(SIZE: tl.constexpr, FP64: tl.constexpr):
    """A [SIZE] accumulator of zeros in the compute type: float64 for float64 data, else float32."""
    if FP64:
        acc = tl.zeros([SIZE], dtype=tl.float64)
    else:
        acc = tl.zeros([SIZE], dtype=tl.float32)
    return acc


@triton.jit
def relu(x):
    """``max(x, 0)`` that keeps NaN, like torch.relu."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def interval_relu(c, r):
    """The interval ReLU in centre–radius form: ``((relu(u) + relu(l)) / 2, (relu(u) - relu(l)) / 2)``."""
    lo = relu(c - r)
    hi = relu(c + r)
    return (hi + lo) * 0.5, (hi - lo) * 0.5


@triton.jit
def interval_relu_grad(c, r, gc, gr):
    """Gradients of :func:`interval_relu` given those of its outputs. (c, r) may be the ReLU's input
    or its output: ``l > 0`` and ``u > 0`` read the same on both (but where rounding already hid
    ``l`` in the output's centre and radius)."""
    g_lo = tl.where(c - r > 0, (gc - gr) * 0.5, 0.0)
    g_hi = tl.where(c + r > 0, (gc + gr) * 0.5, 0.0)
    return g_hi + g_lo, g_hi - g_lo


@triton.jit
def sqrt_nearest(x):
    """The square root rounded to nearest, as torch's (``tl.sqrt`` is a fast approximation in float32); a
    float32 input below the smallest normal number reads as 0 on a GPU (Triton flushes subnormals there)."""
    if x.dtype == tl.float32:
        x = tl.sqrt_rn(x)
    else:
        x = tl.sqrt(x)
    return x


@triton.jit
def round_to_tf32(x):
    """float32 ``x`` rounded to the nearest TF32 value (10 mantissa bits, ties away from zero: PTX
    ``cvt.rna.tf32.f32``), as a float32 with its low 13 bits zero; NaN stays NaN, overflow gives inf."""
    bits = tl.where(x == x, x.to(tl.uint32, bitcast=True), 0)  # NaN bits could overflow the add
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def dot(a, b, acc, DOT: tl.constexpr, BF16: tl.constexpr):
    """``acc + a @ b``, the tiles rounded to bfloat16 first when ``BF16``, to TF32 when ``DOT`` is "tf32"
    (on a GPU: see :data:`ROUND_TF32`)."""
    if BF16:
        a = a.to(tl.bfloat16)
        b = b.to(tl.bfloat16)
    elif DOT == "tf32" and ROUND_TF32 and a.dtype == tl.float32:
        a = round_to_tf32(a)
        b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=DOT)


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0)).to(x.dtype)
