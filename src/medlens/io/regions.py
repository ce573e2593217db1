"""Region files (where the finding is): YOLO box text, PNG/JPEG/TIFF masks and NIfTI masks, read and checked,
and brought onto the grid of a prepared input as a boolean mask (the same rasterisation `evaluate` uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from medlens.errors import InputError
from medlens.io.scan import NIFTI_EXTENSIONS, RASTER_EXTENSIONS, image_stem
from medlens.io import read_image  # the same checked readers as scans (size limits, corrupt files)

BOX_SUFFIXES = (".txt",)
MAX_BOX_FILE_BYTES = 1 << 20  # a box file is a few lines; anything larger is not one


@dataclass(frozen=True)
class Region:
    """A region read from `source`: normalised YOLO boxes (x_center, y_center, width, height) or a boolean mask."""

    source: Path
    boxes: Optional[tuple[tuple[float, float, float, float], ...]] = None
    mask: Optional[np.ndarray] = None  # (H, W) or (D, H, W) boolean, at the scan's own size

    @property
    def kind(self) -> str:
        return "boxes" if self.boxes is not None else "mask"


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def parse_boxes(path: Path, text: str) -> tuple[tuple[float, float, float, float], ...]:
    """YOLO lines `label x_center y_center width height`, normalised to [0, 1]; blank lines are skipped."""
    boxes = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            xc, yc, w, h = (float(v) for v in parts[1:5])
        except ValueError:
            raise InputError(f"{path}: line {n} ({line.strip()[:60]!r}) is not a box; each line must read "
                             f"'label x_center y_center width height' with values normalised to 0..1 (YOLO).") from None
        if not all(np.isfinite(v) for v in (xc, yc, w, h)) or not (0 <= xc <= 1 and 0 <= yc <= 1 and 0 < w <= 1 and 0 < h <= 1):
            raise InputError(f"{path}: line {n} has a box outside the image ({xc:g} {yc:g} {w:g} {h:g}); YOLO boxes are "
                             f"normalised: centre in 0..1, width and height in (0, 1].")
        boxes.append((xc, yc, w, h))
    if not boxes:
        raise InputError(f"{path}: the box file holds no box; give one line 'label x_center y_center width height' per box.")
    return tuple(boxes)


def read_region(path: Union[str, Path]) -> Region:
    """Read a region file: `.txt` YOLO boxes, an image mask (non-zero = inside) or a NIfTI mask."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such region file; give a YOLO box .txt, a PNG mask or a NIfTI mask.")
    suffix = _suffix(path)
    if suffix in BOX_SUFFIXES:
        if path.stat().st_size > MAX_BOX_FILE_BYTES:
            raise InputError(f"{path}: {path.stat().st_size} bytes is too large for a box file (at most {MAX_BOX_FILE_BYTES}).")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise InputError(f"{path}: cannot read the box file as text ({exc}); it must hold YOLO lines.") from None
        return Region(path, boxes=parse_boxes(path, text))
    if suffix in RASTER_EXTENSIONS or suffix in NIFTI_EXTENSIONS:
        try:
            scan = read_image(path, window=False)
        except InputError as exc:
            raise InputError(f"the region file could not be read as a mask: {exc}") from None
        values = scan.grayscale() if scan.layout == "color" else scan.pixels
        mask = np.asarray(values) > 0
        if not mask.any():
            raise InputError(f"{path}: the mask is empty (no non-zero pixel); the region must mark at least one pixel.")
        return Region(path, mask=mask)
    raise InputError(f"{path}: unknown region file type {suffix or '(none)'}; give a YOLO box .txt, a PNG mask "
                     f"(.png/.tif) or a NIfTI mask (.nii/.nii.gz).")


def region_beside(image: Union[str, Path]) -> Optional[Path]:
    """A box file with the image's stem beside it (`scan.png` -> `scan.txt`), if there is one."""
    image = Path(image)
    if image.is_dir():
        return None
    candidate = image.with_name(image_stem(image.name) + ".txt")
    return candidate if candidate.is_file() else None


def boxes_to_mask(boxes: Sequence[tuple[float, float, float, float]], size: tuple[int, int]) -> torch.Tensor:
    """Boolean (H, W) mask of normalised boxes: the pixels whose centres fall in a box, plus each box's centre pixel."""
    h, w = size
    mask = torch.zeros(h, w, dtype=torch.bool)
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    for xc, yc, bw, bh in boxes:
        rows = (cy >= yc - bh / 2) & (cy <= yc + bh / 2)
        cols = (cx >= xc - bw / 2) & (cx <= xc + bw / 2)
        mask |= rows[:, None] & cols[None, :]
        mask[min(h - 1, int(min(max(yc, 0.0), 1.0) * h)), min(w - 1, int(min(max(xc, 0.0), 1.0) * w))] = True
    return mask


def _slice_of(depth: int, slice_index: Optional[int]) -> int:
    index = depth // 2 if slice_index is None else (slice_index + depth if slice_index < 0 else slice_index)
    return min(max(index, 0), depth - 1)


def region_mask(region: Region, scan_shape: Sequence[int], grid: Sequence[int], *, slice_index: Optional[int] = None) -> torch.Tensor:
    """The region as a boolean mask on `grid` (the prepared input's spatial size). `scan_shape` is the spatial
    shape of the scan as read (before slicing and resizing): a mask must have that shape; boxes are normalised.
    A volume mask given with a 2-D grid is sliced like the scan (`slice_index`, default the middle)."""
    grid = tuple(int(g) for g in grid)
    if region.boxes is not None:
        if len(grid) != 2:
            raise InputError(f"{region.source}: box files describe 2-D images; for a volume give a NIfTI mask.")
        return boxes_to_mask(region.boxes, grid)
    mask = region.mask
    assert mask is not None
    scan_shape = tuple(int(s) for s in scan_shape)
    if tuple(mask.shape) != scan_shape:
        raise InputError(f"{region.source}: the mask is {' x '.join(map(str, mask.shape))} but the image is "
                         f"{' x '.join(map(str, scan_shape))}; the mask must have the image's size.")
    if mask.ndim == 3 and len(grid) == 2:
        mask = mask[_slice_of(mask.shape[0], slice_index)]
        if not mask.any():
            raise InputError(f"{region.source}: the mask is empty on the slice that is explained; choose a slice with --slice.")
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(t.shape[2:]) != grid:
        shrinking = all(g <= s for g, s in zip(grid, t.shape[2:]))
        t = F.interpolate(t, size=grid, mode="area") if shrinking else F.interpolate(t, size=grid, mode="nearest")
    out = t[0, 0] >= 0.5
    if not out.any():  # a region smaller than one cell of the grid: keep the cell that holds most of it
        flat = t[0, 0].flatten()
        out = torch.zeros_like(flat, dtype=torch.bool)
        out[int(flat.argmax())] = True
        out = out.view(grid)
    return out
