"""The batch's per-worker task: `BatchTaskFactory` (a picklable `WorkerRecipe` plus where results go) builds a
`BatchTask` once per worker (model loaded once, torch threads set), which explains and writes `WorkItem`s (a
mini-batch of one prepared shape in one call) and returns their manifest records.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medlens.batch.inputs import WorkItem
from medlens.batch.manifest import DONE, FAILED
from medlens.core.model_description import describe
from medlens.errors import MedlensError, short_message
from medlens.io.files import deferred_fsync
from medlens.io import PreparedInput
from medlens.pipeline import (Outcome, Plan, WorkerRecipe, explain_prepared_many, read_with_shape,
                              write_outcome)


@dataclass
class BatchTaskFactory:
    """Everything a worker needs to explain inputs, as plain values (sent to worker processes and Ray actors): the
    shared `WorkerRecipe` (model source and request), where results go and the run's settings digest."""

    recipe: WorkerRecipe
    out: str
    settings_digest: str
    region: Any = "auto"  # "auto": a box or mask file beside each input; None: none

    def __call__(self) -> "BatchTask":
        return BatchTask(self, self.recipe.plan())

    def lost(self, item: WorkItem, message: str) -> dict[str, Any]:
        """The record of an input whose worker died or raised outside the task (see executors)."""
        return failed_record(item, message, self.settings_digest)


def failed_record(item: WorkItem, message: str, digest: str, seconds: float = 0.0) -> dict[str, Any]:
    return {"id": item.id, "path": item.relative, "status": FAILED, "error": message, "prediction": None,
            "scores": None, "targets": [], "outputs": [], "seconds": {"total": round(seconds, 6)}, "settings": digest,
            "digest": item.digest}


CAUGHT = (MedlensError, RuntimeError, ValueError, MemoryError, OSError)  # an input's failure, not the run's


class BatchTask:
    """One worker's explainer: call it with a `WorkItem`; it returns the JSON record for the manifest."""

    def __init__(self, factory: BatchTaskFactory, plan: Plan) -> None:
        self.factory = factory
        self.plan = plan
        self.out = Path(factory.out)
        self.model_source = describe(plan.model).provenance()

    def __call__(self, item: WorkItem) -> dict[str, Any]:
        return self.run_many([item])[0]

    def run_many(self, items: Sequence[WorkItem]) -> list[dict[str, Any]]:
        """The records of `items`, in their order: those of one prepared shape are explained in one call (a
        mini-batch). An input that cannot be read fails alone; a mini-batch whose explanation fails is explained
        one input at a time, so that only the input at fault is `failed`."""
        records: dict[int, dict[str, Any]] = {}
        groups: dict[tuple, list[tuple[int, float, PreparedInput, tuple[int, ...], float, Path]]] = {}
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            try:
                prepared, read_shape = read_with_shape(self.plan, Path(item.path))
            except CAUGHT as exc:
                records[i] = self._failed(item, exc, "the model could not explain this input", t0)
                continue
            key = (tuple(prepared.tensor.shape[1:]), prepared.tensor.dtype)
            groups.setdefault(key, []).append((i, t0, prepared, read_shape, time.perf_counter() - t0, Path(item.path)))
        for group in groups.values():
            for (i, t0, _, _, read_s, _), outcome in zip(group, self._explain(group)):
                records[i] = self._write(items[i], outcome, read_s, t0)
        return [records[i] for i in range(len(items))]

    def _explain(self, group: list) -> list[Any]:
        """Outcomes of a group of one shape (an exception in place of an input that could not be explained)."""
        try:
            return explain_prepared_many(self.plan, [g[2] for g in group], sources=[g[5] for g in group],
                                         region=self.factory.region, read_shapes=[g[3] for g in group])
        except CAUGHT as exc:
            if len(group) == 1:
                return [exc]
        return [self._explain([g])[0] for g in group]  # one at a time: the input at fault fails alone

    def _write(self, item: WorkItem, outcome: Any, read_s: float, t0: float) -> dict[str, Any]:
        if isinstance(outcome, BaseException):
            return self._failed(item, outcome, "the model could not explain this input", t0)
        t1 = time.perf_counter()
        try:
            with deferred_fsync():  # made durable by the manifest's sync, once a second instead of once per file
                written = write_outcome(outcome, self.out / item.folder, model_source=self.model_source,
                                        extra_provenance={"batch": {"id": item.id, "settings": self.factory.settings_digest}})
        except CAUGHT as exc:
            return self._failed(item, exc, "its results could not be written", t0)
        write_s = time.perf_counter() - t1
        seconds = {"read": round(read_s, 6), "explain": round(outcome.seconds["explain"], 6),
                   "write": round(write_s, 6), "total": round(read_s + outcome.seconds["explain"] + write_s, 6)}
        return {"id": item.id, "path": item.relative, "status": DONE, "error": None,
                "prediction": outcome.prediction() or None, "scores": outcome.scores() or None,
                "targets": outcome.target_names(),
                "outputs": sorted(p.relative_to(self.out).as_posix() for p in written), "seconds": seconds,
                "settings": self.factory.settings_digest, "digest": item.digest, "maps": map_summary(outcome),
                "notes": list(outcome.notes)}

    def _failed(self, item: WorkItem, exc: BaseException, step: str, t0: float) -> dict[str, Any]:
        if isinstance(exc, MedlensError):  # this input's file, or the model on it: recorded, and the run goes on
            message = _one_line(exc, item)
        else:  # e.g. a volume the model cannot take
            message = f"{item.relative}: {step} ({type(exc).__name__}: {short_message(exc)})"
        return failed_record(item, message, self.factory.settings_digest, time.perf_counter() - t0)


def _one_line(exc: BaseException, item: WorkItem) -> str:
    text = " ".join(str(exc).split())
    return text if item.path in text or item.relative in text else f"{item.relative}: {text}"


def map_summary(outcome: Outcome) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> target -> the map's peak (in the source image's pixel grid) and, with a region, its energy share."""
    result = outcome.result
    names = outcome.target_names()
    source_shape = tuple(outcome.prepared.scan.spatial_shape)
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for method in result:
        maps = result[method][0].detach().float().cpu()
        per_target: dict[str, dict[str, Any]] = {}
        for j, name in enumerate(names):
            grid = tuple(maps.shape[1:])
            flat = int(torch.argmax(maps[j]).item())
            peak = [int(v) for v in np.unravel_index(flat, grid)]
            if len(source_shape) == len(grid):  # map grid -> source pixels (the resize maps whole extents)
                peak = [int(round((p + 0.5) * s / g - 0.5)) for p, s, g in zip(peak, source_shape, grid)]
            entry: dict[str, Any] = {"peak": peak}
            if outcome.region_scores:
                entry["energy_in_region"] = outcome.region_scores.get(method, {}).get(name, {}).get("energy_in_region")
            per_target[name] = entry
        summary[method] = per_target
    return summary
