"""Every CUDA kernel fits in its registers on the GPUs the project targets: ptxas (run by nvcc, no
GPU needed) reports no spill stores or loads and no stack frame for any kernel of csrc/, compiled
with the flags of setup.py (and those torch's extension builder adds) for sm_90. A spill turns
register traffic into local-memory traffic in the inner loop, a slowdown no output test sees."""
import glob
import os
import re
import subprocess

import pytest

from cure_fast._toolkit import cuda_home

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
# setup.py's nvcc flags, and the ones torch.utils.cpp_extension adds to every .cu file.
FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
         "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'\s*\n(?:.*\n)*?.*?"
                   r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@pytest.fixture(scope="module")
def nvcc():
    home = cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit: the kernels' register use is read from nvcc's ptxas")
    return os.path.join(home, "bin", "nvcc")


def test_sources_found():
    assert {"interval_conv.cu", "interval_linear.cu", "channel.cu"} <= set(SOURCES)


@pytest.mark.parametrize("source", SOURCES)
def test_no_kernel_spills(nvcc, source, tmp_path):
    cmd = [nvcc, *FLAGS, "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", "-c",
           os.path.join(ROOT, "csrc", source), "-o", str(tmp_path / "kernels.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
    kernels = ENTRY.findall(proc.stderr)
    assert kernels, f"no kernel in the ptxas report of {source}:\n{proc.stderr[:2000]}"
    spilling = [name for name, stack, stores, loads in kernels if int(stack) or int(stores) or int(loads)]
    assert not spilling, f"{len(spilling)} of {len(kernels)} kernels of {source} spill: {spilling[:3]}"
