"""The contract of a bound layer: everything one layer type means to the engine, in one class.

A :class:`Layer` subclass handles the ``torch.nn`` module types in its ``types`` and holds, side by
side: the checks of the module and of its input, the interval step on the stacked streams
(:meth:`Layer.step`, with a fusable epilogue for the affine and per-channel layers), the exact l2
step where one exists, and for certification the backward operator (:meth:`Layer.operator`,
CROWN's exact step through a linear layer) or the linear relaxation of an activation
(:meth:`Layer.relaxation`). :func:`register_layer` maps the module types to the class;
:class:`~cure_fast.engine.bounded.BoundedModule` and :mod:`~cure_fast.engine.crown` only loop over
layers. See docs/design.md, "How to add a layer type".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..streams import Interval, Streams
from ..window import Window, rowsum

Affine = Tuple[Tensor, Tensor]  # per-channel (scale, shift), each (C,)
LAYERS: Dict[type, Type["Layer"]] = {}


@dataclass(frozen=True)
class Context:
    """Options of one propagation: the ops' backend and precision, and the number of input sets."""
    backend: Optional[str]
    precision: Optional[str]
    n_specs: int


class Operator:
    """CROWN's exact backward step through one linear layer of the eval-mode network.

    ``ibp`` says what the layer does to the exactness of interval bounds: ``"affine"`` (one mixing
    affine map: IBP after a single one is exact), ``"neutral"`` (per-channel affine or reshape) or
    ``"inexact"``. ``local`` operators act position by position on a (C, H, W) map and implement
    :meth:`back_window`.

    For sound bounds (:mod:`..rounding`): ``exact`` operators (reshapes) round nothing; the others
    give ``fan_in`` (terms of a forward dot product, without the bias), ``fan_out`` (the most
    non-zero terms of a coefficient of the transposed product) and :meth:`magnitude`; their bias
    terms are summed in ``accumulate`` (None: A's dtype; in the sound modes float64: in float32, from
    products and partial sums of at most ``window.BLOCK`` terms in float32; in float64, as dot
    products in any order, whose error γ'_n is within the one charged).
    """
    local: bool = False
    ibp: str = "inexact"
    exact: bool = False
    fan_in: int = 0
    fan_out: int = 0
    accumulate: Optional[torch.dtype] = None

    def channel_term(self, A: Tensor, bias: Tensor) -> Tensor:
        """``sum A[n, c, ...] bias[c]`` (N,) for A (N, C, ...), summed in ``accumulate``: in A's dtype as
        per-channel sums times the bias (a dot product of n entries in another order: its error is
        within ``γ_{n+1}``, below the ``γ_33 + 2 γ_n`` the sound modes charge for it)."""
        if self.accumulate in (None, A.dtype):
            return A.reshape(A.shape[0], A.shape[1], -1).sum(2) @ bias
        return rowsum(A * bias.view((1, -1) + (1,) * (A.dim() - 2)), self.accumulate)

    def back(self, A: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Coefficients A (N, *out shape) on the output -> those on the input (N, *in shape) and the
        bias term (N,) or None."""
        raise NotImplementedError

    def back_window(self, window: Window) -> Tuple[Window, Optional[Tensor]]:
        """:meth:`back` on windows of a (C, H, W) map (local operators only)."""
        raise NotImplementedError

    def window_size(self, height: int, width: int) -> Tuple[int, int]:
        """The size of the input window that :meth:`back_window` makes of a (height, width) one."""
        return height, width

    def interval(self, c: Tensor, r: Tensor) -> Interval:
        """The exact interval image (pure PyTorch) of ``(c, r)`` (B, *in shape)."""
        raise NotImplementedError

    def magnitude(self, m: Tensor, bias: bool = True) -> Tensor:
        """``|W| m + |b|`` (``|W| m`` without ``bias``) for m (B, *in shape) >= 0, in m's dtype."""
        raise NotImplementedError

    def deviation(self, m: Tensor) -> Optional[Tensor]:
        """``|W* - W| m + |b* - b|`` (float64) where the coefficients W, b in the working dtype round
        real ones W*, b*; None when they are the real ones."""
        return None

    def derivation_error(self, m: Tensor) -> Optional[Tensor]:
        """The part of :meth:`deviation` between the float64 coefficients (those of :meth:`interval` on
        float64 inputs) and the real ones; None when they are the real ones."""
        return None

    def dual(self, x: Tensor, eps: Tensor, axes: Tensor, p: float) -> Interval:
        """Affine layers: ``(W x + b, eps |W_i ⊙ axes|_dual)`` in x's dtype (the exact first layer
        over an l2 (p = 2) or l1 (p = 1) ball with ellipsoid axes ``axes``)."""
        raise NotImplementedError


class Layer:
    """Bounds through one layer (see the module docstring). Subclasses set ``types`` and override
    what applies to them; the defaults describe a layer that takes part in nothing optional."""
    types: ClassVar[Tuple[type, ...]] = ()
    fuses: ClassVar[str] = ""  # "affine": runs a following channel affine and ReLU in its op; "channel": a ReLU
    relu_epilogue: ClassVar[bool] = False  # can be the ReLU of a fused epilogue
    activation: ClassVar[bool] = False  # a nonlinearity: relaxed by CROWN, its input bounds are pre-activation bounds

    def __init__(self, module: nn.Module, position: str):
        self.module, self.position = module, position
        self.check()

    def describe(self) -> str:
        return f"layer {self.position} ({self.module})"

    def check(self) -> None:
        """A ValueError naming the layer when the module has a setting the engine cannot bound."""

    def check_input(self, c: Tensor) -> None:
        """A ValueError naming the layer when its input (B, ...) has the wrong per-sample shape."""

    def expect(self, ok: bool, want: str, c: Tensor) -> None:
        if not ok:
            raise ValueError(f"{self.describe()} expects per-sample input of shape {want}, got {tuple(c.shape[1:])}")

    def step(self, s: Streams, ctx: Context) -> Tuple[Streams, Optional[Affine]]:
        """The layer on every stream; returns the new streams and, for a per-channel affine layer, the
        (scale, shift) it applied (folded into the specification when it follows the last Linear)."""
        raise NotImplementedError

    def fused(self, s: Streams, ctx: Context, affine: Optional[Affine], relu: bool) -> Streams:
        """Heads of fused groups (``fuses`` set): the layer, then ``affine`` and the interval ReLU, as one op."""
        raise NotImplementedError

    def affine(self, natural: Tensor, ctx: Context) -> Affine:
        """Per-channel layers: (scale, shift) for the natural stream (B, C, ...)."""
        raise NotImplementedError

    def folds_into(self, head: "Layer", s: Streams) -> bool:
        """Whether this layer can run inside the epilogue of ``head`` (an affine layer) on streams ``s``."""
        return False

    def follows_spec(self) -> bool:
        """Whether the specification can be folded through this layer when it follows the last Linear."""
        return False

    def is_random(self) -> bool:
        """Whether the layer draws random numbers in its current mode (train-mode dropout)."""
        return False

    def check_certifiable(self) -> None:
        """A ValueError naming the layer when the eval-mode network is not defined by it (CROWN)."""

    def operator(self, h: Tensor) -> Optional[Operator]:
        """The backward operator for the layer's input h (B, ...); None for an activation."""
        raise NotImplementedError

    def relaxation(self, lower: Tensor, upper: Tensor, outward: bool = False):
        """Activations: the linear relaxation over pre-activation bounds (B, *shape); ``outward``: one
        that holds exactly for its slopes and offsets (the sound modes)."""
        raise NotImplementedError

    def image(self, lower: Tensor, upper: Tensor) -> Interval:
        """Activations: the exact bounds ``(lower', upper')`` of the output over ``[lower, upper]``."""
        raise NotImplementedError


def register_layer(cls: Type[Layer]) -> Type[Layer]:
    """Class decorator: ``cls`` handles every module type in ``cls.types``."""
    for module_type in cls.types:
        LAYERS[module_type] = cls
    return cls
