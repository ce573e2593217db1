"""Building a loaded model's `ModelDescription` in steps (`build_description`): gather the fields from the options, the
model itself, a sidecar JSON and defaults; validate them into an `InputSpec`; check it with one probe pass; finish.

Where each field comes from, first match wins:
1. options given to `load_model` (`labels=`, `input_size=`, `multi_label=`, `channels=`, ...): what the user says
   explicitly overrides what the file says (a note records the override);
2. the model itself (what its source says, its `.input_spec`, `.labels`, `.multi_label`, or `.pathologies` /
   `.class_names`);
3. a sidecar JSON beside the file (`model.pt.json`, else `model.json`) holding `InputSpec` fields;
4. defaults: labels "class 0".."class K-1" with K from the probe pass, single-label (softmax), channels from the first
   convolution, the scan's own size, min-max intensity scaling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from torch import nn

from medlens.core.input_spec import InputSpec
from medlens.core.model_description import ModelDescription, declared_fields
from medlens.errors import ModelError
from medlens.io.limits import current_limits
from medlens.models.probe import convolution_channels_dims, probe_task
from medlens.models.sidecar import as_labels, as_size, checked_field
from medlens.models.source import LoadedModel

MAX_CHANNELS = 16  # input channels a model may take (1 or 3 for scans; more only when its first convolution says so)
OPTION_FIELDS = {"labels": "labels", "input_size": "size", "multi_label": "multi_label", "channels": "channels",
                 "scale": "scale", "mean": "mean", "std": "std", "modality": "modality"}  # load_model option -> field


@dataclass
class Gathered:
    """The description's fields as gathered, before they are checked: value, where each came from, notes."""

    fields: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def build_description(loaded: LoadedModel, options: Optional[Mapping[str, Any]] = None) -> ModelDescription:
    """The checked description of a loaded model: gather, validate, probe, finish.

    Args:
        loaded: the module and what its source knows about it.
        options: the description options given to `load_model` (labels, input_size, multi_label, channels, scale,
            mean, std, modality).

    Returns:
        The ModelDescription, with labels for every output and the input spec the probe pass ran on.

    Raises:
        ModelError: an unknown option, a field of the wrong type, an input spec the model cannot run on, or labels
            that do not match its outputs.
    """
    source = loaded.partial.source
    gathered = gather(loaded, options or {})
    spec, dims, conv_channels = complete_fields(loaded.module, gathered, source)
    spec = validate(spec, gathered.origin, conv_channels, source)
    n_classes, task = probe_task(loaded.module, spec, dims, source)
    return finish(loaded, spec, n_classes, gathered, task)


def gather(loaded: LoadedModel, options: Mapping[str, Any]) -> Gathered:
    """The fields from the model (and its source), the sidecar, then the options, each over the one before.

    Args:
        loaded: the module and what its source knows about it.
        options: the description options given to `load_model`.

    Returns:
        The gathered fields, their origins and the notes so far.

    Raises:
        ModelError: an unknown option or a field of the wrong type.
    """
    gathered = Gathered(notes=list(loaded.notes))
    _from_model(gathered, loaded.module, loaded.partial.input_spec)
    if loaded.sidecar:
        where = f"sidecar {loaded.sidecar_path.name if loaded.sidecar_path else ''}".strip()
        _from_sidecar(gathered, loaded.sidecar, where, loaded.partial.source)
    _from_options(gathered, options, loaded.partial.source)
    return gathered


def _from_model(gathered: Gathered, model: nn.Module, given: Optional[InputSpec]) -> None:
    declared = declared_fields(model)
    base = given or declared["input_spec"]
    gathered.fields = base.to_dict() if base else {}
    gathered.origin = {k: "model" for k, v in gathered.fields.items() if v not in (None, [], (), "", {})}
    labels = declared["labels"] or _other_labels(model)
    if labels:
        gathered.fields["labels"] = list(labels)
        gathered.origin["labels"] = "model"
    if isinstance(declared["multi_label"], bool):
        gathered.fields["multi_label"] = declared["multi_label"]
        gathered.origin["multi_label"] = "model"


def _other_labels(model: nn.Module) -> Optional[list[str]]:
    """Class names under the names other libraries use (TorchXRayVision's `.pathologies`, `.class_names`)."""
    labels = getattr(model, "pathologies", None) or getattr(model, "class_names", None)
    return [str(label) for label in labels] if labels and not isinstance(labels, str) else None


