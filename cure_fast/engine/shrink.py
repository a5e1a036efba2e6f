"""The shrinking box: a training heuristic of the CURE reference code (taken there from SABR's code),
NOT a bound.

At every ReLU, the pre-activation interval ``[l, u]`` of the chosen input sets is made smaller
before the ReLU is applied; everything after that ReLU is computed from the smaller box. The result
is not a sound bound of the network over the input set (a point of the set can reach values the
shrunk box leaves out), so it must never be used to certify: :meth:`BoundedModule.propagate` applies
it only when given ``shrink=`` (the trainer does, when ``shrink_ratio`` is set) and then marks its
:class:`Propagation` ``sound=False``. Certification never passes it.

Methods, with ratio ρ, on the neurons that ``relu_state`` selects:

- ``to_zero``: ``u ← u (1 - ρ/2)``, l kept (for a crossing neuron the ReLU output ``[0, u]`` shrinks
  towards 0): the reference's ``to_zero_shrinking_box``;
- ``std``: both ends move inwards by ``ρ/2 · (u - l)``: ``std_shrinking_box``;
- ``std_upper``: only u moves, by ``ρ/2 · (u - l)``: ``std_upper_shrinking_box``.

``relu_state``: ``cross`` (``l < 0 < u``), ``above`` (``l >= 0``, ``u > 0``) or ``all``. The upper end
never goes below the lower one. The reference's random ``random_loc`` method and its ``wide`` state
are not implemented.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from .streams import Interval, Streams

METHODS = ("to_zero", "std", "std_upper")
RELU_STATES = ("cross", "above", "all")


@dataclass(frozen=True)
class ShrinkBox:
    """How to shrink: ``ratio`` in (0, 1], ``method`` of :data:`METHODS`, ``relu_state`` of
    :data:`RELU_STATES`, and ``specs``, the indices (in the ``specs`` given to ``propagate``) of the
    input sets to shrink; the others and the natural stream are left as they are."""
    ratio: float
    method: str = "to_zero"
    relu_state: str = "cross"
    specs: Tuple[int, ...] = (0,)

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ShrinkBox ratio must lie in (0, 1], got {self.ratio}")
        if self.method not in METHODS:
            raise ValueError(f"ShrinkBox method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.relu_state not in RELU_STATES:
            raise ValueError(f"ShrinkBox relu_state must be one of {', '.join(RELU_STATES)}, got {self.relu_state!r}")

    def selected(self, lower: Tensor, upper: Tensor) -> Tensor:
        """(B, *shape) bool: the neurons to shrink, from the pre-activation bounds."""
        if self.relu_state == "cross":
            return (lower < 0) & (upper > 0)
        if self.relu_state == "above":
            return (lower >= 0) & (upper > 0)
        return torch.ones_like(lower, dtype=torch.bool)

    def interval(self, lower: Tensor, upper: Tensor) -> Interval:
        """Shrunk pre-activation bounds ``(lower, upper)``, each (B, *shape) as given."""
        step = (upper - lower) * (self.ratio / 2)
        if self.method == "to_zero":
            new_lower, new_upper = lower, upper * (1 - self.ratio / 2)
        elif self.method == "std":
            new_lower, new_upper = lower + step, upper - step
        else:
            new_lower, new_upper = lower, upper - step
        chosen = self.selected(lower, upper)
        new_lower = torch.where(chosen, new_lower, lower)
        return new_lower, torch.where(chosen, torch.maximum(new_upper, new_lower), upper)

    def streams(self, s: Streams) -> Streams:
        """``s`` (every spec an interval block, :meth:`Streams.boxed`) with the blocks of ``specs`` shrunk."""
        if not s.order:
            return s
        blocks = []
        for k in s.order:
            c, r = s.block(k)
            if k in self.specs:
                lower, upper = self.interval(c - r, c + r)
                c, r = (upper + lower) / 2, (upper - lower) / 2
            blocks.append((c, r))
        points = s.c[: s.batch * s.points]
        return s.like(torch.cat([points] + [c for c, _ in blocks]), torch.cat([r for _, r in blocks]))
