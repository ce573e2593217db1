"""The bundled model zoo: which models ship (`bundled_models`) and loading them offline (`load_bundled`).

Owns `weights/models.json` (architecture, input spec, weights file and digest per model) and the checks on load.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from medlens.errors import ModelError
from medlens.core.input_spec import InputSpec
from medlens.models.architectures import build

HERE = Path(__file__).resolve().parent
WEIGHTS_DIR = HERE / "weights"
CARDS_DIR = HERE / "cards"
SPEC_FILE = WEIGHTS_DIR / "models.json"


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
    """name -> {labels, input_spec (InputSpec), description, card (Path), weights (Path), architecture, test_accuracy}."""
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
        }
    return out


def _sha256(path: Path) -> str:
    from medlens.io.files import file_sha256  # one implementation of file hashing

    return file_sha256(path)


def load_state_dict_checked(model: nn.Module, path: Union[str, Path], what: str) -> nn.Module:
    """Load a state dict file into `model`; a missing, unreadable or mismatching file raises ModelError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"the weights file {path} for {what} is missing; expected a PyTorch state dict (.pt).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, pickle, truncated file...
        raise ModelError(f"cannot read the weights file {path} for {what}: {exc}. Expected a PyTorch state dict (.pt).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"the weights file {path} for {what} does not hold a state dict (name -> tensor).")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:3])})")
        raise ModelError(
            f"the weights file {path} does not match the architecture of {what}: parameters {', '.join(parts)}. "
            f"Expected weights saved from {type(model).__name__} with the same configuration."
        )
    model.load_state_dict(state)
    return model


def load_bundled(name: str) -> nn.Module:
    """A bundled model by name, in eval mode, with `.labels`, `.multi_label`, `.input_spec` (offline, CPU)."""
    specs = _specs()
    if name not in specs:
        raise ModelError(f"no bundled model is called {name!r}; the bundled models are: {', '.join(sorted(specs))}.")
    s = specs[name]
    model = build(s["architecture"], **copy.deepcopy(s.get("kwargs", {})))
    path = WEIGHTS_DIR / s["weights"]
    digest = s.get("sha256")
    if digest and path.is_file() and _sha256(path) != digest:
        raise ModelError(f"the weights file {path} of {name!r} has been changed or damaged (its SHA-256 differs from "
                         f"the one in {SPEC_FILE.name}); reinstall medlens or retrain with `medlens train {name}`.")
    load_state_dict_checked(model, path, f"the bundled model {name!r} ({s['architecture']})")
    spec = InputSpec.from_dict(s["input_spec"])
    model.labels = list(spec.labels)
    model.multi_label = bool(spec.multi_label)
    model.input_spec = spec
    model.medlens_name = name
    return model.eval()
