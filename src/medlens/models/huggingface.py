"""Local HuggingFace `transformers` image classifiers (a `save_pretrained` folder: config.json and safetensors weights):
the "huggingface" model source (`can_load`, `load`). Labels come from the config's id2label, the input from
preprocessor_config.json; nothing is downloaded (`local_files_only`), and a hub name is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from medlens.core.input_spec import InputSpec
from medlens.core.model_description import ModelDescription
from medlens.errors import ModelError
from medlens.io.files import file_sha256
from medlens.models.source import LoadedModel, LoadOptions

PREFIXES = ("hf:", "huggingface:")  # an explicit HuggingFace source; what follows must be a local folder
INSTALL_HINT = 'pip install "medlens[transformers]"'


def _folder(source: Any) -> Optional[Path]:
    """The folder `source` names (after an hf: prefix), whether or not it exists; None for what is not a path."""
    if isinstance(source, os.PathLike):
        return Path(source)
    if isinstance(source, str):
        text = source
        for prefix in PREFIXES:
            if text.lower().startswith(prefix):
                text = text[len(prefix):]
        return Path(text.strip()).expanduser()
    return None


def can_load(source: Any) -> bool:
    """Whether `source` is a HuggingFace model: "hf:<folder>", or a folder holding a config.json.

    Args:
        source: what `load_model` was given.

    Returns:
        True for an hf:/huggingface: string (checked on load) or a local folder with config.json.
    """
    if isinstance(source, str) and source.lower().startswith(PREFIXES):
        return True
    folder = _folder(source)
    return folder is not None and folder.is_dir() and (folder / "config.json").is_file()


def _check_folder(source: Any) -> Path:
    folder = _folder(source)
    if folder is None or not folder.is_dir():
        raise ModelError(f"{source}: only local HuggingFace folders load (the output of save_pretrained: config.json and "
                         f"model.safetensors); medlens never downloads a model from the hub. Download it yourself and "
                         f"give the folder.")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder}: this folder has no config.json; give the folder save_pretrained wrote.")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"{folder}: no .safetensors weights in the folder (pickled pytorch_model.bin files are not "
                         f"loaded); save the model with save_pretrained(..., safe_serialization=True).")
    return folder


def _labels(config: Any) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def input_spec(folder: Path, config: Any) -> InputSpec:
    """What the model takes: size and channels from the config, scaling and normalisation from the folder's
    preprocessor_config.json (when it has one), labels from the config's id2label.

    Args:
        folder: the model's folder.
        config: its transformers config.

    Returns:
        The InputSpec the folder describes (mean 0 and std 1 where it has no preprocessor config).

    Raises:
        ModelError: an unreadable preprocessor_config.json.
    """
    pre: dict[str, Any] = {}
    pre_file = folder / "preprocessor_config.json"
    if pre_file.is_file():
        try:
            pre = json.loads(pre_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{pre_file}: not readable JSON ({exc}); fix or remove it.") from None
    channels = int(getattr(config, "num_channels", 3) or 3)
    size = pre.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        shape: Optional[tuple[int, ...]] = (int(size["height"]), int(size["width"]))
    else:
        image_size = getattr(config, "image_size", None)
        shape = tuple(int(s) for s in image_size) if isinstance(image_size, (list, tuple)) else (
            (int(image_size), int(image_size)) if image_size else None)
    mean, std = pre.get("image_mean", [0.0]), pre.get("image_std", [1.0])
    if not pre.get("do_normalize", True):
        mean, std = [0.0], [1.0]
    scale = "uint8" if pre.get("do_rescale") and abs(float(pre.get("rescale_factor", 0)) - 1 / 255) < 1e-9 else "minmax"
    return InputSpec(size=shape, channels=channels, scale=scale, mean=tuple(float(m) for m in mean),
                     std=tuple(float(s) for s in std), labels=tuple(_labels(config)))


_INCOMPLETE = {"missing_keys": "lack {n} tensor(s) of the config's model",
               "mismatched_keys": "have another shape for {n} tensor(s) of the config's model",
               "unexpected_keys": "hold {n} tensor(s) the config's model does not have"}


def _check_weights_complete(report: dict[str, Any]) -> None:
    """Refuse a load in which transformers would fill a weight at random (missing from the files, or of another
    shape) or leave a tensor of the files unused: it only logs those, and the model would explain with random layers."""
    for key, what in _INCOMPLETE.items():
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in report.get(key) or ())
        if names:
            raise ValueError(f"the weights {what.format(n=len(names))}, e.g. {names[0]}")


def load(source: Any, options: LoadOptions) -> LoadedModel:
    """A HuggingFace image classifier from a local folder (`AutoModelForImageClassification`, local files only).

    Args:
        source: the folder, or "hf:<folder>".
        options: map_location (where the module is put).

    Returns:
        The module (its forward returns an object with `.logits`) and its partial description with the input spec.

    Raises:
        ModelError: transformers missing, not a local folder, no config or safetensors weights, or a config that is
            not an image classifier.
    """
    folder = _check_folder(source)
    try:
        import transformers  # type: ignore[import-not-found]  # optional, heavy
    except ImportError:
        raise ModelError(f"{folder}: HuggingFace models need the transformers package: {INSTALL_HINT}") from None
    logs = transformers.utils.logging
    was_enabled, verbosity = logs.is_progress_bar_enabled(), logs.get_verbosity()
    logs.disable_progress_bar()  # no "Loading weights" bar or load report on the user's terminal; restored below
    logs.set_verbosity_error()
    try:
        # `folder` is a local save_pretrained folder the user named (checked above). These read that folder's own
        # files only: local_files_only=True never contacts the hub (offline is the only mode), and
        # trust_remote_code=False runs no code from the folder; a hub name was refused above.
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        model, report = transformers.AutoModelForImageClassification.from_pretrained(
            folder, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True,
            output_loading_info=True)
        _check_weights_complete(report)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{folder}: transformers cannot load this folder as an image classifier ({first}); give a "
                         f"save_pretrained folder of an AutoModelForImageClassification model.") from None
    finally:
        logs.set_verbosity(verbosity)
        if was_enabled:
            logs.enable_progress_bar()
    if options.map_location not in (None, "cpu"):
        model = model.to(options.map_location)
    weights = sorted(folder.glob("*.safetensors"))
    digest = file_sha256(weights[0]) if len(weights) == 1 else None
    partial = ModelDescription(source=str(folder), kind="huggingface", sha256=digest,
                               input_spec=input_spec(folder, config))
    notes = [f"{type(model).__name__} from {folder} (transformers {transformers.__version__}, local files only)"]
    return LoadedModel(model, partial, None, notes)
