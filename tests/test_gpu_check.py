"""bench/gpu_check.sh quick, rehearsed on the CPU: the dry run (GPU_CHECK_DRY=1) runs the script's
every step (no CUDA build, the Triton interpreter, the benchmarks' smoke shapes) and must leave a
well-formed summary.json; and the pieces it relies on: the sampled test selection (bench/pytest_quick.py)
and the summary's JUnit parsing and failure reporting (bench/gpu_summary.py)."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import gpu_summary  # noqa: E402
import pytest_quick  # noqa: E402

STEPS = ["build", "cuda_ops", "gpu_tests", "bench_network", "bench_kernels", "certify"]
COUNTS = {"tests", "passed", "failed", "errors", "skipped"}
DRY_BUDGETS = {"cuda_ops": 25, "gpu_tests": 40, "bench_network": 35, "bench_kernels": 30, "certify": 30}  # gpu_quick.sh


def test_quick_cover_keeps_every_axis_combination_and_every_other_value():
    import itertools
    params = [dict(dtype=d, method=m, shape=s, epilogue=e)
              for d, m, s, e in itertools.product(["f32", "f64", "bf16"], ["fused", "lib"], range(7), "abc")]
    chosen = [params[i] for i in pytest_quick.cover(params)]
    assert {(p["dtype"], p["method"]) for p in chosen} == {(p["dtype"], p["method"]) for p in params}
    assert {p["shape"] for p in chosen} == set(range(7)) and {p["epilogue"] for p in chosen} == set("abc")
    assert len(chosen) <= 7 + 6  # far fewer than the 126 combinations
    assert len(pytest_quick.cover(params, cap=1)) == 1
    assert pytest_quick.cover([{}]) == [0]  # a test without parameters is kept


def test_quick_option_selects_through_pytest(tmp_path):
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('dtype', ['a', 'b'])\n"
        "@pytest.mark.parametrize('shape', [1, 2, 3])\n"
        "def test_p(dtype, shape):\n    pass\n"
        "def test_plain():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bench"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "pytest_quick",
                          "--quick", "--co", str(tmp_path / "test_x.py")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    assert len(ids) == 4 and any("test_plain" in i for i in ids), run.stdout  # 3 shapes cover both dtypes


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad[f32]" time="0.1">
  <failure message="AssertionError: output 0: error 1.5 &gt; 1e-06&#10;more">trace</failure></testcase>
<testcase classname="tests.test_b" name="" time="0"><error message="collection failure">Traceback
E   ImportError: cannot import name 'x' from 'y'</error></testcase>
<testcase classname="tests.test_a" name="test_skip" time="0"><skipped message="needs a GPU"/></testcase>
</testsuite></testsuites>"""


