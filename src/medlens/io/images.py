"""Reading scans (PNG/JPEG/TIFF, DICOM, NIfTI) into `ScanImage`, and preparing them to a model's `InputSpec`.

numpy, Pillow, pydicom and nibabel live only here, at the file edge; `load_input` hands back a torch tensor.

Conventions (the reference for the README's input section):
- `ScanImage.pixels` is float32: (H, W) grayscale, (H, W, 3) colour, or (D, H, W) a volume.
- DICOM: the modality LUT (RescaleSlope/Intercept) is applied, then the VOI LUT or the first
  WindowCenter/Width (to [0, 1]), then MONOCHROME1 is inverted so that bright means dense everywhere.
  `window=False` keeps modality values (e.g. Hounsfield units); `window=(center, width)` sets one.
- A folder holding one DICOM series is read as a volume, slices sorted by position along their normal.
- NIfTI: reoriented to the closest canonical (RAS) orientation, stored as (D, H, W) = (z, y, x) with
  anterior at the top of each axial slice. A 2-D model gets one slice (`slice_index`, default the middle).
- Size limits: a side above `MAX_SIDE_2D` (volumes: `MAX_SIDE_3D`) is downsampled with a note; a side
  above `HARD_SIDE_2D` (volumes: `HARD_SIDE_3D`) is refused before the pixels are decoded.
- Intensity scales: "minmax" per image; "uint8" maps the file's nominal range (0..255 for 8-bit,
  0..65535 for 16-bit, 0..1 after a DICOM window) to [0, 1] (min-max, with a note, when the file has no
  nominal range); "none" keeps values. Then (x - mean) / std per channel.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from medlens.errors import InputError
from medlens.core.input_spec import InputSpec
from medlens.core.layers import first_convolution

PathLike = Union[str, os.PathLike]

MAX_SIDE_2D = 4096  # above this a 2-D image is downsampled (with a note)
HARD_SIDE_2D = 16384  # above this a 2-D image is refused
MAX_SIDE_3D = 512  # above this a volume is downsampled (with a note)
HARD_SIDE_3D = 2048  # above this a volume is refused
HARD_PIXELS_2D = 16384 * 8192  # more pixels than this (about 134 million) are refused
HARD_VOXELS_3D = 1024**3  # more voxels than this are refused

RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
SUPPORTED = "PNG, JPEG, TIFF, BMP (.png .jpg .jpeg .tif .tiff .bmp), DICOM (.dcm or a file with a DICOM header, or a folder holding one series), NIfTI (.nii, .nii.gz)"

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights, used to turn RGB into grayscale


@dataclass
class ScanImage:
    """A scan as read from its file: float32 pixels plus what is known about them.

    layout: "gray" (H, W), "color" (H, W, 3) or "volume" (D, H, W).
    nominal_range: the value range the file format implies (0..255 for 8-bit, 0..1 after a DICOM
        window), or None when only the data itself says (CT in HU, float TIFF, NIfTI).
    spacing: physical pixel/voxel spacing in mm, in the same axis order as `pixels`, when known.
    """

    pixels: np.ndarray
    source: Path
    kind: str
    notes: list[str] = field(default_factory=list)
    spacing: Optional[tuple[float, ...]] = None
    layout: str = "gray"
    nominal_range: Optional[tuple[float, float]] = None

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


@dataclass
class PreparedInput:
    """A scan prepared for a model: the tensor, a grayscale display image aligned with it, and the notes."""

    tensor: torch.Tensor  # (1, C, *spatial) float32
    display: np.ndarray  # (H, W) or (D, H, W) float32 in [0, 1], same spatial size as the tensor
    notes: list[str]
    scan: ScanImage
    spec: InputSpec


# --------------------------------------------------------------------------------------------- reading


def _kind_of(path: Path) -> str:
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
    except OSError:
        pass
    raise InputError(
        f"{path}: unsupported file type {path.suffix or '(no extension)'!r}. medlens reads {SUPPORTED}; "
        f"convert the image to one of these formats."
    )


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file. Check the path (relative paths start from {Path.cwd()}).")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: the file cannot be read (permission denied); check its permissions.")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; re-export or re-copy the image.")


def _check_side_limit(path: Path, shape: Sequence[int], volume: bool) -> None:
    n = int(np.prod([int(s) for s in shape], dtype=np.int64))
    limit = HARD_VOXELS_3D if volume else HARD_PIXELS_2D
    if n > limit:
        what = "volume" if volume else "image"
        raise InputError(
            f"{path}: the {what} is {' x '.join(map(str, shape))} = {n:,} {'voxels' if volume else 'pixels'}, above medlens's "
            f"limit of {limit:,} (HARD_{'VOXELS_3D' if volume else 'PIXELS_2D'}); crop or downsample it first."
        )
    hard = HARD_SIDE_3D if volume else HARD_SIDE_2D
    if max(shape) > hard:
        what = "volume" if volume else "image"
        raise InputError(
            f"{path}: the {what} is {' x '.join(map(str, shape))} and medlens refuses {what}s with a side above "
            f"{hard} (limit HARD_SIDE_{'3D' if volume else '2D'}={hard}); crop or downsample it first."
        )


def _downsample_if_needed(scan: ScanImage) -> ScanImage:
    volume = scan.is_volume
    limit = MAX_SIDE_3D if volume else MAX_SIDE_2D
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
    scan.notes.append(
        f"the {'volume' if volume else 'image'} was {' x '.join(map(str, shape))}, above the {limit}-per-side limit; "
        f"downsampled (area average) to {' x '.join(map(str, new))}"
    )
    return scan


def _finite_check(scan: ScanImage) -> None:
    finite = np.isfinite(scan.pixels)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(
            f"{scan.source}: {bad} pixel(s) are NaN or infinite; medlens cannot explain an image with undefined "
            f"values. Replace them (e.g. numpy.nan_to_num) and save the image again."
        )


def _finish_raster(arr: np.ndarray, path: Path, kind: str, notes: list[str], nominal: Optional[tuple[float, float]]) -> ScanImage:
    """Common to Pillow and tifffile: alpha dropped, equal RGB channels read as gray, float32 pixels."""
    pixels = arr.astype(np.float32)
    if pixels.ndim == 3:
        if pixels.shape[2] in (2, 4):  # gray+alpha or RGB+alpha: the alpha channel is dropped
            pixels = pixels[..., : pixels.shape[2] - 1]
            notes.append("alpha channel dropped")
        if pixels.shape[2] == 1:
            pixels = pixels[..., 0]
        elif pixels.shape[2] != 3:
            raise InputError(f"{path}: the image has {arr.shape[2]} channels; medlens reads grayscale, RGB and RGBA images.")
    if pixels.ndim == 3 and np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2]):
        pixels = np.ascontiguousarray(pixels[..., 0])
        notes.append("an RGB file with equal channels was read as grayscale")
    if pixels.ndim not in (2, 3):
        raise InputError(f"{path}: the image has shape {arr.shape}; medlens reads 2-D grayscale or colour images.")
    layout = "color" if pixels.ndim == 3 else "gray"
    return ScanImage(np.ascontiguousarray(pixels), path, kind, notes, None, layout, nominal)


def _nominal_of(dtype: np.dtype, notes: list[str]) -> Optional[tuple[float, float]]:
    if dtype == np.uint8:
        return (0.0, 255.0)
    if dtype == np.uint16:
        notes.append("16-bit image")
        return (0.0, 65535.0)
    return None


def _read_tiff(path: Path, frame: Optional[int]) -> Optional[ScanImage]:
    """TIFF through tifffile (all bit depths, planar RGB, pages, MINISWHITE), or None to let Pillow try."""
    try:
        import tifffile
    except ImportError:
        return None
    notes: list[str] = []
    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            axes, shape = series.axes, tuple(series.shape)
            if "Y" not in axes or "X" not in axes:
                return None
            _check_side_limit(path, (shape[axes.index("Y")], shape[axes.index("X")]), volume=False)
            photometric = getattr(tf.pages[0].photometric, "name", str(tf.pages[0].photometric)).upper()
            if photometric not in ("MINISBLACK", "MINISWHITE", "RGB"):
                return None  # palette, YCbCr, CMYK ...: Pillow converts those
            arr = np.asarray(series.asarray())
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - tifffile could not read it: Pillow tries, and reports if it cannot
        return None
    if "S" in axes:
        arr = np.moveaxis(arr, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    leading = axes.index("Y")
    if leading:
        arr = arr.reshape((-1,) + arr.shape[leading:])
        n_frames = arr.shape[0]
        if frame is not None:
            if not 0 <= frame < n_frames:
                raise InputError(f"{path}: frame {frame} does not exist; the file has {n_frames} frame(s) (0..{n_frames - 1}).")
            arr = arr[frame]
            notes.append(f"frame {frame} of {n_frames}")
        else:
            arr = arr[0]
            if n_frames > 1:
                notes.append(f"the file has {n_frames} frames; the first was used (choose another with frame=/--frame)")
    elif frame not in (None, 0):
        raise InputError(f"{path}: frame {frame} does not exist; the file has 1 frame (0).")
    nominal = _nominal_of(arr.dtype, notes)
    if photometric == "MINISWHITE" and arr.ndim == 2:
        low, high = nominal if nominal else (float(arr.min()), float(arr.max()))
        arr = (low + high) - arr.astype(np.float64)
        notes.append("MINISWHITE TIFF: intensities inverted so that bright means dense")
    return _finish_raster(arr, path, "tiff", notes, nominal)


def _read_raster(path: Path, kind: str, frame: Optional[int]) -> ScanImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if kind == "tiff":
        scan = _read_tiff(path, frame)
        if scan is not None:
            return scan
    notes: list[str] = []
    try:
        with warnings.catch_warnings():  # medlens applies its own size limits (below), in the user's terms
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable {kind.upper()} image (the file is corrupt or has the wrong extension); re-export it.") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open the image ({exc}); check the file.") from None
    with img:
        width, height = img.size
        _check_side_limit(path, (height, width), volume=False)
        n_frames = getattr(img, "n_frames", 1)
        if frame is not None:
            if not 0 <= frame < n_frames:
                raise InputError(f"{path}: frame {frame} does not exist; the file has {n_frames} frame(s) (0..{n_frames - 1}).")
            img.seek(frame)
            notes.append(f"frame {frame} of {n_frames}")
        elif n_frames > 1:
            notes.append(f"the file has {n_frames} frames; the first was used (choose another with frame=/--frame)")
        try:
            if kind == "jpeg":
                img = ImageOps.exif_transpose(img)
            mode = img.mode
            if mode in ("P", "PA"):
                img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                img = img.convert("RGB")
            elif mode == "1":
                img = img.convert("L")
            arr = np.asarray(img)
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"{path}: the image data cannot be decoded ({exc}); the file may be truncated or corrupt.") from None
    return _finish_raster(arr, path, kind, notes, _nominal_of(arr.dtype, notes))


def _dicom_window(ds: Any, window: Any, notes: list[str]) -> Optional[tuple[float, float]]:
    if window is False or window is None:
        return None
    if isinstance(window, (tuple, list)):
        center, width = float(window[0]), float(window[1])
        notes.append(f"window center {center:g}, width {width:g} (given)")
        return center, width
    if "WindowCenter" in ds and "WindowWidth" in ds:

        def first(v: Any) -> float:
            try:
                return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else float(v)
            except TypeError:
                return float(v)

        center, width = first(ds.WindowCenter), first(ds.WindowWidth)
        if width >= 1:
            notes.append(f"window center {center:g}, width {width:g} (from the file)")
            return center, width
        notes.append(f"the file's window (center {center:g}, width {width:g}) was not used: a width below 1 is not "
                     f"valid DICOM; intensities are scaled over the image's range instead")
    return None


def _apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, output scaled to [0, 1]."""
    if function.upper() == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function.upper() == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0).astype(np.float32)
    if width <= 1:
        return (values > center - 0.5).astype(np.float32)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)


