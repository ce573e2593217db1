"""The evaluation run on the batch runner's executors (`processes`, `ray`): groups of whole batches scored by workers
that load the model once each, their tallies merged in batch order, so the rows equal those of a serial run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from medlens.batch.executors import make_executor
from medlens.errors import InputError
from medlens.evaluation_run.dataset import FolderDataset
from medlens.evaluation_run.scoring import Tally, score_images
from medlens.pipeline import Plan, WorkerRecipe, read_input

BATCHES_PER_ITEM = 2  # batches a worker scores per item: enough to amortise sending, small enough to balance


@dataclass
class EvaluateTaskFactory:
    """What a worker needs, as plain values: the shared `WorkerRecipe` (it loads the model and plans the request), the
    data folder it reads itself, and the scoring settings."""

    recipe: WorkerRecipe
    data: str
    include: Optional[list[str]]
    metrics: list[str]
    options: dict[str, dict[str, Any]]
    batch_size: int
    prior: tuple[Optional[torch.Tensor], int] = (None, 0)

    @property
    def methods(self) -> list[str]:
        return list(self.recipe.request.methods)

    def __call__(self) -> "EvaluateTask":
        plan = self.recipe.plan()
        data = FolderDataset(self.data, lambda path: read_input(plan, path).tensor[0], self.include)
        return EvaluateTask(self, plan, data)

    def lost(self, item: tuple[int, list[int]], message: str) -> dict[str, Any]:
        return {"first_batch": item[0], "indices": item[1], "error": message}


@dataclass
class EvaluateTask:
    factory: EvaluateTaskFactory
    plan: Plan
    data: FolderDataset = field(repr=False)

    def __call__(self, item: tuple[int, list[int]]) -> dict[str, Any]:
        first_batch, indices = item
        f = self.factory
        tally = score_images(self.plan, self.data, indices, f.metrics, f.options, f.prior, f.batch_size)
        return {"first_batch": first_batch, "indices": indices, "tally": tally.to_record()}


def work_items(order: Sequence[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """(number of the first batch, image indices) per item: whole batches, so the batches match a serial run's and the
    tallies merge in its order."""
    step = batch_size * BATCHES_PER_ITEM
    return [(start // batch_size, list(order[start:start + step])) for start in range(0, len(order), step)]


def score_on_executor(factory: EvaluateTaskFactory, order: Sequence[int], *, executor: str, workers: int,
                      ray_address: Optional[str] = None, on_images: Optional[Callable[[int], None]] = None) -> Tally:
    """Score every image of `order` on the named executor and merge the tallies in batch order."""
    records = []
    for record in make_executor(executor, workers, ray_address).run(factory, work_items(order, factory.batch_size)):
        if "error" in record:
            first = record["indices"][0] if record["indices"] else "?"
            raise InputError(f"the evaluation stopped: a worker could not score the images from number {first} on "
                             f"({record['error']}). Run it again, or with --executor serial to see the image at fault.")
        records.append(record)
        if on_images is not None:
            on_images(len(record["indices"]))
    tally = Tally(seconds={m: 0.0 for m in factory.methods})
    for record in sorted(records, key=lambda r: r["first_batch"]):
        tally.merge(Tally.from_record(record["tally"]))
    return tally


__all__ = ["EvaluateTaskFactory", "score_on_executor", "work_items"]
