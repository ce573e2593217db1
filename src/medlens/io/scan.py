"""The scan as read from a file (`ScanImage`), the file-type table, and the checks every reader shares.

Owns the pixel conventions (below), the file check before reading and the NaN check and downsampling after it.

Conventions (the reference for the README's input section):
- `ScanImage.pixels` is float32: (H, W) grayscale, (H, W, 3) colour, or (D, H, W) a volume.
- DICOM: the modality LUT (RescaleSlope/Intercept) is applied, then the VOI LUT or the first
  WindowCenter/Width (to [0, 1]), then MONOCHROME1 is inverted so that bright means dense everywhere.
  `window=False` keeps modality values (e.g. Hounsfield units); `window=(center, width)` sets one.
- A folder holding one DICOM series (the rule: `medlens.io.dicom_series`) is read as a volume, slices sorted by
  position along their normal.
- NIfTI: reoriented to the closest canonical (RAS) orientation, stored as (D, H, W) = (z, y, x) with
  anterior at the top of each axial slice. A 2-D model gets one slice (`slice_index`, default the middle).
- Size limits (`medlens.io.limits`): a side above `MAX_SIDE_2D` (volumes: `MAX_SIDE_3D`) is downsampled with a
  note; larger scans are refused from their header, before the pixels are decoded.
- Intensity scales: "minmax" per image; "uint8" maps the file's nominal range (0..255 for 8-bit,
  0..65535 for 16-bit, 0..1 after a DICOM window) to [0, 1] (min-max, with a note, when the file has no
  nominal range); "none" keeps values. Then (x - mean) / std per channel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from medlens.errors import InputError
from medlens.io.limits import current_limits, size_text

PathLike = Union[str, os.PathLike]

#: The file types medlens reads, by how a file's name ends (lower case): the one list the readers, the batch finder,
#: region files, the CLI's output folder names and the app consult. A DICOM file without one is known by its header.
FILE_TYPES: dict[str, tuple[str, ...]] = {
    "raster": (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"),
    "dicom": (".dcm", ".dicom", ".dic"),
    "nifti": (".nii", ".nii.gz"),
}
RASTER_EXTENSIONS = FILE_TYPES["raster"]
DICOM_EXTENSIONS = FILE_TYPES["dicom"]
NIFTI_EXTENSIONS = FILE_TYPES["nifti"]
IMAGE_EXTENSIONS = RASTER_EXTENSIONS + DICOM_EXTENSIONS + NIFTI_EXTENSIONS
SUPPORTED = "PNG, JPEG, TIFF, BMP (.png .jpg .jpeg .tif .tiff .bmp), DICOM (.dcm or a file with a DICOM header, or a folder holding one series), NIfTI (.nii, .nii.gz)"

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights, used to turn RGB into grayscale



def image_suffix(name: str) -> Optional[str]:
    """The image suffix of `FILE_TYPES` that `name` ends with, lower case (".nii.gz" whole), or None."""
    lowered = name.lower()
    return max((s for s in IMAGE_EXTENSIONS if lowered.endswith(s)), key=len, default=None)


def image_stem(name: str) -> str:
    """`name` without its image suffix ("scan.nii.gz" -> "scan"); any other name loses its last suffix."""
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else Path(name).stem


@dataclass
class ScanImage:
    """A scan as read from its file: float32 pixels plus what is known about them.

    layout: "gray" (H, W), "color" (H, W, 3) or "volume" (D, H, W).
    nominal_range: the value range the file format implies (0..255 for 8-bit, 0..1 after a DICOM
        window), or None when only the data itself says (CT in HU, float TIFF, NIfTI).
    spacing: physical pixel/voxel spacing in mm, in the same axis order as `pixels`, when known.
    affine: 4 x 4, from a pixel's index along the spatial axes of `pixels` ((row, column, 0) for a 2-D image; the third
        column is then the through-plane direction) to its centre in world RAS mm, when the file says (NIfTI, DICOM
        with a patient position). Output formats that place maps in the scan's space (NIfTI, DICOM) use it.
    dicom_headers: the DICOM header(s) the pixels came from (pixel data left out), one per slice in `pixels` order.
    """

    pixels: np.ndarray
    source: Path
    kind: str
    notes: list[str] = field(default_factory=list)
    spacing: Optional[tuple[float, ...]] = None
    layout: str = "gray"
    nominal_range: Optional[tuple[float, float]] = None
    affine: Optional[np.ndarray] = None
    dicom_headers: Optional[tuple] = None

    @property
    def is_volume(self) -> bool:
        return self.layout == "volume"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape[:2]) if self.layout == "color" else tuple(self.pixels.shape)

    def grayscale(self) -> np.ndarray:
        """The pixels as one channel: (H, W) or (D, H, W); colour is converted with BT.601 luma weights."""
        if self.layout == "color":
            return np.tensordot(self.pixels[..., :3], np.asarray(LUMA, dtype=np.float32), axes=([-1], [0])).astype(np.float32)
        return self.pixels


def one_line(exc: BaseException, limit: int = 240) -> str:
    """A library error as one line: its lines joined, whitespace collapsed, cut near `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def check_file(path: Path) -> None:
    """Refuse a path that does not exist, cannot be read or is empty, before any reader opens it."""
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path (relative paths start from {Path.cwd()}).")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: the file cannot be read (permission denied); check its permissions.")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: the file is empty; re-export or re-copy the image.")
    limit = current_limits().hard_bytes
    if size > limit:  # readers such as pydicom read a whole file into memory
        raise InputError(f"{path}: the file is {size_text(size)}, above medlens's limit of {size_text(limit)} (HARD_BYTES); crop or downsample it first, or raise the limit with MEDLENS_HARD_BYTES.")


def downsample_if_needed(scan: ScanImage) -> ScanImage:
    """Downsample (area average, with a note) a scan whose longest side is above the soft limit."""
    limits = current_limits()
    volume = scan.is_volume
    limit = limits.max_side_3d if volume else limits.max_side_2d
    shape = scan.spatial_shape
    if max(shape) <= limit:
        return scan
    factor = limit / max(shape)
    new = tuple(max(1, int(round(s * factor))) for s in shape)
    t = torch.from_numpy(np.ascontiguousarray(scan.pixels))
    if scan.layout == "color":
        t = t.permute(2, 0, 1)[None]
    else:
        t = t[None, None]
    t = F.interpolate(t, size=new, mode="area")
    pixels = t[0].permute(1, 2, 0).numpy() if scan.layout == "color" else t[0, 0].numpy()
    scan.pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if scan.spacing:
        scan.spacing = tuple(float(sp * s / n) for sp, s, n in zip(scan.spacing, shape, new))
    if scan.affine is not None:
        scan.affine = resampled_affine(scan.affine, shape, new)
    scan.notes.append(
        f"the {'volume' if volume else 'image'} was {' x '.join(map(str, shape))}, above the {limit}-per-side limit; "
        f"downsampled (area average) to {' x '.join(map(str, new))}"
    )
    return scan


def resampled_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """The affine of a grid resampled over the same extent (area or bilinear with align_corners=False): new index i
    sits at old index (i + 0.5) * old / new - 0.5 along each axis (the axes not in the shapes are kept)."""
    step = np.eye(4)
    for axis, (old, new) in enumerate(zip(old_shape, new_shape)):
        step[axis, axis] = old / new
        step[axis, 3] = 0.5 * old / new - 0.5
    return np.asarray(affine, dtype=np.float64) @ step


def finite_check(scan: ScanImage) -> None:
    """Refuse pixels that are NaN or infinite."""
    finite = np.isfinite(scan.pixels)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(
            f"{scan.source}: {bad} pixel(s) are NaN or infinite; medlens cannot explain an image with undefined "
            f"values. Replace them (e.g. numpy.nan_to_num) and save the image again."
        )
