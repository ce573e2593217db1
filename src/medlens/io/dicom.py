"""Reading one DICOM file into a `ScanImage`: modality LUT, VOI LUT or window, MONOCHROME1, frames, colour.

Owns pydicom at the file edge: header checks before decoding, the decoders' errors, and the DICOM windowing rules.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medlens.errors import InputError
from medlens.io.limits import check_size
from medlens.io.scan import ScanImage


def dicom_window(ds: Any, window: Any, notes: list[str]) -> Optional[tuple[float, float]]:
    """The (center, width) to apply: the one given, the file's first valid one, or None (window=False or none valid)."""
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


def read_dicom(path: Path, frame: Optional[int], window: Any) -> ScanImage:
    try:
        return _read_dicom_dataset(path, frame, window)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        # A header value that does not parse (RescaleSlope "x", NumberOfFrames "x", a window centre "ab"...).
        raise InputError(
            f"{path}: a DICOM header value could not be read ({type(exc).__name__}: {exc}); the file is not valid "
            f"DICOM. Re-export it from the PACS or viewer, or fix the named attribute."
        ) from None


def _read_dicom_dataset(path: Path, frame: Optional[int], window: Any) -> ScanImage:
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
    check_size(path, (n_frames, rows, cols) if volume else (rows, cols), volume=volume)
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
            win = dicom_window(ds, window, notes)
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
