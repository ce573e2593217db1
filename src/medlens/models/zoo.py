"""The bundled model zoo: which models ship (`bundled_models`), loading them offline (`load_bundled`), and the
"bundled" model source (`can_load`, `load`). Owns `weights/models.json` (architecture, input spec, weights file and
digest per model) and the checks on load.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from medlens.core.input_spec import InputSpec
from medlens.core.model_description import ModelDescription, attach_description
from medlens.errors import ModelError
from medlens.io.files import file_sha256
from medlens.models.networks import ARCHITECTURES
from medlens.models.source import LoadedModel, LoadOptions
from medlens.models.state_dicts import load_state_dict_checked

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
CARDS_DIR = HERE / "cards"
SPEC_FILE = WEIGHTS_DIR / "models.json"
BUNDLED_PROBLEM: list[str] = []  # why the bundled models could not be listed, shown by `medlens models`


@functools.lru_cache(maxsize=1)
def _specs() -> dict[str, dict[str, Any]]:
    try:
        specs = json.loads(SPEC_FILE.read_text())
    except FileNotFoundError:
        raise ModelError(f"the bundled model list {SPEC_FILE} is missing; the medlens install looks incomplete.") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"the bundled model list {SPEC_FILE} is not valid JSON ({exc}); reinstall medlens.") from None
    return specs


def bundled_models() -> dict[str, dict[str, Any]]:
    """Every bundled model and what models.json says about it.

    Returns:
        name -> {labels, multi_label, input_spec (InputSpec), description, card (Path), weights (Path), architecture,
        test_accuracy, task ("classification" or "segmentation"), test_dice (segmentation models)}.

    Raises:
        ModelError: models.json is missing or not valid JSON.
    """
    out = {}
    for name, s in _specs().items():
        out[name] = {
            "labels": list(s["input_spec"]["labels"]),
            "multi_label": bool(s["input_spec"].get("multi_label", False)),
            "input_spec": InputSpec.from_dict(s["input_spec"]),
            "description": s["description"],
            "card": CARDS_DIR / s["card"],
            "weights": WEIGHTS_DIR / s["weights"],
            "architecture": s["architecture"],
            "test_accuracy": s.get("test_accuracy"),
            "task": s.get("task", "classification"),
            "test_dice": s.get("test_dice"),
        }
    return out


def load_bundled(name: str) -> nn.Module:
    """A bundled model by name, in eval mode and on the CPU, described from models.json (offline).

    Args:
        name: the bundled model's name.

    Returns:
        The module, with its description attached (`.labels`, `.multi_label`, `.input_spec`).

    Raises:
        ModelError: no such model, or its weights file is missing, changed or damaged.
    """
    specs = _specs()
    if name not in specs:
        raise ModelError(f"no bundled model is called {name!r}; the bundled models are: {', '.join(sorted(specs))}.")
    s = specs[name]
    model = build(s["architecture"], **copy.deepcopy(s.get("kwargs", {})))
    path = WEIGHTS_DIR / s["weights"]
    digest = s.get("sha256")
    if digest and path.is_file() and file_sha256(path) != digest:
        raise ModelError(f"the weights file {path} of {name!r} has been changed or damaged (its SHA-256 differs from "
                         f"the one in {SPEC_FILE.name}); reinstall medlens or retrain with `medlens train {name}`.")
    load_state_dict_checked(model, path, f"the bundled model {name!r} ({s['architecture']})")
    spec = InputSpec.from_dict(s["input_spec"])
    description = ModelDescription(labels=tuple(spec.labels), multi_label=bool(spec.multi_label), input_spec=spec,
                                   task=s.get("task", "classification"), source=name, kind="bundled", sha256=digest)
    return attach_description(model, description).eval()


def listed_models() -> dict[str, Any]:
    """name -> info of every bundled model; empty, with the reason in BUNDLED_PROBLEM, when the list is broken (so that
    files and architectures still load).

    Returns:
        `bundled_models()`, or {} when it failed.
    """
    BUNDLED_PROBLEM.clear()
    try:
        return dict(bundled_models())
    except Exception as exc:  # noqa: BLE001 - a broken model list must not stop file and architecture loading
        BUNDLED_PROBLEM.append(str(exc))
        return {}


def info_get(info: Any, key: str, default: Any = None) -> Any:
    """One field of a bundled model's info (a mapping, or an object with attributes).

    Args:
        info: the info `bundled_models()` gives for one model.
        key: the field.
        default: what to return when it is absent.

    Returns:
        The field's value, or `default`.
    """
    if isinstance(info, Mapping):
        return info.get(key, default)
    return getattr(info, key, default)


def can_load(source: Any) -> bool:
    """Whether `source` is a bundled model's name (the "bundled" model source).

    Args:
        source: what `load_model` was given.

    Returns:
        True for the name of a bundled model.
    """
    return isinstance(source, str) and source in listed_models()


def load(source: str, options: LoadOptions) -> LoadedModel:
    """A bundled model by name, with the digest of its weights file (the "bundled" model source).

    Args:
        source: the bundled model's name.
        options: unused (a bundled model brings its own weights).

    Returns:
        The module and its partial description.

    Raises:
        ModelError: as `load_bundled`.
    """
    weights_file = info_get(listed_models().get(source), "weights")
    digest = file_sha256(weights_file) if weights_file and Path(weights_file).is_file() else None
    return LoadedModel(load_bundled(source), ModelDescription(source=source, kind="bundled", sha256=digest))


def build(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a bundled network by its class name (as written in models.json).

    Raises:
        ModelError: an architecture medlens does not ship.
    """
    if arch == "HybridViT":  # torchvision's ViT, whose import costs start-up time: only for the model that needs it
        from medlens.models.hybrid_vit import HybridViT

        return HybridViT(**kwargs)
    if arch not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {arch!r}; expected one of {sorted([*ARCHITECTURES, 'HybridViT'])}.")
    return ARCHITECTURES[arch](**kwargs)
