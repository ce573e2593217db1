"""The batch's per-worker task: `BatchTaskFactory` (a picklable `WorkerRecipe` plus where results go) builds a
`BatchTask` once per worker (model loaded once, torch threads set), which explains and writes `WorkItem`s (a
mini-batch of one prepared shape in one call) and returns their manifest records.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from medlens.batch.inputs import WorkItem
from medlens.batch.manifest import DONE, FAILED
from medlens.batch.overlap import overlapped
from medlens.batch.preload import preload_key, preloaded
from medlens.core.model_description import describe
from medlens.errors import MedlensError, short_message
from medlens.io.files import deferred_fsync
from medlens.io import PreparedInput
from medlens.pipeline import (Outcome, Plan, WorkerRecipe, explain_pending, read_with_shape,
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
        recipe = self.recipe
        if recipe.model is None:  # a worker forked from the forkserver that loaded the model (see batch.preload)
            model = preloaded(self.preload_key())
            if model is not None:
                recipe = replace(recipe, model=model)
        return BatchTask(self, recipe.plan())

    def preload_key(self) -> Optional[str]:
        """What names this factory's model for the processes executor's forkserver (None: not preloaded)."""
        r = self.recipe
        return preload_key(r.model_source, r.model_options, r.device)

    def lost(self, item: WorkItem, message: str) -> dict[str, Any]:
        """The record of an input whose worker died or raised outside the task (see executors)."""
        return failed_record(item, message, self.settings_digest)


def failed_record(item: WorkItem, message: str, digest: str, seconds: float = 0.0) -> dict[str, Any]:
    return {"id": item.id, "path": item.relative, "status": FAILED, "error": message, "prediction": None,
            "scores": None, "targets": [], "outputs": [], "seconds": {"total": round(seconds, 6)}, "settings": digest,
            "digest": item.digest}


@dataclass
class ReadChunk:
    """A mini-batch read: its items, the records of those that could not be read, the others by prepared shape."""

    items: list[WorkItem]
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    groups: dict[tuple, list[tuple[int, float, PreparedInput, tuple[int, ...], float, Path]]] = field(
        default_factory=dict)
    broken: bool = False  # reading raised outside an input's failure: its items are run one at a time


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
        read = self.read(items)
        return self.write(read, self.explain(read))

    def stream(self, chunks: Iterable[Sequence[WorkItem]]) -> Iterator[list[dict[str, Any]]]:
        """The records of each mini-batch of `chunks`, in order, as `run_many` gives them, with reading and writing
        overlapped with explaining: a reader thread reads and prepares the next mini-batch while this one is
        explained, a writer thread makes the last one's outcomes (split per input, regions scored) and writes them
        (see `medlens.batch.overlap`). A mini-batch that fails outside an input's own failure is run one input at a
        time on this thread, never on the writer's beside the next explanation (they share the model's hooks)."""
        for records in overlapped(chunks, self._read_or_none, self._explain_or_none, self._write_or_later):
            if isinstance(records, _OneByOne):  # on this thread: the model is never run beside an explanation
                records = [self._alone(item) for item in records.items]
            yield records

    def _read_or_none(self, items: Sequence[WorkItem]) -> "ReadChunk":
        try:
            return self.read(items)
        except Exception:  # noqa: BLE001 - not an input's failure (those are records): one at a time when written
            return ReadChunk(list(items), broken=True)

    def _explain_or_none(self, chunk: "ReadChunk") -> Any:
        try:
            return None if chunk.broken else self.explain(chunk)
        except Exception:  # noqa: BLE001 - as run_many's callers do: one at a time, so only the input at fault is lost
            return None

    def _write_or_later(self, chunk: "ReadChunk", explained: Any) -> Any:
        if explained is not None:
            try:
                return self.write(chunk, explained)
            except Exception:  # noqa: BLE001 - one at a time, by `stream` on the explaining thread
                pass
        return _OneByOne(chunk.items)

    def _alone(self, item: WorkItem) -> dict[str, Any]:
        try:
            return self(item)
        except Exception as exc:  # noqa: BLE001 - a task that raises loses its item, not the run (as the executors)
            return self.factory.lost(item, f"the task raised {type(exc).__name__}: {short_message(exc)}")

    def read(self, items: Sequence[WorkItem]) -> "ReadChunk":
        """Read and prepare `items`: the records of those that cannot be read, the others grouped by prepared shape."""
        chunk = ReadChunk(list(items))
        for i, item in enumerate(items):
            t0 = time.perf_counter()
            try:
                prepared, read_shape = read_with_shape(self.plan, Path(item.path))
            except CAUGHT as exc:
                chunk.records[i] = self._failed(item, exc, "the model could not explain this input", t0)
                continue
            key = (tuple(prepared.tensor.shape[1:]), prepared.tensor.dtype)
            chunk.groups.setdefault(key, []).append((i, t0, prepared, read_shape, time.perf_counter() - t0,
                                                     Path(item.path)))
        return chunk

    def explain(self, chunk: "ReadChunk") -> list[tuple[int, float, float, Any]]:
        """(index, t0, read seconds, outcome or the exception) of each input read, a group of one shape per call."""
        return [(i, t0, read_s, outcome) for group in chunk.groups.values()
                for (i, t0, _, _, read_s, _), outcome in zip(group, self._explain(group))]

    def write(self, chunk: "ReadChunk", explained: list[tuple[int, float, float, Any]]) -> list[dict[str, Any]]:
        """Write the explained outcomes; the records of the whole mini-batch, in its order."""
        records = dict(chunk.records)
        for i, t0, read_s, outcome in explained:
            records[i] = self._write(chunk.items[i], outcome, read_s, t0)
        return [records[i] for i in range(len(chunk.items))]

    def _explain(self, group: list) -> list[Any]:
        """(pending outcomes, index) of each input of a group of one shape (an exception in place of an input that
        could not be explained)."""
        try:
            pending = explain_pending(self.plan, [g[2] for g in group], sources=[g[5] for g in group],
                                      region=self.factory.region, read_shapes=[g[3] for g in group])
            return [(pending, j) for j in range(len(group))]
        except CAUGHT as exc:
            if len(group) == 1:
                return [exc]
        return [self._explain([g])[0] for g in group]  # one at a time: the input at fault fails alone

    def _write(self, item: WorkItem, outcome: Any, read_s: float, t0: float) -> dict[str, Any]:
        if isinstance(outcome, tuple):  # (pending outcomes, index): the outcome made here (no model call)
            pending, j = outcome
            try:
                outcome = pending.outcome(j)
            except CAUGHT as exc:
                outcome = exc
        if isinstance(outcome, BaseException):
            return self._failed(item, outcome, "the model could not explain this input", t0)
        t1 = time.perf_counter()
        try:
            with deferred_fsync():  # made durable by the manifest's sync, once a second instead of once per file
                written = write_outcome(outcome, self.out / item.folder, model_source=self.model_source,
                                        extra_provenance={"batch": {"id": item.id, "settings": self.factory.settings_digest}},
                                        input_sha256=item.digest if item.digest != "unreadable" else None)
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


class _OneByOne:
    """A mini-batch to run one input at a time on the explaining thread (see `BatchTask.stream`)."""

    def __init__(self, items: Sequence[WorkItem]) -> None:
        self.items = list(items)


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
