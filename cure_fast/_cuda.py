"""The CUDA C++ backend: the extension ``cure_fast._C`` (built from csrc/ by setup.py) as torch.library ops.

Every kernel entry point is a ``torch.library.custom_op`` with a fake (meta) implementation, so
``torch.compile`` traces through it, and an autograd formula (``register_autograd``) built from the
backward kernels. The public functions at the bottom have the signatures of
:mod:`cure_fast.functional`'s ops and become its ``cuda`` implementations through
:func:`register_ops` (called on the first dispatch on a CUDA device; importing this module makes no
CUDA call). Dot products honour ``precision``: ``ieee`` (fp32 FMA, certification), ``tf32`` and
``bf16`` (tensor cores with fp32 accumulation); fp64 is always IEEE, fp16 / bf16 inputs use tensor
cores in their own type.
"""
import functools
import importlib
from typing import Callable, Dict, Hashable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autoselect, backends, reference

_REBUILD = ("rebuild with `CURE_FAST_BUILD_CUDA=1 pip install -e . --no-deps --no-build-isolation` "
            "(CUDA_HOME must point at the CUDA toolkit)")

# Entry points this module needs from the extension; an extension without one of them is stale.
ENTRY_POINTS = ("interval_relu_forward", "interval_relu_backward", "interval_linear_forward",
                "interval_linear_grad_input", "interval_linear_grad_weight", "interval_conv2d_forward",
                "interval_conv2d_grad_input", "interval_conv2d_grad_weight", "l2_conv2d_forward",
                "channel_epilogue_forward", "channel_epilogue_backward", "channel_moments", "margins_linear",
                "l2_row_norms", "set_poison")


@functools.cache
def extension():
    """The compiled extension ``cure_fast._C``, imported on first use."""
    try:
        ext = importlib.import_module("cure_fast._C")
    except ImportError as e:
        state = "was not built" if isinstance(e, ModuleNotFoundError) else "is stale or broken"
        raise RuntimeError(f"cure_fast._C {state} ({e}); {_REBUILD}") from e
    missing = [name for name in ENTRY_POINTS if not hasattr(ext, name)]
    if missing:
        raise RuntimeError(f"cure_fast._C is stale (it lacks {', '.join(missing)}); {_REBUILD}")
    return ext


def available() -> bool:
    """True when the extension imports and a CUDA device is present."""
    try:
        extension()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def set_poison(on: bool) -> None:
    """Test hook: while on, every output of the extension starts as NaN (an unwritten element shows up)."""
    extension().set_poison(bool(on))


def _empty(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _contiguous(*tensors: Optional[Tensor]) -> List[Optional[Tensor]]:
    """The tensors made contiguous (None stays None)."""
    return [t.contiguous() if t is not None else None for t in tensors]


def _zeros_if_none(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like, memory_format=torch.contiguous_format) if g is None else g.contiguous()


# ---------------------------------------------------------------------------------------------
# Interval ReLU

@torch.library.custom_op("cure_fast::interval_relu_cuda", mutates_args=())
def _interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    return extension().interval_relu_forward(c.contiguous(), r.contiguous())


@_interval_relu.register_fake
def _(c, r):
    return _empty(c), _empty(r)


@torch.library.custom_op("cure_fast::interval_relu_cuda_backward", mutates_args=())
def _interval_relu_backward(c: Tensor, r: Tensor, grad_c_out: Tensor, grad_r_out: Tensor) -> Tuple[Tensor, Tensor]:
    return extension().interval_relu_backward(c.contiguous(), r.contiguous(), grad_c_out.contiguous(),
                                              grad_r_out.contiguous())


@_interval_relu_backward.register_fake
def _(c, r, grad_c_out, grad_r_out):
    return _empty(c), _empty(r)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_c_out, grad_r_out):
    c, r = ctx.saved_tensors
    return _interval_relu_backward(c, r, _zeros_if_none(grad_c_out, c), _zeros_if_none(grad_r_out, r))


_interval_relu.register_autograd(_backward, setup_context=_setup_context)


def interval_relu(c: Tensor, r: Tensor) -> Tuple[Tensor, Tensor]:
    """ReLU of the interval ``(c, r)`` with the CUDA kernel (differentiable, traceable by torch.compile).

    c: (N, *) centres; r: (M, *) radii, M <= N, of the last M rows of c (the first N - M rows are
    points). Returns c_out (N, *) and r_out (M, *): ``(relu(u) + relu(l)) / 2`` and
    ``(relu(u) - relu(l)) / 2`` with ``l = c - r``, ``u = c + r``; ``relu(c)`` on point rows.
    float32, float64, float16 or bfloat16, on one CUDA device; computed in float32 (float64 for float64).
    """
    return _interval_relu(c, r)


# ---------------------------------------------------------------------------------------------
# Per-channel epilogue: (x + bias) * scale + shift, r * |scale|, interval ReLU

@torch.library.custom_op("cure_fast::channel_epilogue_cuda", mutates_args=())
def _channel_epilogue(xc: Tensor, xr: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                      shift: Optional[Tensor], relu: bool) -> Tuple[Tensor, Tensor]:
    return extension().channel_epilogue_forward(xc, xr, bias, scale, shift, relu)


@_channel_epilogue.register_fake
def _(xc, xr, bias, scale, shift, relu):
    return _empty(xc), _empty(xr)