def _apply_voi_lut_sequence(values: np.ndarray, item: Any) -> np.ndarray:
    descriptor = [int(v) for v in item.LUTDescriptor]
    n_entries = descriptor[0] or 65536
    first_mapped = descriptor[1]
    bits = descriptor[2]
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        # OW data: 16-bit words per entry (even for 8-bit LUTs); fall back to bytes when the length says so
        lut = np.frombuffer(data, dtype="<u2" if len(data) >= 2 * n_entries else np.uint8)
    else:
        lut = np.asarray(data if hasattr(data, "__len__") else [data])
    lut = lut.astype(np.float32)[:n_entries]
    index = np.clip(np.round(values - first_mapped), 0, len(lut) - 1).astype(np.int64)
    top = float(2**bits - 1) if bits else float(lut.max() or 1.0)
    return (lut[index] / top).astype(np.float32)


def _shared_functional_groups(ds: Any) -> dict[str, Any]:
    """Rescale and window of an enhanced multi-frame DICOM, from its shared functional groups (if any)."""
    found: dict[str, Any] = {}
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not shared:
        return found
    group = shared[0]
    transform = group.get("PixelValueTransformationSequence")
    if transform:
        for key in ("RescaleSlope", "RescaleIntercept"):
            if key in transform[0]:
                found[key] = transform[0][key].value
    voi = group.get("FrameVOILUTSequence")
    if voi and "WindowCenter" in voi[0] and "WindowWidth" in voi[0]:
        found["WindowCenter"], found["WindowWidth"] = voi[0].WindowCenter, voi[0].WindowWidth
    return found


