"""MONAI networks by architecture name with a local state dict ("monai:UNet", "monai:SegResNet", "monai:SwinUNETR",
any class in `monai.networks.nets`): the "monai" model source (`can_load`, `load`) and `build_network`.

A MONAI network cannot be built from its weights alone (its channels, strides and spatial dimensions are constructor
arguments), so the sidecar JSON beside the weights gives them under "arguments"; its other fields (labels,
patch_size, scale, ...) describe the model as any sidecar does. Nothing is downloaded: the weights are read without
pickle and checked against the network before they are loaded.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Mapping, Optional

from torch import nn

from medlens.core.model_description import ModelDescription
from medlens.errors import ModelError
from medlens.io.files import file_sha256
from medlens.models.sidecar import read_sidecar
from medlens.models.source import LoadedModel, LoadOptions
from medlens.models.state_dicts import check_state_dict, read_state_dict

PREFIX = "monai:"
BUILD_FIELDS = ("architecture", "arguments")  # sidecar keys that say how to build the network


def _network_class(source: str) -> type:
    try:
        from monai.networks import nets  # optional and slow to import: only this source needs it
    except ImportError:
        raise ModelError(f"{source}: MONAI networks need the monai package: pip install \"medlens[monai]\".") from None
    name = source[len(PREFIX):]
    found = getattr(nets, name, None)
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        names = [n for n in dir(nets) if isinstance(getattr(nets, n), type) and issubclass(getattr(nets, n), nn.Module)]
        close = difflib.get_close_matches(name, names, n=4)
        raise ModelError(f"{source}: monai.networks.nets has no network {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else "."))
    return found


def build_network(source: str, weights: Any, arguments: Optional[Mapping[str, Any]], map_location: Any,
                  where: str) -> nn.Module:
    """MONAI's network `source` ("monai:<Name>") built with `arguments` and given the local `weights`.

    Args:
        source: "monai:<Name>", a class of `monai.networks.nets`.
        weights: the local state dict (.pt/.pth without pickle, or .safetensors).
        arguments: the constructor's keyword arguments (the sidecar's "arguments").
        map_location: where the weights are loaded.
        where: the sidecar's name, for messages.

    Returns:
        The network with the weights loaded.

    Raises:
        ModelError: no weights, MONAI missing, an unknown network, arguments it does not take, or weights that do
            not fit.
    """
    if weights is None:
        raise ModelError(f"{source}: a MONAI network needs a local weights file (weights=... / --weights FILE) and "
                         f"its constructor arguments in a sidecar JSON beside it; medlens never downloads weights.")
    if not isinstance(arguments, Mapping):
        raise ModelError(f"{source}: give the network's constructor arguments as an object \"arguments\" in the "
                         f"sidecar JSON beside the weights ({where}), e.g. {{\"arguments\": {{\"spatial_dims\": 3, "
                         f"\"in_channels\": 1, \"out_channels\": 2, \"channels\": [16, 32, 64], \"strides\": [2, 2]}}}}.")
    cls = _network_class(source)
    try:
        model = cls(**dict(arguments))
    except Exception as exc:  # noqa: BLE001 - any constructor failure is a wrong argument
        raise ModelError(f"{source}: MONAI's {cls.__name__} cannot be built from the arguments in {where} "
                         f"({type(exc).__name__}: {exc}); give the arguments it was trained with.") from None
    state = read_state_dict(Path(weights), map_location)
    check_state_dict(model, state, Path(weights), f"the network {source} built from {where}")
    model.load_state_dict(state)
    return model


def can_load(source: Any) -> bool:
    """Whether `source` names a MONAI network ("monai:<Name>").

    Args:
        source: what `load_model` was given.

    Returns:
        True for a string starting with "monai:".
    """
    return isinstance(source, str) and source.lower().startswith(PREFIX) and len(source) > len(PREFIX)


def load(source: str, options: LoadOptions) -> LoadedModel:
    """A MONAI network by name with `options.weights` (the "monai" model source); the sidecar JSON beside the
    weights gives the constructor's "arguments" and describes the model.

    Args:
        source: "monai:<Name>".
        options: weights (required), map_location.

    Returns:
        The module and its partial description.

    Raises:
        ModelError: as `build_network`, or an unreadable sidecar.
    """
    source = PREFIX + source[len(PREFIX):]
    sidecar, sidecar_path = read_sidecar(Path(options.weights)) if options.weights is not None else (None, None)
    where = sidecar_path.name if sidecar_path else "the sidecar JSON (none found)"
    model = build_network(source, options.weights, (sidecar or {}).get("arguments"), options.map_location, where)
    partial = ModelDescription(source=f"{source} + {options.weights}", kind="architecture+weights",
                               sha256=file_sha256(options.weights), sidecar=str(sidecar_path) if sidecar_path else None)
    rest = {k: v for k, v in (sidecar or {}).items() if k not in BUILD_FIELDS}
    return LoadedModel(model, partial, rest, [])
