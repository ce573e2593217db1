"""The batch runner: many inputs explained into one folder, resumably, on the serial, processes or Ray executor.
`inputs` finds work, `settings` and `manifest` decide what is left, `executors` run it, `report` sums it up.
"""
from medlens.batch.executors import EXECUTORS, ProcessExecutor, SerialExecutor, make_executor
from medlens.batch.ray_pool import RayExecutor
from medlens.batch.inputs import WorkItem, discover
from medlens.batch.manifest import read_manifest
from medlens.batch.runner import BatchSummary, SomeInputsFailed, run_batch
from medlens.batch.task import BatchTaskFactory

__all__ = ["EXECUTORS", "BatchSummary", "BatchTaskFactory", "ProcessExecutor", "RayExecutor", "SerialExecutor",
           "SomeInputsFailed", "WorkItem", "discover", "make_executor", "read_manifest", "run_batch"]
