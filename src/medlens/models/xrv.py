"""TorchXRayVision models ("xrv:<weights name>") from weights already in its local cache; its downloader is disabled
while loading, its calibration is turned off (logits), and its input range [-1024, 1024] is written as an InputSpec.
The "xrv" model source (`can_load`, `load`).
"""
from __future__ import annotations

import contextlib
import difflib
import io
from pathlib import Path
from typing import Any

from torch import nn

from medlens.core.input_spec import InputSpec
from medlens.core.model_description import ModelDescription
from medlens.errors import ModelError
from medlens.models.source import LoadedModel, LoadOptions

XRV_CACHE = Path("~") / ".torchxrayvision" / "models_data"
# TorchXRayVision weight names -> the file its loader looks for in XRV_CACHE (from its model_urls table).
XRV_KNOWN_FILES = {
    "densenet121-res224-all": "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-nih": "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-pc": "pc-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-chex": "chex-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-rsna": "kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-mimic_nb": "mimic_nb-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-mimic_ch": "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
}


def load_xrv(source: str, notes: list[str]) -> nn.Module:
    """A TorchXRayVision model whose weights are already in its local cache; its downloader is disabled.

    Args:
        source: "xrv:<weights name>".
        notes: where notes on what was changed (calibration off) are added.

    Returns:
        The module, returning logits, with its unused outputs named "unused <i>" in `.pathologies`.

    Raises:
        ModelError: torchxrayvision missing, unknown weights, weights not in the cache, or a damaged file.
    """
    name = source.split(":", 1)[1].strip()
    try:
        import torchxrayvision as xrv  # type: ignore[import-not-found]  # optional: only for xrv: sources
    except ImportError:
        fname = XRV_KNOWN_FILES.get(name)
        where = XRV_CACHE / fname if fname else XRV_CACHE / "<the file named in torchxrayvision's model_urls>"
        raise ModelError(
            f"{source}: TorchXRayVision models need the torchxrayvision package (pip install torchxrayvision) and the "
            f"weights file already in its local cache, {where}; medlens never downloads. Known names include "
            f"{', '.join(sorted(XRV_KNOWN_FILES))}."
        ) from None
    urls = getattr(xrv.models, "model_urls", {})
    if name not in urls:
        close = difflib.get_close_matches(name, list(urls), n=4)
        raise ModelError(f"{source}: unknown TorchXRayVision weights {name!r}. Known: {', '.join(sorted(urls)) or '(none)'}." + (f" Did you mean {', '.join(close)}?" if close else ""))

    def refuse(url: str, filename: str, *args: Any, **kwargs: Any) -> None:
        raise ModelError(
            f"{source}: the weights file is not in TorchXRayVision's local cache: {filename}. medlens never downloads; "
            f"copy the file there (it is {url})."
        )

    patched = [(mod, getattr(mod, "download")) for mod in (xrv.models, getattr(xrv, "utils", None)) if mod is not None and hasattr(mod, "download")]
    for mod, _ in patched:
        mod.download = refuse
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # TorchXRayVision prints progress and hints on stdout
            if hasattr(xrv.models, "get_model"):
                model = xrv.models.get_model(name)
            elif "resnet" in name:
                model = xrv.models.ResNet(weights=name)
            else:
                model = xrv.models.DenseNet(weights=name)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged cache file, an incompatible version ...
        raise ModelError(f"{source}: TorchXRayVision could not load these weights ({type(exc).__name__}: {str(exc)[:200]}).") from None
    finally:
        for mod, original in patched:
            mod.download = original
    if getattr(model, "op_threshs", None) is not None:
        model.op_threshs = None  # explain raw logits, not TorchXRayVision's calibrated probabilities
        notes.append("TorchXRayVision calibration (op_threshs) turned off so the model returns logits")
    if getattr(model, "apply_sigmoid", False):
        model.apply_sigmoid = False
    raw = list(getattr(model, "targets", None) or getattr(model, "pathologies", None) or [])
    model.pathologies = [p if p else f"unused {i}" for i, p in enumerate(raw)]
    return model


def xrv_input_spec(name: str, labels: list[str]) -> InputSpec:
    """What a TorchXRayVision model takes: [-1024, 1024] from 8-bit images, x / 255 * 2048 - 1024, which is
    (x/255 - 0.5) / (1/2048), at 224 or 512 pixels.

    Args:
        name: the weights name (its resolution is in it).
        labels: the model's output names.

    Returns:
        The input spec.
    """
    size = 512 if "512" in name else 224
    return InputSpec(size=(size, size), channels=1, scale="uint8", mean=(0.5,), std=(1 / 2048,),
                     labels=tuple(labels), multi_label=True, modality="chest X-ray")


def can_load(source: Any) -> bool:
    """Whether `source` names TorchXRayVision weights ("xrv:<weights name>").

    Args:
        source: what `load_model` was given.

    Returns:
        True for a string starting with "xrv:".
    """
    return isinstance(source, str) and source.lower().startswith("xrv:")


def load(source: str, options: LoadOptions) -> LoadedModel:
    """A TorchXRayVision model (the "xrv" model source), with the input spec TorchXRayVision documents.

    Args:
        source: "xrv:<weights name>".
        options: unused (the weights come from TorchXRayVision's cache).

    Returns:
        The module and its partial description.

    Raises:
        ModelError: as `load_xrv`.
    """
    notes: list[str] = []
    model = load_xrv(source, notes)
    spec = xrv_input_spec(source.split(":", 1)[1].strip(), model.pathologies)
    return LoadedModel(model, ModelDescription(input_spec=spec, source=source, kind="torchxrayvision"), notes=notes)
