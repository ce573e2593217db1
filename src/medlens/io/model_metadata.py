"""What a loaded model takes and says: its `InputSpec`, labels and multi-label flag, from options, the model itself,
a sidecar JSON or defaults (in that order), checked by one forward pass (`attach_metadata`).
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from medlens.core.input_spec import InputSpec
from medlens.errors import ModelError, short_message
from medlens.io.limits import current_limits
from medlens.core.layers import first_convolution

MAX_CHANNELS = 16  # input channels a model may take (1 or 3 for scans; more only when its first convolution says so)


def read_sidecar(path: Path) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """The sidecar JSON beside a model file (`model.pt.json`, else `model.json`), or (None, None)."""
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file() and candidate != path:
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError) as exc:
                raise ModelError(f"{candidate}: the sidecar JSON cannot be read ({exc}); fix it or remove it.") from None
            if not isinstance(data, dict):
                raise ModelError(f"{candidate}: the sidecar JSON must be an object with InputSpec fields (labels, size, ...).")
            return data, candidate
    return None, None


def _as_size(value: Any) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    given = value
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    try:
        if isinstance(value, bool) or any(isinstance(v, bool) for v in value):
            raise ValueError
        size = tuple(int(str(v).strip()) for v in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) not in (2, 3) or any(s <= 0 for s in size):
        raise ModelError(f"input size {given!r} must be one positive number, H,W or D,H,W (e.g. 224 or 224,224).")
    return size


def _as_labels(value: Any) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    labels = tuple(str(v) for v in value)
    return labels or None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_field(key: str, value: Any, where: str) -> Any:
    """An InputSpec field from a sidecar or an option, with the type that field needs (labels normalised), or a
    ModelError naming where it came from; None when it says nothing (an empty label list)."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if key == "labels":
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(_is_number(v) or isinstance(v, str) for v in value)):
            return _as_labels(value)
        expected = "a list of class names or one comma-separated string"
    elif key == "size":
        return value  # _as_size says what is wrong with it
    elif key == "channels":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "a whole number (1 or 3)"
    elif key in ("mean", "std"):
        if _is_number(value) or (isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value)):
            return value
        expected = "a number or a list of numbers, one per channel"
    elif key == "multi_label":
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif key == "scale":
        if value in ("minmax", "uint8", "none"):
            return value
        expected = "'minmax', 'uint8' or 'none'"
    elif key == "extra":
        if isinstance(value, dict):
            return value
        expected = "an object"
    else:  # modality, notes, resample (InputSpec checks the mode)
        if isinstance(value, str):
            return value
        expected = "text"
    raise ModelError(f"{where} gives {key} = {shown}; {key} must be {expected}.")


def _infer_channels_dims(model: nn.Module) -> tuple[Optional[int], int]:
    conv = first_convolution(model)
    weight = getattr(conv, "weight", None) if conv is not None else None
    if weight is None:
        return None, 2
    channels = int(weight.shape[1]) * int(getattr(conv, "groups", 1) or 1)
    return channels, 3 if weight.dim() == 5 else 2


def probe_input(spec: InputSpec, size: tuple[int, ...]) -> torch.Tensor:
    """(1, C, *size): a ramp over [0, 1] along the last axis, normalised as the spec says, so the model's first input
    spans the range its real inputs have (TorchXRayVision, say, warns about an all-zero input, which [-1024, 1024]
    models never see)."""
    ramp = torch.linspace(0.0, 1.0, size[-1]).expand((1, int(spec.channels)) + tuple(size))
    mean = torch.tensor(spec._per_channel(spec.mean), dtype=torch.float32)
    std = torch.tensor(spec._per_channel(spec.std), dtype=torch.float32)
    if mean.numel() != spec.channels or std.numel() != spec.channels:
        return ramp.clone()  # a spec whose statistics do not fit its channels is refused by the caller's checks
    shape = (1, int(spec.channels)) + (1,) * len(size)
    return ((ramp - mean.view(shape)) / std.view(shape)).contiguous()


def _probe(model: nn.Module, spec: InputSpec, dims: int, source: str) -> int:
    """Number of classes K, from one forward pass (no grad, eval mode) on an input of the spec's size and range."""
    size = tuple(spec.size) if spec.size else ((32, 64, 64) if dims == 3 else (224, 224))
    x = probe_input(spec, size)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the spec does not fit the model
        raise ModelError(
            f"{source}: the model could not run on a {tuple(x.shape)} input ({type(exc).__name__}: {short_message(exc)}). "
            f"Tell medlens what it takes: --input-size and --channels, or a sidecar JSON with size and channels."
        ) from None
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{source}: the model returns {shape}, not logits of shape (batch, classes); medlens explains classifiers.")
    return int(out.shape[1])