@torch.library.custom_op("cure_fast::channel_epilogue_cuda_backward", mutates_args=())
def _channel_epilogue_backward(xc: Tensor, xr: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                               shift: Optional[Tensor], relu: bool, grad_c_out: Tensor,
                               grad_r_out: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return extension().channel_epilogue_backward(xc, xr, bias, scale, shift, relu, grad_c_out.contiguous(),
                                                 grad_r_out.contiguous())


@_channel_epilogue_backward.register_fake
def _(xc, xr, bias, scale, shift, relu, grad_c_out, grad_r_out):
    return _empty(xc), _empty(xr), xc.new_empty((2, xc.shape[1]))


def _epilogue_param_grads(sums: Tensor, bias, scale, shift, needs) -> Tuple[Optional[Tensor], ...]:
    """(d bias, d scale, d shift) from the kernel's per-channel sums (see channel_epilogue_backward)."""
    d_shift = sums[0]
    d_bias = d_shift * scale if scale is not None else d_shift
    return (d_bias if bias is not None and needs[0] else None,
            sums[1] if scale is not None and needs[1] else None,
            d_shift if shift is not None and needs[2] else None)


def _channel_epilogue_setup(ctx, inputs, output):
    xc, xr, bias, scale, shift, relu = inputs
    ctx.relu = relu
    ctx.save_for_backward(xc, xr, bias, scale, shift)


def _channel_epilogue_grad(ctx, grad_c_out, grad_r_out):
    xc, xr, bias, scale, shift = ctx.saved_tensors
    g_xc, g_xr, sums = _channel_epilogue_backward(xc, xr, bias, scale, shift, ctx.relu,
                                                  _zeros_if_none(grad_c_out, xc), _zeros_if_none(grad_r_out, xr))
    return (g_xc, g_xr, *_epilogue_param_grads(sums, bias, scale, shift, ctx.needs_input_grad[2:5]), None)


_channel_epilogue.register_autograd(_channel_epilogue_grad, setup_context=_channel_epilogue_setup)


def interval_affine(c: Tensor, r: Tensor, scale: Tensor, shift: Tensor, *, relu: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-channel affine ``c * scale + shift``, ``r * |scale|`` (channels on dim 1), then the interval
    ReLU when ``relu``, in one kernel; its backward gives the scale / shift gradients in one more."""
    return _channel_epilogue(c.contiguous(), r.contiguous(), None, scale.contiguous(), shift.contiguous(), relu)


# ---------------------------------------------------------------------------------------------
# Interval linear: the fused interval GEMM

@torch.library.custom_op("cure_fast::interval_linear_cuda", mutates_args=())
def _interval_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                     shift: Optional[Tensor], relu: bool, precision: str,
                     save_pre: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return extension().interval_linear_forward(c, r, weight, bias, scale, shift, relu, precision, save_pre)


@_interval_linear.register_fake
def _(c, r, weight, bias, scale, shift, relu, precision, save_pre):
    out = weight.shape[0]
    pre_c = c.new_empty((c.shape[0], out) if save_pre else (0,))
    pre_r = c.new_empty((r.shape[0], out) if save_pre else (0,))
    return c.new_empty((c.shape[0], out)), c.new_empty((r.shape[0], out)), pre_c, pre_r


@torch.library.custom_op("cure_fast::interval_linear_cuda_grad_input", mutates_args=())
def _linear_grad_input(grad_c: Tensor, grad_r: Tensor, weight: Tensor, precision: str) -> Tuple[Tensor, Tensor]:
    return extension().interval_linear_grad_input(grad_c, grad_r, weight, precision)


@_linear_grad_input.register_fake
def _(grad_c, grad_r, weight, precision):
    return grad_c.new_empty((grad_c.shape[0], weight.shape[1])), grad_c.new_empty((grad_r.shape[0], weight.shape[1]))


@torch.library.custom_op("cure_fast::interval_linear_cuda_grad_weight", mutates_args=())
def _linear_grad_weight(grad_c: Tensor, grad_r: Tensor, c: Tensor, r: Tensor, weight: Tensor,
                        precision: str) -> Tensor:
    return extension().interval_linear_grad_weight(grad_c, grad_r, c, r, weight, precision)


@_linear_grad_weight.register_fake
def _(grad_c, grad_r, c, r, weight, precision):
    return _empty(weight)


def _has_epilogue(scale, shift, relu) -> bool:
    return scale is not None or shift is not None or relu


def _linear_setup(ctx, inputs, output):
    c, r, weight, bias, scale, shift, relu, precision, save_pre = inputs
    pre_c, pre_r = output[2], output[3]
    ctx.relu, ctx.precision = relu, precision
    ctx.has_pre = save_pre
    ctx.save_for_backward(c, r, weight, bias, scale, shift, pre_c, pre_r)


def _linear_grad(ctx, grad_c_out, grad_r_out, _grad_pre_c, _grad_pre_r):
    c, r, weight, bias, scale, shift, pre_c, pre_r = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_c_out = _zeros_if_none(grad_c_out, c.new_empty((c.shape[0], weight.shape[0])))
    grad_r_out = _zeros_if_none(grad_r_out, c.new_empty((r.shape[0], weight.shape[0])))
    d_bias = d_scale = d_shift = None
    if _has_epilogue(scale, shift, ctx.relu):
        if not ctx.has_pre:  # the accumulators were not kept: recompute them
            pre_c, pre_r = _interval_linear(c, r, weight, None, None, None, False, ctx.precision, False)[:2]
        g_c, g_r, sums = _channel_epilogue_backward(pre_c, pre_r, bias, scale, shift, ctx.relu, grad_c_out, grad_r_out)
        d_bias, d_scale, d_shift = _epilogue_param_grads(sums, bias, scale, shift, need[3:6])
    else:
        g_c, g_r = grad_c_out, grad_r_out
        if bias is not None and need[3]:
            d_bias = g_c.sum(0)
    d_c = d_r = d_w = None
    if need[0] or need[1]:
        d_c, d_r = _linear_grad_input(g_c, g_r, weight, ctx.precision)
    if need[2]:
        d_w = _linear_grad_weight(g_c, g_r, c, r, weight, ctx.precision)
    return d_c, d_r, d_w, d_bias, d_scale, d_shift, None, None, None


_interval_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# method="auto" of the affine ops: the fused kernel or library calls for the two products, measured
# per call key. Per key: the method chosen, and what was measured ({method: median ms, or why not}).
_method_choice: Dict[Hashable, str] = {}
method_measurements: Dict[Hashable, Dict[str, object]] = {}


def _choose_method(key: Hashable, methods: Dict[str, Callable], tensors: List[Optional[Tensor]], precision: str,
                   device: torch.device, fused: str, library: str) -> str:
    """The faster method for this key among those whose outputs (and gradients, when the caller
    records them) agree with the torch backend (``methods["torch"]``), measured once by
    :func:`autoselect.measure` and cached; ``fused`` while torch.compile traces (nothing is measured
    then), ``library`` when no method could be timed."""
    if torch.compiler.is_compiling():
        return fused
    if key not in _method_choice:
        results = autoselect.measure(lambda name: methods[name](*tensors), [n for n in methods if n != "torch"],
                                     device, autoselect.grad_inputs(tensors), precision)
        method_measurements[key] = results
        timed = {name: ms for name, ms in results.items() if isinstance(ms, float)}
        _method_choice[key] = min(timed, key=timed.get) if timed else library
    return _method_choice[key]


LINEAR_METHODS = ("auto", "fused_gemm", "cublas")


def _linear_fused(c, r, weight, bias, scale, shift, *, relu, precision):
    opt = _contiguous(bias, scale, shift)
    save_pre = _has_epilogue(scale, shift, relu) and _needs_grad(c, r, weight, *opt)
    return _interval_linear(c.contiguous(), r.contiguous(), weight.contiguous(), *opt, relu, precision, save_pre)[:2]


def _linear_cublas(c, r, weight, bias, scale, shift, *, relu, precision):
    """The two products from cuBLAS (one strided batched GEMM of ``[c; r]`` against ``[W; |W|]``
    when every row has a radius, else two GEMMs), then the fused epilogue kernel."""
    with backends.library_tf32(precision != "ieee"):  # bf16 runs as TF32 here
        if r.shape[0] == c.shape[0] and c.shape[0] > 0:
            xc, xr = torch.bmm(torch.stack([c, r]), torch.stack([weight, weight.abs()]).transpose(1, 2)).unbind(0)
        else:
            xc, xr = c @ weight.t(), r @ weight.abs().t()
    opt = _contiguous(bias, scale, shift)
    return _channel_epilogue(xc, xr, *opt, relu)


def _linear_torch(c, r, weight, bias, scale, shift, *, relu, precision):
    """The torch backend's result for the same call: the reference the methods are checked against."""
    from . import functional
    with backends.library_tf32(precision != "ieee"):
        out = reference.interval_linear_ref(c, r, weight, bias)
    return functional._epilogue(out, scale, shift, relu, -1, "torch")


def interval_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    precision: str = "ieee", method: str = "auto") -> Tuple[Tensor, Tensor]:
    """Interval linear layer: ``((c W^T + b) * scale + shift, r |W|^T * |scale|)``, then the interval
    ReLU if ``relu``. c (N, *, in), r (M, *, in) the radii of c's last M rows, weight (out, in),
    bias / scale / shift (out,) or None -> (N, *, out), (M, *, out).

    ``method``: ``"fused_gemm"`` runs one kernel that reads each weight tile once for both products
    and applies bias / scale / shift / ReLU on the accumulators; ``"cublas"`` runs the products as
    cuBLAS calls and the epilogue as one more kernel; ``"auto"`` measures both on the first call per
    shape / dtype / precision / device and keeps the faster of those that agree with the torch
    backend (outputs, and gradients when they are recorded).
    """
    if method not in LINEAR_METHODS:
        raise ValueError(f"interval_linear: method must be one of {LINEAR_METHODS}, got {method!r}")
    features, out = c.shape[-1], weight.shape[0]
    rows = [t.reshape(t.shape[:-1].numel(), features) for t in (c, r)]  # (no -1: features may be 0)
    tensors = [*rows, weight, bias, scale, shift]
    options = dict(relu=relu, precision=precision)
    methods = {"fused_gemm": functools.partial(_linear_fused, **options),
               "cublas": functools.partial(_linear_cublas, **options),
               "torch": functools.partial(_linear_torch, **options)}
    if method == "auto":
        key = autoselect.key("interval_linear", c.device, (tensors, relu, precision, torch.is_grad_enabled()))
        method = _choose_method(key, methods, tensors, precision, c.device, "fused_gemm", "cublas")
    c_out, r_out = methods[method](*tensors)
    return c_out.view(*c.shape[:-1], out), r_out.view(*r.shape[:-1], out)


# ---------------------------------------------------------------------------------------------
# Interval conv2d: one implicit GEMM (forward, input and weight gradients), or cuDNN for the two
# products and the fused epilogue kernel after them

_MAX_INDEX = 2 ** 31 - 1  # the implicit GEMM decomposes pixel and tap indices in 32 bits
CONV_METHODS = ("auto", "implicit_gemm", "cudnn")


def _pair(value) -> Optional[List[int]]:
    if isinstance(value, int):
        return [value, value]
    value = [int(v) for v in value]
    return value if len(value) == 2 else None


def _conv_out_size(image, weight: Tensor, stride, padding, dilation) -> List[int]:
    return [(size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(image, weight.shape[2:], stride, padding, dilation)]


def _implicit_geometry(x: Tensor, weight: Tensor, stride, padding, dilation,
                       groups: int) -> Optional[Tuple[List[int], List[int], List[int]]]:
    """(stride, padding, dilation) as [height, width] lists for the implicit-GEMM kernels, or None
    when they cannot run this convolution: groups > 1, padding "same" with an odd kernel span (torch
    pads the extra pixel at the bottom / right only), a kernel that does not fit the padded input,
    or pixel / tap counts beyond int32."""
    stride, dilation = _pair(stride), _pair(dilation)
    if groups != 1 or stride is None or dilation is None or x.dim() != 4 or weight.dim() != 4:
        return None
    spans = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        if stride != [1, 1] or any(span % 2 for span in spans):
            return None
        padding = [span // 2 for span in spans]
    else:
        padding = _pair(padding)
    if padding is None or min(stride + dilation) < 1 or min(padding) < 0:
        return None
    image = list(x.shape[2:])
    out = _conv_out_size(image, weight, stride, padding, dilation)
    if min(image + out) < 1 or min(weight.shape[1:]) < 1:
        return None
    taps = weight.shape[2] * weight.shape[3]
    if (x.shape[0] * max(image[0] * image[1], out[0] * out[1]) > _MAX_INDEX
            or max(weight.shape[0], weight.shape[1]) * taps > _MAX_INDEX):
        return None
    return stride, padding, dilation


@torch.library.custom_op("cure_fast::interval_conv2d_cuda", mutates_args=())
def _interval_conv2d(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                     shift: Optional[Tensor], relu: bool, stride: List[int], padding: List[int], dilation: List[int],
                     precision: str, save_pre: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return extension().interval_conv2d_forward(c, r, weight, bias, scale, shift, relu, stride, padding, dilation,
                                               precision, save_pre)


@_interval_conv2d.register_fake
def _(c, r, weight, bias, scale, shift, relu, stride, padding, dilation, precision, save_pre):
    out = (weight.shape[0], *_conv_out_size(c.shape[2:], weight, stride, padding, dilation))
    pre_c = c.new_empty((c.shape[0], *out) if save_pre else (0,))
    pre_r = c.new_empty((r.shape[0], *out) if save_pre else (0,))
    return c.new_empty((c.shape[0], *out)), c.new_empty((r.shape[0], *out)), pre_c, pre_r


@torch.library.custom_op("cure_fast::interval_conv2d_cuda_grad_input", mutates_args=())
def _conv_grad_input(grad_c: Tensor, grad_r: Tensor, weight: Tensor, input_size: List[int], stride: List[int],
                     padding: List[int], dilation: List[int], precision: str) -> Tuple[Tensor, Tensor]:
    return extension().interval_conv2d_grad_input(grad_c.contiguous(), grad_r.contiguous(), weight, input_size,
                                                  stride, padding, dilation, precision)


@_conv_grad_input.register_fake
def _(grad_c, grad_r, weight, input_size, stride, padding, dilation, precision):
    return (grad_c.new_empty((grad_c.shape[0], weight.shape[1], *input_size)),
            grad_c.new_empty((grad_r.shape[0], weight.shape[1], *input_size)))


@torch.library.custom_op("cure_fast::interval_conv2d_cuda_grad_weight", mutates_args=())
def _conv_grad_weight(grad_c: Tensor, grad_r: Tensor, c: Tensor, r: Tensor, weight: Tensor, stride: List[int],
                      padding: List[int], dilation: List[int], precision: str) -> Tensor:
    return extension().interval_conv2d_grad_weight(grad_c.contiguous(), grad_r.contiguous(), c, r, weight, stride,
                                                   padding, dilation, precision)


@_conv_grad_weight.register_fake
def _(grad_c, grad_r, c, r, weight, stride, padding, dilation, precision):
    return _empty(weight)


def _conv_setup(ctx, inputs, output):
    c, r, weight, bias, scale, shift, relu, stride, padding, dilation, precision, save_pre = inputs
    ctx.relu, ctx.precision, ctx.has_pre = relu, precision, save_pre
    ctx.geometry = (stride, padding, dilation)
    ctx.save_for_backward(c, r, weight, bias, scale, shift, output[2], output[3])


def _conv_grad(ctx, grad_c_out, grad_r_out, _grad_pre_c, _grad_pre_r):
    c, r, weight, bias, scale, shift, pre_c, pre_r = ctx.saved_tensors
    need = ctx.needs_input_grad
    out = (weight.shape[0], *_conv_out_size(c.shape[2:], weight, *ctx.geometry))
    grad_c_out = _zeros_if_none(grad_c_out, c.new_empty((c.shape[0], *out)))
    grad_r_out = _zeros_if_none(grad_r_out, c.new_empty((r.shape[0], *out)))
    d_bias = d_scale = d_shift = None
    if _has_epilogue(scale, shift, ctx.relu):
        if not ctx.has_pre:  # the accumulators were not kept: recompute them
            pre_c, pre_r = _interval_conv2d(c, r, weight, None, None, None, False, *ctx.geometry, ctx.precision,
                                            False)[:2]
        g_c, g_r, sums = _channel_epilogue_backward(pre_c, pre_r, bias, scale, shift, ctx.relu, grad_c_out, grad_r_out)
        d_bias, d_scale, d_shift = _epilogue_param_grads(sums, bias, scale, shift, need[3:6])
    else:
        g_c, g_r = grad_c_out, grad_r_out
        if bias is not None and need[3]:
            d_bias = g_c.sum((0, 2, 3))
    d_c = d_r = d_w = None
    if need[0] or need[1]:
        d_c, d_r = _conv_grad_input(g_c, g_r, weight, list(c.shape[2:]), *ctx.geometry, ctx.precision)
    if need[2]:
        d_w = _conv_grad_weight(g_c, g_r, c, r, weight, *ctx.geometry, ctx.precision)
    return d_c, d_r, d_w, d_bias, d_scale, d_shift, None, None, None, None, None, None


_interval_conv2d.register_autograd(_conv_grad, setup_context=_conv_setup)


def _conv_implicit_gemm(c, r, weight, bias, scale, shift, *, geometry, relu, precision):
    opt = _contiguous(bias, scale, shift)
    save_pre = _has_epilogue(scale, shift, relu) and _needs_grad(c, r, weight, *opt)
    return _interval_conv2d(c.contiguous(), r.contiguous(), weight.contiguous(), *opt, relu, *geometry, precision,
                            save_pre)[:2]


def _conv_cudnn(c, r, weight, bias, scale, shift, *, stride, padding, dilation, groups, relu, precision):
    out = weight.shape[0]
    with backends.library_tf32(precision != "ieee"):  # bf16 runs as TF32 here
        if groups == 1 and r.shape[0] == c.shape[0] and c.shape[0] > 0:
            both = F.conv2d(torch.cat([c, r], 1), torch.cat([weight, weight.abs()], 0), None, stride, padding,
                            dilation, 2)
            xc, xr = both[:, :out], both[:, out:]  # row-strided views; the epilogue reads them in place
        else:
            xc = F.conv2d(c, weight, None, stride, padding, dilation, groups)
            xr = F.conv2d(r, weight.abs(), None, stride, padding, dilation, groups)
    opt = _contiguous(bias, scale, shift)
    return _channel_epilogue(xc, xr, *opt, relu)


def _conv_torch(c, r, weight, bias, scale, shift, *, stride, padding, dilation, groups, relu, precision):
    """The torch backend's result for the same call: the reference the methods are checked against."""
    from . import functional
    with backends.library_tf32(precision != "ieee"):  # bf16 runs as TF32 here
        out = reference.interval_conv2d_ref(c, r, weight, bias, stride, padding, dilation, groups)
    return functional._epilogue(out, scale, shift, relu, 1, "torch")


def interval_conv2d(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
                    dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, *, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, relu: bool = False, precision: str = "ieee",
                    method: str = "auto") -> Tuple[Tensor, Tensor]:
    """Interval convolution: ``((conv(c, W) + b) * scale + shift, conv(r, |W|) * |scale|)``, then the
    interval ReLU if ``relu``. c (N, C, H, W), r (M, C, H, W) the radii of c's last M samples ->
    (N, O, P, Q), (M, O, P, Q).

    ``method``: ``"implicit_gemm"`` runs one kernel that reads each weight tile once for both
    products and applies bias / scale / shift / ReLU on the accumulators (its backward: one kernel
    for the input gradients, one split-K kernel for ``g_c ⋆ c + sign(W) ⊙ (g_r ⋆ r)``);
    ``"cudnn"`` runs the products as cuDNN calls and the epilogue as one more kernel; ``"auto"``
    measures both on the first call per shape / dtype / precision / device and keeps the faster of
    those that agree with the torch backend (outputs, and gradients when they are recorded).
    groups > 1 (and padding "same" with an odd kernel span) always takes the cuDNN route.
    """
    if method not in CONV_METHODS:
        raise ValueError(f"interval_conv2d: method must be one of {CONV_METHODS}, got {method!r}")
    geometry = _implicit_geometry(c, weight, stride, padding, dilation, groups)
    if geometry is None and method == "implicit_gemm":
        raise ValueError("interval_conv2d: the implicit GEMM needs groups == 1, numeric padding (or 'same' with an "
                         "even kernel span) and fewer than 2^31 pixels; use method='cudnn'")
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu, precision=precision)
    methods = {"cudnn": functools.partial(_conv_cudnn, **options), "torch": functools.partial(_conv_torch, **options)}
    if geometry is not None:
        methods["implicit_gemm"] = functools.partial(_conv_implicit_gemm, geometry=geometry, relu=relu,
                                                     precision=precision)
    tensors = [c, r, weight, bias, scale, shift]
    if method == "auto":
        if geometry is None:
            method = "cudnn"
        else:
            key = autoselect.key("interval_conv2d", c.device,
                                 (tensors, relu, precision, geometry, torch.is_grad_enabled()))
            method = _choose_method(key, methods, tensors, precision, c.device, "implicit_gemm", "cudnn")
    return methods[method](*tensors)


# ---------------------------------------------------------------------------------------------
# Margins of the last linear layer (interval and l2 inputs)

@torch.library.custom_op("cure_fast::margins_linear_cuda", mutates_args=())
def _margins(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, eps: Optional[Tensor],
             l2: bool) -> Tensor:
    return extension().margins_linear(c, r, weight, bias, labels, eps, l2)


@_margins.register_fake
def _(c, r, weight, bias, labels, eps, l2):
    return c.new_empty((c.shape[0], weight.shape[0]))


def _margins_setup(ctx, inputs, output):
    c, r, weight, bias, labels, eps, l2 = inputs
    ctx.l2 = l2
    ctx.save_for_backward(c, r, weight, bias, labels, eps)


def _label_blocks(values: Tensor, labels: Tensor, classes: int) -> Tensor:
    """(R, K) values -> (R, K * K): row i holds its values in block ``labels[i]``, zeros elsewhere,
    so that ``blocks @ table.view(K * K, F)`` applies the (K, F) slice ``table[labels[i]]`` to row i."""
    out = values.new_zeros((values.shape[0], classes, classes))
    out[torch.arange(values.shape[0], device=values.device), labels] = values
    return out.view(values.shape[0], classes * classes)


def margins_grad(g: Tensor, c: Tensor, r: Tensor, weight: Tensor, labels: Tensor, eps: Optional[Tensor], l2: bool,
                 needs: Tuple[bool, ...]) -> Tuple[Optional[Tensor], ...]:
    """Gradients (c, r, weight, bias, eps) of ``m[n, j] = D_nj · c_n + b_y - b_j - e_n f(D_nj, r)``,
    ``D_nj = W_y - W_j``, ``f = |D| · r`` (interval: r holds the radii of c's last rows) or
    ``sqrt(D² · s2)`` (l2: r holds the squared scales, one row or one per row; e = eps or 1), given
    g = dL/dm (N, K); ``needs`` says which of the five are wanted (eps: l2 with eps only).

    Every radius term goes through the (K, K, F) tables ``W_y - W_j`` indexed by label, so the
    work is GEMMs of the rows against those tables, and no (rows, K, F) tensor is formed.
    """
    classes = weight.shape[0]
    n_points = 0 if l2 else c.shape[0] - r.shape[0]
    g_sum = g.sum(1, keepdim=True)
    d_c = g_sum * weight[labels] - g @ weight if needs[0] else None
    d_w = torch.index_add(-(g.t() @ c), 0, labels, g_sum * c) if needs[2] else None
    d_b = torch.index_add(-g.sum(0), 0, labels, g_sum[:, 0]) if needs[3] else None
    rows, g_r = labels[n_points:], g[n_points:]
    want_eps = l2 and eps is not None and len(needs) > 4 and needs[4]
    if not r.shape[0] or not (needs[1] or needs[2] or want_eps):
        return d_c, torch.zeros_like(r) if needs[1] else None, d_w, d_b, None
    diff = (weight[:, None, :] - weight[None]).reshape(classes * classes, -1)  # [y * K + j] = W_y - W_j
    if l2:
        squares = diff.square()
        spread = (r @ squares.t()).view(r.shape[0], classes, classes)  # (1 or R, K, K)
        spread = spread[0, rows] if r.shape[0] == 1 else spread[torch.arange(rows.shape[0], device=g.device), rows]
        e = eps[:, None] if eps is not None else g_r.new_ones(())
        d_eps = -(g_r * spread.clamp_min(0).sqrt()).sum(1) if want_eps else None
        positive = spread > 0
        coeff = torch.where(positive, -g_r * e / torch.where(positive, spread, 1).sqrt(), 0)  # 2 d m / d spread
        blocks = _label_blocks(coeff, rows, classes)
        d_r = 0.5 * (blocks @ squares) if needs[1] else None
        if d_r is not None and r.shape[0] == 1:
            d_r = d_r.sum(0, keepdim=True)
        table = diff * (blocks.t() @ r.expand(rows.shape[0], -1))  # sum over rows of each label
    else:
        d_eps = None
        blocks = _label_blocks(g_r, rows, classes)
        d_r = -(blocks @ diff.abs()) if needs[1] else None
        table = -diff.sign() * (blocks.t() @ r)
    if needs[2]:
        table = table.view(classes, classes, -1)  # [y, j]: summed over the rows of label y
        d_w = d_w - table.sum(0) + table.sum(1)
    return d_c, d_r, d_w, d_b, d_eps


def _margins_grad(ctx, g):
    c, r, weight, bias, labels, eps = ctx.saved_tensors
    need = ctx.needs_input_grad
    needs = (need[0], need[1], need[2], bias is not None and need[3], eps is not None and need[5])
    d_c, d_r, d_w, d_b, d_eps = margins_grad(g.contiguous(), c, r, weight, labels, eps, ctx.l2, needs)
    return d_c, d_r, d_w, d_b, None, d_eps, None


_margins.register_autograd(_margins_grad, setup_context=_margins_setup)


def margins_linear(c: Tensor, r: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                   precision: str = "ieee") -> Tensor:
    """Lower bounds on ``z_y - z_j`` with ``e_y - e_j`` folded into the last layer, one block per row.
    c (N, in), r (M, in), weight (K, in), labels (N,) -> (N, K), 0 at ``j = y``. FMA in fp32 (fp64)
    whatever ``precision``."""
    opt_bias = bias.contiguous() if bias is not None else None
    return _margins(c.contiguous(), r.contiguous(), weight.contiguous(), opt_bias, labels.long().contiguous(), None,
                    False)


def _eps_rows(eps: Union[float, Tensor], x: Tensor) -> Tensor:
    return torch.as_tensor(eps, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0]).contiguous()


def l2_margins_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                      scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tensor:
    """Exact lower bounds on ``z_y - z_j`` over ``{x + scale ⊙ u : |u|_2 <= eps}`` in one kernel.
    x (B, in), eps float or (B,), weight (K, in), labels (B,) -> (B, K)."""
    s2 = reference._scale_squared(scale, x).contiguous()
    opt_bias = bias.contiguous() if bias is not None else None
    return _margins(x.contiguous(), s2, weight.contiguous(), opt_bias, labels.long().contiguous(), _eps_rows(eps, x),
                    True)


# ---------------------------------------------------------------------------------------------
# First layer under an l2 ball

@torch.library.custom_op("cure_fast::l2_row_norms_cuda", mutates_args=())
def _row_norms(weight: Tensor, s2: Optional[Tensor]) -> Tensor:
    return extension().l2_row_norms(weight, s2)


@_row_norms.register_fake
def _(weight, s2):
    return weight.new_empty((weight.shape[0],))


def _row_norms_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _row_norms_grad(ctx, g):
    weight, s2, radius = ctx.saved_tensors
    positive = radius > 0
    h = torch.where(positive, g / torch.where(positive, radius, 1), 0)  # d radius / d (radius^2) * 2
    ones = s2 if s2 is not None else weight.new_ones(weight.shape[1])
    d_w = h[:, None] * weight * ones[None] if ctx.needs_input_grad[0] else None
    d_s2 = 0.5 * (h[:, None] * weight.square()).sum(0) if s2 is not None and ctx.needs_input_grad[1] else None
    return d_w, d_s2


_row_norms.register_autograd(_row_norms_grad, setup_context=_row_norms_setup)


def l2_linear(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              scale: Optional[Tensor] = None, *, precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Exact bounds of a linear layer over ``{x + scale ⊙ u : |u|_2 <= eps}``: the centre from the
    interval GEMM (no radius rows), the radius ``eps * |W_i ⊙ scale|_2`` from the row-norm kernel
    (one scale for all samples), or a GEMM of the squared scales with W² (one scale per sample)."""
    c = interval_linear(x, x[:0], weight, bias, precision=precision)[0]
    s2 = reference._scale_squared(scale, x)
    if s2.shape[0] == 1:
        radius = _row_norms(weight.contiguous(), s2[0].contiguous())[None]
    else:
        radius = reference._safe_sqrt(interval_linear(s2, s2[:0], weight.square(), precision=precision)[0])
    return c, (reference._batched_eps(eps, x, 2) * radius).expand_as(c)


@torch.library.custom_op("cure_fast::l2_conv2d_cuda", mutates_args=())
def _l2_conv2d(x: Tensor, s2: Tensor, weight: Tensor, bias: Optional[Tensor], eps: Optional[Tensor],
               stride: List[int], padding: List[int], dilation: List[int], precision: str) -> Tuple[Tensor, Tensor]:
    return extension().l2_conv2d_forward(x, s2, weight, bias, eps, stride, padding, dilation, precision)


@_l2_conv2d.register_fake
def _(x, s2, weight, bias, eps, stride, padding, dilation, precision):
    out = (weight.shape[0], *_conv_out_size(x.shape[2:], weight, stride, padding, dilation))
    rows = x.shape[0] if eps is not None else torch.sym_min(s2.shape[0], x.shape[0])
    return x.new_empty((x.shape[0], *out)), x.new_empty((rows, *out))


def _l2_conv_setup(ctx, inputs, output):
    x, s2, weight, bias, eps, stride, padding, dilation, precision = inputs
    ctx.geometry, ctx.precision = (stride, padding, dilation), precision
    ctx.save_for_backward(x, s2, weight, bias, eps)


def _l2_conv_grad(ctx, g_c, g_r):
    """Gradients of c = conv(x, W) + b and r = e * sqrt(a), a = conv(s2, W²) (e = eps, or 1), from the
    implicit-GEMM kernels with no radius rows: dL/da = g_r e / (2 sqrt(a)), 0 where a = 0 (the
    reference's safe square root); W² is the weight of the products that involve s2."""
    x, s2, weight, bias, eps = ctx.saved_tensors
    need = ctx.needs_input_grad
    geometry, precision = ctx.geometry, ctx.precision
    image = list(x.shape[2:])
    d_x = d_s2 = d_w = d_b = d_eps = None
    if g_c is not None:
        g_c = g_c.contiguous()
        if need[0]:
            d_x = _conv_grad_input(g_c, g_c[:0], weight, image, *geometry, precision)[0]
        if need[2]:
            d_w = _conv_grad_weight(g_c, g_c[:0], x, x[:0], weight, *geometry, precision)
        if bias is not None and need[3]:
            d_b = g_c.sum((0, 2, 3))
    if g_r is not None and (need[1] or need[2] or (eps is not None and need[4])):
        w2 = weight.square()
        a = _interval_conv2d(s2, s2[:0], w2, None, None, None, False, *geometry, precision, False)[0]
        root = reference._safe_sqrt(a)  # (1 or N, O, P, Q)
        if eps is not None and need[4]:
            d_eps = (g_r * root).sum((1, 2, 3))
        e = eps.view(-1, 1, 1, 1) if eps is not None else 1
        positive = root > 0
        g_a = torch.where(positive, g_r * e / (2 * torch.where(positive, root, 1)), 0)
        if s2.shape[0] == 1:  # one scale image for every sample
            g_a = g_a.sum(0, keepdim=True)
        g_a = g_a.contiguous()
        if need[1]:
            d_s2 = _conv_grad_input(g_a, g_a[:0], w2, image, *geometry, precision)[0]
        if need[2]:
            d_w2 = 2 * weight * _conv_grad_weight(g_a, g_a[:0], s2, s2[:0], weight, *geometry, precision)
            d_w = d_w2 if d_w is None else d_w + d_w2
    return d_x, d_s2, d_w, d_b, d_eps, None, None, None, None


_l2_conv2d.register_autograd(_l2_conv_grad, setup_context=_l2_conv_setup)


def l2_conv2d(x: Tensor, eps: Union[float, Tensor], weight: Tensor, bias: Optional[Tensor] = None,
              stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int], str] = 0,
              dilation: Union[int, Tuple[int, int]] = 1, groups: int = 1, scale: Optional[Tensor] = None, *,
              precision: str = "ieee") -> Tuple[Tensor, Tensor]:
    """Exact, padding-aware bounds of a convolution over ``{x + scale ⊙ u : |u|_2 <= eps}``: the
    centre ``conv(x, W) + b`` and the radius ``eps * sqrt(conv(scale², W²))`` from one implicit GEMM
    (one pass over the weight; the backward from the implicit-GEMM gradient kernels). groups > 1, or
    padding the kernel cannot take, runs the reference formula as cuDNN calls. x (B, C, H, W),
    eps float or (B,), scale None or broadcastable to x -> (B, O, P, Q) twice."""
    geometry = _implicit_geometry(x, weight, stride, padding, dilation, groups)
    if geometry is None:
        with backends.library_tf32(precision != "ieee"):  # bf16 runs as TF32 here
            return reference.l2_conv2d_ref(x, eps, weight, bias, stride, padding, dilation, groups, scale)
    s2 = reference._scale_squared(scale, x).contiguous()
    opt_bias = bias.contiguous() if bias is not None else None
    x, weight = x.contiguous(), weight.contiguous()
    if s2.shape[0] > 1 or (isinstance(eps, Tensor) and eps.numel() > 1):  # one radius per sample, eps fused
        return _l2_conv2d(x, s2, weight, opt_bias, _eps_rows(eps, x), *geometry, precision)
    c, radius = _l2_conv2d(x, s2, weight, opt_bias, None, *geometry, precision)  # one radius for all samples
    return c, (reference._batched_eps(eps, x, 4) * radius).expand_as(c)


# ---------------------------------------------------------------------------------------------
# Train-mode BatchNorm statistics of the natural rows

@torch.library.custom_op("cure_fast::channel_moments_cuda", mutates_args=())
def _channel_moments(x: Tensor, rows: int) -> Tuple[Tensor, Tensor]:
    return extension().channel_moments(x, rows)


@_channel_moments.register_fake
def _(x, rows):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((x.shape[1],), dtype=acc), x.new_empty((x.shape[1],), dtype=acc)


def _moments_setup(ctx, inputs, output):
    x, rows = inputs
    ctx.rows = rows
    ctx.save_for_backward(x, output[0])


def _moments_grad(ctx, g_mean, g_var):
    x, mean = ctx.saved_tensors
    head = reference.batch_norm_stats_grad(x[:ctx.rows], mean, g_mean, g_var)
    return torch.cat([head, x.new_zeros((x.shape[0] - ctx.rows,) + x.shape[1:])]), None


_channel_moments.register_autograd(_moments_grad, setup_context=_moments_setup)


def channel_moments(x: Tensor, rows: int) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of the first ``rows`` rows of x (N, C, *), the natural
    stream: train-mode BatchNorm statistics, in float32 (float64 for float64), differentiable."""
    return _channel_moments(x.contiguous(), int(rows))


def batch_norm_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of x (N, C, *) in x's dtype (see :func:`channel_moments`)."""
    mean, var = channel_moments(x, x.shape[0])
    return mean.to(x.dtype), var.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Registration with cure_fast.functional

_IMPLEMENTATIONS = {
    "interval_linear": interval_linear,
    "interval_conv2d": interval_conv2d,
    "interval_relu": interval_relu,
    "interval_affine": interval_affine,
    "l2_linear": l2_linear,
    "l2_conv2d": l2_conv2d,
    "margins_linear": margins_linear,
    "l2_margins_linear": l2_margins_linear,
    "batch_norm_stats": batch_norm_stats,
}


@functools.cache
def register_ops() -> List[str]:
    """Make the functions above the ``cuda`` implementations of :mod:`cure_fast.functional`'s ops
    (once); returns the op names."""
    from . import functional
    for op, fn in _IMPLEMENTATIONS.items():
        functional.register(op, "cuda")(fn)
    return list(_IMPLEMENTATIONS)