def _read_dicom(path: Path, frame: Optional[int], window: Any) -> ScanImage:
    try:
        return _read_dicom_dataset(path, frame, window)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # A header value that does not parse (RescaleSlope "x", NumberOfFrames "x", a window centre "ab"...).
        raise InputError(
            f"{path}: a DICOM header value could not be read ({type(exc).__name__}: {exc}); the file is not valid "
            f"DICOM. Re-export it from the PACS or viewer, or fix the named attribute."
        ) from None


def _read_dicom_dataset(path: Path, frame: Optional[int], window: Any) -> ScanImage:
    import pydicom
    from pydicom.errors import InvalidDicomError

    notes: list[str] = []
    try:
        with warnings.catch_warnings():  # pydicom warns about every oddity of a broken file; the error says it all
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InputError(
            f"{path}: not a valid DICOM file ({type(exc).__name__}: {exc}). The file may be corrupt or truncated; "
            f"re-export it from the PACS or viewer."
        ) from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if "SOPClassUID" not in ds and "Modality" not in ds and "Rows" not in ds:
            raise InputError(
                f"{path}: not a valid DICOM file (no standard DICOM attributes and no pixel data could be read); it is "
                f"corrupt or truncated. Re-export it from the PACS or viewer."
            )
        sop_class = str(getattr(getattr(ds, "SOPClassUID", None), "name", "") or "")
        if ("Rows" in ds and "Columns" in ds) or "Image" in sop_class:  # an image's header without its pixels
            what = f"a {ds.get('Rows')} x {ds.get('Columns')} image" if "Rows" in ds else f"an image ({sop_class})"
            raise InputError(f"{path}: the DICOM header describes {what} but the file holds no pixel data; it is "
                             f"probably truncated. Re-export it from the PACS or viewer.")
        raise InputError(f"{path}: the DICOM file holds no image (no PixelData); it may be a report or structured document.")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is not None and not 0 <= frame < n_frames:
        raise InputError(f"{path}: frame {frame} does not exist; the file has {n_frames} frame(s) (0..{n_frames - 1}).")
    volume = n_frames > 1 and frame is None
    _check_side_limit(path, (n_frames, rows, cols) if volume else (rows, cols), volume=volume)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken or unsupported pixel data
        raise InputError(
            f"{path}: the DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc}). The file may be corrupt, or "
            f"compressed with a codec that needs an extra package (e.g. pip install pylibjpeg pylibjpeg-libjpeg)."
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    color = samples > 1
    if n_frames > 1:
        if frame is not None:
            arr = arr[frame]
            notes.append(f"frame {frame} of {n_frames}")
        else:
            notes.append(f"multi-frame DICOM: {n_frames} frames read as a volume")
    values = arr.astype(np.float32)
    nominal: Optional[tuple[float, float]] = None
    if color:
        if volume:
            raise InputError(f"{path}: a multi-frame colour DICOM cannot be read as a volume; choose one frame (frame=/--frame).")
        notes.append(f"colour DICOM ({photometric}) read as RGB")
        bits = int(ds.get("BitsStored", 8) or 8)
        nominal = (0.0, float(2**bits - 1))
        layout = "color"
    else:
        groups = _shared_functional_groups(ds)
        slope = float(ds.get("RescaleSlope", groups.get("RescaleSlope", 1)) or 1)
        intercept = float(ds.get("RescaleIntercept", groups.get("RescaleIntercept", 0)) or 0)
        if "WindowCenter" not in ds and "WindowCenter" in groups:
            ds.WindowCenter, ds.WindowWidth = groups["WindowCenter"], groups["WindowWidth"]
        if slope != 1 or intercept != 0:
            values = values * np.float32(slope) + np.float32(intercept)
            notes.append(f"rescale slope {slope:g} and intercept {intercept:g} applied")
        voi = ds.get("VOILUTSequence")
        if window is True and voi:
            values = _apply_voi_lut_sequence(values, voi[0])
            notes.append("VOI LUT from the file applied")
            nominal = (0.0, 1.0)
        else:
            win = _dicom_window(ds, window, notes)
            if win is not None:
                values = _apply_window(values, *win, function=str(ds.get("VOILUTFunction", "LINEAR")))
                nominal = (0.0, 1.0)
            elif slope == 1 and intercept == 0 and int(ds.get("PixelRepresentation", 0) or 0) == 0:
                bits = int(ds.get("BitsStored", 16) or 16)
                nominal = (0.0, float(2**bits - 1))  # stored values of an unsigned image: 0 .. 2^BitsStored - 1
        if photometric == "MONOCHROME1":
            if nominal is not None:
                values = nominal[0] + nominal[1] - values
            else:
                values = float(values.min()) + float(values.max()) - values
            notes.append("MONOCHROME1: intensities inverted so that bright means dense")
        layout = "volume" if volume else "gray"
    spacing: Optional[tuple[float, ...]] = None
    if "PixelSpacing" in ds:
        try:
            row_sp, col_sp = (float(v) for v in ds.PixelSpacing)
            if volume:
                depth = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
                spacing = (depth, row_sp, col_sp)
            else:
                spacing = (row_sp, col_sp)
        except (TypeError, ValueError):
            spacing = None
    modality = str(ds.get("Modality", "")).strip()
    if modality:
        notes.append(f"DICOM modality {modality}")
    return ScanImage(np.ascontiguousarray(values, dtype=np.float32), path, "dicom", notes, spacing, layout, nominal)


def _read_dicom_series(folder: Path, window: Any) -> ScanImage:
    """A folder holding one DICOM series (one file per slice) as a volume, slices sorted by position."""
    import pydicom

    headers = []
    for f in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(f), stop_before_pixels=True)
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
    shapes = {(int(ds.Rows), int(ds.Columns)) for _, ds in items}
    if len(shapes) > 1:
        raise InputError(f"{folder}: the slices have different sizes {sorted(shapes)}; they do not form one volume.")
    rows, cols = shapes.pop()
    _check_side_limit(folder, (len(items), rows, cols), volume=True)

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
    first = _read_dicom(ordered[0], None, window)
    fixed = window
    if window is True:
        win = _dicom_window(pydicom.dcmread(str(ordered[0]), stop_before_pixels=True), True, [])
        fixed = win if win is not None else False
    planes = [first.pixels]
    for f in ordered[1:]:
        scan = _read_dicom(f, None, fixed)
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
    return ScanImage(pixels, folder, "dicom-series", notes, spacing, "volume", first.nominal_range)


