"""Reading a folder that holds one DICOM series (one file per slice) as a volume, slices sorted by position.

Owns grouping by SeriesInstanceUID, slice ordering (position along the normal, else instance number) and spacing.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom

from medlens.errors import InputError
from medlens.io.dicom import dicom_window, read_dicom
from medlens.io.limits import check_size
from medlens.io.scan import ScanImage, one_line


def read_dicom_series(folder: Path, window: Any) -> ScanImage:
    """A folder holding one DICOM series (one file per slice) as a volume, slices sorted by position."""
    headers = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)  # force: files without a preamble
        except Exception:  # noqa: BLE001 - other files in the folder (notes, DICOMDIR parts) are skipped
            continue
        if "Rows" in ds and "Columns" in ds:
            headers.append((f, ds))
    if not headers:
        raise InputError(
            f"{folder} is a folder without DICOM images; give an image file, or a folder holding the DICOM files of one series."
        )
    series: dict[str, list] = {}
    for f, ds in headers:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        listing = "; ".join(f"{items[0][1].get('SeriesDescription', '') or uid[-12:]} ({len(items)} files)" for uid, items in series.items())
        raise InputError(f"{folder} holds {len(series)} DICOM series ({listing}); give a folder with the files of one series.")
    items = next(iter(series.values()))
    try:
        shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    except Exception as exc:  # noqa: BLE001 - a Rows or Columns value that does not parse
        raise InputError(f"{folder}: a slice's Rows or Columns cannot be read ({type(exc).__name__}: {one_line(exc)}); "
                         f"re-export the series from the PACS or viewer.") from None
    if len(shapes) > 1:
        raise InputError(f"{folder}: the slices have different sizes {sorted(shapes)}; they do not form one volume.")
    rows, cols = shapes.pop()
    check_size(folder, (len(items), rows, cols), volume=True)

    def position(ds: Any) -> Optional[float]:
        try:
            orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            normal = np.cross(orientation[:3], orientation[3:])
            return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))
        except (AttributeError, TypeError, ValueError):
            return None

    positions = [position(ds) for _, ds in items]
    if all(p is not None for p in positions):
        order = np.argsort(positions, kind="stable")
        how = "slice position"
    else:
        order = np.argsort([int(ds.get("InstanceNumber", 0) or 0) for _, ds in items], kind="stable")
        how = "instance number"
    ordered = [items[i][0] for i in order]
    first = read_dicom(ordered[0], None, window)
    fixed = window
    if window is True:
        win = dicom_window(pydicom.dcmread(str(ordered[0]), stop_before_pixels=True, force=True), True, [])
        fixed = win if win is not None else False
    planes = [first.pixels]
    for f in ordered[1:]:
        scan = read_dicom(f, None, fixed)
        if scan.layout != "gray":
            raise InputError(f"{f}: a series volume needs single-frame grayscale slices; this file is {scan.layout}.")
        planes.append(scan.pixels)
    if first.layout != "gray":
        raise InputError(f"{ordered[0]}: a series volume needs single-frame grayscale slices; this file is {first.layout}.")
    pixels = np.stack(planes).astype(np.float32)
    spacing = None
    if first.spacing:
        gaps = np.diff(np.sort([p for p in positions if p is not None])) if how == "slice position" else []
        depth = float(np.median(gaps)) if len(gaps) else float(items[0][1].get("SliceThickness", 1.0) or 1.0)
        spacing = (depth, *first.spacing)
    notes = [f"DICOM series: {len(ordered)} slices sorted by {how} and read as a volume"] + first.notes
    headers = tuple(items[i][1] for i in order)
    affine = None
    if first.affine is not None and how == "slice position" and spacing is not None:
        a = first.affine  # (row, column, normal) of the first slice -> (slice, row, column) of the volume
        normal = a[:, 2] / (np.linalg.norm(a[:3, 2]) or 1.0)
        affine = np.column_stack([normal * spacing[0], a[:, 0], a[:, 1], a[:, 3]])
        affine[3] = (0.0, 0.0, 0.0, 1.0)
    return ScanImage(pixels, folder, "dicom-series", notes, spacing, "volume", first.nominal_range, affine, headers)
