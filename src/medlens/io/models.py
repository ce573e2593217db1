"""Loading models: bundled names, TorchScript files, pickled modules, architecture + weights, TorchXRayVision.

Every model returned carries `.labels`, `.multi_label`, `.input_spec` and `.medlens_source` (where it came
from, for provenance). Nothing is ever downloaded.

Where labels and the input spec come from, first match wins per field:
1. options given to `load_model` (`labels=`, `input_size=`, `multi_label=`, `channels=`, ...): what the
   user says explicitly overrides what the file says (a note records the override);
2. the model object itself (`.input_spec`, `.labels`, `.multi_label`, or TorchXRayVision's `.pathologies`);
3. a sidecar JSON beside the file (`model.pt.json`, else `model.json`) holding `InputSpec` fields;
4. defaults: labels "class 0".."class K-1" with K from a probe forward pass, single-label (softmax),
   channels from the first convolution, the scan's own size, min-max intensity scaling.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import pickle
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from medlens.errors import ModelError, short_message
from medlens.core.input_spec import InputSpec
from medlens.core.layers import first_convolution

PathLike = Union[str, os.PathLike]

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


class PickleWarning(UserWarning):
    """Loading a pickled module runs code stored in the file."""


# --------------------------------------------------------------------------------------------- helpers


def file_digest(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


BUNDLED_PROBLEM: list[str] = []  # why the bundled models could not be listed, shown by `medlens models`


def _bundled() -> dict[str, Any]:
    """Bundled models from `medlens.models.zoo`, or none while that module does not exist."""
    BUNDLED_PROBLEM.clear()
    try:
        from medlens.models import zoo  # type: ignore[attr-defined]
    except ImportError:
        return {}
    try:
        return dict(zoo.bundled_models())
    except Exception as exc:  # noqa: BLE001 - a broken zoo must not stop file and architecture loading
        BUNDLED_PROBLEM.append(str(exc))
        return {}


def bundled_models() -> dict[str, Any]:
    """name -> info of every bundled model (empty while none are shipped)."""
    return _bundled()


def _info_get(info: Any, key: str, default: Any = None) -> Any:
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


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


def _infer_channels_dims(model: nn.Module) -> tuple[Optional[int], int]:
    conv = first_convolution(model)
    weight = getattr(conv, "weight", None) if conv is not None else None
    if weight is None:
        return None, 2
    channels = int(weight.shape[1]) * int(getattr(conv, "groups", 1) or 1)
    return channels, 3 if weight.dim() == 5 else 2


def _probe(model: nn.Module, spec: InputSpec, dims: int, source: str) -> int:
    """Number of classes K, from one forward pass on a zero input of the spec's size (no grad, eval mode)."""
    size = tuple(spec.size) if spec.size else ((32, 64, 64) if dims == 3 else (224, 224))
    x = torch.zeros((1, spec.channels) + size)
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
        for key, value in sidecar.items():
            if key in InputSpec.__dataclass_fields__ and key not in origin and value is not None:
                fields[key] = _as_labels(value) if key == "labels" else value  # "a,b,c" as on the command line
                origin[key] = f"sidecar {sidecar_path.name if sidecar_path else ''}".strip()
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
        if key in origin and origin[key] != "option" and fields.get(key) not in (None, [], ()) and _norm(fields[key]) != _norm(value):
            notes.append(f"{key} from the options overrides the {key} from the {origin[key]}")
        if key in ("mean", "std") and isinstance(value, (int, float)):
            value = (float(value),)
        fields[key] = value
        origin[key] = "option"
    if options:
        raise ModelError(f"unknown model option(s): {', '.join(sorted(options))}.")

    conv_channels, dims = _infer_channels_dims(model)
    if "channels" not in fields:
        fields["channels"] = conv_channels or 1
        origin["channels"] = "first convolution" if conv_channels else "default"
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
    if int(spec.channels) not in (1, 3) and not conv_channels:
        raise ModelError(f"{source}: channels must be 1 or 3, not {spec.channels}.")

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


