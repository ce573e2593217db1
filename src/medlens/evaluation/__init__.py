"""Evaluation of explanations: faithfulness, localisation and trust metrics, and the run over a dataset.

Metrics are pure functions of (model, x, maps, targets[, masks]); `evaluate()` runs them over a folder.
"""
from __future__ import annotations

from medlens.evaluation.faithfulness import (CurveResult, average_drop, deletion, increase_in_confidence, insertion, linear_impute,
                           road, road_lerf, road_morf)
from medlens.evaluation.localisation import auprc, center_map, dice, energy_in_box, iou, pointing_game, prior_maps
from medlens.evaluation.runner import METRICS, evaluate
from medlens.evaluation.stats import bootstrap_ci
from medlens.evaluation.trust import completeness, max_sensitivity, randomization, sparseness

__all__ = [
    "CurveResult", "METRICS", "auprc", "average_drop", "bootstrap_ci", "center_map", "completeness", "deletion",
    "dice", "energy_in_box", "evaluate", "increase_in_confidence", "insertion", "iou", "linear_impute",
    "max_sensitivity", "pointing_game", "prior_maps", "randomization", "road", "road_lerf", "road_morf",
    "sparseness",
]
