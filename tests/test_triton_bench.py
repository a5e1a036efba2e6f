"""The benchmark scripts run end to end in --smoke mode (tiny shapes, the Triton interpreter on
the CPU) and write their JSON report."""
import json
import os
import subprocess
import sys

import pytest

if not (os.environ.get("TRITON_INTERPRET") == "1" or __import__("torch").cuda.is_available()):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.mark.parametrize("script,rows", [("bench_kernels.py", 27), ("bench_network.py", 3)])
def test_benchmark_smoke(script, rows, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, os.path.join(BENCH, script), "--smoke", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert {"device", "torch", "triton", "date", "results"} <= set(report)
    assert len(report["results"]) == rows
    for row in report["results"]:
        assert row["triton_ms"] > 0 and row["eager_ms"] > 0
        if script == "bench_network.py":  # what did not run says why
            assert row["skipped"]["auto"] == row["skipped"]["compile"] == "skipped under --smoke"
            assert "errors" not in row
