"""Model files: TorchScript, torch.export programs and (opt-in) pickled modules (`load_model_file`), and the "file"
model source (`can_load`, `load`): a path, which may also be weights whose sidecar JSON names their architecture.

Trust: a pickled module runs the code it holds when loaded, so it loads only with `allow_pickle=True`; every other
format here is read without running code from the file (a .pt2 holding pickled objects is refused).
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medlens.core.model_description import ModelDescription
from medlens.errors import ModelError, short_message
from medlens.io.files import file_sha256
from medlens.models import library, monai_nets, zoo
from medlens.models.sidecar import read_sidecar
from medlens.models.source import LoadedModel, LoadOptions
from medlens.models.state_dicts import state_dict_of

SIDECAR_BUILD_FIELDS = ("architecture", "num_classes", "in_channels")  # sidecar keys that say how to build the model


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
    """A model file: TorchScript, a torch.export program (.pt2), or (only with `allow_pickle`) a pickled module.

    Args:
        path: the file.
        map_location: where tensors are loaded.
        allow_pickle: whether a pickled module may be loaded (loading it runs the code it holds).
        notes: where notes on how it was loaded are added.

    Returns:
        (the module, its kind: "torchscript", "torch.export", "file" or "pickled module").

    Raises:
        ModelError: weights alone, a pickle without allow_pickle, an unreadable file, or an object that is no model.
    """
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
    if state_dict_of(obj) is not None:
        raise ModelError(
            f"{path} holds weights (a state_dict) but no architecture. Give the architecture and these weights: "
            f"`--model torchvision:<name> --weights {path}` (or load_model('torchvision:<name>', weights='{path}')), or a "
            f"sidecar JSON {path.name}.json with \"architecture\": \"torchvision:<name>\"."
        )
    raise ModelError(f"{path} holds a {type(obj).__name__}, not a model. Expected {SAFE_FORMATS}.")


def can_load(source: Any) -> bool:
    """Whether `source` may be a path (the "file" model source is the last one asked: it says what else to give).

    Args:
        source: what `load_model` was given.

    Returns:
        True for a string or an os.PathLike.
    """
    return isinstance(source, (str, os.PathLike))


def load(source: Any, options: LoadOptions) -> LoadedModel:
    """A model file, or weights whose sidecar JSON names their architecture (the "file" model source).

    Args:
        source: the path.
        options: map_location, allow_pickle; num_classes and in_channels over the sidecar's for weights.

    Returns:
        The module and its partial description (its digest, its sidecar).

    Raises:
        ModelError: no such file (listing the bundled names), a folder, or as `load_model_file`/`load_architecture`.
    """
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        bundled = zoo.listed_models()
        hint = f" Bundled models: {', '.join(sorted(bundled))}." if bundled else ""
        raise ModelError(
            f"{text!r} is neither a bundled model name nor an existing file.{hint} Give a model file (TorchScript, .pt2, "
            f"or a pickled module with allow_pickle), 'torchvision:<arch>' with weights, or 'xrv:<weights name>'; see "
            f"`medlens models`."
        )
    if path.is_dir():
        raise ModelError(f"{path} is a folder; give the model file inside it.")
    sidecar, sidecar_path = read_sidecar(path)
    notes: list[str] = []
    architecture = (sidecar or {}).get("architecture")
    if architecture is not None:  # weights beside a sidecar that names their architecture
        model, sidecar = _architecture_from_sidecar(path, architecture, sidecar, sidecar_path, options, notes)
        source_text, kind = f"{architecture} + {path}", "architecture+weights"
        # a timm model says what it takes (size, mean, std), as with --model timm:ARCH --weights; the sidecar's win
        spec = library.timm_input_spec(model) if architecture.lower().startswith("timm:") else None
    else:
        model, kind = load_model_file(path, options.map_location, options.allow_pickle, notes)
        source_text, spec = str(path), None
    partial = ModelDescription(source=source_text, kind=kind, sha256=file_sha256(path),
                               sidecar=str(sidecar_path) if sidecar_path else None, input_spec=spec)
    return LoadedModel(model, partial, sidecar, notes)


def _architecture_from_sidecar(path: Path, architecture: Any, sidecar: dict[str, Any], sidecar_path: Path,
                               options: LoadOptions, notes: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The architecture a sidecar names, built and given the weights at `path`; the sidecar without its build keys."""
    if isinstance(architecture, str) and monai_nets.can_load(architecture):  # constructor arguments in the sidecar
        model = monai_nets.build_network(architecture, path, sidecar.get("arguments"), options.map_location,
                                         sidecar_path.name)
        return model, {k: v for k, v in sidecar.items() if k not in monai_nets.BUILD_FIELDS}
    if not isinstance(architecture, str) or not library.can_load(architecture):
        raise ModelError(f"{sidecar_path}: \"architecture\" must be \"torchvision:<name>\", \"timm:<name>\" or "
                         f"\"monai:<Name>\", not {architecture!r}.")
    build = {k: v for k, v in sidecar.items() if k in SIDECAR_BUILD_FIELDS}
    rest = {k: v for k, v in sidecar.items() if k not in SIDECAR_BUILD_FIELDS}
    model = library.load_architecture(
        architecture, path, options.map_location,
        options.num_classes if options.num_classes is not None else build.get("num_classes"),
        options.in_channels if options.in_channels is not None else build.get("in_channels"), notes)
    return model, rest
