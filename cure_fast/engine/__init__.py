"""The bound propagation engine: one bound class per layer type (:mod:`.layers`), the stacked
streams of one pass (:mod:`.streams`), :class:`BoundedModule` (interval / l2 propagation) and the
CROWN family (:mod:`.crown`)."""
from .bounded import BoundedModule, Propagation

__all__ = ["BoundedModule", "Propagation"]
