"""Writes ``$OUT/summary.json`` for ``bench/gpu_check.sh quick`` from what its steps left behind.

The script calls this after every step (so a run stopped from outside still leaves a summary) and
once at the end with ``--final``. Standard library only: it must work when torch does not import.

Inputs:

- ``WORK/steps.jsonl``: one JSON object per step, written by the script (name, kind, status or rc,
  seconds, budget, command, artefact, reason for a skip),
- ``WORK/env.json``: the environment probe (device, versions), ``WORK/logs/<step>.log``: each
  step's output,
- under ``OUT``: the JUnit XML of the test steps and the JSON of the benchmarks.

The summary holds the device and versions, the build time, per step its status (passed, failed,
timeout, crashed, skipped), its pass / fail / error / skip counts (from the JUnit XML) and the first
error line of each failure, every benchmark figure (the rows of each benchmark's JSON) with a
headline per benchmark (ratios to the natural step and to the two-GEMM floor, seconds per image),
and the steps skipped because their budget would have overrun the total.

    python bench/gpu_summary.py --out OUT --work WORK --started EPOCH --total 540 [--dry] [--final]
    python bench/gpu_summary.py --probe WORK/env.json     # the environment probe (imports torch)
"""
import argparse
import datetime
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

SCHEMA = 1
MAX_FAILURES = 25  # failures listed per step (the counts hold them all)
STATUSES = ("passed", "failed", "timeout", "crashed", "skipped")
_ERROR_LINE = re.compile(r"^\s*(E\s+)?([A-Za-z_][\w.]*(Error|Exception|Interrupt|Failure)\b.*|.*\berror\b.*)$",
                         re.IGNORECASE)


def _first_line(text: Optional[str], limit: int = 300) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def parse_junit(path: str) -> Dict[str, object]:
    """Counts (tests, passed, failed, errors, skipped) and the failures (test id, first error line)
    of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    counts = dict(tests=0, passed=0, failed=0, errors=0, skipped=0)
    failures: List[Dict[str, str]] = []
    for case in root.iter("testcase"):
        if not case.get("name") and not case.get("classname") and not len(case):
            continue  # a test stopped by the step's time limit (SIGINT) is written as an empty record
        counts["tests"] += 1
        test = "::".join(p for p in (case.get("classname", ""), case.get("name", "")) if p)
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = _first_line(child.get("message"))
                # pytest puts the traceback in the text, the exception on its "E   " lines; a collection
                # error's message says only "collection failure": its exception is the last such line.
                lines = [l[1:].strip() for l in (child.text or "").splitlines() if l.startswith("E ") and l[1:].strip()]
                if message in ("", "collection failure") and lines:
                    message = lines[-1][:300] if message else lines[0][:300]
                message = message or _first_line(child.text)
                failures.append({"test": test, "kind": child.tag, "error": message})
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return {"counts": counts, "failures": failures}


def error_line(log_path: str) -> str:
    """The last line of a step's output that names an error (a traceback's last line), else its last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [l.rstrip() for l in f if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if _ERROR_LINE.match(line) and not line.lstrip().startswith(("==", "!!")):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _ratio(a, b) -> Optional[float]:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def kernels_headline(rows: List[dict]) -> Dict[str, object]:
    """Per layer op and precision (pass "both": forward + backward): every variant's ms, the best fused
    backend, and each variant's time over the two-GEMM floor; and the sum of the floors per precision
    (the two-GEMM floor of the whole step's affine layers)."""
    layers, floors = {}, {}
    for row in rows:
        if row.get("pass") != "both":
            continue
        ms = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and isinstance(v, (int, float))}
        floor = ms.get("floor")
        entry = {"batch": row.get("batch"), "best": row.get("best"), "ms": ms,
                 "x_floor": {k: _ratio(v, floor) for k, v in ms.items() if k != "floor" and floor},
                 "best_x_eager": row.get("x_eager"), "best_x_compile": row.get("x_compile")}
        layers[f"{row.get('layer')} {row.get('op')} {row.get('precision')}"] = entry
        if floor:
            key = f"{row.get('precision')}"
            floors[key] = floors.get(key, 0.0) + floor
    return {"pass": "both", "layers": layers, "step_floor_ms": floors}


def network_headline(rows: List[dict], step_floor_ms: Dict[str, float]) -> Dict[str, object]:
    """Per mode / precision (pass "both"): each backend's ms, its ratio to the natural step, and to the
    sum of the per-layer two-GEMM floors of the same precision (from bench_kernels, when it ran)."""
    settings = {}
    for row in rows:
        if row.get("pass") != "both":
            continue
        ms = {k[:-3]: v for k, v in row.items() if k.endswith("_ms") and isinstance(v, (int, float))}
        floor = step_floor_ms.get(str(row.get("precision")))
        settings[f"{row.get('mode')}/{row.get('precision')}"] = {
            "batch": row.get("batch"), "ms": ms,
            "x_natural": {k: _ratio(v, ms.get("natural")) for k, v in ms.items() if k != "natural"},
            "x_floor": {k: _ratio(v, floor) for k, v in ms.items()} if floor else None,
            "errors": row.get("errors", {})}
    return {"pass": "both", "settings": settings,
            "floor": "sum over CNN7's affine layers of cuDNN / cuBLAS computing W*c and |W|*r alone (bench_kernels)"}


