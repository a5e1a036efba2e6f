"""The benchmark scripts without the Triton interpreter: the CPU-only ones run in --smoke mode and
write their JSON, and a bad argument of any script is an argparse error naming it, never a traceback."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _run(script, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=BENCH)


@pytest.mark.parametrize("script, kind", [("bench_propagate.py", "propagate"),
                                          ("train_throughput.py", "train_throughput")])
def test_cpu_benchmarks_run_in_smoke_mode(script, kind, tmp_path):
    out = tmp_path / "result.json"
    run = _run(script, "--smoke", "--json", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(out.read_text())
    assert report["results"] and {"device", "torch", "date"} <= set(report)


@pytest.mark.parametrize("script, args, needle", [
    ("bench_propagate.py", ["--model", "cnn9"], "argument --model: invalid choice: 'cnn9'"),
    ("bench_propagate.py", ["--batch", "0"], "argument --batch: got '0'; an integer >= 1"),
    ("bench_propagate.py", ["--device", "gpu"], "argument --device: 'gpu' is no device"),
    ("bench_propagate.py", ["--backend", "tirton"], "argument --backend: invalid choice: 'tirton'"),
    ("train_throughput.py", ["--batch", "1"], "argument --batch: got '1'; an integer >= 2"),
    ("train_throughput.py", ["--repeats", "0"], "argument --repeats: got '0'; an integer >= 1"),
    ("certify_time.py", ["--methods", "ibp,crwn"], "argument --methods: 'crwn' is not one of ibp, crown-ibp"),
    ("certify_time.py", ["--alpha-steps", "-1"], "argument --alpha-steps: got '-1'; an integer >= 0"),
    ("certify_time.py", ["--images", "0"], "argument --images: got '0'; an integer >= 1"),
    ("bench_kernels.py", ["--smoke", "--precisions", "fp16"], "argument --precisions: 'fp16' is not one of ieee"),
    ("bench_network.py", ["--batch", "0"], "argument --batch: got '0'"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_bad_argument_is_an_error_naming_it(script, args, needle):
    run = _run(script, *args, timeout=120)
    assert run.returncode == 2 and needle in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_gpu_check_help_and_unknown_steps_write_nothing(tmp_path):
    script = os.path.join(BENCH, "gpu_check.sh")
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert shown.returncode == 0 and "Quick check" in shown.stdout
    wrong = subprocess.run(["bash", script, "--foo"], capture_output=True, text=True, env=env, timeout=60)
    assert wrong.returncode == 2 and "unknown step '--foo'" in wrong.stderr
    assert not (tmp_path / "out").exists()
