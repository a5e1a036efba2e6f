"""The glibc heap settings of the CPU passes (cure_fast.engine.heap)."""
import os
import platform
import subprocess
import sys

import pytest

from cure_fast.engine import heap

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
PROBE = """
import ctypes
from cure_fast.engine import heap
first = heap.keep_freed()
ctypes.CDLL = None  # a second call that reached the C library again would fail
print(first, heap.keep_freed())
"""


def _probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in heap.OWN_SETTINGS + ("GLIBC_TUNABLES",)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_settings_taken_once_per_process():
    assert _probe() == "True True"


@pytest.mark.parametrize("env", [{name: "1048576"} for name in heap.OWN_SETTINGS]
                         + [{"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1048576"}])
def test_environment_settings_win(env):
    assert _probe(**env) == "False False"


def test_crown_on_cpu_takes_them(monkeypatch):
    import torch
    from torch import nn

    from cure_fast import BoundedModule, LinfBall
    calls = []
    monkeypatch.setattr(heap, "keep_freed", lambda: calls.append(1) or True)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    BoundedModule(model).margins(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), LinfBall(0.1), method="crown")
    assert calls
