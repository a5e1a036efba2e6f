"""The one checkpoint loader: every file a run reads back (``checkpoint.pt``, ``model.pt``, an
``init_from`` file) goes through :func:`load`, which turns every broken case (missing, empty,
truncated, not a PyTorch file, objects other than weights) into a one-line
:class:`~cure_fast.errors.CheckpointError` naming the file and what it holds; :func:`load_weights`
refuses another architecture's weights with the first mismatching tensor. Also the RNG states a
checkpoint keeps for an exact resume.

>>> state, config, what, epoch = model_weights("runs/x/model.pt", torch.device("cpu"))   # or checkpoint.pt
>>> load_weights(model, state, "runs/x/model.pt", what, "mlp")
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .errors import CheckpointError

TRAINING_KEYS = ("model", "optimizer", "epoch", "step", "history")


def _broken(path: str, error: BaseException) -> CheckpointError:
    """Why ``path`` could not be loaded, in one line."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if size == 0:
        return CheckpointError(f"{path} is empty (0 bytes): not a checkpoint; was its writing interrupted?")
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return CheckpointError(f"{path} is truncated: a PyTorch file cut short ({size} bytes); "
                                   "was its writing interrupted?")
        if isinstance(error, pickle.UnpicklingError):
            return CheckpointError(f"{path} holds Python objects other than tensors and plain data; "
                                   "refused (only weights are loaded, never code)")
        return CheckpointError(f"{path} is a corrupt PyTorch file ({size} bytes): {type(error).__name__}")
    return CheckpointError(f"{path} is not a PyTorch file ({size} bytes starting with {head!r})")


def load(path: str, device: torch.device) -> Any:
    """``torch.load(path, weights_only=True)`` onto ``device``, or a one-line CheckpointError."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises EOFError, OSError, RuntimeError, UnpicklingError, KeyError...
        raise _broken(path, error) from None


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in TRAINING_KEYS) and is_state_dict(obj["model"])


def describe(obj: Any) -> str:
    """What a loaded file holds, in a few words."""
    if is_training_checkpoint(obj):
        config = obj.get("config") or {}
        model = f"model {config.get('model', '?')} on {config.get('dataset', '?')}, " if config else ""
        return f"a training checkpoint ({model}epoch {obj['epoch']} of {config.get('epochs', '?')})"
    if is_state_dict(obj):
        return f"model weights ({len(obj)} tensors, {sum(v.numel() for v in obj.values()):,} values)"
    if isinstance(obj, dict):
        keys = ", ".join(repr(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        return f"a dict with keys {keys}" if obj else "an empty dict"
    if isinstance(obj, Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def model_weights(path: str, device: torch.device) -> Tuple[Dict[str, Tensor], Optional[Dict], str, Optional[int]]:
    """(state dict, the run's config as a dict or None, what the file holds, the epochs trained or
    None) from a run's ``checkpoint.pt`` or ``model.pt`` (or any file holding a state dict)."""
    obj = load(path, device)
    if is_training_checkpoint(obj):
        return obj["model"], obj.get("config"), describe(obj), int(obj["epoch"])
    if is_state_dict(obj):
        return obj, None, describe(obj), None
    raise CheckpointError(f"{path} holds {describe(obj)}, not model weights: give a run's checkpoint.pt or model.pt")


def training_state(path: str, device: torch.device) -> Dict[str, Any]:
    """A trainer checkpoint (model, optimizer, epoch, step, history, RNG states) to resume from."""
    obj = load(path, device)
    if not is_training_checkpoint(obj):
        raise CheckpointError(f"{path} holds {describe(obj)}, not a training checkpoint: cannot resume from it")
    return obj


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def load_weights(model: nn.Module, state: Dict[str, Tensor], path: str, what: str, architecture: str) -> None:
    """``model.load_state_dict(state)``, or a one-line CheckpointError when ``state`` (from ``path``,
    which holds ``what``) belongs to another architecture than ``architecture``."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or resized):
        model.load_state_dict(state)
        return
    if resized:
        k = resized[0]
        first = f"tensor {k!r} is {_shape(state[k])} in the file but {_shape(expected[k])} in the model"
    elif missing:
        first = f"tensor {missing[0]!r} of the model is not in the file"
    else:
        first = f"the file has a tensor {unexpected[0]!r} the model lacks"
    counts = f"{len(resized)} of different shape, {len(missing)} missing, {len(unexpected)} unexpected"
    raise CheckpointError(f"{path} holds {what} of another architecture than {architecture}: {first} ({counts})")


def rng_state(device: torch.device) -> Dict[str, Tensor]:
    """This process's RNG states: the CPU generator, and the CUDA one of ``device``."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
