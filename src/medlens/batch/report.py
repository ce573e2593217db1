"""A batch's summary from its manifest records: `summary.csv` (one row per input, target and method) and
`report.html`, a gallery that opens from disk (thumbnails linked relatively, predictions, failures; no network).
"""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import Any, Sequence

from medlens.batch.manifest import DONE
from medlens.io.files import atomic_write

MAX_CARDS = 2000  # a gallery of more would be too heavy to open; summary.csv lists every input
#: `score`: for region targets (a segmentation model) the region score explained, where `probability` stays empty
SUMMARY_COLUMNS = ("path", "status", "target", "probability", "method", "peak", "energy_in_region", "error", "score")


def summary_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of summary.csv: a done input gives one row per target and method, a failed one a row with its error.
    `peak` is the map's maximum in the source image's pixel grid ("row col", volumes "slice row col")."""
    rows: list[dict[str, Any]] = []
    for record in records:
        base = {"path": record.get("path"), "status": record.get("status")}
        if record.get("status") != DONE:
            rows.append({**base, "error": record.get("error")})
            continue
        prediction, scores = record.get("prediction") or {}, record.get("scores") or {}
        for method, per_target in (record.get("maps") or {}).items():
            for target, entry in per_target.items():
                energy = entry.get("energy_in_region")
                probability, score = prediction.get(target), scores.get(target)
                rows.append({**base, "target": target,
                             "probability": f"{probability:.6f}" if isinstance(probability, float) else "",
                             "method": method, "peak": " ".join(map(str, entry.get("peak", []))),
                             "energy_in_region": f"{energy:.6f}" if isinstance(energy, float) else "", "error": "",
                             "score": f"{score:.6g}" if isinstance(score, float) else ""})
    return rows


def write_summary(out: Path, records: Sequence[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in summary_rows(records):
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})
    return atomic_write(out / "summary.csv", buffer.getvalue())


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} .grid{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:320px;font-size:.85em}
.card img{width:100%;height:auto;background:#000} .path{font-weight:600;word-break:break-all}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.failed{color:#a00} .muted{color:#666}
"""


def _card(record: dict[str, Any]) -> str:
    esc = html.escape
    outputs = record.get("outputs") or []
    panel = next((o for o in outputs if o.endswith("/panel.png")), None)
    thumb = next((o for o in outputs if o.endswith(".png")), None) if panel is None else panel
    image = f'<a href="{esc(thumb)}"><img loading="lazy" src="{esc(thumb)}" alt="maps of {esc(record["path"])}"></a>' \
        if thumb else '<p class="muted">(no PNG format written)</p>'
    prediction, scores = record.get("prediction") or {}, record.get("scores") or {}
    top = sorted(prediction.items(), key=lambda kv: -kv[1])[:3]
    lines = "".join(f"<tr><td>{esc(k)}</td><td>{v:.3f}</td></tr>" for k, v in top)
    lines += "".join(f"<tr><td>{esc(k)}</td><td>score {v:.3g}</td></tr>" for k, v in scores.items())
    targets = ", ".join(map(str, record.get("targets") or []))
    folder = Path(outputs[0]).parent.as_posix() if outputs else ""
    link = f' <a href="{esc(folder)}/provenance.json">provenance</a>' if folder else ""
    return (f'<div class="card"><div class="path">{esc(record["path"])}</div>{image}'
            f"<div>explained: {esc(targets)}{link}</div><table>{lines}</table></div>")


def write_report(out: Path, records: Sequence[dict[str, Any]], title: str, settings: dict[str, Any]) -> Path:
    """report.html: every done input as a card (its panel or first overlay, linked relatively), failures listed."""
    esc = html.escape
    done = [r for r in records if r.get("status") == DONE]
    failed = [r for r in records if r.get("status") != DONE]
    request = settings.get("request", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
             f"</head><body><h1>{esc(title)}</h1>",
             f"<p>{len(done)} done, {len(failed)} failed. Model {esc(str(settings.get('model', {}).get('source')))}; "
             f"methods {esc(', '.join(request.get('methods', [])))}; medlens {esc(str(settings.get('medlens')))}. "
             f"Per input: <code>manifest.jsonl</code>; per target and method: <code>summary.csv</code>.</p>"]
    if failed:
        parts.append(f"<h2 class='failed'>Failed ({len(failed)})</h2><table><tr><th>input</th><th>message</th></tr>")
        parts += [f"<tr><td>{esc(str(r.get('path')))}</td><td>{esc(str(r.get('error')))}</td></tr>" for r in failed]
        parts.append("</table>")
    parts.append(f"<h2>Done ({len(done)})</h2><div class='grid'>")
    parts += [_card(r) for r in done[:MAX_CARDS]]
    parts.append("</div>")
    if len(done) > MAX_CARDS:
        parts.append(f"<p class='muted'>The first {MAX_CARDS} of {len(done)} are shown; summary.csv lists all.</p>")
    parts.append("</body></html>\n")
    return atomic_write(out / "report.html", "".join(parts))
