"""pytest plugin for ``bench/gpu_check.sh quick``: ``--quick`` keeps a small sample of each test
function's parametrizations instead of all of them.

Load it with ``-p pytest_quick`` (``bench/`` on ``PYTHONPATH``). For each test function it keeps
items until

- every combination of the *axes* it is parametrized over (``dtype``, ``mode`` (dtype, precision),
  ``precision``, ``method``, ``backend``) appears at least once: every kernel family x dtype x
  backend method runs, and
- every value of each other parameter (shape, epilogue, ...) appears at least once,

choosing greedily the item that covers most of what is still missing (ties: collection order). A
test function without parameters is kept as it is. ``--quick-max N`` caps the items per test
function (the dry run of the script uses 1: one item per function, only to check that the tests
collect and run).

    python -m pytest -p pytest_quick --quick tests/test_triton_kernels.py
"""
from collections import OrderedDict
from typing import Dict, Hashable, List, Sequence, Set

AXES = ("dtype", "mode", "precision", "method", "backend")


def pytest_addoption(parser):
    group = parser.getgroup("quick", "sampled parametrizations (bench/gpu_check.sh quick)")
    group.addoption("--quick", action="store_true", default=False,
                    help="keep a cover of each test function's parametrizations: every combination of "
                         f"{', '.join(AXES)} and every value of the other parameters at least once")
    group.addoption("--quick-max", type=int, default=0, metavar="N",
                    help="with --quick: at most N items per test function (0: no cap)")


def elements(params: Dict[str, object]) -> Set[Hashable]:
    """What one item covers: its combination of axis values, and each other (parameter, value)."""
    axes = tuple((name, repr(params[name])) for name in sorted(params) if name in AXES)
    covered: Set[Hashable] = {("axes",) + axes} if axes else set()
    covered |= {(name, repr(value)) for name, value in params.items() if name not in AXES}
    return covered


def cover(params: Sequence[Dict[str, object]], cap: int = 0) -> List[int]:
    """Indices (in order) of a small subset of ``params`` covering every element of every entry."""
    sets = [elements(p) for p in params]
    missing = set().union(*sets) if sets else set()
    chosen: List[int] = []
    while (missing or not chosen) and sets and (not cap or len(chosen) < cap):
        best = max(range(len(sets)), key=lambda i: (len(sets[i] & missing), -i))
        if chosen and not sets[best] & missing:
            break
        chosen.append(best)
        missing -= sets[best]
    return sorted(chosen)


def pytest_collection_modifyitems(config, items):
    if not config.getoption("quick"):
        return
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for item in items:
        function = getattr(item, "originalname", None) or item.name
        groups.setdefault((item.nodeid.split("::")[0], getattr(item.cls, "__name__", None), function), []).append(item)
    keep = set()
    for group in groups.values():
        params = [dict(getattr(getattr(item, "callspec", None), "params", {})) for item in group]
        keep.update(id(group[i]) for i in cover(params, config.getoption("quick_max")))
    selected = [item for item in items if id(item) in keep]
    deselected = [item for item in items if id(item) not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected
