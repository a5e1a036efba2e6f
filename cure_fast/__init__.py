"""cure_fast: fast, sound bound propagation for multi-norm certified training.

>>> import cure_fast
>>> bm = cure_fast.BoundedModule(model)
>>> out = bm.propagate(x, [cure_fast.LinfBall(2 / 255), cure_fast.L2Ball(0.25)], y)
>>> out.logits, out.bounds, out.margins
"""
import importlib
from typing import Any, List

__all__ = ["BoundedModule", "Propagation", "LinfBall", "L2Ball", "L1Ball", "functional", "models", "nn",
           "set_backend", "get_backend", "set_precision", "get_precision"]
__version__ = "0.1.0"

_HOMES = {"BoundedModule": "engine", "Propagation": "engine", "LinfBall": "specs", "L2Ball": "specs",
          "L1Ball": "specs", "set_backend": "ops.policy", "get_backend": "ops.policy",
          "set_precision": "ops.policy", "get_precision": "ops.policy"}


def __getattr__(name: str) -> Any:
    """The public names, imported on first use: ``import cure_fast`` alone does not import torch (the
    command line answers Ctrl-C during its imports with one line)."""
    if name in ("functional", "models", "nn"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
