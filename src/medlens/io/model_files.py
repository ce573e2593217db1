"""Model files: TorchScript and pickled modules (`load_model_file`), state dicts (`read_state_dict`) and the one check
that a state dict fits a module (`check_state_dict`), shared with the bundled zoo.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from medlens.errors import ModelError


class PickleWarning(UserWarning):
    """Loading a pickled module runs code stored in the file."""


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _state_dict_of(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """A state dict inside a loaded object (a plain one, or a checkpoint with 'state_dict'/'model')."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found = _state_dict_of(inner)
                if found is not None:
                    return found
    return None


def load_model_file(path: Path, map_location: Any, allow_pickle: bool, notes: list[str]) -> tuple[nn.Module, str]:
    """A model file as (module, kind): TorchScript, or a pickled module; weights alone and other objects are refused."""
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=map_location), "torchscript"
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: looks like a TorchScript file but cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}).") from None
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise ModelError(
            f"{path} is not a model file medlens can read (it is neither a TorchScript nor a torch.save archive). "
            f"Expected a TorchScript file (torch.jit.save), a pickled module (torch.save(model)), or weights with an "
            f"architecture (torchvision:<name> with weights=)."
        )
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickled Python object; loading it runs code from the file, and pickled models are not "
                f"allowed here. Save it with torch.jit.save, or save its state_dict and load it with an architecture name."
            ) from None
        warnings.warn(
            f"{path} is a pickled module: loading it runs code stored in the file. Only load files you trust; "
            f"prefer TorchScript (torch.jit.save) or a state_dict with an architecture name.",
            PickleWarning,
            stacklevel=3,
        )
        notes.append("loaded from a pickled module (weights_only=False) after a warning that it runs code")
        try:
            obj = torch.load(str(path), map_location=map_location, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - missing classes, broken pickles, ...
            raise ModelError(
                f"{path}: the pickled model cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}). A pickled module "
                f"needs its class importable under the same module name; TorchScript files do not."
            ) from None
        kind = "pickled module"
    except Exception as exc:  # noqa: BLE001 - not a zip, not a pickle, truncated ...
        raise ModelError(
            f"{path} is not a model file medlens can read ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}). "
            f"Expected a TorchScript file (torch.jit.save), a pickled module (torch.save(model)), or weights with an "
            f"architecture (torchvision:<name> with weights=)."
        ) from None
    else:
        kind = "file"
    if isinstance(obj, nn.Module):
        return obj, kind
    if _state_dict_of(obj) is not None:
        raise ModelError(
            f"{path} holds weights (a state_dict) but no architecture. Give the architecture and these weights: "
            f"`--model torchvision:<name> --weights {path}` (or load_model('torchvision:<name>', weights='{path}'))."
        )
    raise ModelError(
        f"{path} holds a {type(obj).__name__}, not a model. Expected a TorchScript file (torch.jit.save), a pickled "
        f"nn.Module (torch.save(model)), or a state_dict with an architecture name."
    )


def read_state_dict(path: Path, map_location: Any = "cpu", what: str = "") -> dict[str, torch.Tensor]:
    """The state dict in a weights file (plain, or a checkpoint holding one; a DataParallel "module." prefix removed),
    always read with `weights_only=True`. `what` names the model the weights are for, in messages."""
    path = Path(path)
    for_what = f" for {what}" if what else ""
    if not path.is_file():
        raise ModelError(f"the weights file {path}{for_what} is missing; medlens never downloads weights: give a local "
                         f"state dict file (torch.save(model.state_dict(), path)).")
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt zip, a pickle of classes, a truncated file ...
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ModelError(
            f"cannot read the weights file {path}{for_what} ({type(exc).__name__}: {first}). Expected a state_dict saved "
            f"with torch.save(model.state_dict(), path)."
        ) from None
    state = _state_dict_of(obj)
    if state is None:
        raise ModelError(f"the weights file {path}{for_what} holds a {type(obj).__name__}, not a state dict (name -> tensor).")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Refuse a state dict whose keys or shapes differ from `model`'s, naming the file and up to three of each kind."""
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
