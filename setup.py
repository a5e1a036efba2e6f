"""Packages cure_fast (with kernels/ as cure_fast.kernels) and builds the CUDA extension cure_fast._C.

The extension is built when nvcc and a CUDA build of torch are found, and skipped with a one-line
message otherwise. CURE_FAST_BUILD_CUDA=0 skips it, =1 requires it; TORCH_CUDA_ARCH_LIST
(default "8.0;9.0") and MAX_JOBS (default 2) are passed on to torch.utils.cpp_extension.
"""
import glob
import os
import re
import shutil

from setuptools import find_packages, setup


def _is_toolkit(path):
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def _cuda_home():
    """The CUDA toolkit folder, or None: $CUDA_HOME / $CUDA_PATH, else the toolkit of the nvcc on PATH
    (through symlinks and `exec /path/to/nvcc` wrapper scripts), else /usr/local/cuda*."""
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env if _is_toolkit(env) else None
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if head.startswith(b"#!"):
            found = re.findall(rb"(/\S+)/bin/nvcc\b", head)
            candidates += [os.path.realpath(p.decode()) for p in found]
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    return next((path for path in candidates if _is_toolkit(path)), None)


def _cuda_extension():
    """(ext_modules, cmdclass) for cure_fast._C, or ([], {}) after printing why it is skipped."""
    flag = os.environ.get("CURE_FAST_BUILD_CUDA")
    if flag == "0":
        print("cure_fast: skipping the CUDA extension: CURE_FAST_BUILD_CUDA=0")
        return [], {}
    import torch

    home = _cuda_home()
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif home is None:
        reason = ("no CUDA toolkit (bin/nvcc and include/cuda_runtime.h) in $CUDA_HOME, $CUDA_PATH, "
                  "beside the nvcc on PATH or in /usr/local/cuda*")
    else:
        reason = None
    if reason:
        if flag == "1":
            raise RuntimeError(f"CURE_FAST_BUILD_CUDA=1 but {reason}")
        print(f"cure_fast: skipping the CUDA extension: {reason}")
        return [], {}

    os.environ["CUDA_HOME"] = home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    os.environ.setdefault("MAX_JOBS", "2")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    ext = CUDAExtension(
        "cure_fast._C",
        sources=sorted(glob.glob("csrc/*.cu")) + ["csrc/bindings.cpp"],
        # The .cu files include no torch headers; the bindings get the C++ standard torch requires.
        # -g0 overrides the -g in Python's CFLAGS, which doubles the bindings' compile time.
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "-std=c++17"]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(
    packages=find_packages(include=["cure_fast", "cure_fast.*"])
    + ["cure_fast.kernels"] + [f"cure_fast.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"cure_fast.kernels": "kernels"},
    package_data={"cure_fast": ["presets/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
