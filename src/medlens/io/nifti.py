"""Reading NIfTI (.nii, .nii.gz) into a `ScanImage`: reoriented to canonical RAS, stored as (z, y, x).

Owns single-slice NIfTI (read as 2-D), 4-D files (one volume by `frame`) and nibabel's scaling (scl_slope/scl_inter).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

from medlens.errors import InputError
from medlens.io.limits import check_size
from medlens.io.scan import ScanImage, one_line


def _pixel_affine(voxel_affine: np.ndarray, rules: list[tuple[int, int, float]]) -> np.ndarray:
    """The affine from medlens's pixel index to world, given how each NIfTI voxel axis is read from the pixel index:
    rules[axis] = (pixel axis, sign, offset), i.e. voxel[axis] = sign * pixel[pixel axis] + offset."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for axis, (pixel_axis, sign, offset) in enumerate(rules):
        m[axis, pixel_axis] = sign
        m[axis, 3] = offset
    return np.asarray(voxel_affine, dtype=np.float64) @ m


def read_nifti(path: Path, frame: Optional[int]) -> ScanImage:
    notes: list[str] = []
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        itemsize = np.dtype(img.get_data_dtype()).itemsize
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        raise InputError(f"{path}: not a valid NIfTI file ({type(exc).__name__}: {one_line(exc)}); re-export it.") from None
    if any(s <= 0 for s in shape):
        raise InputError(f"{path}: the NIfTI header gives the image a size of 0 along an axis {shape}; the file is corrupt. "
                         f"Re-export it.")
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(f"{path}: the NIfTI image has {len(shape)} dimensions {shape}; medlens reads 2-D, 3-D or 4-D (first volume) images.")
    # One slice along any axis: the usual way to keep a 2-D image in NIfTI (axial, coronal or sagittal).
    flat = len(shape) >= 3 and sorted(shape[:3])[0] == 1 and sorted(shape[:3])[1] > 1
    in_plane = tuple(s for s in shape[:3] if s != 1) if flat else shape[:3]
    check_size(path, in_plane, volume=not flat and len(shape) >= 3, bytes_per_value=itemsize + 8)  # + float32 copies
    try:
        img = nib.as_closest_canonical(img) if len(shape) >= 3 else img
        if frame is not None and len(shape) < 4:
            raise InputError(f"{path}: --frame picks a volume of a 4-D NIfTI, and this image is {len(shape)}-D {shape}; "
                             f"use --slice to pick a slice of a volume for a 2-D model.")
        if len(shape) == 4:
            t = frame or 0
            if not 0 <= t < shape[3]:
                raise InputError(f"{path}: volume {t} does not exist; the 4-D image has {shape[3]} volumes (0..{shape[3] - 1}).")
            data = np.asarray(img.dataobj[..., t], dtype=np.float32)  # nibabel applies scl_slope/scl_inter
            notes.append(f"4-D NIfTI: volume {t} of {shape[3]} used")
        else:
            data = img.get_fdata(dtype=np.float32)  # nibabel applies scl_slope/scl_inter
        zooms = tuple(float(z) for z in img.header.get_zooms()[: min(3, data.ndim)])
        voxel_affine = np.asarray(img.affine, dtype=np.float64)
        axis = 2
        if flat and data.ndim == 3 and 1 in data.shape:
            # after reorientation to RAS the slice axis may have moved: drop it wherever it is
            axis = data.shape.index(1)
            data = np.take(data, 0, axis=axis)
            zooms = tuple(z for a, z in enumerate(zooms) if a != axis)
            notes.append(f"NIfTI with a single {('sagittal', 'coronal', 'axial')[axis]} slice: read as a 2-D image")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: the NIfTI voxel data cannot be read ({type(exc).__name__}: {one_line(exc)}); the file may be truncated.") from None
    if data.ndim not in (2, 3):
        raise InputError(f"{path}: the NIfTI voxel data has shape {data.shape}, not what its header says {shape}; the file "
                         f"is corrupt. Re-export it.")
    if data.ndim == 2:
        pixels = np.ascontiguousarray(data.T[::-1])
        # pixel (row, column) = data[column, rows - 1 - row]; the dropped (or absent) axis is the through-plane one
        kept = [a for a in range(3) if a != axis]
        rules: list[tuple[int, int, float]] = [(2, 1, 0.0)] * 3
        rules[kept[0]] = (1, 1, 0.0)
        rules[kept[1]] = (0, -1, float(data.shape[1] - 1))
        return ScanImage(pixels.astype(np.float32), path, "nifti", notes, (zooms[1], zooms[0]), "gray", None,
                         _pixel_affine(voxel_affine, rules))
    # canonical RAS (x, y, z) -> (z, y, x), anterior (high y) at the top of each axial slice
    pixels = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, :], dtype=np.float32)
    notes.append("NIfTI reoriented to canonical RAS; volume axes (z, y, x), anterior at the top of axial slices")
    spacing = (zooms[2], zooms[1], zooms[0])
    affine = _pixel_affine(voxel_affine, [(2, 1, 0.0), (1, -1, float(data.shape[1] - 1)), (0, 1, 0.0)])
    return ScanImage(pixels, path, "nifti", notes, spacing, "volume", None, affine)