def _from_sidecar(gathered: Gathered, sidecar: Mapping[str, Any], where: str, source: str) -> None:
    unknown = sorted(set(sidecar) - set(InputSpec.__dataclass_fields__) - {"patch_size"})
    if sidecar.get("patch_size") is not None:  # a segmentation model's window (sliding-window explanations)
        extra = {**(gathered.fields.get("extra") or {}), "patch_size": list(as_size(sidecar["patch_size"]))}
        gathered.fields["extra"], gathered.origin["extra"] = extra, where
    if unknown:
        gathered.notes.append(f"sidecar fields not used: {', '.join(unknown)}")
    for key, value in sidecar.items():
        if key in InputSpec.__dataclass_fields__ and key not in gathered.origin and value is not None:
            value = checked_field(key, value, f"{source}: the {where}")
            if value is not None:
                gathered.fields[key] = value
                gathered.origin[key] = where


def _from_options(gathered: Gathered, options: Mapping[str, Any], source: str) -> None:
    fields, origin = gathered.fields, gathered.origin
    explicit = {key: options.get(option) for option, key in OPTION_FIELDS.items()}
    explicit["labels"], explicit["size"] = as_labels(explicit["labels"]), as_size(explicit["size"])
    for key, value in explicit.items():
        if value is None:
            continue
        value = checked_field(key, value, f"{source}: the option")
        if key in origin and origin[key] != "option" and fields.get(key) not in (None, [], ()) and _norm(fields[key]) != _norm(value):
            gathered.notes.append(f"{key} from the options overrides the {key} from the {origin[key]}")
        if key in ("mean", "std") and isinstance(value, (int, float)):
            value = (float(value),)
        fields[key] = value
        origin[key] = "option"
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise ModelError(f"unknown model option(s): {', '.join(unknown)}.")


def complete_fields(model: nn.Module, gathered: Gathered, source: str) -> tuple[InputSpec, int, Optional[int]]:
    """Fill what nothing gave from the model's shape (channels from its first convolution or its exported input, size
    from an exported program, mean 0 and std 1) and build the InputSpec.

    Args:
        model: the module.
        gathered: the gathered fields (completed in place).
        source: the model's name in messages.

    Returns:
        (the InputSpec, 2 or 3 spatial dimensions, the channels the model's first layer takes or None).

    Raises:
        ModelError: the fields do not make a valid InputSpec.
    """
    fields, origin = gathered.fields, gathered.origin
    conv_channels, dims = convolution_channels_dims(model)
    exported = getattr(model, "medlens_export_input", None)  # (B, C, *spatial) fixed when the program was exported
    if exported is not None:
        conv_channels = conv_channels or int(exported[1])
        if "size" not in fields:
            fields["size"], origin["size"] = tuple(int(s) for s in exported[2:]), "exported program"
    if "channels" not in fields:
        fields["channels"] = conv_channels or 1
        origin["channels"] = ("exported program" if exported is not None else "first convolution") if conv_channels else "default"
    if fields.get("size"):
        fields["size"] = as_size(fields["size"])
        dims = len(fields["size"])
    if "mean" not in fields and "std" not in fields:
        fields["mean"], fields["std"] = (0.0,), (1.0,)
    try:
        spec = InputSpec.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{source}: the input spec is not valid ({exc}).") from None
    return spec, dims, conv_channels


def validate(spec: InputSpec, origin: Mapping[str, str], conv_channels: Optional[int], source: str) -> InputSpec:
    """Check an input spec before the probe pass spends memory on it: finite normalisation, named labels, a channel
    count the model can take, a size under medlens's limits.

    Args:
        spec: the spec built from the gathered fields.
        origin: where each field came from, for the messages.
        conv_channels: the channels the model's first layer takes, or None when it has no convolution.
        source: the model's name in messages.

    Returns:
        The same spec.

    Raises:
        ModelError: saying which field is wrong and where it came from.
    """
    try:
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
    return spec


def finish(loaded: LoadedModel, spec: InputSpec, n_classes: int, gathered: Gathered,
           task: str = "classification") -> ModelDescription:
    """The description: labels for every one of the model's outputs, the multi-label default, the notes.

    Args:
        loaded: the module and what its source knows about it.
        spec: the checked input spec.
        n_classes: the number of outputs the probe pass saw.
        gathered: the gathered fields' origins and notes (completed in place).
        task: what the probe pass showed: "classification", or "segmentation" for per-pixel logits.

    Returns:
        The ModelDescription of a classifier or a segmentation model.

    Raises:
        ModelError: the number of labels given differs from the number of outputs.
    """
    origin, notes, source = gathered.origin, gathered.notes, loaded.partial.source
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
    return replace(loaded.partial, labels=tuple(labels), multi_label=bool(spec.multi_label), input_spec=spec,
                   task=task, origin=dict(origin), notes=tuple(notes))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
