"""The metrics dashboard's logic: deletion/insertion curves with their AUC, pointing game and energy in the region,
and the randomisation check for the current image (medlens.evaluation's functions); an `evaluate` output folder read
back; and `medlens evaluate` started on a server-side folder in a background process, its progress read from its log.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from medlens.app.catalogue import ModelEntry
from medlens.app.jobs import PROGRESS, BackgroundJob, log_text, medlens_command, server_folders, start_job
from medlens.errors import InputError
from medlens.evaluation.faithfulness import deletion, insertion
from medlens.evaluation.localisation import energy_in_box, pointing_game
from medlens.evaluation.trust import randomization

CURVE_STEPS = 20


def image_metrics(entry: ModelEntry, x: torch.Tensor, maps: Mapping[tuple[str, int], np.ndarray],
                  region: Optional[np.ndarray], steps: int = CURVE_STEPS) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Rows {model, method, target, deletion_auc, insertion_auc[, pointing_game, energy_in_region]} per map, and the
    curves: "<method> / <target> deletion|insertion" -> the target's probability after each step (steps + 1 points)."""
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    labels = entry.labels
    for (method, target), amap in maps.items():
        m = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
        t = torch.tensor([[int(target)]])
        with entry.borrow() as model:
            dele = deletion(model, x, m, t, steps=steps)
            ins = insertion(model, x, m, t, steps=steps)
        name = labels[target] if target < len(labels) else str(target)
        row: dict[str, Any] = {"model": entry.key, "method": method, "target": name,
                               "deletion_auc": float(dele.values[0, 0]), "insertion_auc": float(ins.values[0, 0])}
        if region is not None:
            mask = torch.from_numpy(np.asarray(region, dtype=bool))[None]
            row["pointing_game"] = float(pointing_game(m, mask)[0, 0])
            row["energy_in_region"] = float(energy_in_box(m, mask)[0, 0])
        rows.append(row)
        curves[f"{method} / {name} deletion"] = dele.curves[0, 0].tolist()
        curves[f"{method} / {name} insertion"] = ins.curves[0, 0].tolist()
    return rows, curves


def randomisation_check(entry: ModelEntry, x: torch.Tensor, method: str, target: int,
                        options: Optional[dict[str, Any]] = None, seed: int = 0, steps: int = 4) -> dict[str, Any]:
    """Cascading weight randomisation (on a copy of the model): the Spearman similarity to the original map after each
    step, and whether the map lost similarity (< 0.5 after the cascade) as a method that explains the model must."""
    with entry.borrow() as model:
        res = randomization(model, x, torch.tensor([[int(target)]]), method, max_steps=steps, seed=seed,
                            options=options or None)
    return {"method": method, "layers": list(res.layers), "spearman": res.spearman[0, 0].tolist(),
            "final": float(res.values[0, 0]), "passes": bool(res.passes[0, 0]), "threshold": res.threshold}


def read_evaluate_folder(folder: str) -> tuple[list[dict[str, str]], list[Path], str]:
    """An `evaluate` output folder: metrics.csv rows, its plots (PNG) and metrics.md; InputError when it is not one."""
    root = Path(folder).expanduser()
    table = root / "metrics.csv"
    if not table.is_file():
        raise InputError(f"{root}: no metrics.csv here; give a folder written by `medlens evaluate --out`.")
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    summary = root / "metrics.md"
    return rows, sorted(root.glob("*.png")), summary.read_text() if summary.is_file() else ""


@dataclass
class EvaluateJob(BackgroundJob):
    """`medlens evaluate` running in the background; its progress read from the log's progress bar."""

    def progress(self) -> tuple[int, int]:
        """(images done, images in all) from the last progress line of the log; (0, 0) before the first."""
        text = log_text(self.log)[-4000:]
        found = PROGRESS.findall(text.replace("\r", "\n"))
        return (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)


def start_evaluate(model_source: str, data_dir: str, out_dir: str, methods: Sequence[str], metrics: Sequence[str],
                   limit: Optional[int], allow_pickle: bool = False) -> EvaluateJob:
    """Start `medlens evaluate` on a server-side folder; refuses a missing data folder or an unwritable output folder."""
    if not methods:
        raise InputError("choose at least one method to evaluate.")
    data, out = server_folders(data_dir, out_dir, "data")
    arguments = ["evaluate", "--model", model_source, "--data", str(data), "--methods", ",".join(methods), "--out", str(out)]
    if metrics:
        arguments += ["--metrics", ",".join(metrics)]
    if limit:
        arguments += ["--limit", str(int(limit))]
    return start_job(EvaluateJob, medlens_command(arguments, allow_pickle), out)