def _read_nifti(path: Path, frame: Optional[int]) -> ScanImage:
    import nibabel as nib

    notes: list[str] = []
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for broken headers
        raise InputError(f"{path}: not a valid NIfTI file ({type(exc).__name__}: {exc}); re-export it.") from None
    if len(shape) < 2 or len(shape) > 4:
        raise InputError(f"{path}: the NIfTI image has {len(shape)} dimensions {shape}; medlens reads 2-D, 3-D or 4-D (first volume) images.")
    # One slice along any axis: the usual way to keep a 2-D image in NIfTI (axial, coronal or sagittal).
    flat = len(shape) >= 3 and sorted(shape[:3])[0] == 1 and sorted(shape[:3])[1] > 1
    in_plane = tuple(s for s in shape[:3] if s != 1) if flat else shape[:3]
    _check_side_limit(path, in_plane, volume=not flat and len(shape) >= 3)
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
        if flat and data.ndim == 3 and 1 in data.shape:
            # after reorientation to RAS the slice axis may have moved: drop it wherever it is
            axis = data.shape.index(1)
            data = np.take(data, 0, axis=axis)
            zooms = tuple(z for a, z in enumerate(zooms) if a != axis)
            notes.append(f"NIfTI with a single {('sagittal', 'coronal', 'axial')[axis]} slice: read as a 2-D image")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: the NIfTI voxel data cannot be read ({type(exc).__name__}: {exc}); the file may be truncated.") from None
    if data.ndim == 2:
        pixels = np.ascontiguousarray(data.T[::-1])
        return ScanImage(pixels.astype(np.float32), path, "nifti", notes, (zooms[1], zooms[0]), "gray", None)
    # canonical RAS (x, y, z) -> (z, y, x), anterior (high y) at the top of each axial slice
    pixels = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, :], dtype=np.float32)
    notes.append("NIfTI reoriented to canonical RAS; volume axes (z, y, x), anterior at the top of axial slices")
    spacing = (zooms[2], zooms[1], zooms[0])
    return ScanImage(pixels, path, "nifti", notes, spacing, "volume", None)


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
        _check_file(path)
        kind = _kind_of(path)
    if kind == "dicom-series":
        scan = _read_dicom_series(path, window)
    elif kind == "dicom":
        scan = _read_dicom(path, frame, window)
    elif kind == "nifti":
        scan = _read_nifti(path, frame)
    else:
        scan = _read_raster(path, kind, frame)
    if scan.pixels.size == 0:
        raise InputError(f"{path}: the image has no pixels (shape {scan.pixels.shape}).")
    _finite_check(scan)
    if slice_index is not None:
        scan = take_slice(scan, slice_index)
    return _downsample_if_needed(scan)


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
    return ScanImage(
        np.ascontiguousarray(scan.pixels[index]), scan.source, scan.kind, scan.notes + [note], spacing, "gray", scan.nominal_range
    )


