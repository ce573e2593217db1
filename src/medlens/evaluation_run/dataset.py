"""What an evaluation runs over: a folder with one sub-folder per class and a YOLO box file (or a mask image
`N_mask.png`) beside each image (the figshare brain tumour data's layout), or in-memory samples; each a `Sample`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch

from medlens.errors import InputError
from medlens.io.readers import read_image
from medlens.io.regions import Region, boxes_to_mask, region_mask
from medlens.io.scan import RASTER_EXTENSIONS

IMAGE_SUFFIXES = RASTER_EXTENSIONS  # a dataset of 2-D pictures with box files beside them


@dataclass
class Sample:
    """One evaluation item: x (C, *s) prepared for the model, mask (*s) boolean, class name or index."""

    x: torch.Tensor
    mask: torch.Tensor
    label: Union[str, int, None]
    name: str = ""


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def box_mask(box_file: Optional[Path], size: tuple[int, int]) -> torch.Tensor:
    """Boolean (H, W) mask of the YOLO boxes in `box_file` (`label xc yc w h` per line, normalised), rasterised as
    `medlens explain --region` does (`medlens.io.regions.boxes_to_mask`). No file: an empty mask."""
    if box_file is None or not box_file.is_file():
        return torch.zeros(*size, dtype=torch.bool)
    try:
        text = box_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # a binary or unreadable file
        raise InputError(f"{box_file}: cannot read the box file ({type(exc).__name__}); expected text lines 'label x_center "
                         f"y_center width height'.") from None
    boxes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        try:
            box = tuple(float(v) for v in parts[1:5])
            if not all(math.isfinite(v) for v in box):
                raise ValueError
        except ValueError:
            raise InputError(f"{box_file}: cannot read the box line {line!r}; expected 'label x_center y_center width height'.") from None
        boxes.append(box)
    return boxes_to_mask(boxes, size)


MASK_SUFFIX = "_mask"  # `N_mask.png` beside `N.png` is N's region mask (non-zero inside), not an image of its own


def mask_beside(image: Path) -> Optional[Path]:
    """The mask image beside `image` (`N.png` -> `N_mask.png`, any raster suffix), if there is one."""
    for suffix in sorted(IMAGE_SUFFIXES):
        candidate = image.with_name(image.stem + MASK_SUFFIX + suffix)
        if candidate.is_file():
            return candidate
    return None


def true_mask(image: Path, size: tuple[int, ...]) -> torch.Tensor:
    """Boolean mask on `size` of the region annotated for `image`: its mask image (`N_mask.png`, brought onto the grid
    nearest-neighbour as `medlens explain --region` does) when there is one, else its YOLO box file `N.txt` (none:
    an empty mask)."""
    found = mask_beside(image)
    if found is None:
        return box_mask(image.with_suffix(".txt"), size)
    try:
        scan = read_image(found, window=False)
    except InputError as exc:
        raise InputError(f"{found}: the mask beside {image.name} could not be read: {exc}") from None
    values = np.asarray(scan.grayscale() if scan.layout == "color" else scan.pixels) > 0
    if not values.any():  # an empty mask: nothing annotated on this image (a normal case)
        return torch.zeros(size, dtype=torch.bool)
    return region_mask(Region(found, mask=values), tuple(values.shape), size)


def read_include(include: Union[str, Path, Iterable[str], None]) -> Optional[list[str]]:
    """`include` as a list of `class/N.jpg` entries: a list, or a text file with one per line."""
    if include is None:
        return None
    if isinstance(include, (str, Path)):
        path = Path(include)
        if not path.is_file():
            raise InputError(f"the image list {path} does not exist; give a text file with one class/N.jpg per line.")
        include = path.read_text().splitlines()
    return [str(i) for i in include if str(i).strip()]


class FolderDataset:
    """A folder with one sub-folder per class, each image `N.jpg` with its box file `N.txt` beside it. Items are read
    and prepared by `reader` (path -> (C, *s) tensor; the evaluation run passes the pipeline's reader)."""

    def __init__(self, root: Union[str, Path], reader: Callable[[Path], torch.Tensor],
                 include: Optional[Iterable[str]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"the data folder {self.root} does not exist; give a folder with one sub-folder per class.")
        self.reader = reader
        self.items: list[tuple[Path, str]] = []
        for cls in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = (p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_SUFFIX))
            for img in sorted(images, key=_natural_key):
                self.items.append((img, cls.name))
        if include is not None:
            wanted = {str(w).strip().replace("\\", "/") for w in include if str(w).strip()}
            present = {f"{cls}/{img.name}" for img, cls in self.items}
            missing = sorted(wanted - present)
            if missing:
                raise InputError(f"{len(missing)} listed image(s) are not under {self.root}, e.g. {missing[0]}; "
                                 f"list paths as class/N.jpg relative to the data folder.")
            self.items = [(img, cls) for img, cls in self.items if f"{cls}/{img.name}" in wanted]
        if not self.items:
            raise InputError(f"no images found under {self.root}: expected sub-folders per class holding .jpg/.png files.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        path, cls = self.items[i]
        x = self.reader(path)
        return Sample(x, true_mask(path, tuple(x.shape[1:])), cls, f"{cls}/{path.name}")


def as_sample(item: Any) -> Sample:
    """A dataset item as a Sample: a Sample, a dict with 'image', 'mask', 'label', or a tuple (image, mask, label)."""
    if isinstance(item, Sample):
        return item
    if isinstance(item, dict):
        return Sample(torch.as_tensor(item["image"]).float(), torch.as_tensor(item["mask"]).bool(), item.get("label"),
                      str(item.get("name", "")))
    if isinstance(item, (tuple, list)) and len(item) >= 3:
        return Sample(torch.as_tensor(item[0]).float(), torch.as_tensor(item[1]).bool(), item[2])
    raise InputError("each dataset item must be a Sample, a dict with 'image', 'mask', 'label', or a tuple (image, mask, label).")


__all__ = ["FolderDataset", "IMAGE_SUFFIXES", "MASK_SUFFIX", "Sample", "as_sample", "box_mask", "mask_beside",
           "read_include", "true_mask"]
