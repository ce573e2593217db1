"""Where a DICOM image sits in the patient: the affine of a single-frame image, of one frame or of the whole stack of
an (enhanced) multi-frame file, from its plane position, orientation and pixel spacing.

Geometry is optional: a damaged, zero or missing value means "no affine" with a note, never an unreadable file.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _numbers(value: Any, count: int) -> Optional[np.ndarray]:
    try:
        found = np.asarray([float(v) for v in value], dtype=np.float64)
    except Exception:  # noqa: BLE001 - a damaged or absent value: no geometry
        return None
    return found if found.shape == (count,) and np.isfinite(found).all() else None


def pixel_spacing(ds: Any) -> Optional[tuple[float, float]]:
    """(row, column) spacing in mm from PixelSpacing; None when absent, damaged, zero or negative (e.g. CR "0\\0")."""
    spacing = _numbers(ds.get("PixelSpacing"), 2) if ds is not None and "PixelSpacing" in ds else None
    if spacing is None or not (spacing > 0).all():
        return None
    return float(spacing[0]), float(spacing[1])


def _plane_affine(position: Optional[np.ndarray], orientation: Optional[np.ndarray],
                  spacing: Optional[tuple[float, float]], thickness: float) -> Optional[np.ndarray]:
    """(row, column, through-plane) index -> world RAS mm, or None when a part is missing or degenerate."""
    if position is None or orientation is None or spacing is None:
        return None
    along_row, along_column = orientation[:3], orientation[3:]  # index column grows along the row direction
    normal = np.cross(along_row, along_column)
    if np.linalg.norm(normal) < 1e-3:  # parallel or zero direction cosines
        return None
    affine = np.eye(4)
    affine[:3, 0] = along_column * spacing[0]
    affine[:3, 1] = along_row * spacing[1]
    affine[:3, 2] = normal / np.linalg.norm(normal) * thickness
    affine[:3, 3] = position
    return LPS_TO_RAS @ affine


def _thickness(ds: Any) -> float:
    try:
        return abs(float(ds.get("SliceThickness", 1.0) or 1.0)) or 1.0
    except (TypeError, ValueError):
        return 1.0


def patient_affine(ds: Any) -> Optional[np.ndarray]:
    """A single-frame image's affine from (row, column, through-plane) to world RAS mm, from ImagePositionPatient,
    ImageOrientationPatient and PixelSpacing; None when the file has no patient geometry (e.g. most radiographs)."""
    return _plane_affine(_numbers(ds.get("ImagePositionPatient"), 3), _numbers(ds.get("ImageOrientationPatient"), 6),
                         pixel_spacing(ds), _thickness(ds))


def _group(ds: Any, frame: int, sequence: str) -> Optional[Any]:
    """The first item of a functional group for one frame: per-frame first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index and sequence in items[index] and items[index][sequence].value:
            return items[index][sequence].value[0]
    return None


def frame_affines(ds: Any, n_frames: int) -> Optional[list[np.ndarray]]:
    """One (row, column, through-plane) affine per frame of a multi-frame file: from the functional groups of an
    enhanced file, or from ImagePositionPatient and GridFrameOffsetVector (RT Dose); None when a frame has none."""
    affines: list[np.ndarray] = []
    if ds.get("PerFrameFunctionalGroupsSequence") is not None or ds.get("SharedFunctionalGroupsSequence") is not None:
        for k in range(n_frames):
            position, orientation, measures = (_group(ds, k, s) for s in (
                "PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"))
            affine = _plane_affine(
                _numbers(position.get("ImagePositionPatient"), 3) if position is not None else None,
                _numbers(orientation.get("ImageOrientationPatient"), 6) if orientation is not None else None,
                pixel_spacing(measures), _thickness(measures) if measures is not None else 1.0)
            if affine is None:
                return None
            affines.append(affine)
        return affines
    offsets = _numbers(ds.get("GridFrameOffsetVector"), n_frames) if "GridFrameOffsetVector" in ds else None
    first = patient_affine(ds)
    if first is None or offsets is None:
        return None
    normal = first[:3, 2] / np.linalg.norm(first[:3, 2])
    for offset in offsets:
        affine = first.copy()
        affine[:3, 3] = first[:3, 3] + offset * normal
        affines.append(affine)
    return affines


def stack_affine(affines: list[np.ndarray], notes: list[str]) -> Optional[np.ndarray]:
    """The (slice, row, column) affine of frames that form one evenly spaced stack of parallel planes; None, with a
    note, when they do not (several stacks, uneven gaps, changing orientation)."""
    if len(affines) < 2:
        return None
    first = affines[0]
    step = affines[1][:3, 3] - first[:3, 3]
    even = all(np.allclose(a[:3, :3], first[:3, :3], atol=1e-4) for a in affines) and all(
        np.allclose(b[:3, 3] - a[:3, 3], step, atol=1e-3 * max(1.0, float(np.linalg.norm(step))))
        for a, b in zip(affines, affines[1:]))
    if not even or np.linalg.norm(step) < 1e-6:
        notes.append("the frames are not one evenly spaced stack of parallel planes: the volume has no patient geometry")
        return None
    affine = np.column_stack([step, first[:3, 0], first[:3, 1], first[:3, 3]])
    return np.vstack([affine, [0.0, 0.0, 0.0, 1.0]])
