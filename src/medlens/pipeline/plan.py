"""A request (methods, options, targets, seed, slice, formats) and its `Plan`: the request checked once against a
model before any file is read, so a wrong option fails in a second and not after the first image.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from medlens.core.explain import check_methods, model_digest
from medlens.core.model_description import describe
from medlens.core.registry import MethodSpec
from medlens.core.region_targets import SegmentationTarget, has_region_targets
from medlens.core.sliding_window import declared_window
from medlens.core.targets import check_target_names
from medlens.errors import InputError, ModelError
from medlens.io import model_dims
from medlens.io.files import jsonable
from medlens.io.formats import DEFAULT_FORMATS, check_formats
from medlens.models.loading import load_model
from medlens.version import __version__


@dataclass(frozen=True)
class ExplainRequest:
    """What to explain and how, the same for every input of a run."""

    methods: tuple[str, ...] = ("gradcam",)
    targets: Any = None  # None (top-1; multi-label: p >= 0.5), "all", or a list of class indices or names
    layer: Optional[str] = None  # dotted name of the target layer; None = chosen automatically
    seed: Optional[int] = None
    options: Mapping[str, Any] = field(default_factory=dict)  # method options, e.g. {"n_steps": 32}
    slice_index: Optional[int] = None  # a 2-D model given a volume: which axial slice (default the middle)
    frame: Optional[int] = None  # a multi-frame file: which frame
    window: Any = True  # DICOM: True = the file's window, False = modality values, (center, width)
    formats: tuple[str, ...] = DEFAULT_FORMATS
    signed: bool = False  # pictures draw every raw signed map, not each method as defined (Grad-CAM's positive part)

    @classmethod
    def build(cls, methods: Any = "gradcam", **fields: Any) -> "ExplainRequest":
        """A request from loose values: methods as "a,b" or a list, targets as "0,2", "all", or a list."""
        names = tuple(m.strip() for m in (methods.split(",") if isinstance(methods, str) else methods) if str(m).strip())
        targets = fields.pop("targets", None)
        if isinstance(targets, str):
            parts = [p.strip() for p in targets.split(",") if p.strip()]
            targets = None if not parts else "all" if [p.lower() for p in parts] == ["all"] else [
                int(p) if p.lstrip("-").isdigit() else p for p in parts]
        formats = fields.pop("formats", DEFAULT_FORMATS)
        formats = tuple(f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip())
        return cls(methods=names, targets=targets, formats=formats, options=dict(fields.pop("options", None) or {}), **fields)

    def settings(self) -> dict[str, Any]:
        """The request as JSON values (for provenance, manifests and digests)."""
        settings = {"methods": list(self.methods), "targets": self.targets, "layer": self.layer, "seed": self.seed,
                    "options": dict(sorted(self.options.items())), "slice_index": self.slice_index,
                    "frame": self.frame, "window": self.window, "formats": list(self.formats)}
        if self.signed:  # only when asked, so that the settings (and digests) of earlier runs stay as they were
            settings["signed"] = True
        return jsonable(settings)


@dataclass(frozen=True)
class Plan:
    """A request checked against a model: the method specs, the target list and the model's dimensionality."""

    model: nn.Module
    request: ExplainRequest
    specs: tuple[MethodSpec, ...]
    targets: Any  # None or a list of class indices / names (checked against the labels), or SegmentationTargets
    dims: int  # 2 or 3: what the model takes
    formats: tuple[str, ...]

    @property
    def device(self) -> Any:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else "cpu"

    def settings_digest(self, model_sha256: Optional[str] = None) -> str:
        """sha256 of everything that decides a result: the model's weights, the request and medlens's version."""
        payload = {"model": model_sha256 or model_digest(self.model), "request": self.request.settings(),
                   "medlens": __version__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_for(model: nn.Module, request: ExplainRequest) -> Plan:
    """Check `request` against `model` before any work: method names and options, 3-D support, TorchScript,
    target indices and names, output formats. Raises a MedlensError that says what to change."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, not {type(model).__name__}; load one with medlens.load_model().")
    if not isinstance(request, ExplainRequest):
        raise InputError(f"request must be an ExplainRequest, not {type(request).__name__}.")
    dims = model_dims(model)
    if declared_window(model, request.options) != dict(request.options):  # the model's patch size: a sliding window
        request = dataclasses.replace(request, options=declared_window(model, request.options))
    specs, _ = check_methods(list(request.methods), dict(request.options), model=model, model_dims=dims)
    labels = list(describe(model).labels)
    targets = request.targets
    if isinstance(targets, str) and targets.lower() == "all":
        if not labels:
            raise InputError("targets='all' needs a model that carries its labels (give them with --labels).")
        targets = list(range(len(labels)))
    elif targets is not None and not isinstance(targets, (list, tuple)):
        targets = [targets]
    if targets is not None and labels and not has_region_targets(targets):
        check_target_names(targets, labels)
    if describe(model).task == "segmentation" and not has_region_targets(targets):
        # each class over the model's own predicted region (by default every class but the first, the background)
        targets = [SegmentationTarget(c) for c in (targets if targets is not None else range(1, max(len(labels), 2)))]
    return Plan(model, request, tuple(specs), list(targets) if targets is not None else None, dims,
                tuple(check_formats(request.formats)))


@dataclass
class WorkerRecipe:
    """What a worker (a process, a Ray actor) needs to explain inputs, as picklable values: where the model comes
    from and the request. `plan()` loads the model once per worker and checks the request against it.

    `threads`: torch threads in the worker (None: leave torch's default). `model` may hold an already loaded model for
    in-process use (a serial run); it is never pickled, a worker loads its own from `model_source`."""

    model_source: str
    model_options: dict[str, Any]
    request: ExplainRequest
    device: str = "cpu"
    threads: Optional[int] = None
    model: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "model": None}

    def plan(self) -> Plan:
        """The request's plan on this worker's model (loaded from `model_source` unless one was given in process)."""
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        model = self.model
        if model is None:
            model = load_model(self.model_source, **self.model_options).to(self.device)
        return plan_for(model, self.request)


__all__ = ["ExplainRequest", "Plan", "WorkerRecipe", "plan_for"]

