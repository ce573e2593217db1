"""The run's plots (matplotlib, Agg): mean deletion and insertion curves, one bar chart per metric with its
interval, and the cascading-randomisation curves; each written atomically as a PNG.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg", force=False)  # files only: never a window, also on a machine with a display
import matplotlib.pyplot as plt  # noqa: E402

from medlens.evaluation.metrics import HIGHER_IS_BETTER, METRICS, CurvePart  # noqa: E402
from medlens.io.files import save_figure  # noqa: E402

Curves = dict[str, dict[str, CurvePart]]  # curve name -> method -> summed curve


def _line_style(i: int) -> dict[str, Any]:
    """A distinct colour and dash for the i-th method (20 colours, then a new dash), so 20+ lines stay apart."""
    return {"color": matplotlib.colormaps["tab20"](i % 20), "linestyle": ("-", "--", ":", "-.")[(i // 20) % 4]}


def _mean(part: CurvePart) -> Any:
    return (part.total / max(part.count, 1)).numpy()


def _deletion_curves(out: Path, curves: Curves) -> list[str]:
    names = [k for k in ("deletion", "insertion") if curves.get(k)]
    if not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], names):
        for i, (method, part) in enumerate(curves[metric].items()):
            ax.plot(part.x, _mean(part), label=method, **_line_style(i))
        ax.set_xlabel("fraction of pixels " + ("removed" if metric == "deletion" else "inserted"))
        ax.set_ylabel("mean score of the target")
        ax.set_title(f"{metric} curves")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    save_figure(fig, out / "deletion_curves.png")
    plt.close(fig)
    return ["deletion_curves.png"]


def _metric_bars(out: Path, rows: Sequence[dict[str, Any]]) -> list[str]:
    metrics = [m for m in METRICS if any(r["metric"] == m and r["target"] == "all" for r in rows)]
    if not metrics:
        return []
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        sel = [r for r in rows if r["metric"] == metric and r["target"] == "all"]
        vals = [r["value"] for r in sel]
        err = [[max(0.0, r["value"] - r["ci_low"]) if not math.isnan(r["value"]) else 0 for r in sel],
               [max(0.0, r["ci_high"] - r["value"]) if not math.isnan(r["value"]) else 0 for r in sel]]
        colors = ["0.6" if r["method"].startswith("baseline:") else "C0" for r in sel]
        ax.bar(range(len(sel)), vals, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(sel)))
        ax.set_xticklabels([r["method"] for r in sel], rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)", fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, out / "metric_bars.png")
    plt.close(fig)
    return ["metric_bars.png"]


def _randomization_curves(out: Path, curves: Curves) -> list[str]:
    keys = [k for k in ("spearman", "ssim") if curves.get(f"randomization:{k}")]
    if not keys:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for key, ax in zip(keys, axes[0]):
        for i, (method, part) in enumerate(curves[f"randomization:{key}"].items()):
            ax.plot(part.x, _mean(part), marker="o", label=method, **_line_style(i))
            ax.set_xticks(list(part.x))
            ax.set_xticklabels(list(part.x_labels or []), rotation=40, ha="right", fontsize=7)
        ax.set_ylim(-1.05 if key == "spearman" else -0.05, 1.05)
        ax.set_xlabel("randomised down to (cumulative, top first)")
        ax.set_ylabel(f"{key} to the original map")
        ax.set_title("cascading randomisation")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    save_figure(fig, out / "randomization_curves.png")
    plt.close(fig)
    return ["randomization_curves.png"]


def write_plots(out: Path, rows: Sequence[dict[str, Any]], curves: Curves) -> list[str]:
    """Every plot the run has data for, into `out`; returns the file names written."""
    return _deletion_curves(out, curves) + _metric_bars(out, rows) + _randomization_curves(out, curves)


__all__ = ["write_plots"]
