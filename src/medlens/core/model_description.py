"""The one description of a model that medlens reads: `ModelDescription` (input spec, labels, multi-label, task,
where it came from) and `describe(model)`, the accessor every module uses instead of reading attributes itself.

It sits in core, below io and models, because core (explain's labels), families (LRP's input bounds) and io
(preparing a scan) read it; `medlens.models` builds it when it loads a model and stores it with `attach_description`.
A module medlens did not load (a plain torchvision model, a user's module with its own `.labels`) is described from
what it carries, at every call, so an attribute a user sets later is seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from medlens.core.input_spec import InputSpec
from medlens.errors import ModelError

TASKS = ("classification", "segmentation", "detection")  # what a model's output is; only classification loads today
DESCRIPTION_ATTR = "medlens_description"  # where a loaded model keeps its description


@dataclass(frozen=True)
class ModelDescription:
    """What medlens knows about a model: what it takes, what its outputs mean, and where it came from.

    labels: one name per output class (empty when the model names none).
    multi_label: True when the outputs are independent findings (sigmoid), False for a softmax over classes.
    input_spec: how scans are prepared for it; None when the model says nothing (then the first convolution and the
        scan decide).
    task: "classification" (logits (B, K)); "segmentation" and "detection" are reserved for those model kinds.
    source: what the user gave (a bundled name, a file, "torchvision:<arch> + <weights>", a class name).
    kind: which loader read it ("bundled", "torchscript", "torch.export", "pickled module", "architecture+weights",
        "torchxrayvision", "module").
    sha256: digest of the weights or model file, when there is one.
    sidecar: the sidecar JSON that was read, if any.
    origin: field -> where its value came from ("option", "model", "sidecar ...", "default", ...).
    notes: what a user should know about how the description was read.
    """

    labels: tuple[str, ...] = ()
    multi_label: bool = False
    input_spec: Optional[InputSpec] = None
    task: str = "classification"
    source: str = ""
    kind: str = "module"
    sha256: Optional[str] = None
    sidecar: Optional[str] = None
    origin: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ModelError(f"unknown model task {self.task!r}; use one of {', '.join(TASKS)}.")

    def provenance(self) -> dict[str, Any]:
        """Where the model came from, as JSON-ready data (the `medlens_source` of a loaded model).

        Returns:
            A dict with source, kind, sha256, sidecar, from (field -> origin) and notes.
        """
        return {"source": self.source, "kind": self.kind, "sha256": self.sha256, "sidecar": self.sidecar,
                "from": dict(self.origin), "notes": list(self.notes)}


def declared_fields(model: Any) -> dict[str, Any]:
    """What a module says about itself: its `.input_spec` (an InputSpec or a dict of its fields), `.labels` and
    `.multi_label`, each None when absent. The one place these attributes are read.

    Args:
        model: any object, usually a torch.nn.Module.

    Returns:
        {"input_spec": InputSpec or None, "labels": tuple of str or None, "multi_label": the attribute as set or None}.
    """
    spec = getattr(model, "input_spec", None)
    if isinstance(spec, dict):
        spec = InputSpec.from_dict(spec)
    labels = getattr(model, "labels", None)
    labels = tuple(str(label) for label in labels) if labels and not isinstance(labels, str) else None
    return {"input_spec": spec if isinstance(spec, InputSpec) else None, "labels": labels,
            "multi_label": getattr(model, "multi_label", None)}


def describe(model: Any) -> ModelDescription:
    """The description of `model`: the one medlens stored when it loaded it, else one read from what the module carries.

    The public attributes stay authoritative: a `.labels`, `.multi_label` or `.input_spec` a user set after loading
    replaces the stored value, so the description and what the user sees never disagree.

    Args:
        model: a torch.nn.Module (loaded by medlens or not), or None (an empty description).

    Returns:
        The model's ModelDescription.
    """
    if model is None:
        return ModelDescription()
    declared = declared_fields(model)
    stored = model.__dict__.get(DESCRIPTION_ATTR) if hasattr(model, "__dict__") else None
    if not isinstance(stored, ModelDescription):
        return ModelDescription(labels=declared["labels"] or (), multi_label=bool(declared["multi_label"]),
                                input_spec=declared["input_spec"], source=type(model).__name__, kind="module")
    changes: dict[str, Any] = {}
    if declared["labels"] is not None and declared["labels"] != stored.labels:
        changes["labels"] = declared["labels"]
    if declared["multi_label"] is not None and bool(declared["multi_label"]) != stored.multi_label:
        changes["multi_label"] = bool(declared["multi_label"])
    if declared["input_spec"] is not None and declared["input_spec"] != stored.input_spec:
        changes["input_spec"] = declared["input_spec"]
    return replace(stored, **changes) if changes else stored


def attach_description(model: Any, description: ModelDescription) -> Any:
    """Store `description` on `model` and set the attributes users read (`.labels`, `.multi_label`, `.input_spec`,
    `.medlens_source`), all from it.

    Args:
        model: the torch.nn.Module that was loaded.
        description: what medlens knows about it.

    Returns:
        The same module.
    """
    setattr(model, DESCRIPTION_ATTR, description)
    model.input_spec = description.input_spec
    model.labels = list(description.labels)
    model.multi_label = bool(description.multi_label)
    model.medlens_source = description.provenance()
    return model
