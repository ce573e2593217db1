"""A batch run's settings (model digest, methods, options, targets, seed, formats, medlens version) and their digest,
kept in `OUT/batch.json`; a folder holding another run's settings is refused with the differences named.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from medlens.core.explain import model_digest
from medlens.errors import OutputError
from medlens.io.files import atomic_write, jsonable
from medlens.pipeline import Plan
from medlens.version import __version__

SETTINGS_FILE = "batch.json"
MANIFEST_FILE = "manifest.jsonl"


def run_settings(plan: Plan, model_source: str) -> dict[str, Any]:
    """What decides a batch's results, as JSON values, with `digest` = `plan.settings_digest` (the same sha256 that
    provenance uses: model weights, request, medlens version)."""
    weights = model_digest(plan.model)
    return jsonable({"digest": plan.settings_digest(weights), "model": {"source": model_source, "sha256": weights},
                     "request": plan.request.settings(), "medlens": __version__})


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    if isinstance(value, str) and len(value) == 64:  # a digest
        return value[:12] + "..."
    return "(none)" if value is None else str(value)


def differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that differ, as `name: old -> new` (the digest itself and the model's file name left out)."""
    a, b = _flat(before), _flat(now)
    ignored = {"digest", "model.source"}
    names = [k for k in dict.fromkeys([*a, *b]) if k not in ignored and a.get(k) != b.get(k)]
    return [f"{k.replace('request.', '')}: {_show(a.get(k))} -> {_show(b.get(k))}" for k in names]


def read_settings(out: Path) -> Optional[dict[str, Any]]:
    path = out / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise OutputError(f"{path} cannot be read ({exc}); it is not a medlens batch settings file. Choose another "
                          f"--out folder, or --force to start a new run there.") from None
    return found if isinstance(found, dict) else None


def claim_folder(out: Path, settings: dict[str, Any], force: bool) -> None:
    """Check `out` may take this run: empty, or an earlier run of the same settings (resumed), or `force`. Then record
    the settings. A folder of another run, or of other files, is refused naming why (nothing written)."""
    earlier = read_settings(out)
    if earlier is None:
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
        if others and not force:
            shown = ", ".join(sorted(others)[:5]) + (" ..." if len(others) > 5 else "")
            raise OutputError(f"the output folder {out} already holds files that are not a medlens batch run ({shown}); "
                              f"choose an empty or new folder with --out, or add --force to write there anyway.")
    elif earlier.get("digest") != settings["digest"] and not force:
        changed = differences(earlier, settings) or ["the settings digest (written by another medlens version?)"]
        raise OutputError(f"the output folder {out} holds a batch run with other settings ({'; '.join(changed)}); "
                          f"its results are not mixed with this run's. Run with the same settings to resume it, choose "
                          f"another --out folder, or add --force to start a new run there (the manifest keeps the "
                          f"earlier lines; only this run's settings count).")
    if earlier != settings:
        atomic_write(out / SETTINGS_FILE, json.dumps(settings, indent=2, sort_keys=True))
