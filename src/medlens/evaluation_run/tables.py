"""The run's numbers as tables: per-image values summarised into rows (mean and 95% bootstrap interval per
method, metric and target), `metrics.csv` (the columns docs/api.md lists) and the Markdown table of `metrics.md`.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

from medlens.evaluation.metrics import HIGHER_IS_BETTER, METRICS
from medlens.evaluation.stats import bootstrap_ci

COLUMNS = ("method", "metric", "target", "n", "value", "ci_low", "ci_high")


def summarise(values: dict[tuple[str, str], list[tuple[str, float]]], methods: Sequence[str], metrics: Sequence[str],
              seed: int) -> list[dict[str, Any]]:
    """Rows {method, metric, target, n, value, ci_low, ci_high}: per explained class, plus `all`."""
    rows: list[dict[str, Any]] = []
    for method in methods:
        for metric in metrics:
            entries = values.get((method, metric))
            if entries is None:
                continue
            by_target: dict[str, list[float]] = {"all": [v for _, v in entries]}
            for name, v in entries:
                by_target.setdefault(name, []).append(v)
            for target, vs in by_target.items():
                n, mean, lo, hi = bootstrap_ci(vs, seed=seed)
                rows.append({"method": method, "metric": metric, "target": target, "n": n, "value": mean,
                             "ci_low": lo, "ci_high": hi})
    return rows


def fmt(v: Any) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r["method"], r["metric"], r["target"], r["n"], fmt(r["value"]), fmt(r["ci_low"]), fmt(r["ci_high"])])
    return buf.getvalue()


def rows_to_markdown(rows: Sequence[dict[str, Any]], seconds: dict[str, float], settings: dict[str, Any]) -> str:
    """One table, methods down, metrics across, over all targets: value [ci_low, ci_high]."""
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    cell = {(r["method"], r["metric"]): r for r in rows if r["target"] == "all"}
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in metrics}
    lines = [
        "# Evaluation", "",
        f"{settings.get('n_images')} images from `{settings.get('data')}`; seed {settings.get('seed')}; "
        f"mean over images with a 95% bootstrap interval; ↑ higher is better, ↓ lower is better.", "",
        "| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " | s/image |",
        "|---|" + "---|" * len(metrics) + "---|",
    ]
    for method in methods:
        cells = []
        for m in metrics:
            r = cell.get((method, m))
            cells.append("" if r is None else f"{fmt(r['value'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]")
        sec = seconds.get(method)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'' if sec is None else f'{sec:.4f}'} |")
    return "\n".join(lines) + "\n"


__all__ = ["COLUMNS", "fmt", "rows_to_csv", "rows_to_markdown", "summarise"]
