"""`load_model`: a bundled name, a model file, an architecture with local weights, or "xrv:<name>", returned with
`.labels`, `.multi_label`, `.input_spec` and `.medlens_source` (where it came from, for provenance). Nothing is downloaded.

Where labels and the input spec come from, first match wins per field:
1. options given to `load_model` (`labels=`, `input_size=`, `multi_label=`, `channels=`, ...): what the
   user says explicitly overrides what the file says (a note records the override);
2. the model object itself (`.input_spec`, `.labels`, `.multi_label`, or TorchXRayVision's `.pathologies`);
3. a sidecar JSON beside the file (`model.pt.json`, else `model.json`) holding `InputSpec` fields;
4. defaults: labels "class 0".."class K-1" with K from a probe forward pass, single-label (softmax),
   channels from the first convolution, the scan's own size, min-max intensity scaling.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from medlens.errors import ModelError
from medlens.io.files import file_sha256
from medlens.io.model_architectures import load_architecture
from medlens.io.model_files import load_model_file
from medlens.io.model_metadata import attach_metadata, read_sidecar
from medlens.io.xrv import XRV_CACHE, XRV_KNOWN_FILES, load_xrv
from medlens.models import zoo

PathLike = Union[str, os.PathLike]

SIDECAR_BUILD_FIELDS = ("architecture", "num_classes", "in_channels")  # sidecar keys that say how to build the model
BUNDLED_PROBLEM: list[str] = []  # why the bundled models could not be listed, shown by `medlens models`


def bundled_models() -> dict[str, Any]:
    """name -> info of every bundled model; empty (with the reason in BUNDLED_PROBLEM) when the zoo's list is broken."""
    BUNDLED_PROBLEM.clear()
    try:
        return dict(zoo.bundled_models())
    except Exception as exc:  # noqa: BLE001 - a broken model list must not stop file and architecture loading
        BUNDLED_PROBLEM.append(str(exc))
        return {}


def _info_get(info: Any, key: str, default: Any = None) -> Any:
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


def load_model(
    source: Any,
    *,
    weights: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    in_channels: Optional[int] = None,
    map_location: Any = "cpu",
    allow_pickle: bool = False,
    **options: Any,
) -> nn.Module:
    """A bundled model name, a file path, "torchvision:<arch>"/"timm:<arch>" with `weights=`, or "xrv:<name>".

    Files: TorchScript, a torch.export program (.pt2), weights (state dict or .safetensors) whose sidecar JSON names
    an "architecture" ("torchvision:<arch>"), or a pickled module, which loads only with `allow_pickle=True` because
    loading it runs the code it holds. Weights are always read without pickle (`weights_only=True`, safetensors).

    Options: labels (list or comma-separated), input_size (int, (H, W) or (D, H, W)), multi_label, channels,
    scale, mean, std, modality. Returns the module in eval mode with `.labels`, `.multi_label`, `.input_spec`.
    """
    notes: list[str] = []
    if isinstance(source, nn.Module):
        return attach_metadata(source, type(source).__name__, kind="module", options=options, notes=notes)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(f"a model source must be a name, a path or an nn.Module, not {type(source).__name__}.")
    text = str(source)
    lowered = text.lower()
    if weights is not None and not lowered.startswith(("torchvision:", "timm:")):
        raise ModelError(f"weights= is only used with an architecture name (torchvision:<arch> or timm:<arch>); {text!r} "
                         f"(a bundled name, xrv: or a model file) comes with its own weights. To explain other weights, "
                         f"give the architecture and the file.")
    if lowered.startswith("xrv:"):
        model = load_xrv(text, notes)
        return attach_metadata(model, text, kind="torchxrayvision", options=options, notes=notes, digest=None)
    if lowered.startswith(("torchvision:", "timm:")):
        model = load_architecture(text, weights, map_location, num_classes, in_channels, notes)
        sidecar, sidecar_path = read_sidecar(Path(weights)) if weights else (None, None)
        return attach_metadata(model, f"{text} + {weights}", kind="architecture+weights", sidecar=sidecar,
                               sidecar_path=sidecar_path, options=options, notes=notes, digest=file_sha256(weights))
    bundled = bundled_models()
    if text in bundled:
        model = zoo.load_bundled(text)
        weights_file = _info_get(bundled[text], "weights")
        digest = file_sha256(weights_file) if weights_file and Path(weights_file).is_file() else None
        return attach_metadata(model, text, kind="bundled", options=options, notes=notes, digest=digest)
    path = Path(text).expanduser()
    if not path.exists():
        hint = f" Bundled models: {', '.join(sorted(bundled))}." if bundled else ""
        raise ModelError(
            f"{text!r} is neither a bundled model name nor an existing file.{hint} Give a model file (TorchScript, .pt2, "
            f"or a pickled module with allow_pickle), 'torchvision:<arch>' with weights, or 'xrv:<weights name>'; see "
            f"`medlens models`."
        )
    if path.is_dir():
        raise ModelError(f"{path} is a folder; give the model file inside it.")
    sidecar, sidecar_path = read_sidecar(path)
    architecture = (sidecar or {}).get("architecture")
    if architecture is not None:  # weights beside a sidecar that names their architecture
        if not isinstance(architecture, str) or not architecture.lower().startswith(("torchvision:", "timm:")):
            raise ModelError(f"{sidecar_path}: \"architecture\" must be \"torchvision:<name>\" or \"timm:<name>\", not "
                             f"{architecture!r}.")
        build = {k: v for k, v in sidecar.items() if k in SIDECAR_BUILD_FIELDS}
        sidecar = {k: v for k, v in sidecar.items() if k not in SIDECAR_BUILD_FIELDS}
        model = load_architecture(architecture, path, map_location,
                                  num_classes if num_classes is not None else build.get("num_classes"),
                                  in_channels if in_channels is not None else build.get("in_channels"), notes)
        return attach_metadata(model, f"{architecture} + {path}", kind="architecture+weights", sidecar=sidecar,
                               sidecar_path=sidecar_path, options=options, notes=notes, digest=file_sha256(path))
    model, kind = load_model_file(path, map_location, allow_pickle, notes)
    return attach_metadata(model, str(path), kind=kind, sidecar=sidecar, sidecar_path=sidecar_path,
                           options=options, notes=notes, digest=file_sha256(path))

__all__ = ["BUNDLED_PROBLEM", "XRV_CACHE", "XRV_KNOWN_FILES", "attach_metadata", "bundled_models", "load_model",
           "read_sidecar"]
