"""Pictures at the scan's own resolution: the maps taken back through the inverse of `prepare` (its resize) onto
the scan as it was read, with the scan's own grayscale and the region on the scan's grid; or a note when they cannot be.

`prepare` does, for a 2-D model: take one slice of a volume (in-plane grid unchanged), convert colour to gray, resize
the whole plane to the model's size (bilinear or Pillow's box filter; the aspect may change), scale intensities and
normalise. Only the resize moves pixels, and it maps the scan's extent onto the model's grid edge to edge, so its
inverse is a resize of the map back to the scan's plane with the same pixel-centre convention (align_corners=False):
model pixel i covers scan pixels [i * s, (i + 1) * s) along an axis with s = scan size / model size.
A 3-D model's volume is drawn as one slice of the model's grid (the slice with the largest map mass); taking that
back to the scan would need the slice's position in the scan's own slices, so such pictures stay on the model's grid
and say so.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

#: the largest side a picture is drawn at (a 4096 x 4096 radiograph is drawn at 2048; provenance says so)
MAX_SIDE = 2048


@dataclass(frozen=True)
class ScanView:
    """Where pictures are drawn: the scan's plane (at most MAX_SIDE a side) and how maps get there."""

    shape: tuple[int, int]  # the picture's (H, W): the scan's plane, or the model's grid when the view is not inverted
    display_source: Any  # grayscale (H, W) in [0, 1], or a function that makes it when a picture is first drawn
    region_source: Any  # boolean (H, W), None, or a function that makes one of them when first asked
    inverted: bool  # True when maps are taken back onto the scan's plane
    note: str  # what provenance says of the picture's grid

    @functools.cached_property
    def display(self) -> np.ndarray:
        """The grayscale picture (H, W) in [0, 1] (made on first use: outputs without pictures never pay for it)."""
        return self.display_source() if callable(self.display_source) else self.display_source

    @functools.cached_property
    def region(self) -> Optional[np.ndarray]:
        """The region (H, W) to outline, or None (made on first use)."""
        return self.region_source() if callable(self.region_source) else self.region_source

    def maps(self, values: np.ndarray) -> np.ndarray:
        """(..., h, w) maps on the model's grid -> (..., H, W) on the picture's grid (bilinear, align_corners=False)."""
        values = np.asarray(values, dtype=np.float32)
        if not self.inverted or tuple(values.shape[-2:]) == self.shape:
            return values
        lead = values.shape[:-2]
        t = torch.from_numpy(np.ascontiguousarray(values.reshape(-1, 1, *values.shape[-2:])))
        up = F.interpolate(t, size=self.shape, mode="bilinear", align_corners=False)
        return up.reshape(*lead, *self.shape).numpy()


def _plane_of(scan: Any) -> Optional[np.ndarray]:
    """The scan's 2-D grayscale plane as float32, or None when it holds a volume (not a single plane)."""
    if getattr(scan, "is_volume", False):
        return None
    values = scan.grayscale() if getattr(scan, "layout", "") == "color" else np.asarray(scan.pixels)
    values = np.asarray(values, dtype=np.float32)
    return values if values.ndim == 2 else None


def _unit(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    everywhere = np.isfinite(lo) and np.isfinite(hi)  # no NaN or infinity anywhere: no mask, no copy (the usual case)
    if not everywhere:
        finite = np.isfinite(values)
        if not finite.any():
            return np.zeros(values.shape, np.float32)
        lo, hi = float(values[finite].min()), float(values[finite].max())
    scaled = values if everywhere else np.nan_to_num(values, nan=lo)
    out = (scaled - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _shrink(plane: np.ndarray) -> np.ndarray:
    side = max(plane.shape)
    if side <= MAX_SIDE:
        return plane
    size = tuple(max(1, round(n * MAX_SIDE / side)) for n in plane.shape)
    t = torch.from_numpy(np.ascontiguousarray(plane))[None, None]
    return F.interpolate(t, size=size, mode="area")[0, 0].numpy()


def scan_view(scan: Any, grid: Sequence[int], display: np.ndarray, region: Optional[np.ndarray] = None,
              scan_region: Any = None) -> ScanView:
    """The view pictures are drawn on for maps of spatial shape `grid`.

    Args:
        scan: the `ScanImage` the prepared input came from (after a 2-D model's slice), or None.
        grid: the maps' spatial shape (the model's input grid).
        display: the grayscale display image on `grid`, in [0, 1] (used when the maps stay on the grid).
        region: the region on `grid`, or None.
        scan_region: the region on the scan's plane (an array, or a function that makes it when a picture is
            first drawn), or None (then `region` is enlarged to it, nearest).

    Returns:
        A `ScanView` on the scan's plane when the preparation can be inverted (a 2-D map of a single plane), else
        on `grid` with a note saying why.
    """
    grid = tuple(int(g) for g in grid)
    plane = _plane_of(scan) if scan is not None else None
    if len(grid) != 2 or plane is None:
        why = ("a 3-D model's map is drawn on the model's grid (one slice of the resized volume); the scan's own "
               "slices are in the NIfTI/DICOM outputs") if len(grid) == 3 else \
              "no scan plane to go back to (a prepared tensor): drawn on the model's grid"
        return ScanView(grid, display, region, False, why)
    read_shape = tuple(plane.shape)
    plane = _shrink(plane)
    shape = (int(plane.shape[0]), int(plane.shape[1]))
    if shape == grid:
        note = "drawn on the scan's own grid (the model takes it at this size)"
    else:
        shrunk = f", shrunk from {read_shape[0]} x {read_shape[1]} to at most {MAX_SIDE} a side" if shape != read_shape else ""
        note = (f"the map ({grid[0]} x {grid[1]}, the model's grid) taken back through the preparation's resize onto the "
                f"scan's plane ({shape[0]} x {shape[1]}{shrunk}), bilinear")
    return ScanView(shape, functools.partial(_unit, plane), functools.partial(_region_on, shape, region, scan_region),
                    True, note)


def _region_on(shape: tuple[int, int], region: Optional[np.ndarray], scan_region: Any) -> Optional[np.ndarray]:
    """The region on the picture's plane: `scan_region` (an array or tensor, or a function returning one or None)
    when it has the plane's shape, else `region` (on the model's grid) enlarged to it (nearest), else None."""
    if callable(scan_region):
        scan_region = scan_region()
    if isinstance(scan_region, torch.Tensor):
        scan_region = scan_region.cpu().numpy()
    if scan_region is not None and tuple(scan_region.shape) == shape:
        return np.asarray(scan_region, bool)
    if region is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="nearest")[0, 0].numpy() >= 0.5
