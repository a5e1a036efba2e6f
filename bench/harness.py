"""Shared by the benchmarks: timing, the environment record, the table and the JSON.

On a GPU, times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed
between runs; ``--warmup-ms`` / ``--rep-ms`` set its budget per measurement) over calls that cycle
through several copies of the inputs. ``--smoke`` runs tiny shapes once each on the CPU through the
Triton interpreter, to check that the scripts work. With ``--json``, the scripts rewrite the file
after each case (``"complete": false`` until the last), so a run stopped at a time limit keeps what
it measured.
"""
import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

if "--smoke" in sys.argv[1:] and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read as the Triton kernels are defined: before cure_fast

from cure_fast.validation import integer_type  # noqa: E402  (after the interpreter switch)

TIMING = {"warmup": 25, "rep": 200}  # do_bench's budget per measurement, in ms


def device_type(text: str) -> torch.device:
    """An argparse ``type=``: ``cpu``, ``cuda`` or ``cuda:N`` that this machine has."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is no device; give cpu or cuda (cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: give cpu or cuda (cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device; give cpu")
    return device


def subset_type(known: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse ``type=``: a comma-separated list of names out of ``known``."""
    def parse(text: str) -> List[str]:
        names = text.split(",")
        wrong = [name for name in names if name not in known]
        if wrong:
            raise argparse.ArgumentTypeError(f"{wrong[0]!r} is not one of {', '.join(known)}")
        return names
    return parse


def docstring_help(doc: str) -> dict:
    """``ArgumentParser`` keywords showing a script's docstring whole as its help text."""
    return dict(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def arguments(doc: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None
              ) -> argparse.Namespace:
    """The common options (``extra(parser)`` adds a script's own)."""
    parser = argparse.ArgumentParser(**docstring_help(doc))
    parser.add_argument("--batch", type=integer_type(1), nargs="+", default=[128, 512])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one run each, on the CPU through the Triton interpreter, to check the "
                             "script (its own batch and settings: the others are ignored)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--warmup-ms", type=integer_type(1), default=TIMING["warmup"],
                        help="do_bench warm-up per measurement")
    parser.add_argument("--rep-ms", type=integer_type(1), default=TIMING["rep"],
                        help="do_bench repetitions per measurement")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    TIMING.update(warmup=args.warmup_ms, rep=args.rep_ms)
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.batch, args.no_compile = [2], True
    elif args.device.type != "cuda":
        parser.error("the benchmarks need a CUDA device (or --smoke)")
    return args


def median_ms(fn: Callable[[], object], device: torch.device, smoke: bool = False) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if device.type == "cuda" and not smoke:
        import triton.testing
        return triton.testing.do_bench(fn, warmup=TIMING["warmup"], rep=TIMING["rep"], return_mode="median")
    if not smoke:
        fn()
    times = []
    for _ in range(1 if smoke else 5):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def rotating(make: Callable[[], Sequence], copies: int = 3) -> Callable[[], Sequence]:
    """A function returning, call after call, one of ``copies`` independent input sets from ``make``
    (so that no timed call finds its inputs in cache from the previous one)."""
    pool = itertools.cycle([make() for _ in range(copies)])
    return lambda: next(pool)


def as_tuple(fn: Callable) -> Callable:
    """``fn`` with its result always a tuple of tensors."""
    def wrapped(*args):
        out = fn(*args)
        return out if isinstance(out, tuple) else (out,)
    return wrapped


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> Dict[str, object]:
    """What a result depends on: device, versions, date, commit, and the load average of the machine."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda or "", "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "commit": commit,
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
            "load_average": os.getloadavg()}


def synced_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def save_json(path: str, title: str, device: torch.device, record: Dict) -> None:
    """Write ``record`` with the environment (see :func:`environment`) to ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:  # replaced whole: a run stopped while writing keeps the last file
        json.dump({"benchmark": title, **environment(device), **record}, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def table(rows: List[Dict], columns: Sequence[str]) -> str:
    """Rows as a fixed-width text table; floats with 3 significant digits."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def attempt(errors: Dict[str, str], name: str, fn: Callable[[], object], strict: bool = False):
    """``fn()``, or None after recording its exception's first line under ``errors[name]`` (so that one
    failing backend leaves the others' figures; ``strict``: raise instead, as the smoke runs do)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 -- any failure of one measured variant is a result
        if strict:
            raise
        errors[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        print(f"!! {name}: {errors[name]}", flush=True)
        return None


def partial(title: str, rows: List[Dict], args: argparse.Namespace) -> None:
    """Write the rows measured so far (``"complete": false``) to ``args.json``, if given."""
    if args.json:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            save_json(args.json, title, args.device, {"results": rows, "complete": False})


def report(title: str, rows: List[Dict], columns: Sequence[str], args: argparse.Namespace) -> None:
    env = environment(args.device)
    print(f"{title} — {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    print(table(rows, columns))
    if args.json:
        save_json(args.json, title, args.device, {"results": rows, "complete": True})
