"""Coefficients of backward (CROWN) passes on spatial windows of a feature map.

A backward pass from one neuron of a convolutional layer stays on its receptive field until it
reaches a layer that mixes positions, so it runs on windows instead of whole maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

BLOCK = 32  # the most terms of a partial sum in rowsum


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product of a, b (N, d) -> (N,)."""
    return (a * b).sum(1)


def rowsum(t: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The sum of every row of t (N, ...) -> (N,); with ``dtype``, partial sums of at most BLOCK
    consecutive entries in t's dtype, added up in ``dtype`` (float64 sums without a float64 copy of t)."""
    flat = t.reshape(t.shape[0], -1)
    if dtype is None:
        return flat.sum(1)
    size = next(b for b in range(min(BLOCK, flat.shape[1]), 0, -1) if flat.shape[1] % b == 0)
    return flat.view(flat.shape[0], -1, size).sum(2).sum(1, dtype=dtype)


def runs(rows: Tensor) -> List[Tuple[int, int]]:
    """(sample, count) of each run of equal consecutive entries of rows (N,)."""
    samples, counts = torch.unique_consecutive(rows, return_counts=True)
    return list(zip(samples.tolist(), counts.tolist()))


def pixel_major(t: Tensor) -> Tensor:
    """t (B, C, H, W, *extra) as (B, H, W, C, *extra), contiguous: every pixel's values together."""
    return t.movedim(1, 3).contiguous()


@dataclass
class Window:
    """Coefficients of each row on a spatial window of a (C, H, W) feature map: ``A`` (N, C, h, w) on map
    rows ``top .. top + h - 1`` and columns ``left .. left + w - 1`` (``top``, ``left`` (N,)). A window may
    reach outside the map; A is zero there."""
    A: Tensor
    top: Tensor
    left: Tensor

    def _grid(self) -> Tuple[Tensor, Tensor]:
        """Map row (N, h) and column (N, w) of every window position."""
        h, w = self.A.shape[2:]
        return (self.top[:, None] + torch.arange(h, device=self.top.device),
                self.left[:, None] + torch.arange(w, device=self.left.device))

    def with_A(self, A: Tensor) -> "Window":
        """The same window position with new coefficients of the same spatial size."""
        return Window(A, self.top, self.left)

    def inside(self, height: int, width: int) -> Tensor:
        """Whether each window position lies on the (height, width) map: (N, 1, h, w) bool."""
        i, j = self._grid()
        return (((i >= 0) & (i < height))[:, None, :, None]) & (((j >= 0) & (j < width))[:, None, None, :])

    def take(self, t: Tensor, rows: Tensor) -> Tensor:
        """The values of t (B, C, H, W, *extra) of sample ``rows`` (N,) on each window, (N, C, h, w, *extra);
        positions outside the map take the nearest border value (A is zero there): :meth:`gather` of
        t's :func:`pixel_major` copy."""
        return self.gather(pixel_major(t), rows)

    def gather(self, pixels: Tensor, rows: Tensor) -> Tensor:
        """:meth:`take` from a :func:`pixel_major` copy ``pixels`` (B, H, W, C, *extra), which a caller
        may keep: one row gather (every pixel's C values together), not an element-wise gather."""
        batch, height, width, channels = pixels.shape[:4]
        extra = pixels.shape[4:]
        i, j = self._grid()
        i, j = i.clamp(0, height - 1), j.clamp(0, width - 1)
        pixel = (rows[:, None, None] * height + i[:, :, None]) * width + j[:, None, :]  # (N, h, w)
        table = pixels.view(batch * height * width, channels, *extra)
        values = table.index_select(0, pixel.flatten()).view(*pixel.shape, channels, *extra)
        return values.movedim(3, 1)

    def dense(self, height: int, width: int) -> Tensor:
        """A on the whole (height, width) map, (N, C, height, width)."""
        n, c, h, w = self.A.shape
        i, j = self._grid()
        i, j = i.clamp(0, height - 1), j.clamp(0, width - 1)
        flat = (i[:, :, None] * width + j[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        return self.A.new_zeros(n, c, height * width).scatter_add_(2, flat, self.A.reshape(n, c, h * w)).view(
            n, c, height, width)
