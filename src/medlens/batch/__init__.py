"""The batch runner: many inputs explained into one folder, resumably, on the serial, processes or Ray executor.
`inputs` finds work, `settings` and `manifest` decide what is left, `executors` run it, `report` sums it up.

The names below are imported on first use (PEP 562 `__getattr__`): the runner imports torch, and the command line
starts the processes executor's forkserver from `medlens.batch.executors` before torch is imported.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medlens.batch.executors import EXECUTORS, ProcessExecutor, SerialExecutor, make_executor
    from medlens.batch.inputs import WorkItem, discover
    from medlens.batch.manifest import read_manifest
    from medlens.batch.ray_pool import RayExecutor
    from medlens.batch.runner import BatchSummary, SomeInputsFailed, run_batch
    from medlens.batch.task import BatchTaskFactory

_LAZY = {"EXECUTORS": "executors", "ProcessExecutor": "executors", "SerialExecutor": "executors",
         "make_executor": "executors", "RayExecutor": "ray_pool", "WorkItem": "inputs", "discover": "inputs",
         "read_manifest": "manifest", "BatchSummary": "runner", "SomeInputsFailed": "runner", "run_batch": "runner",
         "BatchTaskFactory": "task"}

__all__ = ["EXECUTORS", "BatchSummary", "BatchTaskFactory", "ProcessExecutor", "RayExecutor", "SerialExecutor",
           "SomeInputsFailed", "WorkItem", "discover", "make_executor", "read_manifest", "run_batch"]


def __getattr__(name: str) -> Any:
    """A name of the batch package, imported from its module on first use.

    Raises:
        AttributeError: `name` is not one of the package's names.
    """
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medlens.batch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"medlens.batch.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