def certify_headline(rows: List[dict]) -> Dict[str, object]:
    return {f"{r.get('norm')}/{r.get('method')}": r.get("seconds_per_image", r.get("error")) for r in rows}


def _benchmark_failures(name: str, report: dict) -> List[Dict[str, str]]:
    failures = []
    for row in report.get("results", []):
        where = " ".join(str(row[k]) for k in ("layer", "op", "mode", "norm", "method", "precision", "pass")
                         if k in row)
        for variant, message in (row.get("errors") or {}).items():
            item = {"test": f"{name} {where} {variant}".strip(), "kind": "error", "error": message}
            if item not in failures:
                failures.append(item)
        if "error" in row:
            failures.append({"test": f"{name} {where}".strip(), "kind": "error", "error": row["error"]})
    return failures


def _status(step: dict, counts: Optional[dict]) -> str:
    if step.get("status"):
        return step["status"]
    rc = step.get("rc")
    if rc == 0:
        return "failed" if counts and (counts["failed"] or counts["errors"]) else "passed"
    if rc in (124, 137):
        return "timeout"
    if isinstance(rc, int) and (rc > 128 or rc < 0):
        return "crashed"
    return "failed"


def summarize(out: str, work: str, started: float, total: float, dry: bool, final: bool) -> dict:
    steps_in = []
    try:
        with open(os.path.join(work, "steps.jsonl")) as f:
            steps_in = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    env = _load_json(os.path.join(work, "env.json")) or {}
    reports: Dict[str, dict] = {}
    steps, totals = [], dict(tests=0, passed=0, failed=0, errors=0, skipped=0)
    for raw in steps_in:
        step = {k: raw.get(k) for k in ("name", "kind", "rc", "seconds", "budget_seconds", "command", "artefact")}
        step = {k: v for k, v in step.items() if v is not None}
        artefact = os.path.join(out, raw["artefact"]) if raw.get("artefact") else None
        counts, failures = None, []
        if raw.get("kind") == "pytest" and artefact and os.path.exists(artefact):
            try:
                junit = parse_junit(artefact)
                counts, failures = junit["counts"], junit["failures"]
            except ET.ParseError as error:
                failures = [{"test": raw["name"], "kind": "error", "error": f"unreadable JUnit XML: {error}"}]
        elif raw.get("kind") == "bench" and artefact and os.path.exists(artefact):
            report = _load_json(artefact)
            if report is not None:
                reports[raw["name"]] = report
                failures = _benchmark_failures(raw["name"], report)
        step["status"] = _status(raw, counts)
        if step["status"] == "passed" and failures:  # a benchmark variant that raised (recorded in its rows)
            step["status"] = "failed"
        if raw.get("reason"):
            step["reason"] = raw["reason"]
        if counts is not None:
            step["tests"] = counts
            for k in totals:
                totals[k] += counts[k]
        elif raw.get("kind") == "pytest" and step["status"] != "skipped":
            step["tests"] = None  # no JUnit XML: the run died before pytest wrote it
        if step["status"] in ("failed", "timeout", "crashed") and not failures:
            line = error_line(os.path.join(work, "logs", f"{raw['name']}.log"))
            if step["status"] == "timeout":
                line = f"stopped at its budget of {raw.get('budget_seconds')} s" + (f"; last error: {line}" if line else "")
            failures = [{"test": raw["name"], "kind": step["status"], "error": line or f"exit status {raw.get('rc')}"}]
        elif step["status"] == "timeout":
            failures.insert(0, {"test": raw["name"], "kind": "timeout",
                                "error": f"stopped at its budget of {raw.get('budget_seconds')} s"})
        if failures:
            step["failures"] = failures[:MAX_FAILURES]
            step["failures_listed"] = f"{min(len(failures), MAX_FAILURES)} of {len(failures)}"
        steps.append(step)

    benchmarks = {}
    kernels = reports.get("bench_kernels")
    floors = {}
    if kernels is not None:
        head = kernels_headline(kernels.get("results", []))
        floors = head["step_floor_ms"]
        benchmarks["bench_kernels"] = {"complete": kernels.get("complete"), "headline": head,
                                       "results": kernels.get("results", [])}
    if "bench_network" in reports:
        network = reports["bench_network"]
        benchmarks["bench_network"] = {"complete": network.get("complete"),
                                       "headline": network_headline(network.get("results", []), floors),
                                       "results": network.get("results", [])}
    if "certify" in reports:
        certify = reports["certify"]
        benchmarks["certify"] = {"complete": certify.get("complete"), "images": certify.get("images"),
                                 "model": certify.get("model"),
                                 "headline": {"seconds_per_image": certify_headline(certify.get("results", []))},
                                 "results": certify.get("results", [])}
    for name, report in reports.items():
        if name not in benchmarks:
            benchmarks[name] = {"complete": report.get("complete"), "results": report.get("results")}

    build = next((s for s in steps if s["name"] == "build"), None)
    first = next(iter(reports.values()), {})
    return {
        "schema": SCHEMA,
        "mode": "quick",
        "dry_run": dry,
        "finished": final,
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 1),
        "budget": {"total_seconds": total, "steps": {s["name"]: s.get("budget_seconds") for s in steps}},
        "device": env.get("device") or first.get("device"),
        "gpu": env.get("gpu"),
        "versions": {k: env.get(k, first.get(k)) for k in ("python", "torch", "triton", "cuda", "nvcc", "commit")},
        "extension_loaded": env.get("extension_loaded"),
        "build": {"status": build["status"] if build else None,
                  "seconds": build.get("seconds") if build and build["status"] != "skipped" else None,
                  "reason": build.get("reason") if build else None,
                  "arch": env.get("arch"), "jobs": env.get("jobs")},
        "steps": steps,
        "counts": totals,
        "failed_steps": [s["name"] for s in steps if s["status"] in ("failed", "timeout", "crashed")],
        "skipped_for_budget": [s["name"] for s in steps if s["status"] == "skipped"
                               and str(s.get("reason", "")).startswith("budget")],
        "benchmarks": benchmarks,
    }