# --------------------------------------------------------------------------------------------- preparing


def model_dims(model: Any) -> int:
    """2 or 3: the spatial dimensionality a model takes (its spec's size, else its first convolution)."""
    spec = getattr(model, "input_spec", None)
    if spec is not None and spec.size:
        return len(spec.size)
    conv = first_convolution(model) if model is not None else None
    if conv is not None:
        weight = getattr(conv, "weight", None)
        if weight is not None and weight.dim() == 5:
            return 3
    return 2


def spec_for(model: Any) -> InputSpec:
    """The model's `input_spec`, or one inferred from its first convolution (channels, 2-D/3-D)."""
    if model is None:
        return InputSpec()
    spec = getattr(model, "input_spec", None)
    if isinstance(spec, InputSpec):
        return spec
    if isinstance(spec, dict):
        return InputSpec.from_dict(spec)
    conv = first_convolution(model)
    channels = 1
    if conv is not None and getattr(conv, "weight", None) is not None:
        channels = int(conv.weight.shape[1]) * int(getattr(conv, "groups", 1) or 1)
    return InputSpec(channels=channels)


def _scale(values: np.ndarray, scan: ScanImage, scale: str, notes: list[str]) -> np.ndarray:
    if scale == "none":
        return values
    if scale == "uint8" and scan.nominal_range is not None:
        lo, hi = scan.nominal_range
        return (values - lo) / (hi - lo)
    if scale == "uint8":
        notes.append("the model expects 8-bit intensities but the file has no nominal range; min-max scaling was used")
    elif scale != "minmax":
        raise InputError(f"unknown intensity scale {scale!r} in the model's input spec; use 'minmax', 'uint8' or 'none'.")
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        notes.append("the image is constant; it was scaled to zeros")
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


