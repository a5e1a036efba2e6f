"""The CUDA extension is built whenever the toolchain allows it (runs without a GPU)."""
import os
import shutil

import pytest
import torch


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")


def test_cuda_extension_built():
    if os.environ.get("CURE_FAST_BUILD_CUDA") == "0":
        pytest.skip("CURE_FAST_BUILD_CUDA=0")
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    nvcc = _nvcc()
    if not (nvcc and os.path.isfile(nvcc)):
        pytest.skip("nvcc not found")
    from cure_fast import cuda

    ext = cuda.load()
    assert callable(ext.interval_relu_forward) and callable(ext.interval_relu_backward)