def probe(path: str) -> None:
    """Write the environment (device, versions, whether the CUDA extension loads) to ``path`` as JSON.
    Called by the script in a process of its own: this one imports torch."""
    import platform
    import subprocess

    def command(*args: str) -> str:
        try:
            run = subprocess.run(args, capture_output=True, text=True, timeout=30)
            return run.stdout.strip() if run.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            return ""

    nvcc = command("nvcc", "--version").splitlines()
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
           "arch": os.environ.get("GPU_CHECK_ARCH") or None, "jobs": os.environ.get("GPU_CHECK_JOBS") or None,
           "nvcc": nvcc[-1].strip() if nvcc else None,
           "commit": command("git", "rev-parse", "--short", "HEAD"),
           "gpu": command("nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                          "--format=csv,noheader") or None}
    try:
        import torch
        env.update(torch=torch.__version__, cuda=torch.version.cuda or "")
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["device_properties"] = {"capability": f"{props.major}.{props.minor}",
                                        "multiprocessors": props.multi_processor_count,
                                        "memory_gib": round(props.total_memory / 2**30, 1)}
        else:
            env["device"] = f"CPU {platform.machine()}, {os.cpu_count()} cores (no CUDA device)"
    except Exception as error:  # noqa: BLE001 -- the probe records what is broken
        env["torch_error"] = f"{type(error).__name__}: {error}"
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as error:  # noqa: BLE001
        env["triton"] = None
        env["triton_error"] = f"{type(error).__name__}: {error}"
    import importlib
    for name in ("cure_fast._C", "cure_fast.cuda._C"):
        try:
            importlib.import_module(name)
            env["extension_loaded"], env["extension"] = True, name
            env.pop("extension_error", None)
            break
        except Exception as error:  # noqa: BLE001
            env["extension_loaded"], env["extension_error"] = False, f"{type(error).__name__}: {error}"
    with open(path, "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--started", type=float, required=True, help="the run's start, seconds since the epoch")
    parser.add_argument("--total", type=float, required=True, help="the run's total budget in seconds")
    parser.add_argument("--dry", action="store_true")
    parser.add_argument("--final", action="store_true")
    args = parser.parse_args()
    summary = summarize(args.out, args.work, args.started, args.total, args.dry, args.final)
    path = os.path.join(args.out, "summary.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(path + ".tmp", path)
    if args.final:
        print(f"wrote {path}")
        for step in summary["steps"]:
            tests = step.get("tests")
            counts = "" if not tests else \
                " ".join(f"{k} {v}" for k, v in tests.items() if v and k != "tests")
            print(f"  {step['name']:<14} {step['status']:<8} {step.get('seconds', 0) or 0:>7.1f} s  {counts}"
                  f"{'  (' + step['reason'] + ')' if step.get('reason') else ''}")
            for failure in step.get("failures", [])[:3]:
                print(f"      {failure['test']}: {failure['error']}")


if __name__ == "__main__":
    main()
