"""The app's export: one ZIP (built in memory, handed to the browser) of the annotated overlays (model, method, target,
probability, colour bar, region and threshold outlines burned in), the raw maps, provenance, and the equivalent
`medlens explain` command line; nothing is written on the server.
"""
from __future__ import annotations

import io
import json
import shlex
import zipfile
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medlens.io.files import jsonable, safe_name
from medlens.version import __version__


@dataclass
class ExportItem:
    """One overlay of the grid as exported."""

    model: str
    method: str
    target: str
    probability: float
    png: bytes  # the annotated overlay
    raw: np.ndarray  # the raw, signed map on the model's input grid


def overlay_title(model: str, method: str, target: str, probability: float) -> list[str]:
    """The lines burned into an exported overlay."""
    return [f"{model} | {method}", f"target {target} (p={probability:.3f})"]


def command_lines(input_name: str, models: Mapping[str, str], methods: Sequence[str], options: Mapping[str, Any],
                  targets: Mapping[str, Sequence[str]], seed: Optional[int], slice_index: Optional[int] = None,
                  region_name: Optional[str] = None) -> list[str]:
    """The `medlens explain` command that gives the same maps, one per model (model key -> its --model source)."""
    lines = []
    for key, source in models.items():
        parts = ["medlens", "explain", input_name, "--model", source, "--methods", ",".join(methods)]
        if targets.get(key):
            parts += ["--targets", ",".join(targets[key])]
        if seed is not None:
            parts += ["--seed", str(seed)]
        for name, value in sorted(options.items()):
            parts += ["--option", f"{name}={value}"]
        if slice_index is not None:
            parts += ["--slice", str(slice_index)]
        parts += ["--region", region_name] if region_name else ["--no-region"]
        parts += ["--out", f"medlens-out/{safe_name(key)}"]
        if source.startswith("/") or source.endswith((".pt", ".pth", ".ts")):
            parts.append("# add --allow-pickle only if this file is a pickled module you trust")
        lines.append(" ".join(shlex.quote(p) if not p.startswith("#") else p for p in parts))
    return lines


def build_zip(items: Sequence[ExportItem], provenance: Mapping[str, Any], commands: Sequence[str]) -> bytes:
    """ZIP bytes: overlays/<model>/<method>_<target>.png, maps/<model>.npz (one raw map per method and target, keys
    "<method>/<target>"), provenance.json, command.txt."""
    buffer = io.BytesIO()
    by_model: dict[str, dict[str, np.ndarray]] = {}
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for item in items:
            zf.writestr(f"overlays/{safe_name(item.model)}/{safe_name(item.method)}_{safe_name(item.target)}.png", item.png)
            by_model.setdefault(item.model, {})[f"{item.method}/{item.target}"] = np.asarray(item.raw, dtype=np.float32)
        for model, arrays in by_model.items():
            npz = io.BytesIO()
            np.savez(npz, **arrays)
            zf.writestr(f"maps/{safe_name(model)}.npz", npz.getvalue())
        record = {"medlens": __version__, "note": "maps/*.npz hold the raw, signed maps at each model's input size; "
                  "the overlays are normalised for display only", **dict(provenance)}
        zf.writestr("provenance.json", json.dumps(jsonable(record), indent=2, sort_keys=True))
        zf.writestr("command.txt", "\n".join(commands) + "\n")
    return buffer.getvalue()
