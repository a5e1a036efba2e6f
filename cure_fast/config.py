"""Training configuration: one flat dataclass, presets shipped as YAML, validated with clear errors;
and what its values name: the input set of a norm (``make_spec``) and the device (``resolve_device``).

>>> config = load_config(preset="mnist-demo-cure", overrides=["epochs=3", "norms=[inf]"])
>>> make_spec("2", config.eps_2), resolve_device(config.device)
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from .models import DATASETS, MODELS
from .specs import L2Ball, LinfBall

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
METHODS = ("natural", "pgd", "ibp", "sabr")
NORMS = ("inf", "2")
COMBINES = ("joint", "max", "random")


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
    sabr_l2_set: str = "ball"                  # SABR for l2: a small l2 "ball" or a small l∞ "box"
    pgd_steps: int = 8                         # attacks for PGD and SABR training
    pgd_restarts: int = 1
    align_lambda: float = 0.0                  # bound alignment weight (0: off)
    align_reference: str = "inf"               # the norm whose certified samples and distribution lead
    gp_beta: float = 0.0                       # gradient projection with natural training (0: off)
    epochs: int = 10
    batch_size: int = 256
    lr: float = 5e-4
    lr_milestones: List[int] = field(default_factory=list)
    lr_gamma: float = 0.2
    weight_decay: float = 0.0
    eps_start_epoch: int = 0                   # epochs of natural training before the eps ramp
    eps_end_epoch: int = 1                     # the ramp reaches eps at the end of this epoch
    ibp_init: bool = True
    reg_lambda: float = 0.5                    # warm-up regularizers' weight during the ramp (0: off)
    reg_tol: float = 0.5
    grad_clip: float = 10.0
    eval_every: int = 1
    eval_limit: Optional[int] = 1000           # evaluate on the first N test images (None: all)
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


def make_spec(norm: str, eps: float, **kwargs):
    """The input set of norm ``"inf"`` or ``"2"`` with radius eps (pixel space, domain [0, 1])."""
    if norm == "inf":
        return LinfBall(eps, **kwargs)
    if norm == "2":
        return L2Ball(eps, **kwargs)
    raise ValueError(f"unknown norm {norm!r}; choose 'inf' or '2'")


def resolve_device(name: str) -> torch.device:
    """The device a ``device`` value names: "auto" (CUDA when available, else the CPU), "cpu", "cuda"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is available")
    return torch.device(name)


def _fail(message: str):
    raise ValueError(f"invalid config: {message}")


def validate(config: TrainConfig) -> TrainConfig:
    """Check every field; raise ValueError naming the field and what is allowed."""
    choices = {"dataset": tuple(DATASETS), "model": tuple(MODELS), "method": METHODS, "combine": COMBINES,
               "sabr_l2_set": ("ball", "box"), "align_reference": NORMS, "device": ("auto", "cpu", "cuda"),
               "backend": ("auto", "torch", "triton", "cuda")}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            _fail(f"{name}={getattr(config, name)!r}; choose one of {', '.join(allowed)}")
    if not config.norms or any(n not in NORMS for n in config.norms) or len(set(config.norms)) != len(config.norms):
        _fail(f"norms={config.norms!r}; a non-empty list of distinct values from {NORMS}")
    for name in ("eps_inf", "eps_2", "eval_eps_inf", "eval_eps_2", "weight_decay", "align_lambda", "reg_lambda"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
            _fail(f"{name}={value!r}; a finite number >= 0")
    for name in ("alpha", "natural_weight", "gp_beta", "reg_tol"):
        if not 0 <= getattr(config, name) <= 1:
            _fail(f"{name}={getattr(config, name)!r}; a number in [0, 1]")
    if not 0 < config.sabr_lambda <= 1:
        _fail(f"sabr_lambda={config.sabr_lambda!r}; a number in (0, 1]")
    for name in ("epochs", "batch_size", "eval_every", "eval_batch_size", "pgd_restarts", "eval_pgd_restarts"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 1:
            _fail(f"{name}={getattr(config, name)!r}; an integer >= 1")
    for name in ("pgd_steps", "eval_pgd_steps", "eps_start_epoch"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) < 0:
            _fail(f"{name}={getattr(config, name)!r}; an integer >= 0")
    if not (config.eps_start_epoch < config.eps_end_epoch <= config.epochs) and config.method in ("ibp", "sabr"):
        _fail(f"need eps_start_epoch < eps_end_epoch <= epochs, got {config.eps_start_epoch}, "
              f"{config.eps_end_epoch}, {config.epochs}")
    if not (config.lr > 0 and config.grad_clip > 0 and 0 < config.lr_gamma <= 1):
        _fail("lr and grad_clip must be > 0 and lr_gamma in (0, 1]")
    if sorted(config.lr_milestones) != list(config.lr_milestones):
        _fail(f"lr_milestones={config.lr_milestones!r} must be increasing")
    if config.align_lambda > 0 and len(config.norms) < 2:
        _fail("bound alignment (align_lambda > 0) needs both norms: norms=[inf, 2]")
    if config.gp_beta > 0 and config.method not in ("ibp", "sabr"):
        _fail("gradient projection (gp_beta > 0) needs a certified method (ibp or sabr)")
    if config.init_from is not None and not os.path.isfile(config.init_from):
        _fail(f"init_from={config.init_from!r} is not a file")
    return config


_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _number(value):
    """``"2/255"`` -> 2/255; anything else unchanged."""
    match = _FRACTION.match(value) if isinstance(value, str) else None
    return float(match.group(1)) / float(match.group(2)) if match else value


def _parse_override(item: str):
    if "=" not in item:
        _fail(f"override {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def presets() -> List[str]:
    """Names of the presets shipped with the package."""
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def _read_yaml(path: str) -> Dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        _fail(f"{path} must hold a mapping of config keys")
    return data


def load_config(preset: Optional[str] = None, config_file: Optional[str] = None,
                overrides: Sequence[str] = (), values: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """A validated config from a preset, then a YAML file, then ``key=value`` overrides, then ``values``."""
    data: Dict[str, Any] = {}
    if preset is not None:
        if preset not in presets():
            _fail(f"unknown preset {preset!r}; available: {', '.join(presets())}")
        data.update(_read_yaml(os.path.join(PRESET_DIR, preset + ".yaml")))
    if config_file is not None:
        data.update(_read_yaml(config_file))
    data.update(dict(_parse_override(item) for item in overrides))
    data.update(values or {})
    return from_dict(data)


def from_dict(data: Dict[str, Any]) -> TrainConfig:
    """A validated config from a mapping; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        _fail(f"unknown key(s) {', '.join(unknown)}")
    data = {key: _number(value) for key, value in data.items()}
    if isinstance(data.get("norms"), (str, int)):
        data["norms"] = [data["norms"]]
    if "norms" in data:
        data["norms"] = [str(n) for n in data["norms"]]
    return validate(TrainConfig(**data))


def to_dict(config: TrainConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)
