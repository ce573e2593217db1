"""Architectures named by library ("torchvision:<arch>", "timm:<arch>") with a local state dict: built empty, their
classifier size and input channels read from the weights, then the weights checked and loaded; the "architecture"
model source (`can_load`, `load`).
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from medlens.core.input_spec import InputSpec
from medlens.core.model_description import ModelDescription
from medlens.errors import ModelError
from medlens.io.files import file_sha256
from medlens.models.sidecar import read_sidecar
from medlens.models.source import LoadedModel, LoadOptions
from medlens.models.state_dicts import check_state_dict, read_state_dict
from medlens.models.torchvision_tasks import builder_options, detection_classes

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
        build = _torchvision_builder(arch, state)
    elif library == "timm":
        make = _timm_builder(source, arch, in_channels)
        with torch.device("meta"):
            img_size = _timm_img_size(make(None, None), state, notes)

        def build(k: Optional[int]) -> nn.Module:
            return make(k, img_size)

    else:
        raise ModelError(f"{source}: unknown architecture library {library!r}; use torchvision:<name> or timm:<name>.")
    if num_classes is None and library == "torchvision" and detection_classes(arch, state) is not None:
        num_classes = detection_classes(arch, state)  # a detector: its class scores, not its last (box) layer
        notes.append(f"num_classes={num_classes} read from the detector's weights")
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


def _torchvision_builder(arch: str, state: Mapping[str, torch.Tensor]) -> Callable[[Optional[int]], nn.Module]:
    """A function building torchvision's `arch` without weights for k classes (None: its default).

    Raises:
        ModelError: torchvision has no such architecture (the closest names said).
    """
    import torchvision  # lazy: importing torchvision takes seconds, and only this path needs it

    names = torchvision.models.list_models()
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=4)
        raise ModelError(f"unknown torchvision architecture {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()."))

    def build(k: Optional[int]) -> nn.Module:
        kwargs: dict[str, Any] = {"weights": None}  # segmentation and detection: weights_backbone=None too
        kwargs.update(builder_options(torchvision.models.get_model_builder(arch), state))
        if k is not None:
            kwargs["num_classes"] = int(k)
        if arch in ("inception_v3", "googlenet"):
            kwargs["aux_logits"] = any("Aux" in key for key in state)
            kwargs["init_weights"] = False
        return torchvision.models.get_model(arch, **kwargs)

    return build


def _timm_builder(source: str, arch: str, in_channels: Any) -> Callable[[Optional[int], Optional[int]], nn.Module]:
    """A function building timm's `arch` without weights for k classes and an image size (None: its defaults).

    Raises:
        ModelError: timm is not installed, or cannot build the architecture.
    """
    try:
        import timm  # type: ignore[import-not-found]  # optional, heavy
    except ImportError:
        raise ModelError(f"{source}: timm architectures need the timm package: pip install \"medlens[transformers]\"") from None

    def build(k: Optional[int], img_size: Optional[int]) -> nn.Module:
        kwargs: dict[str, Any] = {"pretrained": False}
        if k is not None:
            kwargs["num_classes"] = int(k)
        if in_channels is not None:
            kwargs["in_chans"] = int(in_channels)
        if img_size is not None:
            kwargs["img_size"] = img_size
        try:
            return timm.create_model(arch, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{source}: timm cannot build {arch!r} ({exc}).") from None

    return build


def _timm_img_size(skeleton: nn.Module, state: Mapping[str, torch.Tensor], notes: list[str]) -> Optional[int]:
    """A timm vision transformer's input size from the weights' position embedding (grid x patch size) when it differs
    from the architecture's default; None otherwise (or for a model without a patch embedding)."""
    patch_embed, pos = getattr(skeleton, "patch_embed", None), state.get("pos_embed")
    if patch_embed is None or pos is None or pos.dim() != 3 or not hasattr(patch_embed, "patch_size"):
        return None
    prefix = 0 if getattr(skeleton, "no_embed_class", False) else int(getattr(skeleton, "num_prefix_tokens", 1))
    grid = math.isqrt(int(pos.shape[1]) - prefix)
    patch = int(patch_embed.patch_size[0])
    default = getattr(patch_embed, "img_size", None)
    if grid * grid != int(pos.shape[1]) - prefix or (default is not None and tuple(default) == (grid * patch,) * 2):
        return None
    notes.append(f"input size {grid * patch} read from the weights' position embedding ({grid} x {grid} patches of {patch})")
    return grid * patch


def timm_input_spec(model: nn.Module) -> Optional[InputSpec]:
    """What a timm model takes, from its pretrained config (channels, mean, std; the size from its patch embedding
    when it has one, else from the config): images scaled to [0, 1] then normalised, as timm's transforms do.

    Args:
        model: a module timm built.

    Returns:
        The InputSpec, or None when the model carries no pretrained config.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not cfg or "mean" not in cfg or "std" not in cfg:
        return None
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or cfg.get("input_size", (None,))[1:]
    channels = int(getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "in_channels", 0)
                   or cfg.get("input_size", (3,))[0])
    mean, std = tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])
    if len(mean) != channels:  # in_chans changed from the config's: one value for every channel
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return InputSpec(size=tuple(int(v) for v in size) if size and all(size) else None, channels=channels,
                     scale="uint8", mean=mean, std=std)


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
    spec = timm_input_spec(model) if source.lower().startswith("timm:") else None
    partial = ModelDescription(source=f"{source} + {options.weights}", kind="architecture+weights",
                               sha256=file_sha256(options.weights), sidecar=str(sidecar_path) if sidecar_path else None,
                               input_spec=spec)
    return LoadedModel(model, partial, sidecar, notes)