def attach_metadata(
    model: nn.Module,
    source: str,
    *,
    kind: str,
    sidecar: Optional[Mapping[str, Any]] = None,
    sidecar_path: Optional[Path] = None,
    options: Optional[Mapping[str, Any]] = None,
    notes: Optional[list[str]] = None,
    digest: Optional[str] = None,
) -> nn.Module:
    """Give `model` its `.input_spec`, `.labels`, `.multi_label` and `.medlens_source`, checked by a probe pass."""
    options = dict(options or {})
    notes = list(notes or [])
    spec_obj = getattr(model, "input_spec", None)
    if isinstance(spec_obj, dict):
        spec_obj = InputSpec.from_dict(spec_obj)
    base = spec_obj if isinstance(spec_obj, InputSpec) else None
    fields: dict[str, Any] = base.to_dict() if base else {}
    origin: dict[str, str] = {k: "model" for k, v in fields.items() if v not in (None, [], (), "", {})}

    model_labels = getattr(model, "labels", None) or getattr(model, "pathologies", None) or getattr(model, "class_names", None)
    if model_labels and not isinstance(model_labels, str):
        fields["labels"] = [str(l) for l in model_labels]
        origin["labels"] = "model"
    if isinstance(getattr(model, "multi_label", None), bool):
        fields["multi_label"] = model.multi_label
        origin["multi_label"] = "model"
    if sidecar:
        unknown = sorted(set(sidecar) - set(InputSpec.__dataclass_fields__))
        if unknown:
            notes.append(f"sidecar fields not used: {', '.join(unknown)}")
        where = f"sidecar {sidecar_path.name if sidecar_path else ''}".strip()
        for key, value in sidecar.items():
            if key in InputSpec.__dataclass_fields__ and key not in origin and value is not None:
                value = _checked_field(key, value, f"{source}: the {where}")
                if value is not None:
                    fields[key] = value
                    origin[key] = where
    explicit = {
        "labels": _as_labels(options.pop("labels", None)),
        "size": _as_size(options.pop("input_size", None)),
        "multi_label": options.pop("multi_label", None),
        "channels": options.pop("channels", None),
        "scale": options.pop("scale", None),
        "mean": options.pop("mean", None),
        "std": options.pop("std", None),
        "modality": options.pop("modality", None),
    }
    for key, value in explicit.items():
        if value is None:
            continue
        value = _checked_field(key, value, f"{source}: the option")
        if key in origin and origin[key] != "option" and fields.get(key) not in (None, [], ()) and _norm(fields[key]) != _norm(value):
            notes.append(f"{key} from the options overrides the {key} from the {origin[key]}")
        if key in ("mean", "std") and isinstance(value, (int, float)):
            value = (float(value),)
        fields[key] = value
        origin[key] = "option"
    if options:
        raise ModelError(f"unknown model option(s): {', '.join(sorted(options))}.")

    conv_channels, dims = _infer_channels_dims(model)
    exported = getattr(model, "medlens_export_input", None)  # (B, C, *spatial) fixed when the program was exported
    if exported is not None:
        conv_channels = conv_channels or int(exported[1])
        if "size" not in fields:
            fields["size"], origin["size"] = tuple(int(s) for s in exported[2:]), "exported program"
    if "channels" not in fields:
        fields["channels"] = conv_channels or 1
        origin["channels"] = ("exported program" if exported is not None else "first convolution") if conv_channels else "default"
    if fields.get("size"):
        fields["size"] = _as_size(fields["size"])
        dims = len(fields["size"])
    if "mean" not in fields and "std" not in fields:
        fields["mean"], fields["std"] = (0.0,), (1.0,)
    try:
        spec = InputSpec.from_dict(fields)
        std = [float(v) for v in spec.std]
        mean = [float(v) for v in spec.mean]
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{source}: the input spec is not valid ({exc}).") from None
    if not all(math.isfinite(v) and v > 0 for v in std) or not all(math.isfinite(v) for v in mean):
        raise ModelError(f"{source}: the input normalisation must have finite means and positive standard deviations, "
                         f"got mean {list(spec.mean)} and std {list(spec.std)} ({origin.get('std', origin.get('mean', ''))}).")
    if any(not str(label).strip() for label in spec.labels):
        raise ModelError(f"{source}: a class label is empty ({list(spec.labels)}); give a name for every class.")
    channels = spec.channels
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= MAX_CHANNELS:
        raise ModelError(f"{source}: channels must be a whole number from 1 to {MAX_CHANNELS}, not {channels!r} "
                         f"({origin.get('channels', '')}).")
    if channels not in (1, 3) and not conv_channels:
        raise ModelError(f"{source}: channels must be 1 or 3, not {spec.channels}.")
    if spec.size:  # the probe pass allocates an input of this size: a size from a file is checked before that
        limits = current_limits()
        cap = limits.hard_voxels_3d if len(spec.size) == 3 else limits.hard_pixels_2d
        if math.prod(spec.size) * channels > cap:
            raise ModelError(f"{source}: the input size {' x '.join(map(str, spec.size))} with {channels} channel(s) "
                             f"({origin.get('size', '')}) is above medlens's limit of {cap:,} values; give the size the "
                             f"model was trained with.")

    n_classes = _probe(model, spec, dims, source)
    labels = list(spec.labels)
    if labels and len(labels) != n_classes:
        raise ModelError(
            f"{source}: {len(labels)} labels were given ({origin.get('labels', '')}) but the model has {n_classes} outputs; "
            f"give exactly {n_classes} labels."
        )
    if not labels:
        labels = [f"class {i}" for i in range(n_classes)]
        origin["labels"] = "default"
        notes.append(f"no labels were given: classes are named 'class 0'..'class {n_classes - 1}' (give --labels or a sidecar JSON)")
    if "multi_label" not in origin and n_classes == 1:
        # A softmax over one output is 1 for every input; one output is a binary finding's logit.
        origin["multi_label"] = "default for one output"
        spec = replace(spec, multi_label=True)
        notes.append("one output: read as the logit of one finding, probability = sigmoid (use --single-label to "
                     "override)")
    elif "multi_label" not in origin:
        origin["multi_label"] = "default"
        notes.append("not marked multi-label: probabilities are a softmax over classes (use --multi-label for sigmoid outputs)")
    if not spec.size:
        notes.append("the model carries no input size: scans are used at their own size (give --input-size)")
    spec = replace(spec, labels=tuple(labels))
    model.input_spec = spec
    model.labels = labels
    model.multi_label = bool(spec.multi_label)
    model.medlens_source = {
        "source": source,
        "kind": kind,
        "sha256": digest,
        "sidecar": str(sidecar_path) if sidecar_path else None,
        "from": origin,
        "notes": notes,
    }
    model.eval()
    return model


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
