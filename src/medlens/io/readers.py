"""`read_image`: any supported file (or a DICOM series folder) into a `ScanImage`; `take_slice` for 2-D models.

Owns the choice of reader (by extension or DICOM magic) and the checks every scan passes after reading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from medlens.errors import InputError
from medlens.io.raster import read_raster
from medlens.io.scan import (DICOM_EXTENSIONS, NIFTI_EXTENSIONS, RASTER_EXTENSIONS, SUPPORTED, PathLike, ScanImage,
                             check_file, downsample_if_needed, finite_check)


def kind_of(path: Path) -> str:
    """The kind of file ("nifti", "dicom", "png", "jpeg", "tiff" or "bmp"), from the extension or (DICOM) the magic at byte 128."""
    name = path.name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if name.endswith(DICOM_EXTENSIONS):
        return "dicom"
    suffix = path.suffix.lower()
    if suffix in RASTER_EXTENSIONS:
        return {".jpeg": "jpeg", ".jpg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}.get(suffix, suffix[1:])
    try:  # a DICOM file often has no extension: look for the "DICM" magic at byte 128
        with open(path, "rb") as fh:
            head = fh.read(132)
        if len(head) == 132 and head[128:132] == b"DICM":
            return "dicom"
        if head[:2] in (b"\x08\x00", b"\x00\x08") and head[2:4] in (b"\x00\x00", b"\x05\x00", b"\x08\x00", b"\x16\x00"):
            return "dicom"  # no preamble (ACR-NEMA style): the first element is (0008,0000/0005/0008/0016)
    except OSError:
        pass
    raise InputError(
        f"{path}: unsupported file type {path.suffix or '(no extension)'!r}. medlens reads {SUPPORTED}; "
        f"convert the image to one of these formats."
    )


def read_image(
    path: PathLike,
    *,
    slice_index: Optional[int] = None,
    frame: Optional[int] = None,
    window: Any = True,
) -> ScanImage:
    """Read a PNG/JPEG/TIFF/BMP, DICOM or NIfTI file, or a folder holding one DICOM series, into a `ScanImage`.

    Pixels are float32 and checked finite.

    slice_index: for a volume, return only that axial slice (a 2-D image).
    frame: for a multi-frame file (DICOM, TIFF, 4-D NIfTI), the frame to read; a multi-frame DICOM
        without `frame` is read as a volume.
    window: DICOM only: True applies the file's VOI LUT or window, False keeps modality values,
        (center, width) applies that window.
    """
    path = Path(path)
    if path.is_dir():
        kind = "dicom-series"
    else:
        check_file(path)
        kind = kind_of(path)
    # the DICOM and NIfTI readers are imported on first use: pydicom and nibabel take over a second to import,
    # which every start of `medlens batch` on PNG or JPEG files paid
    if kind == "dicom-series":
        from medlens.io.dicom_series import read_dicom_series

        scan = read_dicom_series(path, window)
    elif kind == "dicom":
        from medlens.io.dicom import read_dicom

        scan = read_dicom(path, frame, window)
    elif kind == "nifti":
        from medlens.io.nifti import read_nifti

        scan = read_nifti(path, frame)
    else:
        scan = read_raster(path, kind, frame)
    if scan.pixels.size == 0:
        raise InputError(f"{path}: the image has no pixels (shape {scan.pixels.shape}).")
    finite_check(scan)
    if slice_index is not None:
        scan = take_slice(scan, slice_index)
    return downsample_if_needed(scan)


def take_slice(scan: ScanImage, slice_index: Optional[int]) -> ScanImage:
    """One axial slice of a volume as a 2-D scan (the middle one when `slice_index` is None), with a note."""
    if not scan.is_volume:
        if slice_index is not None:
            scan.notes.append(f"slice {slice_index} was asked for, but {scan.source.name} is a 2-D image; it was used whole")
        return scan
    depth = scan.pixels.shape[0]
    if slice_index is None:
        index = depth // 2
        note = f"a 2-D model was given a volume of {depth} slices: the middle slice {index} was used (choose one with --slice)"
    else:
        index = slice_index + depth if slice_index < 0 else slice_index
        if not 0 <= index < depth:
            raise InputError(f"{scan.source}: slice {slice_index} does not exist; the volume has {depth} slices (0..{depth - 1}).")
        note = f"slice {index} of {depth}"
    spacing = scan.spacing[1:] if scan.spacing else None
    affine = None
    if scan.affine is not None:  # (slice, row, column) -> (row, column, through-plane) at this slice
        a = np.asarray(scan.affine, dtype=np.float64)
        affine = np.column_stack([a[:, 1], a[:, 2], a[:, 0], a[:, 3] + index * a[:, 0]])
    headers = scan.dicom_headers
    if headers is not None and len(headers) == depth:
        headers = (headers[index],)
    return ScanImage(
        np.ascontiguousarray(scan.pixels[index]), scan.source, scan.kind, scan.notes + [note], spacing, "gray",
        scan.nominal_range, affine, headers
    )
