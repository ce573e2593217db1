"""The evaluation run: every (method, metric) pair over a dataset, read and explained through `medlens.pipeline`,
summarised with bootstrap intervals and written as `metrics.csv`, `metrics.md`, `run.json` and plots.
"""
from medlens.evaluation_run.dataset import FolderDataset, Sample, box_mask
from medlens.evaluation_run.runner import evaluate

__all__ = ["FolderDataset", "Sample", "box_mask", "evaluate"]
