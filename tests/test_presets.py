"""The paper presets: each loads, its key values match the table below (values of the CURE
reference scripts, see docs/reproduction.md: a change here is a change of the reproduction), and
each runs one training step on the CPU (fake CIFAR-10 / TinyImageNet files, tiny limits)."""
import pickle
import types

import numpy as np
import pytest
import torch
from PIL import Image

from cure_fast import data, models
from cure_fast.config import load_config, presets
from cure_fast.errors import ConfigError
from cure_fast.training import objectives
from cure_fast.training.batch import Objective, training_sets
from cure_fast.training.trainer import Trainer

FIELDS = ("dataset", "norms", "eps_inf", "eps_2", "lambda_inf", "lambda_2", "l1_penalty", "epochs", "lr_milestones",
          "eps_start_epoch", "eps_end_epoch", "batch_size", "combine", "align_lambda", "align_reference", "gp_beta",
          "eval_eps_2", "gp_start_epoch", "reg_zero_eps_box", "shrink")
# shrink: (shrink_ratio, shrink_method, shrink_relu_state, shrink_norms), or None when shrink_ratio is null.
# Epochs are 0-based here; the reference counts from 1 (from 0 when fine-tuning with --start_epoch 0) and
# steps its lr scheduler before each epoch: see docs/reproduction.md, "Epoch numbering".
EXPECTED = {
    "cifar10-2-2": ('cifar10', ['2'], 2/255, 0.25, 1e-05, 1e-05, 0.0, 160, [119, 139], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 0.25, None, None, None),
    "cifar10-2-cure": ('cifar10', ['inf', '2'], 2/255, 0.25, 0.1, 1e-05, 1e-06, 160, [119, 139], 1, 81, 128, 'max', 2.0, 'inf', 0.8, 0.25, 82, 1e-06, (0.4, 'to_zero', 'cross', ['inf'])),
    "cifar10-2-cure-finetune": ('cifar10', ['inf', '2'], 2/255, 0.25, 0.1, 1e-05, 1e-06, 33, [23, 27], 2, 16, 128, 'joint', 0.5, 'inf', 0.5, 0.25, 17, 1e-06, (0.4, 'to_zero', 'cross', ['inf'])),
    "cifar10-2-inf": ('cifar10', ['inf'], 2/255, 0.25, 0.1, 0.1, 1e-06, 160, [119, 139], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 0.25, None, 1e-06, (0.4, 'to_zero', 'cross', ['inf'])),
    "cifar10-2-joint": ('cifar10', ['inf', '2'], 2/255, 0.25, 0.1, 1e-05, 1e-06, 160, [119, 139], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 0.25, None, 1e-06, (0.4, 'to_zero', 'cross', ['inf'])),
    "cifar10-2-max": ('cifar10', ['inf', '2'], 2/255, 0.25, 0.1, 1e-05, 1e-06, 160, [119, 139], 1, 81, 128, 'max', 0.0, 'inf', 0.0, 0.25, None, 1e-06, (0.4, 'to_zero', 'cross', ['inf'])),
    "cifar10-2-random": ('cifar10', ['inf', '2'], 2/255, 0.25, 0.1, 1e-05, 1e-06, 160, [119, 139], 1, 81, 128, 'random', 0.0, 'inf', 0.0, 0.25, None, 1e-06, (0.4, 'to_zero', 'cross', ['inf', '2'])),
    "cifar10-8-2": ('cifar10', ['2'], 8/255, 0.5, 1e-05, 1e-05, 0.0, 160, [119, 139], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 0.5, None, None, None),
    "cifar10-8-cure": ('cifar10', ['inf', '2'], 8/255, 0.5, 0.7, 1e-05, 0.0, 180, [139, 159], 1, 81, 128, 'max', 2.0, 'inf', 0.8, 0.5, 82, 1e-06, None),
    "cifar10-8-cure-finetune": ('cifar10', ['inf', '2'], 8/255, 0.5, 0.7, 1e-05, 0.0, 37, [27, 31], 2, 16, 128, 'max', 0.5, 'inf', 0.5, 0.5, 17, 1e-06, None),
    "cifar10-8-inf": ('cifar10', ['inf'], 8/255, 0.5, 0.7, 0.7, 0.0, 180, [139, 159], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "cifar10-8-joint": ('cifar10', ['inf', '2'], 8/255, 0.5, 0.7, 1e-05, 0.0, 180, [139, 159], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "cifar10-8-max": ('cifar10', ['inf', '2'], 8/255, 0.5, 0.7, 1e-05, 0.0, 180, [139, 159], 1, 81, 128, 'max', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "cifar10-8-random": ('cifar10', ['inf', '2'], 8/255, 0.5, 0.7, 1e-05, 0.0, 180, [139, 159], 1, 81, 128, 'random', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "mnist-0.1-2": ('mnist', ['2'], 0.1, 0.5, 1e-05, 1e-05, 0.0, 70, [49, 59], 1, 21, 256, 'joint', 0.0, 'inf', 0.0, 0.5, None, None, None),
    "mnist-0.1-cure": ('mnist', ['inf', '2'], 0.1, 0.75, 0.4, 1e-05, 1e-05, 70, [49, 59], 1, 21, 256, 'max', 2.0, '2', 0.8, 0.5, 22, 1e-06, None),
    "mnist-0.1-cure-finetune": ('mnist', ['inf', '2'], 0.1, 0.5, 0.4, 1e-05, 1e-05, 15, [9, 11], 2, 15, 256, 'max', 0.5, '2', 0.0, 0.5, None, 1e-06, None),
    "mnist-0.1-inf": ('mnist', ['inf'], 0.1, 0.75, 0.4, 0.4, 1e-05, 70, [49, 59], 1, 21, 256, 'joint', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "mnist-0.1-joint": ('mnist', ['inf', '2'], 0.1, 0.75, 0.4, 1e-05, 1e-05, 70, [49, 59], 1, 21, 256, 'joint', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "mnist-0.1-max": ('mnist', ['inf', '2'], 0.1, 0.75, 0.4, 1e-05, 1e-05, 70, [49, 59], 1, 21, 256, 'max', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "mnist-0.1-random": ('mnist', ['inf', '2'], 0.1, 0.75, 0.4, 1e-05, 1e-05, 70, [49, 59], 1, 21, 256, 'random', 0.0, 'inf', 0.0, 0.5, None, 1e-06, None),
    "mnist-0.3-2": ('mnist', ['2'], 0.3, 1.0, 1e-05, 1e-05, 0.0, 70, [49, 59], 1, 21, 256, 'joint', 0.0, 'inf', 0.0, 1.0, None, None, None),
    "mnist-0.3-cure": ('mnist', ['inf', '2'], 0.3, 1.0, 0.6, 1e-05, 1e-06, 70, [49, 59], 1, 21, 256, 'max', 0.5, '2', 0.8, 1.0, 22, 1e-06, None),
    "mnist-0.3-cure-finetune": ('mnist', ['inf', '2'], 0.3, 1.0, 0.6, 1e-05, 1e-06, 15, [9, 11], 2, 4, 256, 'max', 0.5, '2', 0.5, 1.0, 5, 1e-06, None),
    "mnist-0.3-inf": ('mnist', ['inf'], 0.3, 1.0, 0.6, 0.6, 1e-06, 70, [49, 59], 1, 21, 256, 'joint', 0.0, 'inf', 0.0, 1.0, None, 1e-06, None),
    "mnist-0.3-joint": ('mnist', ['inf', '2'], 0.3, 1.0, 0.6, 1e-05, 1e-06, 70, [49, 59], 1, 21, 256, 'joint', 0.0, 'inf', 0.0, 1.0, None, 1e-06, None),
    "mnist-0.3-max": ('mnist', ['inf', '2'], 0.3, 1.0, 0.6, 1e-05, 1e-06, 70, [49, 59], 1, 21, 256, 'max', 0.0, 'inf', 0.0, 1.0, None, 1e-06, None),
    "mnist-0.3-random": ('mnist', ['inf', '2'], 0.3, 1.0, 0.6, 1e-05, 1e-06, 70, [49, 59], 1, 21, 256, 'random', 0.0, 'inf', 0.0, 1.0, None, 1e-06, None),
    "tinyimagenet-1-2": ('tinyimagenet', ['2'], 1/255, 36/255, 1e-05, 1e-05, 0.0, 180, [139, 159], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 36/255, None, None, None),
    "tinyimagenet-1-cure": ('tinyimagenet', ['inf', '2'], 1/255, 36/255, 0.4, 1e-05, 1e-06, 180, [139, 159], 1, 81, 128, 'max', 2.0, 'inf', 0.5, 36/255, 82, 1e-06, None),
    "tinyimagenet-1-cure-finetune": ('tinyimagenet', ['inf', '2'], 1/255, 36/255, 0.4, 1e-05, 1e-06, 37, [27, 31], 2, 16, 128, 'max', 0.5, 'inf', 0.5, 36/255, 17, 1e-06, None),
    "tinyimagenet-1-inf": ('tinyimagenet', ['inf'], 1/255, 36/255, 0.4, 0.4, 1e-06, 180, [139, 159], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 36/255, None, 1e-06, None),
    "tinyimagenet-1-joint": ('tinyimagenet', ['inf', '2'], 1/255, 36/255, 0.4, 1e-05, 1e-06, 180, [139, 159], 1, 81, 128, 'joint', 0.0, 'inf', 0.0, 36/255, None, 1e-06, None),
    "tinyimagenet-1-max": ('tinyimagenet', ['inf', '2'], 1/255, 36/255, 0.4, 1e-05, 1e-06, 180, [139, 159], 1, 81, 128, 'max', 0.0, 'inf', 0.0, 36/255, None, 1e-06, None),
    "tinyimagenet-1-random": ('tinyimagenet', ['inf', '2'], 1/255, 36/255, 0.4, 1e-05, 1e-06, 180, [139, 159], 1, 81, 128, 'random', 0.0, 'inf', 0.0, 36/255, None, 1e-06, None),
}
PAPER = sorted(EXPECTED)
REFERENCE_PROCEDURES = {"method": "sabr", "model": "cnn7", "lr": 0.0005, "sabr_l2_set": "reference", "pgd_steps": 8,
                        "pgd_schedule": "reference", "grad_clip": None, "reg_placement": "reference",
                        "normalization": "reference", "final_certify": "alpha-crown", "eps_schedule": "exp"}


def key_values(config):
    values = {name: getattr(config, name, None) for name in FIELDS}
    values.update(lambda_inf=config.small_ratio("inf"), lambda_2=config.small_ratio("2"), eval_eps_2=config.eval_eps("2"))
    values["shrink"] = None if config.shrink_ratio is None else (
        config.shrink_ratio, config.shrink_method, config.shrink_relu_state, config.shrink_norms)
    return tuple(values[name] for name in FIELDS)


def test_every_paper_preset_is_in_the_table():
    shipped = [p for p in presets() if not p.startswith("mnist-demo")]
    assert sorted(shipped) == PAPER
    for setting in ("mnist-0.1", "mnist-0.3", "cifar10-2", "cifar10-8", "tinyimagenet-1"):
        for variant in ("inf", "2", "joint", "max", "random", "cure", "cure-finetune"):
            assert f"{setting}-{variant}" in EXPECTED


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A file for the fine-tuning presets' required init_from (validation checks that it is a file)."""
    path = tmp_path_factory.mktemp("pretrained") / "model.pt"
    path.write_bytes(b"")
    return path


def load_paper(name, pretrained, overrides=()):
    return load_config(name, overrides=list(overrides) + ([f"init_from={pretrained}"] if "finetune" in name else []))


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_values(name, pretrained):
    config = load_paper(name, pretrained)
    got = key_values(config)
    for field, value, expected in zip(FIELDS, got, EXPECTED[name]):
        assert value == pytest.approx(expected, rel=1e-9) if isinstance(expected, float) else value == expected, \
            f"{name}: {field} = {value!r}, the table says {expected!r}"
    for key, expected in REFERENCE_PROCEDURES.items():
        assert getattr(config, key) == expected, f"{name}: {key}"
    if config.dataset == "mnist":
        assert config.train_split == "train+validation"


def _fake_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": rng.integers(0, 10, 4).tolist(), b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def _fake_tinyimagenet(root):
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    wnids = ["n01", "n02"]
    folder.mkdir()
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{wnid}_{i}.JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "val" / "images" / "val_0.JPEG")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn01\t0\t0\t63\t63\n")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    _fake_cifar10(root)
    _fake_tinyimagenet(root)
    return str(root)


_LOADED = {}


def _training_images(dataset, split, root):
    """The first 4 training images of a split, each split read once."""
    if (dataset, split) not in _LOADED:
        images = data.load_dataset(dataset, split, root)
        if (dataset, split) == ("mnist", "train+validation"):
            assert len(images) == 60_000
        _LOADED[dataset, split] = data.ImageData(images.images[:4], images.labels[:4])
    return _LOADED[dataset, split]


@pytest.mark.parametrize("name", PAPER)
def test_paper_preset_trains_one_step(name, data_root, pretrained):
    """One step of the preset's objective at half its eps (the warm-up regularizer on, the shrinking box
    where set), and one at eps = 0 (the regularizer on the tiny box where set), as the trainer takes them."""
    torch.manual_seed(0)
    config = load_paper(name, pretrained, ["pgd_steps=2", "batch_size=4", "train_limit=4", "eval_limit=2",
                                           "device=cpu", "model_args={width: 4, linear: 16}",  # a narrow CNN7: fast
                                           f"data_root={data_root if not name.startswith('mnist') else 'null'}"])
    train = _training_images(config.dataset, config.train_split, config.data_root)
    model = models.build(config.model, config.dataset, config.normalization, **config.model_args)
    objectives.ibp_init(model)
    x, y = next(data.batches(train.images, train.labels, 4, shuffle=False, drop_last=config.drop_last))
    x = data.augment(config.dataset, x)
    eps = {n: config.train_eps(n) / 2 for n in config.norms}
    specs = training_sets(config, model, x, y, eps)
    assignment = torch.zeros(2, 4, dtype=torch.bool) if config.combine == "random" else None
    if assignment is not None:
        assignment[0, :2], assignment[1, 1:3] = True, True
    loss, logits, margins = Objective(model, config)(x, y, specs, regularizer_weight=config.reg_lambda / 2,
                                                     assignment=assignment)
    assert torch.isfinite(loss) and logits.shape == (4, models.DATASETS[config.dataset].classes)
    assert len(margins) == len(config.norms)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    zero = {n: 0.0 for n in config.norms}  # a step of the first epoch, at eps = 0, as the trainer takes it
    weight = Trainer._regularizer_weight(types.SimpleNamespace(config=config), zero)
    assert weight == (config.reg_lambda if config.reg_zero_eps_box is not None and config.norms != ["2"] else 0.0)
    loss, _, margins = Objective(model, config)(x, y, [], regularizer_weight=weight)
    assert torch.isfinite(loss) and margins == []
    loss.backward()


@pytest.mark.parametrize("override, match", [
    ("sabr_l2_set=sphere", "sabr_l2_set"), ("sabr_lambda_inf=0", "sabr_lambda_inf"), ("sabr_lambda_2=2", "sabr_lambda_2"),
    ("pgd_schedule=fast", "pgd_schedule"), ("grad_clip=0", "grad_clip"), ("l1_penalty=-1", "l1_penalty"),
    ("reg_placement=first", "reg_placement"), ("normalization=none", "normalization"), ("drop_last=maybe", "drop_last"),
    ("train_split=all", "train_split"), ("final_certify=beta-crown", "final_certify"), ("align_target=x", "align_target"),
    ("random_split=thirds", "random_split"), ("gp_natural=x", "gp_natural"),
    ("eps_schedule=cosine", "eps_schedule='cosine'.*smooth, exp, linear"), ("eps_schedule=expo", "did you mean 'exp'"),
    ("reg_zero_eps_box=0", "reg_zero_eps_box=0.*\\(0, 1\\].*or null"), ("reg_zero_eps_box=abc", "reg_zero_eps_box"),
    ("gp_start_epoch=-1", "gp_start_epoch=-1.*null: eps_end_epoch"), ("gp_start_epoch=2.5", "gp_start_epoch"),
    ("shrink_ratio=1.5", "shrink_ratio=1.5.*\\(0, 1\\]"), ("shrink_ratio=0", "shrink_ratio"),
    ("shrink_method=random_loc", "shrink_method='random_loc'.*to_zero, std, std_upper"),
    ("shrink_relu_state=wide", "shrink_relu_state='wide'.*cross, above, all"), ("shrink_norms=[1]", "shrink_norms"),
    ("shrink_norms=[]", "shrink_norms"),
])
def test_new_options_are_one_line_errors(override, match):
    with pytest.raises(ValueError, match=match) as error:
        load_config("mnist-demo-inf", overrides=[override])
    assert "\n" not in str(error.value)


def test_the_shrinking_box_needs_a_certified_method():
    with pytest.raises(ValueError, match="shrinking box \\(shrink_ratio=0.4\\) .* needs method ibp or sabr, not pgd") \
            as error:
        load_config("mnist-demo-inf", overrides=["method=pgd", "shrink_ratio=0.4"])
    assert "\n" not in str(error.value)


def test_train_split_is_for_mnist():
    with pytest.raises(ValueError, match="train_split=train\\+validation is for MNIST"):
        load_config("cifar10-2-cure", overrides=["train_split=train+validation"])


def test_null_grad_clip_and_per_norm_lambda():
    config = load_config("mnist-demo-cure", overrides=["grad_clip=null", "sabr_lambda=0.3", "sabr_lambda_2=1e-5"])
    assert config.grad_clip is None and config.small_ratio("inf") == 0.3 and config.small_ratio("2") == 1e-5


@pytest.mark.parametrize("name", [p for p in PAPER if p.endswith("finetune")])
def test_a_fine_tuning_preset_without_pretrained_weights_is_refused(name):
    with pytest.raises(ConfigError, match=f"{name} fine-tunes a pretrained model: give its weights with --set init_from"):
        load_config(name)
