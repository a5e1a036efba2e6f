"""cure_fast: fast, sound bound propagation for multi-norm certified training.

>>> import cure_fast
>>> bm = cure_fast.BoundedModule(model)
>>> out = bm.propagate(x, [cure_fast.LinfBall(2 / 255), cure_fast.L2Ball(0.25)], y)
>>> out.logits, out.bounds, out.margins
"""
from . import functional, models, nn
from .ops.policy import get_backend, get_precision, set_backend, set_precision
from .engine import BoundedModule, Propagation
from .specs import L1Ball, L2Ball, LinfBall

__all__ = ["BoundedModule", "Propagation", "LinfBall", "L2Ball", "L1Ball", "functional", "models", "nn",
           "set_backend", "get_backend", "set_precision", "get_precision"]
__version__ = "0.1.0"
