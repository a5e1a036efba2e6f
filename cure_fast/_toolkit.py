"""Where the CUDA toolkit is (standard library only: setup.py loads this file before cure_fast exists)."""
import glob
import os
import re
import shutil
from typing import Optional


def _is_toolkit(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h"))


def cuda_home() -> Optional[str]:
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
