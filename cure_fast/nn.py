"""Modules that BoundedModule understands beyond torch.nn."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """Per-channel input normalization ``(x - mean) / std``, channels on dim 1.

    Put it first in a model so that input sets (eps) are expressed in pixel space.

    Args:
        mean: per-channel means, a sequence or tensor of shape ``(C,)``.
        std: per-channel standard deviations (all > 0), shape ``(C,)``.
    """

    def __init__(self, mean: Union[Sequence[float], Tensor], std: Union[Sequence[float], Tensor]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(f"Normalize: mean has {mean.numel()} channels but std has {std.numel()}")
        if not (std > 0).all():
            raise ValueError("Normalize: every std must be > 0")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.mean.numel():
            raise ValueError(f"Normalize expects {self.mean.numel()} channels on dim 1, got input of shape {tuple(x.shape)}")

    def channel_affine(self, x: Tensor):
        """``(scale, shift)`` of shape (C,) such that the layer is ``x * scale + shift`` per channel."""
        self._check(x)
        scale = 1.0 / self.std.to(x.dtype)
        return scale, -self.mean.to(x.dtype) * scale

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.to(x.dtype).view(shape)) / self.std.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
