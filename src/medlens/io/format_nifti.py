"""The `nifti` output format: each raw map as `<method>_<target>.nii.gz`, placed in the input's world space: the affine
of the scan as read (NIfTI; DICOM with a patient position), carried over to the map's grid (resized as prepared).
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Optional

import nibabel as nib
import numpy as np

from medlens.io.files import atomic_write, safe_name
from medlens.io.scan import resampled_affine


def map_affine(job: Any, grid: tuple[int, ...]) -> tuple[np.ndarray, str]:  # job: a formats.ImageResult
    """The affine from a map index ((row, column, 0) in 2-D, (slice, row, column) in 3-D) to world RAS mm, and where
    it came from: the scan's affine resampled to the map's grid, else the pixel spacing, else 1 mm pixels."""
    scan: Any = job.scan
    affine: Optional[np.ndarray] = getattr(scan, "affine", None)
    if affine is not None and len(scan.spatial_shape) == len(grid):
        return resampled_affine(affine, scan.spatial_shape, grid), "the input's affine, resampled to the map's grid"
    spacing = getattr(scan, "spacing", None)
    shape = getattr(scan, "spatial_shape", grid)
    diagonal = np.ones(3)
    if spacing and len(spacing) == len(grid):
        diagonal[: len(grid)] = spacing
        how = "the input's pixel spacing (it has no position in patient space)"
    else:
        how = "1 mm pixels (the input has no spacing or position in patient space)"
    base = np.diag([*diagonal, 1.0])
    return (resampled_affine(base, shape, grid) if len(shape) == len(grid) else base), how


def to_nifti_array(values: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A map in medlens's pixel order as a NIfTI array in (x, y, z) voxel order, and that array's affine: for a scan
    read from a canonical NIfTI this is the input's own voxel order and affine."""
    if values.ndim == 2:  # pixel (row, column) = array (column, rows - 1 - row, 0)
        rows = values.shape[0]
        array = np.ascontiguousarray(values.T[:, ::-1])[..., None]
        order = np.array([[0, -1, 0, rows - 1], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    else:  # pixel (slice, row, column) = array (column, rows - 1 - row, slice)
        rows = values.shape[1]
        array = np.ascontiguousarray(values.transpose(2, 1, 0)[:, ::-1, :])
        order = np.array([[0, 0, 1, 0], [0, -1, 0, rows - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return array.astype(np.float32), affine @ order


def write_nifti(job: Any, folder: Path) -> list[Path]:
    """`<method>_<target>.nii.gz` per method and target: the raw float32 map with the input's affine."""
    written: list[Path] = []
    how = ""
    for method, maps in job.raw.items():
        affine, how = map_affine(job, tuple(maps.shape[1:]))
        for j, part in enumerate(job.file_parts):
            array, array_affine = to_nifti_array(maps[j], affine)
            image = nib.Nifti1Image(array, array_affine)
            image.header.set_xyzt_units("mm")
            image.header["descrip"] = f"medlens {method} {part}"[:79].encode()
            code = 1 if "input's affine" in how else 0  # 1: scanner space, as the input said
            image.set_qform(array_affine, code=code)
            image.set_sform(array_affine, code=code)
            payload = image.to_bytes()
            written.append(atomic_write(folder / f"{safe_name(method)}_{part}.nii.gz", _gzip(payload)))
    if written:
        job.provenance["nifti"] = {"affine_from": how, "note": "raw, unnormalised maps; voxel order (x, y, z)"}
    return written


def _gzip(payload: bytes) -> bytes:
    """gzip with mtime 0, so that the same map gives the same bytes."""
    return gzip.compress(payload, compresslevel=6, mtime=0)
