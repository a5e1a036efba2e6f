"""Every Triton kernel compiles for the GPU (sm_80 and sm_90, down to the cubin) with the flag and
dtype combinations its launcher uses, within the shared memory of the architecture. Triton's compiler and ptxas run on the CPU, so this catches
what the interpreter lets through (it runs kernels as plain Python) without a GPU."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("under TRITON_INTERPRET=1 the kernels are interpreted, not compiled", allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from cure_fast.kernels import elementwise, implicit_gemm, margins  # noqa: E402

TYPES = {"fp32": "fp32", "fp64": "fp64", "fp16": "fp16", "bf16": "bf16"}
# Shared memory a block may use (bytes): A100 (sm_80) and H100 (sm_90). A kernel above it fails to launch.
SHARED_MEMORY = {80: 163 * 1024, 90: 227 * 1024}


def _compile(kernel, dtype, arch=90, acc=None, pointers=None, **constexprs):
    """Compile ``kernel`` for sm_<arch> with ``dtype`` data pointers (``acc`` for the workspaces
    named in ``pointers``); pointer arguments given as None in ``constexprs`` stay None, as in a launch."""
    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    if hasattr(kernel, "configs") and not any(k in constexprs for k in kernel.configs[0].kwargs):
        constexprs.update(kernel.configs[0].kwargs)
    signature = {}
    for param in jit.params:
        name = param.name
        if param.is_constexpr or (name in constexprs and constexprs[name] is None):
            signature[name] = "constexpr"
        elif name == "y_ptr":
            signature[name] = "*i64"
        elif name.endswith("_ptr"):
            signature[name] = "*" + ((acc or dtype) if name in (pointers or ()) else dtype)
        else:
            signature[name] = "i32"
    missing = [p.name for p in jit.params if p.is_constexpr and p.name not in constexprs]
    assert not missing, f"no value for {missing}"
    compiled = triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", arch, 32))
    assert compiled.asm["cubin"]
    assert compiled.metadata.shared <= SHARED_MEMORY[arch], \
        f"{jit.__name__} needs {compiled.metadata.shared} bytes of shared memory, sm_{arch} has {SHARED_MEMORY[arch]}"


def _precision(dtype, precision="ieee"):
    torch_dtype = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    import torch
    return implicit_gemm.dot_flags(getattr(torch, torch_dtype), precision)


AFFINE = {  # name: (flags, dtype, precision, arch)
    "interval-bn-relu": (dict(HAS_SCALE=True, HAS_SHIFT=True, RELU=True), "fp32", "ieee", 90),
    "interval-relu-tf32": (dict(HAS_SHIFT=True, RELU=True), "fp32", "tf32", 80),
    "interval-bf16-inputs": (dict(HAS_SHIFT=True, RELU=True), "fp32", "bf16", 90),
    "interval-fp64": (dict(HAS_SCALE=True, HAS_SHIFT=True, RELU=True), "fp64", "ieee", 80),
    "interval-fp16-points": (dict(RELU=True, RADIUS=False), "fp16", "ieee", 90),
    "l2": (dict(SQUARE=True, HAS_SHIFT=True, SQRT=True), "bf16", "ieee", 80),
    "l2-rgb-flat": (dict(SQUARE=True, HAS_SHIFT=True, SQRT=True, FLAT=True), "fp32", "tf32", 90),
    "interval-rgb-flat-fp64": (dict(HAS_SCALE=True, HAS_SHIFT=True, RELU=True, FLAT=True), "fp64", "ieee", 80),
    "interval-fp64-sm90": (dict(HAS_SCALE=True, HAS_SHIFT=True, RELU=True), "fp64", "ieee", 90),  # no fp64 wgmma
    "linear-split": (dict(SPLIT=True, HAS_SHIFT=True, RELU=True), "bf16", "ieee", 90),
    "input-grad": (dict(TRANSPOSED=True, SQUARE=True), "fp32", "tf32", 90),
}


@pytest.mark.parametrize("case", list(AFFINE))
def test_affine_kernel_compiles(case):
    flags, dtype, precision, arch = AFFINE[case]
    constexprs = dict(TRANSPOSED=False, SQUARE=False, RADIUS=True, HAS_SCALE=False, HAS_SHIFT=False, RELU=False,
                      SQRT=False, FLAT=False, SPLIT=False, FP64=dtype == "fp64", **_precision(dtype, precision))
    constexprs.update(flags)
    for name, needed in (("scale_ptr", "HAS_SCALE"), ("shift_ptr", "HAS_SHIFT")):
        if not constexprs[needed]:
            constexprs[name] = None
    pointers = ("c_out_ptr", "r_out_ptr") if constexprs["SPLIT"] else ()
    _compile(implicit_gemm._affine_kernel, dtype, arch, acc="fp32", pointers=pointers, **constexprs)


@pytest.mark.parametrize("dtype,sqrt", [("fp32", False), ("bf16", True), ("fp64", False)])
def test_finish_splits_kernel_compiles(dtype, sqrt):
    _compile(implicit_gemm._finish_splits_kernel, dtype, acc="fp64" if dtype == "fp64" else "fp32",
             pointers=("ws_c_ptr", "ws_r_ptr"), HAS_SCALE=True, HAS_SHIFT=True, SQRT=sqrt, RELU=True,
             FP64=dtype == "fp64", BLOCK=implicit_gemm.BLOCK)


@pytest.mark.parametrize("dtype,square,bias,flat,precision,arch", [("fp32", False, True, False, "ieee", 90),
                                                                   ("bf16", True, False, False, "ieee", 80),
                                                                   ("fp32", False, True, False, "tf32", 80),
                                                                   ("fp32", True, True, True, "tf32", 90),
                                                                   ("fp64", False, True, True, "ieee", 80),
                                                                   ("fp64", True, True, False, "ieee", 90)])
def test_weight_grad_kernel_compiles(dtype, square, bias, flat, precision, arch):
    acc = "fp64" if dtype == "fp64" else "fp32"
    constexprs = dict(SQUARE=square, HAS_BIAS=bias, FLAT=flat, FP64=dtype == "fp64", **_precision(dtype, precision))
    if not bias:
        constexprs["db_ptr"] = None
    _compile(implicit_gemm._weight_grad_kernel, dtype, arch, acc=acc, pointers=("dw_ptr", "db_ptr"), **constexprs)


@pytest.mark.parametrize("dtype", ["fp32", "fp64", "bf16"])
def test_elementwise_kernels_compile(dtype):
    fp64 = dtype == "fp64"
    for kernel in (elementwise._relu_kernel, elementwise._relu_grad_kernel):
        _compile(kernel, dtype, FP64=fp64, BLOCK=elementwise.BLOCK)
    for relu in (False, True):
        _compile(elementwise._channel_affine_kernel, dtype, RELU=relu, FP64=fp64, BLOCK=elementwise.BLOCK)
        _compile(elementwise._channel_affine_grad_kernel, dtype, acc="fp64" if fp64 else "fp32",
                 pointers=("ds_ptr", "dt_ptr"), RELU=relu, FP64=fp64, BLOCK=256)
    _compile(elementwise._moments_kernel, dtype, acc="fp64" if fp64 else "fp32", pointers=("sum_ptr", "sq_ptr"),
             FP64=fp64, BLOCK=256)


@pytest.mark.parametrize("dtype,l2,bias", [("fp32", False, True), ("fp32", True, False), ("fp64", True, True),
                                           ("fp16", False, True)])
def test_margins_kernels_compile(dtype, l2, bias):
    block_k, block_f = margins._blocks(10)
    fp64 = dtype == "fp64"
    _compile(margins._margins_kernel, dtype, L2=l2, HAS_BIAS=bias, FP64=fp64, BK=block_k, BF=block_f,
             **({} if bias else {"b_ptr": None}))
    _compile(margins._margins_grad_kernel, dtype, acc="fp64" if fp64 else "fp32", pointers=("dw_ptr", "db_ptr"),
             L2=l2, HAS_BIAS=bias, FP64=fp64, BK=block_k, BF=block_f)