def box_weights(n_in: int, n_out: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n_out, n_in) weights of Pillow's BOX filter along one axis: output pixel i is the mean of the input
    pixels j whose centres fall in its footprint, -1/2 < (j + 1/2 - c) / f <= 1/2 with c = (i + 1/2) s,
    s = n_in / n_out and f = max(s, 1) (when enlarging: the input pixel under c). Rows sum to 1."""
    s = n_in / n_out
    f = max(s, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * s
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    v = (j - centre + 0.5) * (1.0 / f)
    lo = (centre - 0.5 * f + 0.5).floor().clamp_min(0)  # Pillow's xmin / xmax window, same rounding
    hi = (centre + 0.5 * f + 0.5).floor().clamp_max(n_in)
    inside = ((v > -0.5) & (v <= 0.5) & (j >= lo) & (j < hi)).to(torch.float64)
    return (inside / inside.sum(dim=1, keepdim=True)).to(dtype)


def box_resize(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """t: (N, C, *spatial) -> (N, C, *size) by Pillow's BOX filter, axis by axis (2-D and 3-D), in float."""
    out = t
    for axis, n_out in enumerate(size):
        dim = 2 + axis
        n_in = out.shape[dim]
        if n_in == n_out:
            continue
        w = box_weights(n_in, n_out, out.dtype).to(out.device)
        out = torch.movedim(torch.movedim(out, dim, -1) @ w.T, -1, dim)
    return out.contiguous()


