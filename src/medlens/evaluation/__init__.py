"""Evaluation of explanations: faithfulness, localisation and trust metrics, each registered in `metrics`.

Metrics are pure functions of (model, x, maps, targets[, masks]); `medlens.evaluation_run.evaluate()` runs them over a folder.
"""
from __future__ import annotations

from medlens.evaluation.faithfulness import (CurveResult, average_drop, deletion, increase_in_confidence, insertion, linear_impute,
                           road, road_lerf, road_morf)
from medlens.evaluation.localisation import auprc, center_map, dice, energy_in_box, iou, pointing_game, prior_maps
from medlens.evaluation.metrics import LOCALISATION, METRICS, MetricSpec, get_metric, metric_names, register_metric
from medlens.evaluation.stats import bootstrap_ci
from medlens.evaluation.trust import completeness, max_sensitivity, randomization, sparseness

__all__ = [
    "CurveResult", "LOCALISATION", "METRICS", "MetricSpec", "auprc", "average_drop", "bootstrap_ci", "center_map", "completeness", "deletion",
    "dice", "energy_in_box", "get_metric", "increase_in_confidence", "insertion", "iou", "linear_impute",
    "max_sensitivity", "metric_names", "pointing_game", "prior_maps", "randomization", "road", "road_lerf", "road_morf",
    "register_metric", "sparseness",
]
