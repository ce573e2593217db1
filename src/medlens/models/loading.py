"""`load_model`: the table of model sources (`SOURCES`) and the one path through it: the first source that can load
what was given loads it, `metadata.build_description` checks and completes its description, and the module comes back
in eval mode with it attached. Nothing is downloaded.

A new kind of model (a HuggingFace folder, a timm name, a MONAI network) is one loader module with `can_load(source)`
and `load(source, options) -> LoadedModel` (see source.py), plus one `ModelSource` line in `SOURCES` before "file".
"""
from __future__ import annotations

from typing import Any, Optional

from torch import nn

from medlens.core.model_description import ModelDescription, attach_description
from medlens.errors import ModelError
from medlens.models import huggingface, library, model_files, monai_nets, xrv, zoo
from medlens.models.metadata import build_description
from medlens.models.sidecar import read_sidecar
from medlens.models.source import LoadedModel, LoadOptions, ModelSource, PathLike
from medlens.models.xrv import XRV_CACHE, XRV_KNOWN_FILES
from medlens.models.zoo import BUNDLED_PROBLEM
from medlens.models.zoo import info_get as _info_get  # noqa: F401 - the CLI's model table reads it here


def _is_module(source: Any) -> bool:
    return isinstance(source, nn.Module)


def _given_module(source: nn.Module, options: LoadOptions) -> LoadedModel:
    """A module the caller built: described from what it carries."""
    return LoadedModel(source, ModelDescription(source=type(source).__name__, kind="module"))


# Asked in order; the first whose can_load says yes loads. "file" takes any path, so it comes last.
SOURCES: tuple[ModelSource, ...] = (
    ModelSource("module", _is_module, _given_module),
    ModelSource("xrv", xrv.can_load, xrv.load),
    ModelSource("architecture", library.can_load, library.load, takes_weights=True),
    ModelSource("monai", monai_nets.can_load, monai_nets.load, takes_weights=True),
    ModelSource("bundled", zoo.can_load, zoo.load),
    ModelSource("huggingface", huggingface.can_load, huggingface.load),
    ModelSource("file", model_files.can_load, model_files.load),
)


def bundled_models() -> dict[str, Any]:
    """Every bundled model; empty (with the reason in BUNDLED_PROBLEM) when the zoo's list is broken.

    Returns:
        name -> info (labels, multi_label, input_spec, description, card, weights, architecture, test_accuracy).
    """
    return zoo.listed_models()


def source_for(source: Any, weights: Optional[PathLike] = None) -> ModelSource:
    """The entry of SOURCES that loads `source`.

    Args:
        source: what `load_model` was given.
        weights: the weights file given with it, if any.

    Returns:
        The first ModelSource whose can_load accepts `source`.

    Raises:
        ModelError: no source takes it (not a name, path or module), or weights were given to a source that brings its
            own.
    """
    entry = next((e for e in SOURCES if e.can_load(source)), None)
    if entry is None:
        raise ModelError(f"a model source must be a name, a path or an nn.Module, not {type(source).__name__}.")
    if weights is not None and not entry.takes_weights:
        text = f"a {type(source).__name__}" if isinstance(source, nn.Module) else repr(str(source))
        raise ModelError(f"weights= is only used with an architecture name (torchvision:, timm: or monai:<arch>); {text} "
                         f"(a bundled name, xrv: or a model file) comes with its own weights. To explain other weights, "
                         f"give the architecture and the file.")
    return entry


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
    """A bundled model name, a file path, a local HuggingFace folder ("hf:<folder>" or a folder with config.json),
    "torchvision:<arch>"/"timm:<arch>"/"monai:<Name>" with `weights=`, "xrv:<name>", or a module.

    Files: TorchScript, a torch.export program (.pt2), weights (state dict or .safetensors) whose sidecar JSON names
    an "architecture" ("torchvision:<arch>"), or a pickled module, which loads only with `allow_pickle=True` because
    loading it runs the code it holds. Weights are always read without pickle (`weights_only=True`, safetensors).

    Args:
        source: what to load (see above); an nn.Module is described and returned.
        weights: a local weights file, for an architecture name.
        num_classes: the architecture's number of classes (read from the weights when None).
        in_channels: the architecture's input channels (read from the weights when None).
        map_location: where tensors are loaded.
        allow_pickle: load a pickled module (it runs the code it holds).
        **options: what the model takes and says, over what its files say: labels (list or comma-separated),
            input_size (int, (H, W) or (D, H, W)), multi_label, channels, scale, mean, std, modality.

    Returns:
        The module in eval mode, with `.labels`, `.multi_label`, `.input_spec` and its description
        (`medlens.core.model_description.describe(model)`).

    Raises:
        ModelError: what was wrong with the source, its files or the options, and what to give instead.
    """
    entry = source_for(source, weights)
    load_options = LoadOptions(weights=weights, num_classes=num_classes, in_channels=in_channels,
                               map_location=map_location, allow_pickle=allow_pickle)
    loaded = entry.load(source, load_options)
    description = build_description(loaded, options)
    return attach_description(loaded.module, description).eval()


__all__ = ["BUNDLED_PROBLEM", "SOURCES", "XRV_CACHE", "XRV_KNOWN_FILES", "bundled_models", "load_model", "read_sidecar",
           "source_for"]