def _resize(t: torch.Tensor, size: tuple[int, ...], resample: str = "bilinear") -> torch.Tensor:
    """t: (N, C, *spatial) float32 -> resized as the spec's `resample` says ("area": Pillow's BOX filter;
    "bilinear": bilinear with antialias in 2-D, area average when shrinking and trilinear when enlarging in 3-D)."""
    if tuple(t.shape[2:]) == tuple(size):
        return t
    if resample == "area":
        return box_resize(t, size)
    if len(size) == 2:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    if all(n <= s for n, s in zip(size, t.shape[2:])):
        return F.interpolate(t, size=size, mode="area")
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)


def prepare(scan: ScanImage, spec: Optional[InputSpec] = None, *, dims: Optional[int] = None, slice_index: Optional[int] = None) -> PreparedInput:
    """Prepare a read scan for a model's input spec: slice/volume, channels, size, intensity, normalisation."""
    spec = spec or InputSpec()
    notes = list(scan.notes)
    dims = dims or (len(spec.size) if spec.size else 2)
    if dims == 3:
        if not scan.is_volume:
            raise InputError(
                f"{scan.source}: the model takes 3-D volumes, but this file holds a 2-D image {scan.spatial_shape}; "
                f"give a NIfTI or multi-frame DICOM volume."
            )
        if slice_index is not None:
            notes.append(f"slice {slice_index} was asked for, but the model takes whole volumes; the volume was used")
    elif scan.is_volume:
        scan = take_slice(scan, slice_index)
        notes = list(scan.notes)
    elif slice_index is not None:
        notes.append(f"slice {slice_index} was asked for, but the file is a 2-D image; it was used whole")

    channels = int(spec.channels)
    if scan.layout == "color" and channels == 1:
        values = scan.grayscale()
        notes.append("RGB converted to grayscale (BT.601 luma) because the model takes 1 channel")
        stack = values[None]
    elif scan.layout == "color":
        if channels != 3:
            raise InputError(f"{scan.source}: an RGB image cannot be given to a model that takes {channels} channels.")
        stack = np.moveaxis(scan.pixels, -1, 0)
    else:
        stack = scan.pixels[None]
    t = torch.from_numpy(np.ascontiguousarray(stack.astype(np.float32)))[None]  # (1, c, *spatial)
    if spec.size:  # resize first, so a min-max scale sees exactly the pixels the model gets
        size = tuple(int(s) for s in spec.size)
        if len(size) != dims:
            raise InputError(f"the model's input size {size} does not match a {dims}-D input.")
        old = tuple(t.shape[2:])
        if old != size:
            ratio_old = old[-1] / old[-2]
            ratio_new = size[-1] / size[-2]
            t = _resize(t, size, spec.resample)
            note = f"resized from {' x '.join(map(str, old))} to {' x '.join(map(str, size))}"
            note += " (box filter)" if spec.resample == "area" else ""
            if abs(ratio_old / ratio_new - 1) > 0.01:
                note += " (aspect ratio changed)"
            notes.append(note)
    scaled = _scale(t[0].numpy(), scan, spec.scale, notes).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(scaled))[None]
    display_src = t.mean(dim=1)[0] if t.shape[1] > 1 else t[0, 0]
    display = display_src.numpy().astype(np.float32)
    lo, hi = float(display.min()), float(display.max())
    display = (display - lo) / (hi - lo) if hi > lo else np.zeros_like(display)
    if t.shape[1] == 1 and channels > 1:
        t = t.repeat(1, channels, *([1] * dims))
        notes.append(f"grayscale repeated to {channels} channels because the model takes {channels}")
    elif t.shape[1] != channels:
        raise InputError(f"{scan.source}: the image has {t.shape[1]} channel(s) but the model takes {channels}.")
    mean = torch.tensor(spec._per_channel(spec.mean), dtype=torch.float32)
    std = torch.tensor(spec._per_channel(spec.std), dtype=torch.float32)
    if mean.numel() != channels or std.numel() != channels:
        raise InputError(f"the model's input spec gives {mean.numel()} means / {std.numel()} stds for {channels} channels.")
    shape = (1, channels) + (1,) * dims
    if not (torch.all(mean == 0) and torch.all(std == 1)):
        t = (t - mean.view(shape)) / std.view(shape)
    return PreparedInput(t.contiguous().float(), display, notes, scan, spec)


