"""Model files: TorchScript, torch.export programs and (opt-in) pickled modules (`load_model_file`), state dicts and
safetensors weights (`read_state_dict`, always without pickle) and the one check that weights fit a module.

Trust: a pickled module runs the code it holds when loaded, so it loads only with `allow_pickle=True`; every other
format here is read without running code from the file (a .pt2 holding pickled objects is refused).
"""
from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import safetensors.torch
import torch
from torch import nn

from medlens.errors import ModelError, short_message


SAFE_FORMATS = ("TorchScript (torch.jit.save), a torch.export program (.pt2, torch.export.save), or an architecture "
                "name with a state dict or .safetensors weights (--model torchvision:ARCH --weights FILE, or a sidecar "
                "JSON naming the architecture)")


def _zip_names(path: Path) -> list[str]:
    if not zipfile.is_zipfile(path):
        return []
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return []


def _is_torchscript(names: list[str]) -> bool:
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _is_export(path: Path, names: list[str]) -> bool:
    return path.suffix.lower() == ".pt2" or any(n.endswith("/archive_format") or n.endswith("/models/model.json") for n in names)


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


def _check_export_archive(path: Path) -> None:
    """Refuse a .pt2 whose torch.save members need pickle: torch.export.load would fall back to weights_only=False
    (running their code) when weights_only=True fails on them."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            with zf.open(info) as fh:
                head = fh.read(4)
            if not (head == b"PK\x03\x04" or info.filename.endswith((".pt", ".pkl", ".pickle"))):
                continue  # raw tensor bytes and JSON: no code
            data = zf.read(info)
            try:
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                raise ModelError(f"{path}: the exported program holds pickled Python objects ({info.filename}); loading them "
                                 f"would run code from the file. Export the model again without custom objects.") from None
            except Exception:  # noqa: BLE001 - not a torch.save archive after all: torch.export reads it as data
                continue


def _load_export(path: Path, notes: list[str]) -> nn.Module:
    """A torch.export program, unflattened so that its module tree (and layer hooks) are there as in the original."""
    try:
        _check_export_archive(path)
        program = torch.export.load(str(path))
        module = torch.export.unflatten(program)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated archive, a newer serialization version ...
        raise ModelError(f"{path}: the torch.export program cannot be loaded ({type(exc).__name__}: {short_message(exc, 200)}); "
                         f"export it again with torch.export.save, with this torch version.") from None
    shapes = [tuple(n.meta["val"].shape) for n in program.graph.nodes
              if n.op == "placeholder" and n.name in program.graph_signature.user_inputs and "val" in n.meta]
    if len(shapes) == 1 and len(shapes[0]) in (4, 5) and all(isinstance(s, int) for s in shapes[0][1:]):
        module.medlens_export_input = shapes[0]  # (B, C, *spatial) as exported: channels and size for the input spec
    notes.append("torch.export program (.pt2), unflattened to its module tree: layer hooks work, but guided "
                 "backpropagation and LRP need the original Python module")
    return module


def load_model_file(path: Path, map_location: Any, allow_pickle: bool, notes: list[str]) -> tuple[nn.Module, str]:
    """A model file as (module, kind): TorchScript, a torch.export program (.pt2), or (only with `allow_pickle`) a pickled
    module; weights alone and other objects are refused with what to do."""
    names = _zip_names(path)
    if _is_torchscript(names):
        try:
            return torch.jit.load(str(path), map_location=map_location), "torchscript"
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: looks like a TorchScript file but cannot be loaded ({type(exc).__name__}: {short_message(exc, 200)}).") from None
    if _is_export(path, names):
        return _load_export(path, notes), "torch.export"
    if path.suffix.lower() == ".safetensors":
        raise ModelError(f"{path} holds weights (safetensors) but no architecture. Give the architecture and these weights: "
                         f"`--model torchvision:<name> --weights {path}`, or a sidecar JSON {path.name}.json with "
                         f"\"architecture\": \"torchvision:<name>\".")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (names or head[:1] == b"\x80"):
        raise ModelError(f"{path} is not a model file medlens can read (it is neither a TorchScript, a torch.export nor a "
                         f"torch.save archive). Expected {SAFE_FORMATS}.")
    kind = "file"
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickled Python module (torch.save(model)): loading it runs whatever code the file holds, so "
                f"medlens loads it only if you trust the file and say so (allow_pickle=True, or --allow-pickle on the "
                f"command line). Formats that run no code: {SAFE_FORMATS}."
            ) from None
        notes.append("loaded from a pickled module because allow_pickle=True: loading it ran code from the file")
        try:
            # reached only with the user's explicit allow_pickle=True / --allow-pickle (refused above otherwise)
            obj = torch.load(str(path), map_location=map_location, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - missing classes, broken pickles, ...
            raise ModelError(
                f"{path}: the pickled model cannot be loaded ({type(exc).__name__}: {short_message(exc, 200)}). A pickled "
                f"module needs its class importable under the same module name; TorchScript files do not."
            ) from None
        kind = "pickled module"
    except Exception as exc:  # noqa: BLE001 - not a zip, not a pickle, truncated ...
        raise ModelError(f"{path} is not a model file medlens can read ({type(exc).__name__}: {short_message(exc, 160)}). "
                         f"Expected {SAFE_FORMATS}.") from None
    if isinstance(obj, nn.Module):
        return obj, kind
    if _state_dict_of(obj) is not None:
        raise ModelError(
            f"{path} holds weights (a state_dict) but no architecture. Give the architecture and these weights: "
            f"`--model torchvision:<name> --weights {path}` (or load_model('torchvision:<name>', weights='{path}')), or a "
            f"sidecar JSON {path.name}.json with \"architecture\": \"torchvision:<name>\"."
        )
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a model. Expected {SAFE_FORMATS}.")


def read_state_dict(path: Path, map_location: Any = "cpu", what: str = "") -> dict[str, torch.Tensor]:
    """The state dict in a weights file (plain, or a checkpoint holding one; a DataParallel "module." prefix removed),
    always read with `weights_only=True`. `what` names the model the weights are for, in messages."""
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
