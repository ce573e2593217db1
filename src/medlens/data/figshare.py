"""Loader for the figshare brain-tumour MRI slices (Cheng et al., CC BY 4.0): scan, fixed split, boxes to masks.

Owns the folder layout checks, the documented train/val/test split by contiguous blocks of slice numbers, and decoding.

Data: Jun Cheng et al., "Brain tumor dataset", figshare, doi:10.6084/m9.figshare.1512427 (CC BY 4.0).
Layout expected: one folder per class (`pituitary/`, `meningioma/`, `glioma/`), each with `N.jpg` slices and
an `N.txt` box file beside each one holding a single line `label x_center y_center width height` (YOLO form,
normalised to [0, 1]; label 0 = pituitary, 1 = meningioma, 2 = glioma).

Split: slices of one patient have consecutive numbers `N`, so the split goes by blocks of `BLOCK = 30`
consecutive numbers: block `b = (N - 1) // 30`; `b % 10 == 0` -> test, `b % 10 == 5` -> validation, every
other block -> train (about 80 / 10 / 10). The split depends only on `N`, so it is the same on every copy.

Source and licence: Jun Cheng et al., "Brain tumor dataset", figshare, doi:10.6084/m9.figshare.1512427,
CC BY 4.0.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from medlens.errors import InputError
from medlens.io.regions import boxes_to_mask

#: class names in the order of the dataset's label ids (the box files' first field) and of the model's outputs
CLASSES: tuple[str, ...] = ("pituitary", "meningioma", "glioma")
BLOCK = 30
SPLITS = ("train", "val", "test")
CREDIT = (
    'Jun Cheng et al., "Brain tumor dataset", figshare, doi:10.6084/m9.figshare.1512427, licence CC BY 4.0'
)


@dataclass(frozen=True)
class FigshareSlice:
    """One slice: its number in the original release, files, class id and name, tumour box (normalised YOLO)."""

    number: int
    image_path: Path
    box_path: Path
    label: int
    box: tuple[float, float, float, float]

    @property
    def class_name(self) -> str:
        return CLASSES[self.label]

    @property
    def split(self) -> str:
        return split_of(self.number)


def split_of(number: int) -> str:
    """The fixed split of slice number `number`: "train", "val" or "test" (by blocks of 30 numbers)."""
    block = (int(number) - 1) // BLOCK
    if block % 10 == 0:
        return "test"
    if block % 10 == 5:
        return "val"
    return "train"


def parse_box_file(path: Union[str, Path]) -> tuple[int, tuple[float, float, float, float]]:
    """Read one `label xc yc w h` line; raise InputError naming the file when it does not parse."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the box file {path}: {type(exc).__name__}. Each N.jpg needs an N.txt beside it.") from None
    fields = text.split()
    expected = "one line 'label x_center y_center width height' (label 0-2, the rest numbers in [0, 1])"
    if len(fields) != 5:
        raise InputError(f"the box file {path} holds {text[:60]!r}; expected {expected}.")
    try:
        label = int(fields[0])
        xc, yc, w, h = (float(v) for v in fields[1:])
    except ValueError:
        raise InputError(f"the box file {path} holds {text[:60]!r}; expected {expected}.") from None
    if label not in range(len(CLASSES)):
        raise InputError(f"the box file {path} has label {label}; expected {expected}.")
    if not all(0.0 <= v <= 1.0 for v in (xc, yc, w, h)) or w <= 0 or h <= 0:
        raise InputError(f"the box file {path} has a box {xc, yc, w, h} outside [0, 1]; expected {expected}.")
    return label, (xc, yc, w, h)


