"""Who a DICOM result is: its UIDs, series, instance number and description, derived from the source instance(s), the
model digest, the method with its own options and the target, so the same settings give the same UIDs.

Another option of a method (or another model) gives that method's results new UIDs; other methods keep theirs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medlens.core.registry import get_spec  # the registry says which methods read a layer

MAX_INSTANCE_BASE = 2_000_000  # InstanceNumber (IS) must stay below 2^31: base * 1000 + target position


def method_settings(provenance: Mapping[str, Any], method: str) -> dict[str, Any]:
    """What decides one method's maps: the model's weights digest, the method, its options, and the layer when the
    method reads one (a CAM); the target is added per instance."""
    try:
        needs_layer = bool(get_spec(method).needs_layer)
    except Exception:  # noqa: BLE001 - a method outside the registry: its layer counts, to be safe
        needs_layer = True
    layer = provenance.get("layer") or {}
    return {"model": (provenance.get("model") or {}).get("sha256"), "method": method,
            "options": ((provenance.get("methods") or {}).get(method) or {}).get("options", {}),
            "layer": layer.get("name") if needs_layer and isinstance(layer, Mapping) else None}


def settings_digest(provenance: Mapping[str, Any], method: str) -> str:
    """sha256 of `method_settings` as canonical JSON."""
    text = json.dumps(method_settings(provenance, method), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def series_uid(sources: Sequence[Dataset], digest: str, kind: str) -> str:
    """One series per source series, model and method (with its options), and kind ("pm" or "sc")."""
    first = sources[0]
    return generate_uid(entropy_srcs=["medlens-series", str(first.get("StudyInstanceUID", "")),
                                      str(first.get("SeriesInstanceUID", "")), digest, kind])


def instance_uid(sources: Sequence[Dataset], digest: str, kind: str, target: int) -> str:
    """One instance per source instance(s), model, method (with its options), target and kind."""
    return generate_uid(entropy_srcs=["medlens-instance", *(str(s.get("SOPInstanceUID", "")) for s in sources),
                                      digest, kind, str(int(target))])


def instance_number(sources: Sequence[Dataset], position: int) -> int:
    """Unique in the series: the source's instance number (the lowest of a volume's) times 1000 plus the target's
    position; a source without one gets a number from its SOPInstanceUID."""
    numbers = []
    for s in sources:
        try:
            numbers.append(int(s.get("InstanceNumber")))
        except (TypeError, ValueError):
            pass
    if numbers:
        base = min(numbers) % MAX_INSTANCE_BASE
    else:
        uid = str(sources[0].get("SOPInstanceUID", ""))
        base = int(hashlib.sha256(uid.encode()).hexdigest(), 16) % MAX_INSTANCE_BASE
    return base * 1000 + (position % 1000) + 1


def model_name(model_source: Optional[Mapping[str, Any]], provenance: Mapping[str, Any]) -> str:
    """The model as a person knows it: the bundled name or the file name, else the class name."""
    source = (model_source or {}).get("source")
    if source:
        return Path(str(source)).name
    return str((provenance.get("model") or {}).get("class", "model"))


def target_text(provenance: Mapping[str, Any], names: Sequence[str]) -> str:
    """The series' target: the classes when they were given for every image, else the rule (e.g. "top-1 class")."""
    rule = str(provenance.get("target_rule") or "")
    if "as given" in rule or not rule:
        return ", ".join(names)
    return rule.replace(" of each image", "")


def series_description(model: str, method: str, kind: str, target: str) -> str:
    """SeriesDescription (LO, 64 characters): method, what the object is, target and model."""
    what = "relevance map" if kind == "pm" else "overlay"
    return f"medlens {method} {what}, {target}, {model}"[:64]
