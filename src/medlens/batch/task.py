"""The batch's per-worker task: `BatchTaskFactory` (picklable settings) builds a `BatchTask` once per worker (model
loaded once, torch threads set), which explains and writes one `WorkItem` and returns its manifest record.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import medlens
from medlens.batch.inputs import WorkItem
from medlens.batch.manifest import DONE, FAILED
from medlens.core.model_description import describe
from medlens.errors import MedlensError, short_message
from medlens.io.files import deferred_fsync
from medlens.pipeline import ExplainRequest, Outcome, Plan, explain_file, plan_for, write_outcome


@dataclass
class BatchTaskFactory:
    """Everything a worker needs to explain inputs, as plain values (sent to worker processes and Ray actors).

    `threads`: torch threads in the worker (None: leave torch's default). `model` may hold an already loaded model
    for in-process use (the serial executor); it is never pickled, a worker loads its own from `model_source`."""

    model_source: str
    model_options: dict[str, Any]
    request: ExplainRequest
    out: str
    settings_digest: str
    device: str = "cpu"
    threads: Optional[int] = None
    region: Any = "auto"  # "auto": a box or mask file beside each input; None: none
    model: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model"] = None
        return state

    def with_threads(self, threads: Optional[int]) -> "BatchTaskFactory":
        return replace(self, threads=threads)

    def __call__(self) -> "BatchTask":
        if self.threads is not None:
            torch.set_num_threads(int(self.threads))
        model = self.model
        if model is None:
            model = medlens.load_model(self.model_source, **self.model_options).to(self.device)
        return BatchTask(self, plan_for(model, self.request))  # a segmentation model: its predicted regions (plan_for)

    def lost(self, item: WorkItem, message: str) -> dict[str, Any]:
        """The record of an input whose worker died or raised outside the task (see executors)."""
        return failed_record(item, message, self.settings_digest)


def failed_record(item: WorkItem, message: str, digest: str, seconds: float = 0.0) -> dict[str, Any]:
    return {"id": item.id, "path": item.relative, "status": FAILED, "error": message, "prediction": None,
            "targets": [], "outputs": [], "seconds": {"total": round(seconds, 6)}, "settings": digest,
            "digest": item.digest}


class BatchTask:
    """One worker's explainer: call it with a `WorkItem`; it returns the JSON record for the manifest."""

    def __init__(self, factory: BatchTaskFactory, plan: Plan) -> None:
        self.factory = factory
        self.plan = plan
        self.out = Path(factory.out)
        self.model_source = describe(plan.model).provenance()

    def __call__(self, item: WorkItem) -> dict[str, Any]:
        t0 = time.perf_counter()
        step = "the model could not explain this input"
        try:
            outcome = explain_file(self.plan, item.path, region=self.factory.region)
            t1 = time.perf_counter()
            step = "its results could not be written"
            with deferred_fsync():  # made durable by the manifest's sync, once a second instead of once per file
                written = write_outcome(outcome, self.out / item.folder, model_source=self.model_source,
                                        extra_provenance={"batch": {"id": item.id, "settings": self.factory.settings_digest}})
        except MedlensError as exc:  # this input's file, or the model on it: recorded, and the run goes on
            return failed_record(item, _one_line(exc, item), self.factory.settings_digest, time.perf_counter() - t0)
        except (RuntimeError, ValueError, MemoryError, OSError) as exc:  # e.g. a volume the model cannot take
            message = f"{item.relative}: {step} ({type(exc).__name__}: {short_message(exc)})"
            return failed_record(item, message, self.factory.settings_digest, time.perf_counter() - t0)
        t2 = time.perf_counter()
        seconds = {**{k: round(v, 6) for k, v in outcome.seconds.items()}, "write": round(t2 - t1, 6),
                   "total": round(t2 - t0, 6)}
        return {"id": item.id, "path": item.relative, "status": DONE, "error": None,
                "prediction": outcome.prediction(), "targets": outcome.target_names(),
                "outputs": sorted(p.relative_to(self.out).as_posix() for p in written), "seconds": seconds,
                "settings": self.factory.settings_digest, "digest": item.digest, "maps": map_summary(outcome),
                "notes": list(outcome.notes)}


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
