"""DICOM series: the one rule for when files form a volume (`check_series`, used by the reader and the batch finder)
and reading such a folder as a volume, slices sorted by their position along the normal, with its spacing.

The rule: two or more single-frame DICOM images, nothing but DICOM images among the folder's pictures, of one
series (SeriesInstanceUID), one size and one orientation, each at its own position (ImagePositionPatient). Anything
else (radiographs of one series, a multi-frame file, slices without a position) is read file by file.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pydicom

from medlens.errors import InputError
from medlens.io.dicom import dicom_window, read_dicom
from medlens.io.limits import check_size
from medlens.io.scan import DICOM_EXTENSIONS, ScanImage, image_suffix, one_line

#: the header elements the rule reads (a finder that needs only the verdict reads just these)
SERIES_TAGS = ["SeriesInstanceUID", "SeriesDescription", "NumberOfFrames", "Rows", "Columns", "ImagePositionPatient",
               "ImageOrientationPatient"]


@dataclass(frozen=True)
class SeriesCheck:
    """The DICOM images among some files, in name order, and why they are not one volume (None: they are)."""

    slices: list[tuple[Path, Any]]  # (file, header without pixel data)
    problem: Optional[str]


def _header(path: Path, tags: Optional[Sequence[str]]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True, specific_tags=tags)  # force: no preamble


def _numbers(values: Any) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


def _volume_problem(folder: Path, items: list[tuple[Path, Any]]) -> Optional[str]:
    """Why DICOM images of one folder are not one volume, or None."""
    series: dict[str, list] = {}
    for f, ds in items:
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(series) > 1:
        listing = "; ".join(f"{group[0][1].get('SeriesDescription', '') or uid[-12:]} ({len(group)} files)"
                            for uid, group in series.items())
        return f"{folder} holds {len(series)} DICOM series ({listing}); give a folder with the files of one series."
    if not next(iter(series)):
        return f"{folder}: the DICOM images carry no SeriesInstanceUID; give the files one by one."
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(shapes) > 1:
        return f"{folder}: the slices have different sizes {sorted(shapes)}; they do not form one volume."
    for f, ds in items:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return f"{folder}: {f.name} holds several frames; a series volume needs single-frame slices. Give it as a file."
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            return (f"{folder}: {f.name} has no ImagePositionPatient or ImageOrientationPatient, so where its slice lies is "
                    f"unknown (radiographs, secondary captures); give the files one by one.")
    if len({_numbers(ds.ImageOrientationPatient) for _, ds in items}) > 1:
        return f"{folder}: the slices have different orientations; they do not form one volume."
    if len({_numbers(ds.ImagePositionPatient) for _, ds in items}) < len(items):
        return f"{folder}: two or more slices lie at the same position; they do not form one volume."
    return None


def check_series(folder: Path, files: Sequence[Path], tags: Optional[Sequence[str]] = None) -> SeriesCheck:
    """Whether `files` (of `folder`) form one DICOM series volume, by the rule in this module's docstring.

    Files that are neither pictures by name nor DICOM images (notes, a DICOMDIR) are passed over. `tags`: read only
    these header elements (at least `SERIES_TAGS`; the reader wants whole headers, the batch finder a verdict).
    """
    slices: list[tuple[Path, Any]] = []
    others: list[str] = []
    for f in sorted(files):
        suffix = image_suffix(f.name)
        if suffix is not None and suffix not in DICOM_EXTENSIONS:
            others.append(f.name)
            continue
        try:
            ds = _header(f, tags)
            if "Rows" in ds and "Columns" in ds:
                slices.append((f, ds))
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged headers
            if suffix is not None:
                return SeriesCheck(slices, f"{f}: the DICOM header cannot be read ({type(exc).__name__}: "
                                           f"{one_line(exc)}); re-export the series from the PACS or viewer.")
    if not slices:
        return SeriesCheck(slices, f"{folder} is a folder without DICOM images; give an image file, or a folder "
                                   f"holding the DICOM files of one series.")
    if others:
        return SeriesCheck(slices, f"{folder} holds other pictures beside its DICOM images ({', '.join(others[:3])}); "
                                   f"give a folder with the files of one DICOM series, or the files one by one.")
    if len(slices) < 2:
        return SeriesCheck(slices, f"{folder} holds one DICOM image ({slices[0][0].name}); give the file itself.")
    try:
        return SeriesCheck(slices, _volume_problem(folder, slices))
    except (TypeError, ValueError) as exc:  # a size, orientation or position value that does not parse
        return SeriesCheck(slices, f"{folder}: a slice's geometry cannot be read ({type(exc).__name__}: "
                                   f"{one_line(exc)}); re-export the series from the PACS or viewer.")


def _position(ds: Any) -> float:
    """The slice's position along the normal of its orientation."""
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))


def read_dicom_series(folder: Path, window: Any) -> ScanImage:
    """A folder holding one DICOM series (one file per slice) as a volume, slices sorted by position.

    Raises:
        InputError: the folder's files do not form one volume (`check_series` says why), or a slice cannot be read.
    """
    check = check_series(folder, [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")])
    if check.problem is not None:
        raise InputError(check.problem)
    items = check.slices
    check_size(folder, (len(items), int(items[0][1].Rows), int(items[0][1].Columns)), volume=True)

    positions = [_position(ds) for _, ds in items]
    order = np.argsort(positions, kind="stable")
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
        depth = float(np.median(np.diff(np.sort(positions))))
        spacing = (depth, *first.spacing)
    notes = [f"DICOM series: {len(ordered)} slices sorted by slice position and read as a volume"] + first.notes
    headers = tuple(items[i][1] for i in order)
    affine = None
    if first.affine is not None and spacing is not None:
        a = first.affine  # (row, column, normal) of the first slice -> (slice, row, column) of the volume
        normal = a[:, 2] / (np.linalg.norm(a[:3, 2]) or 1.0)
        affine = np.column_stack([normal * spacing[0], a[:, 0], a[:, 1], a[:, 3]])
        affine[3] = (0.0, 0.0, 0.0, 1.0)
    return ScanImage(pixels, folder, "dicom-series", notes, spacing, "volume", first.nominal_range, affine, headers)
