"""Weights without an architecture: reading a state dict or .safetensors file (`read_state_dict`, always without
pickle) and the one check that weights fit a module (`check_state_dict`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors.torch
import torch
from torch import nn

from medlens.errors import ModelError


def state_dict_of(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """A state dict inside a loaded object (a plain one, or a checkpoint with 'state_dict'/'model').

    Args:
        obj: what torch.load returned.

    Returns:
        name -> tensor, or None when the object holds no state dict.
    """
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found = state_dict_of(inner)
                if found is not None:
                    return found
    return None


def read_state_dict(path: Path, map_location: Any = "cpu", what: str = "") -> dict[str, torch.Tensor]:
    """The state dict in a weights file (plain, or a checkpoint holding one; a DataParallel "module." prefix removed),
    always read with `weights_only=True`.

    Args:
        path: the weights file (torch.save of a state dict, a checkpoint holding one, or .safetensors).
        map_location: where the tensors are loaded.
        what: the model the weights are for, in messages.

    Returns:
        name -> tensor.

    Raises:
        ModelError: the file is missing, unreadable, or holds no state dict.
    """
    path = Path(path)
    for_what = f" for {what}" if what else ""
    if not path.is_file():
        raise ModelError(f"the weights file {path}{for_what} is missing; medlens never downloads weights: give a local "
                         f"state dict file (torch.save(model.state_dict(), path)).")
    try:
        if path.suffix.lower() == ".safetensors":
            obj = safetensors.torch.load_file(str(path), device=str(map_location) if map_location is not None else "cpu")
        else:
            obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt zip, a pickle of classes, a truncated file ...
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ModelError(
            f"cannot read the weights file {path}{for_what} ({type(exc).__name__}: {first}). Expected a state_dict saved "
            f"with torch.save(model.state_dict(), path) or safetensors.torch.save_file."
        ) from None
    state = state_dict_of(obj)
    if state is None:
        raise ModelError(f"the weights file {path}{for_what} holds a {type(obj).__name__}, not a state dict (name -> tensor).")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Refuse a state dict whose keys or shapes differ from `model`'s, naming the file and up to three of each kind.

    Args:
        model: the module the weights are for.
        state: the weights.
        path: the weights file, in the message.
        what: the architecture, in the message.

    Raises:
        ModelError: keys are missing, unexpected or of the wrong shape.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:2])})")
        raise ModelError(
            f"{path}: these weights do not match {what}: {', '.join(parts)} keys. Check the architecture name, "
            f"num_classes and in_channels."
        )


def load_state_dict_checked(model: nn.Module, path: Union[str, Path], what: str) -> nn.Module:
    """Load a state dict file into `model`.

    Args:
        model: the module, built with the architecture the weights are for.
        path: the weights file.
        what: the model, in messages.

    Returns:
        The same module with the weights loaded.

    Raises:
        ModelError: the file is missing, unreadable, or does not match the module (naming it).
    """
    state = read_state_dict(Path(path), "cpu", what)
    check_state_dict(model, state, Path(path), f"the architecture of {what}")
    model.load_state_dict(state)
    return model
