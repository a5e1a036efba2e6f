"""Networks of the certified-training literature, each an ``nn.Sequential`` starting with the
dataset's :class:`~cure_fast.nn.Normalize` so that input sets (eps) live in pixel space.

>>> model = cnn7(DATASETS["cifar10"])            # CNN7 for CIFAR-10, 3x32x32 -> 10
>>> model = build("cnn3", "mnist")               # by name (yours too, after register())
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import yaml
from torch import nn

from .nn import Normalize


@dataclass(frozen=True)
class DatasetInfo:
    """Input shape (C, H, W), number of classes and per-channel normalization of a data set."""
    shape: Tuple[int, int, int]
    classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


DATASETS: Dict[str, DatasetInfo] = {
    "mnist": DatasetInfo((1, 28, 28), 10, (0.1307,), (0.3081,)),
    "cifar10": DatasetInfo((3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "tinyimagenet": DatasetInfo((3, 56, 56), 200, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}


def _conv_stack(data: DatasetInfo, convs: Sequence[Tuple[int, int, int, int]], batchnorm: bool):
    """Normalize, then Conv2d(+BatchNorm)+ReLU per (channels, kernel, stride, padding); returns the
    layers and the flattened feature count."""
    channels, height, width = data.shape
    layers = [Normalize(data.mean, data.std)]
    for out, kernel, stride, padding in convs:
        layers.append(nn.Conv2d(channels, out, kernel, stride, padding, bias=not batchnorm))
        layers += [nn.BatchNorm2d(out)] if batchnorm else []
        layers.append(nn.ReLU())
        channels = out
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
    return layers + [nn.Flatten()], channels * height * width


def _dense_head(features: int, hidden: Sequence[int], classes: int, batchnorm: bool):
    layers = []
    for units in hidden:
        layers.append(nn.Linear(features, units, bias=not batchnorm))
        layers += [nn.BatchNorm1d(units)] if batchnorm else []
        layers.append(nn.ReLU())
        features = units
    return layers + [nn.Linear(features, classes)]


def cnn7(data: DatasetInfo, width: int = 64, linear: int = 512, batchnorm: bool = True) -> nn.Sequential:
    """CNN7: conv 64-64-128-128-128 (3x3, strides 1,1,2,1,1, padding 1), each BatchNorm+ReLU;
    Linear 512 + BatchNorm1d + ReLU; Linear to the classes. ``width`` scales the conv channels."""
    w = width
    convs = [(w, 3, 1, 1), (w, 3, 1, 1), (2 * w, 3, 2, 1), (2 * w, 3, 1, 1), (2 * w, 3, 1, 1)]
    layers, features = _conv_stack(data, convs, batchnorm)
    return nn.Sequential(*layers, *_dense_head(features, [linear], data.classes, batchnorm))


def cnn5(data: DatasetInfo, width: int = 32, linear: int = 256, batchnorm: bool = True) -> nn.Sequential:
    """CNN5: conv 32 (3x3, s1), conv 64 (4x4, s2), conv 64 (4x4, s2), each BatchNorm+ReLU;
    Linear 256 + BatchNorm1d + ReLU; Linear to the classes."""
    w = width
    layers, features = _conv_stack(data, [(w, 3, 1, 1), (2 * w, 4, 2, 1), (2 * w, 4, 2, 1)], batchnorm)
    return nn.Sequential(*layers, *_dense_head(features, [linear], data.classes, batchnorm))


def cnn3(data: DatasetInfo, width: int = 16, batchnorm: bool = True) -> nn.Sequential:
    """CNN3: conv 16 and conv 32 (4x4, stride 2, padding 1), each BatchNorm+ReLU; Linear to the classes."""
    layers, features = _conv_stack(data, [(width, 4, 2, 1), (2 * width, 4, 2, 1)], batchnorm)
    return nn.Sequential(*layers, *_dense_head(features, [], data.classes, batchnorm))


def mlp(data: DatasetInfo, hidden: Sequence[int] = (512, 512), batchnorm: bool = False) -> nn.Sequential:
    """MLP: Normalize, Flatten, then Linear(+BatchNorm1d)+ReLU per hidden width, Linear to the classes."""
    channels, height, width = data.shape
    features = channels * height * width
    head = _dense_head(features, hidden, data.classes, batchnorm)
    return nn.Sequential(Normalize(data.mean, data.std), nn.Flatten(), *head)


MODELS: Dict[str, Callable[..., nn.Sequential]] = {"cnn7": cnn7, "cnn5": cnn5, "cnn3": cnn3, "mlp": mlp}
BUILT_IN = tuple(MODELS)


def register(name: str, builder: Callable[..., nn.Sequential]) -> Callable[..., nn.Sequential]:
    """Make ``builder(data: DatasetInfo, **model_args) -> nn.Sequential`` the model ``name`` of this
    process: the config key ``model``, :class:`~cure_fast.training.Trainer` and ``certify_run`` build it
    by name (its keyword arguments with defaults become ``model_args``, checked by the type of the
    default). ``data`` carries the input shape, the classes and the normalization's mean and std: start
    with ``Normalize(data.mean, data.std)`` as the built-in models do, so that eps is in pixel units.
    Registering a name again replaces it; a built-in name is refused. Returns ``builder``::

        models.register("wide-mlp", lambda data, hidden=1024: models.mlp(data, (hidden, hidden)))
        Trainer(load_config("mnist-demo-cure", overrides=["model=wide-mlp", "model_args={hidden: 256}"])).run()

    Only the process that registers a name knows it: certify the run (``certify_run``) from such a
    process, and under DDP register it in the code every process runs.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"a model name is a non-empty string without surrounding spaces, got {name!r}")
    if yaml.safe_load(name) != name:
        raise ValueError(f"model name {name!r} reads as {yaml.safe_load(name)!r} in a config file; choose another")
    if name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in model ({', '.join(BUILT_IN)}): register yours under another name")
    if not callable(builder):
        raise TypeError(f"builder must be callable as builder(data, **model_args), got {type(builder).__name__}")
    parameters = list(inspect.signature(builder).parameters.values())
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        raise TypeError(f"builder {name!r} must take the data set's DatasetInfo as its first argument")
    required = [p.name for p in parameters[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL,
                                                                                          p.VAR_KEYWORD)]
    if required:
        raise TypeError(f"builder {name!r}: give {', '.join(required)} a default (model_args may then change it)")
    MODELS[name] = builder
    return builder


REFERENCE_NORMALIZATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "mnist": ((0.0,), (1.0,)),                                          # none
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),    # the std most CIFAR code copies
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
}
"""(mean, std) per data set in the CURE / SABR reference code (``normalization="reference"``)."""


def build(name: str, dataset: str = "cifar10", normalization: str = "standard", **kwargs) -> nn.Sequential:
    """Model ``name`` (cnn7, cnn5, cnn3, mlp) for ``dataset`` (mnist, cifar10, tinyimagenet), its
    first layer normalizing with the data set's statistics (``"standard"``) or with the reference
    code's constants (``"reference"``, :data:`REFERENCE_NORMALIZATION`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} (or models.register it "
                         f"in this process)")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if normalization not in ("standard", "reference"):
        raise ValueError(f"unknown normalization {normalization!r}; choose standard or reference")
    info = DATASETS[dataset]
    if normalization == "reference":
        mean, std = REFERENCE_NORMALIZATION[dataset]
        info = dataclasses.replace(info, mean=mean, std=std)
    model = MODELS[name](info, **kwargs)
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model {name!r} built a {type(model).__name__}; the bound layers take an nn.Sequential")
    return model
