"""Packages cure_fast (with kernels/ as cure_fast.kernels) and builds the CUDA extension cure_fast._C.

The extension is built when nvcc and a CUDA build of torch are found, and skipped with a one-line
message otherwise. CURE_FAST_BUILD_CUDA=0 skips it, =1 requires it; TORCH_CUDA_ARCH_LIST
(default "8.0;9.0") and MAX_JOBS (default 2) are passed on to torch.utils.cpp_extension.
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup


def _load_toolkit():
    """cure_fast/_toolkit.py, loaded by path (the package is not importable before it is built)."""
    spec = importlib.util.spec_from_file_location(
        "cure_fast_toolkit", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cure_fast", "_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    """(ext_modules, cmdclass) for cure_fast._C, or ([], {}) after printing why it is skipped."""
    flag = os.environ.get("CURE_FAST_BUILD_CUDA")
    if flag == "0":
        print("cure_fast: skipping the CUDA extension: CURE_FAST_BUILD_CUDA=0")
        return [], {}
    import torch

    home = _load_toolkit().cuda_home()
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
        # The kernels (csrc/*.cu, no torch headers) and the operators that check and launch them
        # (csrc/ops/*.cpp: one TORCH_LIBRARY of schemas, one file of CUDA kernels per op family).
        sources=sorted(glob.glob("csrc/*.cu")) + sorted(glob.glob("csrc/ops/*.cpp")),
        # The .cpp files get the C++ standard torch requires. -g0 overrides the -g in Python's
        # CFLAGS, which doubles their compile time.
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
