"""The training package's public names in one place: the loop, the recipes, the data preparation and the metrics.

Owns nothing itself; the `medlens train` command is `medlens.cli.train`.
"""
from __future__ import annotations

from medlens.training.export import bundled_entry, export_bundled, render_card
from medlens.training.loop import train, train_brain, train_phantom
from medlens.training.metrics import confusion_matrix, metrics_from_confusion, predict
from medlens.training.recipes import (BRAIN_RECIPE, BRAIN_RECIPES, PHANTOM_RECIPES, PHANTOM_SEEDS, FigshareData,
                                      Guidance, Network, Optimiser, PhantomData, Recipe, Selection, brain_prepare,
                                      phantom_data, phantom_prepare, recipe_record, with_overrides)
from medlens.training.weights import WeightAverage

__all__ = ["BRAIN_RECIPE", "BRAIN_RECIPES", "PHANTOM_RECIPES", "PHANTOM_SEEDS", "FigshareData", "Guidance", "Network",
           "Optimiser", "PhantomData", "Recipe", "Selection", "WeightAverage", "brain_prepare", "bundled_entry",
           "confusion_matrix", "export_bundled", "metrics_from_confusion", "phantom_data", "phantom_prepare", "predict",
           "recipe_record", "render_card", "train", "train_brain", "train_phantom", "with_overrides"]
