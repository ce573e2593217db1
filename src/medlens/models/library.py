"""Architectures named by library ("torchvision:<arch>", "timm:<arch>") with a local state dict: built empty, their
classifier size and input channels read from the weights, then the weights checked and loaded; the "architecture"
model source (`can_load`, `load`).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from medlens.core.model_description import ModelDescription
from medlens.errors import ModelError
from medlens.io.files import file_sha256
from medlens.models.sidecar import read_sidecar
from medlens.models.source import LoadedModel, LoadOptions
from medlens.models.state_dicts import check_state_dict, read_state_dict

LIBRARIES = ("torchvision:", "timm:")  # the prefixes of an architecture named by library


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.in_channels == in_channels:
                return
            conv = type(module)(
                in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups if module.groups == 1 else in_channels, module.bias is not None,
                module.padding_mode,
            )
            parent = model
            parts = name.split(".")
            for p in parts[:-1]:
                parent = getattr(parent, p)
            setattr(parent, parts[-1], conv)
            return


def _classifier_out(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Number of classes in `state`, from the weight of the model's last linear (or 1x1 conv) layer."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            last = name
    if last is not None and f"{last}.weight" in state:
        return int(state[f"{last}.weight"].shape[0])
    return None


def _first_conv_in(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    for value in state.values():
        if value.dim() in (4, 5):
            return int(value.shape[1])
    return None


def load_architecture(source: str, weights: Any, map_location: Any, num_classes: Any, in_channels: Any, notes: list[str]) -> nn.Module:
    """"torchvision:<arch>" or "timm:<arch>" built without weights, then given the local `weights`.

    Args:
        source: "torchvision:<arch>" or "timm:<arch>".
        weights: the local weights file.
        map_location: where the weights are loaded.
        num_classes: the classifier's size; read from the weights when None.
        in_channels: the first convolution's input channels; read from the weights when None.
        notes: where a note on what was read from the weights is added.

    Returns:
        The module with the weights loaded.

    Raises:
        ModelError: no weights, an unknown library or architecture, timm missing, or weights that do not fit.
    """
    library, _, arch = source.partition(":")
    library = library.lower()
    if weights is None:
        raise ModelError(
            f"{source}: an architecture name needs a local weights file (weights=... / --weights FILE); "
            f"medlens never downloads weights."
        )
    weights_path = Path(weights)
    state = read_state_dict(weights_path, map_location)
    if in_channels is None:
        in_channels = _first_conv_in(state)
    if library == "torchvision":
        import torchvision  # lazy: importing torchvision takes seconds, and only this path needs it

        names = torchvision.models.list_models()
        if arch not in names:
            close = difflib.get_close_matches(arch, names, n=4)
            raise ModelError(f"unknown torchvision architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()."))

        def build(k: Optional[int]) -> nn.Module:
            kwargs: dict[str, Any] = {"weights": None}
            if k is not None:
                kwargs["num_classes"] = int(k)
            if arch in ("inception_v3", "googlenet"):
                kwargs["aux_logits"] = any("Aux" in key for key in state)
                kwargs["init_weights"] = False
            return torchvision.models.get_model(arch, **kwargs)

    elif library == "timm":
        try:
            import timm  # type: ignore[import-not-found]  # optional, heavy
        except ImportError:
            raise ModelError(
                f"{source}: timm architectures need the timm package, which is not installed: `pip install timm`, then "
                f"give the architecture with a local weights file."
            ) from None

        def build(k: Optional[int]) -> nn.Module:
            kwargs: dict[str, Any] = {"pretrained": False}
            if k is not None:
                kwargs["num_classes"] = int(k)
            if in_channels is not None:
                kwargs["in_chans"] = int(in_channels)
            try:
                return timm.create_model(arch, **kwargs)
            except Exception as exc:  # noqa: BLE001
                raise ModelError(f"{source}: timm cannot build {arch!r} ({exc}).") from None

    else:
        raise ModelError(f"{source}: unknown architecture library {library!r}; use torchvision:<name> or timm:<name>.")
    if num_classes is None:
        with torch.device("meta"):  # a parameter-free skeleton, only to find the classifier's key
            skeleton = build(None)
        inferred = _classifier_out(skeleton, state)
        if inferred is not None and inferred != _classifier_out(skeleton, skeleton.state_dict()):
            num_classes = inferred
            notes.append(f"num_classes={inferred} read from the weights")
    model = build(num_classes)
    if library == "torchvision" and in_channels is not None:
        _replace_first_conv(model, int(in_channels))
    check_state_dict(model, state, weights_path, f"the architecture {source}")
    model.load_state_dict(state)
    return model


def can_load(source: Any) -> bool:
    """Whether `source` names an architecture by library ("torchvision:<arch>", "timm:<arch>").

    Args:
        source: what `load_model` was given.

    Returns:
        True for a string with one of the LIBRARIES prefixes.
    """
    return isinstance(source, str) and source.lower().startswith(LIBRARIES)


def load(source: str, options: LoadOptions) -> LoadedModel:
    """An architecture by name with `options.weights` (the "architecture" model source); a sidecar JSON beside the
    weights describes the model.

    Args:
        source: "torchvision:<arch>" or "timm:<arch>".
        options: weights (required), num_classes, in_channels, map_location.

    Returns:
        The module and its partial description.

    Raises:
        ModelError: as `load_architecture`, or an unreadable sidecar.
    """
    notes: list[str] = []
    model = load_architecture(source, options.weights, options.map_location, options.num_classes, options.in_channels,
                              notes)
    sidecar, sidecar_path = read_sidecar(Path(options.weights))
    partial = ModelDescription(source=f"{source} + {options.weights}", kind="architecture+weights",
                               sha256=file_sha256(options.weights), sidecar=str(sidecar_path) if sidecar_path else None)
    return LoadedModel(model, partial, sidecar, notes)
