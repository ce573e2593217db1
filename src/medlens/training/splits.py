"""The data of a training run, whatever its source: train and validation splits with each image's region, the
splits the final metrics are reported on, and what the metrics file says about the data.

Owns reading the figshare brain slices (boxes, the region check before decoding, the in-painted control) and
generating the phantoms of a phantom recipe, both into the same `TrainingData`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from medlens.data.figshare import CLASSES, CREDIT, box_to_mask, load_arrays, minmax_scale, scan_folder
from medlens.data.phantom import LABELS, PhantomSet
from medlens.errors import InputError
from medlens.training.augment import inpaint_regions
from medlens.training.recipes import FigshareData, PHANTOM_SEEDS, PhantomData, Recipe, check_guidance, phantom_data

PathLike = Union[str, Path]
#: what a brain recipe's data folder is, for users' hints (the data set's source, not a path of ours)
FIGSHARE_LAYOUT = ("the figshare brain tumour set (Cheng et al., doi:10.6084/m9.figshare.1512427), one folder per class "
                   "(pituitary, meningioma, glioma), each N.jpg with its YOLO box N.txt beside it")
DATA_HINT = f"DIR: {FIGSHARE_LAYOUT}"


@dataclass
class Split:
    """One split: images as stored (uint8 slices or [0, 1] phantoms, (N, 1, S, S)), labels (N,), region masks
    (N, S, S), all False where an image has no region, and which images have one (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    has_region: torch.Tensor


@dataclass
class TrainingData:
    """What the loop trains and validates on, the class names, the splits reported at the end (a function: only a
    run that writes its results needs them), the metrics file's data fields and the log's lines about the data."""

    train: Split
    val: Split
    classes: list[str]
    reports: Callable[[], dict[str, Split]]
    record: dict[str, Any]
    description: list[str]


def check_data(recipe: Recipe, data_root: Optional[PathLike] = None) -> None:
    """What can be checked of a brain recipe's data before decoding it: a folder given, in the figshare layout, with the
    regions a guided option, lesion crops or in-painting need in its train split. (Phantoms are checked as generated.)

    Raises:
        InputError: naming the folder or the option and what to give instead.
    """
    if not isinstance(recipe.data, FigshareData):
        return
    if data_root is None:
        raise InputError(f"{recipe.name} needs --data {DATA_HINT}.")
    boxed = torch.tensor([s.box[0] == s.box[0] for s in scan_folder(data_root, ["train"], require_boxes=False)])
    check_guidance(recipe, boxed, f"the train split of {data_root}")


def load_data(recipe: Recipe, data_root: Optional[PathLike] = None, cache_dir: Optional[PathLike] = None) -> TrainingData:
    """The recipe's data: the figshare slices under `data_root` (brain recipes) or freshly generated phantoms.

    Raises:
        InputError: as `check_data`, and an in-painted control with a slice without a box in any split, or phantoms
            without the regions an option needs.
    """
    check_data(recipe, data_root)
    if isinstance(recipe.data, FigshareData):
        return _figshare(recipe, recipe.data, data_root, cache_dir)
    assert isinstance(recipe.data, PhantomData)
    return _phantoms(recipe, recipe.data)


def _box_masks(boxes: torch.Tensor, has: torch.Tensor, size: int) -> torch.Tensor:
    """(N, size, size) masks of the normalised boxes, all False where an image has none."""
    empty = torch.zeros(size, size, dtype=torch.bool)
    if len(boxes) == 0:
        return empty[None].expand(0, -1, -1).clone()
    return torch.stack([box_to_mask(b, size) if ok else empty for b, ok in zip(boxes, has)])


def _figshare(recipe: Recipe, d: FigshareData, root: PathLike, cache_dir: Optional[PathLike]) -> TrainingData:
    """The figshare folder's train, val and test splits at the recipe's size (decoded once, cached in cache_dir)."""
    arrays = {s: load_arrays(root, s, d.size, cache_dir=cache_dir, progress=True, require_boxes=False)
              for s in ("train", "val", "test")}
    splits = {}
    for s, a in arrays.items():
        has = ~torch.isnan(a["boxes"]).any(1)
        if d.inpaint_region:  # the control model: every split's slices with the region in-painted
            check_guidance(recipe, has, f"the {s} split of {root}")
        masks = _box_masks(a["boxes"], has, d.size)
        images = inpaint_regions(minmax_scale(a["images"]), masks) if d.inpaint_region else a["images"]
        splits[s] = Split(images, a["labels"], masks, has)
    counts = {s: torch.bincount(split.labels, minlength=len(CLASSES)).tolist() for s, split in splits.items()}
    return TrainingData(train=splits["train"], val=splits["val"], classes=list(CLASSES),
                        reports=lambda: {"val": splits["val"], "test": splits["test"]},
                        record={"data_credit": CREDIT, "split_counts": counts},
                        description=[f"{s}: {len(split.labels)} slices, per class {counts[s]}" for s, split in splits.items()])


def _phantom_split(cases: PhantomSet) -> Split:
    masks = cases.lesion_masks[:, 0]
    return Split(cases.images, cases.labels, masks, masks.flatten(1).any(1))


def _phantoms(recipe: Recipe, d: PhantomData) -> TrainingData:
    """Generated train and validation phantoms (their own seeds); the test phantoms (and, for the shortcut model,
    the same test phantoms with the marker random, never or always present) when reported."""
    name, contrast = recipe.name, d.lesion_contrast
    train = phantom_data(name, "train", n=d.n_train, lesion_contrast=contrast, data=d)
    check_guidance(recipe, train.lesion_masks.flatten(1).any(1), f"the {name} training phantoms")
    val = phantom_data(name, "val", n=d.n_val, lesion_contrast=contrast, data=d)

    def reports() -> dict[str, Split]:
        found = {"test": _phantom_split(phantom_data(name, "test", n=d.n_test, lesion_contrast=contrast, data=d))}
        if name == "phantom-shortcut":  # how much the model leans on the marker
            for mode in ("random", "never", "always"):
                found[f"test_marker_{mode}"] = _phantom_split(phantom_data(name, "test", n=d.n_test, marker=mode,
                                                                           lesion_contrast=contrast, data=d))
        return found

    splits = {"train": _phantom_split(train), "val": _phantom_split(val)}
    return TrainingData(train=splits["train"], val=splits["val"], classes=list(LABELS), reports=reports,
                        record={"data_seeds": PHANTOM_SEEDS},
                        description=[f"{s}: {len(split.labels)} phantoms, per class "
                                     f"{torch.bincount(split.labels, minlength=len(LABELS)).tolist()}"
                                     for s, split in splits.items()])