# --------------------------------------------------------------------------------------------- files


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _state_dict_of(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """A state dict inside a loaded object (a plain one, or a checkpoint with 'state_dict'/'model')."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in ("state_dict", "model_state_dict", "model", "net", "weights"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found = _state_dict_of(inner)
                if found is not None:
                    return found
    return None


def _load_file(path: Path, map_location: Any, allow_pickle: bool, notes: list[str]) -> tuple[nn.Module, str]:
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location=map_location), "torchscript"
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{path}: looks like a TorchScript file but cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}).") from None
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        raise ModelError(
            f"{path} is not a model file medlens can read (it is neither a TorchScript nor a torch.save archive). "
            f"Expected a TorchScript file (torch.jit.save), a pickled module (torch.save(model)), or weights with an "
            f"architecture (torchvision:<name> with weights=)."
        )
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise ModelError(
                f"{path} is a pickled Python object; loading it runs code from the file, and pickled models are not "
                f"allowed here. Save it with torch.jit.save, or save its state_dict and load it with an architecture name."
            ) from None
        warnings.warn(
            f"{path} is a pickled module: loading it runs code stored in the file. Only load files you trust; "
            f"prefer TorchScript (torch.jit.save) or a state_dict with an architecture name.",
            PickleWarning,
            stacklevel=3,
        )
        notes.append("loaded from a pickled module (weights_only=False) after a warning that it runs code")
        try:
            obj = torch.load(str(path), map_location=map_location, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - missing classes, broken pickles, ...
            raise ModelError(
                f"{path}: the pickled model cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}). A pickled module "
                f"needs its class importable under the same module name; TorchScript files do not."
            ) from None
        kind = "pickled module"
    except Exception as exc:  # noqa: BLE001 - not a zip, not a pickle, truncated ...
        raise ModelError(
            f"{path} is not a model file medlens can read ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}). "
            f"Expected a TorchScript file (torch.jit.save), a pickled module (torch.save(model)), or weights with an "
            f"architecture (torchvision:<name> with weights=)."
        ) from None
    else:
        kind = "file"
    if isinstance(obj, nn.Module):
        return obj, kind
    if _state_dict_of(obj) is not None:
        raise ModelError(
            f"{path} holds weights (a state_dict) but no architecture. Give the architecture and these weights: "
            f"`--model torchvision:<name> --weights {path}` (or load_model('torchvision:<name>', weights='{path}'))."
        )
    raise ModelError(
        f"{path} holds a {type(obj).__name__}, not a model. Expected a TorchScript file (torch.jit.save), a pickled "
        f"nn.Module (torch.save(model)), or a state_dict with an architecture name."
    )


# --------------------------------------------------------------------------------------------- architectures


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


def _load_weights_file(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"{path}: no such weights file. medlens never downloads weights; give a local file.")
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(
            f"{path} is not a weights file medlens can read ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}). "
            f"Expected a state_dict saved with torch.save(model.state_dict(), path); a whole pickled module can be "
            f"given directly as the model."
        ) from None
    state = _state_dict_of(obj)
    if state is None:
        raise ModelError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors.")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


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


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], weights: Path, arch: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
        raise ModelError(
            f"{weights}: these weights do not match the architecture {arch}: {', '.join(parts)} keys. Check the "
            f"architecture name, num_classes and in_channels."
        )


def _load_architecture(source: str, weights: Any, map_location: Any, num_classes: Any, in_channels: Any, notes: list[str]) -> nn.Module:
    library, _, arch = source.partition(":")
    library = library.lower()
    if weights is None:
        raise ModelError(
            f"{source}: an architecture name needs a local weights file (weights=... / --weights FILE); "
            f"medlens never downloads weights."
        )
    weights_path = Path(weights)
    state = _load_weights_file(weights_path, map_location)
    if in_channels is None:
        in_channels = _first_conv_in(state)
    if library == "torchvision":
        import torchvision

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
            import timm  # type: ignore[import-not-found]
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
    _check_state(model, state, weights_path, source)
    model.load_state_dict(state)
    return model


# --------------------------------------------------------------------------------------------- TorchXRayVision


def _load_xrv(source: str, notes: list[str]) -> nn.Module:
    """A TorchXRayVision model whose weights are already in its local cache; its downloader is disabled."""
    import contextlib
    import io as _io

    name = source.split(":", 1)[1].strip()
    try:
        import torchxrayvision as xrv  # type: ignore[import-not-found]
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
        with contextlib.redirect_stdout(_io.StringIO()):  # TorchXRayVision prints progress and hints on stdout
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
    size = 512 if "512" in name else 224
    raw = list(getattr(model, "targets", None) or getattr(model, "pathologies", None) or [])
    labels = [p if p else f"unused {i}" for i, p in enumerate(raw)]
    model.pathologies = labels
    # TorchXRayVision expects [-1024, 1024] from 8-bit images: x / 255 * 2048 - 1024 = (x/255 - 0.5) / (1/2048)
    model.input_spec = InputSpec(size=(size, size), channels=1, scale="uint8", mean=(0.5,), std=(1 / 2048,),
                                 labels=tuple(labels), multi_label=True, modality="chest X-ray")
    return model


# --------------------------------------------------------------------------------------------- entry point


def load_model(
    source: Any,
    *,
    weights: Optional[PathLike] = None,
    num_classes: Optional[int] = None,
    in_channels: Optional[int] = None,
    map_location: Any = "cpu",
    allow_pickle: bool = True,
    **options: Any,
) -> nn.Module:
    """A bundled model name, a file path, "torchvision:<arch>"/"timm:<arch>" with `weights=`, or "xrv:<name>".

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
        model = _load_xrv(text, notes)
        return attach_metadata(model, text, kind="torchxrayvision", options=options, notes=notes, digest=None)
    if lowered.startswith(("torchvision:", "timm:")):
        model = _load_architecture(text, weights, map_location, num_classes, in_channels, notes)
        sidecar, sidecar_path = read_sidecar(Path(weights)) if weights else (None, None)
        return attach_metadata(model, f"{text} + {weights}", kind="architecture+weights", sidecar=sidecar,
                               sidecar_path=sidecar_path, options=options, notes=notes, digest=file_digest(weights))
    bundled = _bundled()
    if text in bundled:
        from medlens.models import zoo  # type: ignore[attr-defined]

        model = zoo.load_bundled(text)
        weights_file = _info_get(bundled[text], "weights")
        digest = file_digest(weights_file) if weights_file and Path(weights_file).is_file() else None
        return attach_metadata(model, text, kind="bundled", options=options, notes=notes, digest=digest)
    path = Path(text).expanduser()
    if not path.exists():
        hint = f" Bundled models: {', '.join(sorted(bundled))}." if bundled else ""
        raise ModelError(
            f"{text!r} is neither a bundled model name nor an existing file.{hint} Give a model file (TorchScript or "
            f"pickled module), 'torchvision:<arch>' with weights, or 'xrv:<weights name>'; see `medlens models`."
        )
    if path.is_dir():
        raise ModelError(f"{path} is a folder; give the model file inside it.")
    model, kind = _load_file(path, map_location, allow_pickle, notes)
    sidecar, sidecar_path = read_sidecar(path)
    return attach_metadata(model, str(path), kind=kind, sidecar=sidecar, sidecar_path=sidecar_path,
                           options=options, notes=notes, digest=file_digest(path))


__all__ = ["PickleWarning", "XRV_CACHE", "attach_metadata", "bundled_models", "file_digest", "load_model", "read_sidecar"]