def scan_folder(root: Union[str, Path], splits: Optional[Sequence[str]] = None,
                require_boxes: bool = True) -> list[FigshareSlice]:
    """Every slice under `root` (optionally only those in `splits`), sorted by number, with layout checks.

    Raises InputError when the folder is missing or empty, a class folder is missing, an image has no
    box file (unless `require_boxes` is False: its box is then NaN), a box file does not parse, or a box's
    label disagrees with its class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"the dataset folder {root} does not exist; point to a copy of the figshare brain tumour set "
            f"with one folder per class ({', '.join(CLASSES)})."
        )
    if splits is not None:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise InputError(f"unknown split(s) {unknown}; expected some of {list(SPLITS)}.")
    present = [c for c in CLASSES if (root / c).is_dir()]
    if not present:
        raise InputError(
            f"the dataset folder {root} has none of the class folders {list(CLASSES)}; expected one folder "
            f"per class holding N.jpg slices with N.txt box files."
        )
    missing = [c for c in CLASSES if c not in present]
    if missing:
        raise InputError(f"the dataset folder {root} lacks the class folder(s) {missing}; expected all of {list(CLASSES)}.")
    items: list[FigshareSlice] = []
    seen: dict[int, Path] = {}
    for label, name in enumerate(CLASSES):
        for image_path in sorted((root / name).glob("*.jpg")):
            try:
                number = int(image_path.stem)
            except ValueError:
                raise InputError(f"the image {image_path} is not named N.jpg with a slice number N.") from None
            if number in seen:
                raise InputError(f"slice number {number} appears twice: {seen[number]} and {image_path}.")
            seen[number] = image_path
            if splits is not None and split_of(number) not in splits:
                continue
            box_path = image_path.with_suffix(".txt")
            if not box_path.is_file() and not require_boxes:
                items.append(FigshareSlice(number, image_path, box_path, label, (float("nan"),) * 4))
                continue
            if not box_path.is_file():
                raise InputError(f"the image {image_path} has no box file {box_path.name} beside it.")
            box_label, box = parse_box_file(box_path)
            if box_label != label:
                raise InputError(
                    f"the box file {box_path} says label {box_label} ({CLASSES[box_label]}) but lies in the "
                    f"folder {name}/ (label {label}); the dataset looks mislabelled."
                )
            items.append(FigshareSlice(number, image_path, box_path, label, box))
    if not seen:
        raise InputError(f"the dataset folder {root} holds no N.jpg slices in {list(CLASSES)}.")
    items.sort(key=lambda s: s.number)
    return items


def box_to_mask(box: Sequence[float], size: Union[int, Sequence[int]]) -> torch.Tensor:
    """A normalised (xc, yc, w, h) box -> bool mask (H, W): pixels whose centres lie inside the box, and the pixel
    holding its centre (a box thinner than a pixel still marks one), by the one rasteriser `medlens.io.regions` has."""
    h_px, w_px = (size, size) if isinstance(size, int) else tuple(size)
    return boxes_to_mask([tuple(float(v) for v in box)], (int(h_px), int(w_px)))


def read_image(path: Union[str, Path], size: Optional[int] = None) -> torch.Tensor:
    """Decode one slice to a uint8 tensor (1, H, W), grayscale, resized (area filter) to size x size if given."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("L")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BOX)
            data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.size[1], im.size[0])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot decode the image {path}: {exc}; expected an 8-bit grayscale JPEG.") from exc
    return data.unsqueeze(0).clone()


def load_arrays(
    root: Union[str, Path],
    split: str,
    size: int,
    cache_dir: Optional[Union[str, Path]] = None,
    progress: bool = False,
    require_boxes: bool = True,
) -> dict[str, torch.Tensor]:
    """All slices of one split, decoded once: {"images": uint8 (N,1,S,S), "labels": long (N,), "numbers",
    "boxes": float (N,4) normalised, NaN where an image has no box and `require_boxes` is False}. With `cache_dir`, the decoded tensors are kept in a .pt file keyed by
    the file list, so later runs skip decoding."""
    items = scan_folder(root, splits=[split], require_boxes=require_boxes)
    numbers = torch.tensor([s.number for s in items], dtype=torch.long)
    labels = torch.tensor([s.label for s in items], dtype=torch.long)
    boxes = torch.tensor([s.box for s in items], dtype=torch.float32)
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha1(
            ("|".join(f"{s.number}:{s.label}:{s.image_path.stat().st_size}" for s in items) + f"|{size}").encode()
        ).hexdigest()[:16]
        cache_file = Path(cache_dir) / f"figshare-{split}-{size}-{key}.pt"
        if cache_file.is_file():
            images = torch.load(cache_file, weights_only=True)
            if images.shape[0] == len(items):
                return {"images": images, "labels": labels, "numbers": numbers, "boxes": boxes}
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc=f"decoding {split}", unit="img")
    images = torch.stack([read_image(s.image_path, size) for s in iterator]) if items else torch.zeros(0, 1, size, size, dtype=torch.uint8)
    if cache_file is not None:
        import os

        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(images, tmp)
        os.replace(tmp, cache_file)
    return {"images": images, "labels": labels, "numbers": numbers, "boxes": boxes}


def minmax_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float images (N, C, *s) -> float32 in [0, 1], per image min-max (the "minmax" input scale)."""
    x = images.float()
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.dim() - 1)))
    return (x - lo) / (hi - lo).clamp_min(1e-6)