def load_input(
    path: PathLike,
    model: Any = None,
    *,
    slice_index: Optional[int] = None,
    frame: Optional[int] = None,
    window: Any = True,
    spec: Optional[InputSpec] = None,
    return_notes: bool = False,
) -> Any:
    """Read an image or volume file and prepare it for `model`: a (1, C, *spatial) float32 tensor.

    With `model=None` the default spec keeps the size, uses 1 channel and min-max scaling. `spec=` overrides
    the model's. With `return_notes=True` returns `(tensor, notes)`, the notes being what loading did
    (for provenance). For the grayscale display image as well, use `prepare(read_image(path), spec)`.
    """
    use_spec = spec or spec_for(model)
    dims = len(use_spec.size) if use_spec.size else model_dims(model)
    scan = read_image(path, frame=frame, window=window)
    prepared = prepare(scan, use_spec, dims=dims, slice_index=slice_index)
    if return_notes:
        return prepared.tensor, prepared.notes
    return prepared.tensor


__all__ = [
    "HARD_PIXELS_2D",
    "HARD_SIDE_2D",
    "HARD_SIDE_3D",
    "MAX_SIDE_2D",
    "MAX_SIDE_3D",
    "PreparedInput",
    "ScanImage",
    "load_input",
    "model_dims",
    "prepare",
    "read_image",
    "spec_for",
    "take_slice",
]
