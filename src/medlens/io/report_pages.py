"""A report a person keeps: one page per explained scan of a result folder (`medlens explain --out` or `medlens batch`),
read back from what was written (provenance.json, maps.npz, the overlay PNGs), as HTML and, on request, a PDF.

Each page: the research-use banner, the prediction, the overlays as written (the scan's resolution, colour bars with
their captions, region outline), the region scores, faithfulness numbers when provenance holds any, and the provenance
in plain words. The PDF is drawn with matplotlib's PdfPages (matplotlib is already a dependency; no new library).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from medlens.errors import InputError
from medlens.io.files import atomic_write

BANNER = "For research use only. Not a medical device; not for diagnosis or any clinical decision."
FAITHFULNESS_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "average_drop", "increase_in_confidence",
                     "completeness")


@dataclass
class ScanPage:
    """What one page shows of one explained scan."""

    folder: Path
    title: str
    prediction: list[str]
    overlays: list[Path]
    region: list[str] = field(default_factory=list)
    faithfulness: list[str] = field(default_factory=list)
    provenance: list[str] = field(default_factory=list)


def find_results(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds a provenance.json, sorted.

    Raises:
        InputError: when `root` is not a folder or holds no result.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; give the folder `medlens explain --out` or `medlens batch --out` wrote.")
    found = sorted(p.parent for p in root.rglob("provenance.json"))
    if not found:
        raise InputError(f"{root}: no provenance.json found under it; give a folder written by `medlens explain` or "
                         f"`medlens batch`.")
    return found


def _prediction(folder: Path, provenance: dict[str, Any]) -> list[str]:
    npz = folder / "maps.npz"
    if npz.is_file():
        with np.load(npz) as data:
            if "region_targets" in provenance and {"logits", "targets"} <= set(data.files):  # region scores
                names = (provenance.get("target_names") or [[]])[0] or [str(t) for t in data["targets"][0]]
                return [f"{name}: score {float(data['logits'][0][t]):.3g}" for name, t in zip(names, data["targets"][0])]
            if "probabilities" in data.files:
                probs = data["probabilities"][0]
                labels = list(data["labels"]) if "labels" in data.files else [f"class {i}" for i in range(len(probs))]
                order = np.argsort(-probs)
                return [f"{labels[i]}: {float(probs[i]):.3f}" for i in order]
    names = provenance.get("target_names") or []
    return [f"explained: {', '.join(names[0])}"] if names else ["(no prediction recorded)"]


def _plain_words(p: dict[str, Any]) -> list[str]:
    source = p.get("model_source") or {}
    layer = p.get("layer") or {}
    lines = [f"Model: {source.get('source', (p.get('model') or {}).get('class', '?'))}"
             + (f" ({source.get('kind')})" if source.get("kind") else "")
             + f", weights sha256 {str((source.get('sha256') or (p.get('model') or {}).get('sha256') or '?'))[:12]}...",
             f"Input: {(p.get('input_file') or {}).get('path', '?')}"]
    for method, info in (p.get("methods") or {}).items():
        options = ", ".join(f"{k}={v}" for k, v in (info.get("options") or {}).items()) or "defaults"
        extra = info.get("reference") or info.get("baseline_reference") or info.get("input_reference") or ""
        lines.append(f"{method}: {options}" + (f"; reference: {extra}" if extra else ""))
    if layer:
        lines.append(f"CAM layer: {layer.get('name')} ({'chosen automatically' if layer.get('chosen_automatically') else 'given'})")
    rendering = p.get("rendering") or {}
    if rendering.get("grid"):
        lines.append(f"Pictures: {rendering['grid']}")
    lines.append(f"Made by medlens {p.get('medlens_version', '?')} with torch {p.get('torch_version', '?')} on "
                 f"{p.get('device', '?')}, {p.get('created_utc', '?')}; seed {p.get('seed')}")
    lines += [f"Note: {n}" for n in p.get("loading_notes") or []]
    return lines


def read_page(folder: Path) -> ScanPage:
    """The page of one result folder, from its provenance.json, maps.npz and overlay PNGs."""
    provenance = json.loads((folder / "provenance.json").read_text())
    files = [f for f in provenance.get("files", []) if f.endswith(".png") and f != "panel.png"]
    overlays = [folder / f for f in files if (folder / f).is_file()]
    region = []
    for method, per_target in ((provenance.get("region") or {}).get("metrics") or {}).items():
        for target, scores in per_target.items():
            region.append(f"{method}, {target}: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in scores.items()))
    faithfulness = [f"{k.replace('_', ' ')}: {provenance[k]}" for k in FAITHFULNESS_KEYS if k in provenance]
    title = Path((provenance.get("input_file") or {}).get("path", folder.name)).name
    return ScanPage(folder, title, _prediction(folder, provenance), overlays, region, faithfulness, _plain_words(provenance))


def write_html(root: Path, pages: list[ScanPage]) -> Path:
    """`root/report.html`: every page, the overlays linked relative to it. Returns its path."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>medlens report</title><p><b>{html.escape(BANNER)}</b></p>"]
    for page in pages:
        parts.append(f"<h2>{html.escape(page.title)}</h2><p><b>Prediction</b>: {html.escape('; '.join(page.prediction))}</p>")
        parts += [f"<img src='{html.escape(str(o.relative_to(root)))}' style='max-width:48%'>" for o in page.overlays]
        for heading, lines in (("Region", page.region), ("Faithfulness", page.faithfulness), ("Provenance", page.provenance)):
            if lines:
                parts.append(f"<h3>{heading}</h3><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
    return atomic_write(Path(root) / "report.html", "\n".join(parts))


def write_pdf(root: Path, pages: list[ScanPage], path: Optional[Path] = None) -> Path:
    """`root/report.pdf`, one A4 page per scan (matplotlib's PdfPages, Agg). Returns its path."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages
    from PIL import Image

    path = Path(path or Path(root) / "report.pdf")

    def write(fh: Any) -> None:
        with PdfPages(fh) as pdf:
            for page in pages:
                fig = plt.figure(figsize=(8.27, 11.69))
                fig.text(0.05, 0.975, BANNER, fontsize=8, weight="bold", color="darkred", va="top")
                fig.text(0.05, 0.955, page.title, fontsize=13, weight="bold", va="top")
                fig.text(0.05, 0.93, "Prediction: " + "; ".join(page.prediction), fontsize=9, va="top")
                n = max(1, len(page.overlays))
                cols = 2 if n > 1 else 1
                rows = (n + cols - 1) // cols
                height = 0.5 / max(rows, 1)
                for k, overlay in enumerate(page.overlays):
                    ax = fig.add_axes([0.05 + (k % cols) * 0.46, 0.91 - (k // cols + 1) * height, 0.44, height * 0.97])
                    with Image.open(overlay) as im:
                        ax.imshow(np.asarray(im.convert("RGB")), interpolation="none")  # embedded at its own resolution
                    ax.axis("off")
                lines: list[str] = []
                for heading, items in (("Region", page.region), ("Faithfulness", page.faithfulness),
                                       ("Provenance", page.provenance)):
                    if items:
                        lines.append(heading)
                        lines += [w for item in items for w in textwrap.wrap("- " + item, 110, subsequent_indent="  ")]
                fig.text(0.05, 0.39, "\n".join(lines[:48]), fontsize=7, va="top", family="monospace")
                pdf.savefig(fig)
                plt.close(fig)

    return atomic_write(path, write)
