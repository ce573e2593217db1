"""The recipes of the bundled models (data, input size, optimiser, epochs, augmentation, guidance) and their inputs.

Owns the recipe dictionaries and their check before training, the phantom data of each phantom model and the input
preparation used in training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from medlens.data.figshare import minmax_scale
from medlens.data.phantom import PhantomSet, phantom_2d, shortcut_set
from medlens.errors import InputError
from medlens.training.guided import GUIDES

AUGMENTS = ("affine", "lesion-crop", "none")

#: the first bundled brain model (now `brain-tumor-mri-v1`): whole slices, affine augmentation, 5 x 5 last grid
BRAIN_V1_RECIPE: dict[str, Any] = {
    "size": 160,
    "widths": (32, 64, 128, 256),
    "last_stride": 2,
    "epochs": 36,
    "batch_size": 32,
    "lr": 3e-3,
    "weight_decay": 0.05,
    "label_smoothing": 0.1,
    "mean": 0.15,
    "std": 0.2,
    "ema_decay": 0.995,
    "augment": "affine",
    "guide": "none",
    "guide_weight": 0.0,
    "energy_weight": 1.0,
    "init": None,
    "seed": 0,
}

#: `brain-tumor-mri-v2`: v1's network with a 10 x 10 last grid, crops that keep the tumour, and an attention loss on
#: Grad-CAM (= CAM for this network) that asks for the class evidence inside the training boxes
BRAIN_V2_RECIPE: dict[str, Any] = dict(
    BRAIN_V1_RECIPE,
    last_stride=1,
    augment="lesion-crop",
    guide="cam",
    guide_weight=0.5,
    energy_weight=2.0,
    init="brain-tumor-mri-v1",
    epochs=12,
    lr=1e-3,
    ema_decay=0.99,
)

#: `brain-tumor-mri-v3`: v2 fine-tuned with the same attention loss on the gradient x input map as well (the
#: pixel-level evidence LRP and integrated gradients show), BatchNorm statistics kept from v2
BRAIN_V3_RECIPE: dict[str, Any] = dict(
    BRAIN_V2_RECIPE,
    guide="cam+input",
    input_weight=2.0,
    freeze_batchnorm=True,
    init="brain-tumor-mri-v2",
    epochs=6,
    lr=5e-4,
)

#: the bundled `brain-tumor-mri`, a second stage on v3: the same losses for 4 more epochs at a lower rate, keeping the epoch
#: whose gradient x input or integrated gradients points at the tumour most often on validation among those that keep
#: the Grad-CAM goals and at least 92% validation accuracy. v3's weights are not bundled: `medlens train
#: brain-tumor-mri-v3` writes them into the --out folder this recipe starts from
BRAIN_RECIPE: dict[str, Any] = dict(
    BRAIN_V3_RECIPE,
    init="brain-tumor-mri-v3",
    epochs=4,
    lr=3e-4,
    select="pixel",
    val_accuracy_floor=0.92,
)

BRAIN_RECIPES: dict[str, dict[str, Any]] = {"brain-tumor-mri": BRAIN_RECIPE, "brain-tumor-mri-v3": BRAIN_V3_RECIPE, "brain-tumor-mri-v2": BRAIN_V2_RECIPE,
                                            "brain-tumor-mri-v1": BRAIN_V1_RECIPE}

PHANTOM_RECIPES: dict[str, dict[str, Any]] = {
    "phantom-lesion": {"size": 64, "widths": (16, 32, 64), "marker": "none", "n_train": 1600, "n_val": 400,
                       "n_test": 1000, "epochs": 8, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4},
    "phantom-shortcut": {"size": 64, "widths": (16, 32, 64), "marker": "correlated", "n_train": 1600, "n_val": 400,
                         "n_test": 1000, "epochs": 6, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4},
}
#: data seeds: train, validation and the model card's test set are drawn from different seeds
PHANTOM_SEEDS = {"train": 1, "val": 2, "test": 3}


def brain_prepare(images: torch.Tensor, mean: float = BRAIN_V1_RECIPE["mean"], std: float = BRAIN_V1_RECIPE["std"]) -> torch.Tensor:
    """uint8 slices (N, 1, S, S) -> the model's input: per-image min-max to [0, 1], then (x - mean) / std."""
    return (minmax_scale(images) - mean) / std


def phantom_data(name: str, split: str, n: Optional[int] = None, seed: Optional[int] = None,
                 marker: Optional[str] = None, lesion_contrast: Optional[tuple[float, float]] = None) -> PhantomSet:
    """The phantom set a bundled phantom model is trained/validated/tested on (marker mode and, for the shortcut
    set, the lesion contrast overridable: a visible lesion beside the marker)."""
    r = PHANTOM_RECIPES[name]
    n = r[f"n_{split}"] if n is None else n
    seed = PHANTOM_SEEDS[split] if seed is None else seed
    if name == "phantom-shortcut" and lesion_contrast is not None:
        return phantom_2d(n, size=r["size"], seed=seed, marker=marker or "correlated", lesion_contrast=tuple(lesion_contrast))
    if name == "phantom-shortcut":
        if marker in (None, "correlated"):
            return shortcut_set(n, size=r["size"], seed=seed)
        return phantom_2d(n, size=r["size"], seed=seed, marker=marker, lesion_contrast=(0.06, 0.1))
    return phantom_2d(n, size=r["size"], seed=seed, marker=marker or r["marker"])


def phantom_prepare(images: torch.Tensor) -> torch.Tensor:
    """Phantom images -> model input: per-image min-max to [0, 1] (the spec's "minmax" scale, mean 0, std 1)."""
    return minmax_scale(images)


def plain(recipe: dict[str, Any]) -> dict[str, Any]:
    """The recipe as JSON-able values (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}


def check_guidance(recipe: dict[str, Any], has_region: torch.Tensor, where: str) -> None:
    """Refuse, before any training, a guided option or lesion crops without regions in the training data."""
    if recipe["guide"] not in GUIDES:
        raise InputError(f"unknown --guide {recipe['guide']!r}; expected one of {list(GUIDES)}.")
    if recipe["augment"] not in AUGMENTS:
        raise InputError(f"unknown --augment {recipe['augment']!r}; expected one of {list(AUGMENTS)}.")
    alpha = recipe.get("input_alpha", "image")
    if alpha not in ("image", "path") or (alpha == "path" and "input" not in recipe["guide"]):
        raise InputError(f"--input-alpha {alpha!r}: expected 'image' or 'path', and 'path' only with --guide input or "
                         f"cam+input (it chooses where that guide takes the gradient); the guide is {recipe['guide']!r}.")
    wants = [opt for opt, on in ((f"--guide {recipe['guide']}", recipe["guide"] != "none"),
                                 ("--augment lesion-crop", recipe["augment"] == "lesion-crop")) if on]
    if recipe.get("inpaint_region") and not bool(has_region.all()):
        missing = int((~has_region).sum())
        raise InputError(f"--inpaint-region removes each image's region, and {missing} image(s) of {where} have none (their "
                         f"lesion would stay in view). Give every image a box file (N.txt) or train without it.")
    if wants and not bool(has_region.any()):
        raise InputError(f"{' and '.join(wants)} need(s) a region (box or mask) for the training images, and {where} "
                         f"has none. Give each image a box file (N.txt: 'label x_center y_center width height') or "
                         f"train without these options.")