def test_summary_counts_failures_crashes_and_budget_skips(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    (work / "logs").mkdir(parents=True)
    out.mkdir()
    (out / "cuda_ops.xml").write_text(JUNIT)
    (work / "logs" / "bench_network.log").write_text(
        "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: an illegal memory access\n")
    (out / "bench_kernels.json").write_text(json.dumps({"complete": False, "results": [
        {"layer": "conv2d0", "op": "interval+relu", "precision": "tf32", "pass": "both", "triton_ms": 2.0,
         "floor_ms": 1.0, "errors": {"cuda": "RuntimeError: launch failed"}}]}))
    steps = [dict(name="cuda_ops", kind="pytest", rc=1, seconds=3.0, budget_seconds=60, artefact="cuda_ops.xml"),
             dict(name="bench_network", kind="bench", rc=-11, seconds=1.0, budget_seconds=60,
                  artefact="bench_network.json"),
             dict(name="bench_kernels", kind="bench", rc=124, seconds=50.0, budget_seconds=50,
                  artefact="bench_kernels.json"),
             dict(name="propagate", kind="bench", rc=0, seconds=2.0, budget_seconds=30, artefact="propagate.json"),
             dict(name="certify", kind="bench", status="skipped", budget_seconds=35,
                  reason="budget: needs 35 s, 20 s left of 470 s")]
    (out / "propagate.json").write_text(json.dumps({"complete": True, "results": [
        {"method": "crown", "norm": "l2 0.25", "error": "RuntimeError: out of memory"}]}))
    (work / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    summary = gpu_summary.summarize(str(out), str(work), time.time() - 5, 470, dry=False, final=True)
    by = {s["name"]: s for s in summary["steps"]}
    assert by["cuda_ops"]["status"] == "failed"
    assert by["cuda_ops"]["tests"] == dict(tests=4, passed=1, failed=1, errors=1, skipped=1)
    errors = [f["error"] for f in by["cuda_ops"]["failures"]]
    assert errors == ["AssertionError: output 0: error 1.5 > 1e-06", "ImportError: cannot import name 'x' from 'y'"]
    assert by["bench_network"]["status"] == "crashed"
    assert "illegal memory access" in by["bench_network"]["failures"][0]["error"]
    assert by["bench_kernels"]["status"] == "timeout"
    assert [f["kind"] for f in by["bench_kernels"]["failures"]] == ["timeout", "error"]
    assert summary["benchmarks"]["bench_kernels"]["headline"]["layers"]["conv2d0 interval+relu tf32"][
        "x_floor"]["triton"] == 2.0
    assert by["propagate"]["status"] == "failed"  # exit status 0, but a variant raised
    assert by["propagate"]["failures"][0]["error"] == "RuntimeError: out of memory"
    assert summary["failed_steps"] == ["cuda_ops", "bench_network", "bench_kernels", "propagate"]
    assert summary["skipped_for_budget"] == ["certify"]
    assert summary["counts"]["failed"] == 1


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_dry_run_writes_a_well_formed_summary(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "out"
    # Budgets four times the script's dry-run ones: the test checks the summary's shape and the steps'
    # outcomes, not the speed of a CPU that other tests share (the 3-minute figure is measured, not asserted).
    budgets = {f"GPU_CHECK_BUDGET_{name}": str(4 * seconds) for name, seconds in DRY_BUDGETS.items()}
    env = dict(os.environ, GPU_CHECK_DRY="1", OUT=str(out), PYTHON=sys.executable, GPU_CHECK_TOTAL="720", **budgets)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "quick"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    log = run.stdout[-6000:] + run.stderr[-3000:]
    assert (out / "summary.json").exists(), log
    summary = json.loads((out / "summary.json").read_text())
    assert run.returncode == 0, json.dumps(summary.get("steps"), indent=1) + log
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back from $OUT

    assert summary["schema"] == gpu_summary.SCHEMA and summary["mode"] == "quick"
    assert summary["dry_run"] is True and summary["finished"] is True
    assert isinstance(summary["wall_seconds"], float) and summary["wall_seconds"] <= summary["budget"]["total_seconds"]
    assert isinstance(summary["device"], str) and summary["versions"]["torch"]
    assert set(summary["budget"]["steps"]) == set(STEPS)
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["build"]["status"] == "skipped" and summary["build"]["seconds"] is None
    assert summary["failed_steps"] == [] and summary["skipped_for_budget"] == []
    for step in summary["steps"][1:]:
        assert step["status"] == "passed", step
        assert isinstance(step["seconds"], float) and 0 < step["seconds"] <= step["budget_seconds"], step
    by = {s["name"]: s for s in summary["steps"]}
    for name in ("cuda_ops", "gpu_tests"):
        tests = by[name]["tests"]
        assert set(tests) == COUNTS and all(isinstance(v, int) for v in tests.values())
        assert tests["tests"] == sum(tests[k] for k in COUNTS - {"tests"}) > 0
        assert tests["failed"] == tests["errors"] == 0
    assert by["cuda_ops"]["tests"]["skipped"] == by["cuda_ops"]["tests"]["tests"]  # no GPU: every CUDA op test skips
    assert by["gpu_tests"]["tests"]["passed"] >= 5  # one per Triton kernel test function
    assert summary["counts"]["tests"] == by["cuda_ops"]["tests"]["tests"] + by["gpu_tests"]["tests"]["tests"]

    bench = summary["benchmarks"]
    assert set(bench) == {"bench_network", "bench_kernels", "certify"}
    for report in bench.values():
        assert report["complete"] is True and report["results"]
    network = bench["bench_network"]["headline"]["settings"]["eval/ieee"]
    assert network["ms"]["natural"] > 0 and network["x_natural"]["triton"] > 0 and network["x_floor"]["triton"] > 0
    layers = bench["bench_kernels"]["headline"]["layers"]
    assert layers and all(entry["ms"]["triton"] > 0 for entry in layers.values())
    assert bench["bench_kernels"]["headline"]["step_floor_ms"]["ieee"] > 0
    times = bench["certify"]["headline"]["seconds_per_image"]
    assert set(times) == {"linf 2/255/ibp", "linf 2/255/crown", "l2 0.25/ibp", "l2 0.25/crown"}
    assert all(isinstance(t, float) and t > 0 for t in times.values())
