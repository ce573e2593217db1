"""Reading one DICOM file into a `ScanImage`: modality LUT, VOI LUT or window, MONOCHROME1, frames, colour.

Owns pydicom at the file edge: header checks before decoding, the decoders' errors, and the DICOM windowing rules.
"""
from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage

from medlens.errors import InputError
from medlens.io.dicom_geometry import frame_affines, patient_affine, pixel_spacing, stack_affine
from medlens.io.limits import check_size
from medlens.io.scan import ScanImage, one_line


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
    except (ValueError, TypeError, LookupError, AttributeError, OverflowError, NotImplementedError, struct.error,
            BytesLengthException) as exc:
        # A header value that does not parse (RescaleSlope "x", NumberOfFrames "x", a window centre "ab"...).
        raise InputError(
            f"{path}: a DICOM header value could not be read ({type(exc).__name__}: {one_line(exc)}); the file is not valid "
            f"DICOM. Re-export it from the PACS or viewer, or fix the named attribute."
        ) from None


def _dcmread(path: Path, notes: list[str]) -> Any:
    """The dataset, also from a file without the 128-byte preamble and "DICM" (ACR-NEMA style headers, still found in
    exports): read with force=True, and a transfer syntax assumed from how its header was encoded, as viewers do."""
    with warnings.catch_warnings():  # pydicom warns about every oddity of a broken file; the error says it all
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(str(path))
        except InvalidDicomError:
            ds = pydicom.dcmread(str(path), force=True)
    if len(ds) == 0 or not any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys()):
        raise InvalidDicomError("no DICOM preamble and no standard DICOM attributes")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        if implicit is None:
            implicit, little = True, True
        uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta.TransferSyntaxUID = uid
        notes.append(f"no DICOM preamble or file meta header (ACR-NEMA style): read as {uid.name}")
    return ds


PIXEL_MODULE = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")


def _pixel_header(path: Path, ds: Any, frame: Optional[int]) -> tuple[int, int, int, int, int]:
    """rows, columns, frames, samples per pixel and bits allocated, checked, and the claimed size checked against the
    limits before anything is decoded."""
    missing = [k for k in PIXEL_MODULE if k not in ds or ds[k].value in (None, "")]
    if "PhotometricInterpretation" in missing and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        ds.PhotometricInterpretation = "MONOCHROME2"  # ACR-NEMA files often omit it; one sample means grayscale
        missing.remove("PhotometricInterpretation")
    if "SamplesPerPixel" in missing and "SamplesPerPixel" not in ds:
        ds.SamplesPerPixel = 1
        missing.remove("SamplesPerPixel")
    if missing:
        raise InputError(f"{path}: the DICOM header lacks {', '.join(missing)}, needed to decode its pixels; the file is "
                         f"incomplete. Re-export it from the PACS or viewer.")
    rows, cols = int(ds.Rows), int(ds.Columns)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
    if rows <= 0 or cols <= 0 or n_frames <= 0 or samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise InputError(f"{path}: the DICOM header gives an impossible image ({rows} x {cols}, {n_frames} frame(s), "
                         f"{samples} samples of {bits} bits); the file is corrupt. Re-export it from the PACS or viewer.")
    if frame is not None and not 0 <= frame < n_frames:
        raise InputError(f"{path}: frame {frame} does not exist; the file has {n_frames} frame(s) (0..{n_frames - 1}).")
    # all frames are decoded (then one kept): bits as stored plus float32 copies while windowing
    check_size(path, (n_frames, rows, cols) if n_frames > 1 else (rows, cols), volume=n_frames > 1,
               bytes_per_value=samples * (max(bits, 8) / 8 + 8))
    return rows, cols, n_frames, samples, bits


def _decode_error(path: Path, ds: Any, exc: BaseException) -> InputError:
    """Why pixel data could not be decoded, in one line: a missing decoder (and what to install) or damaged data."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(ts, "name", str(ts))
    try:
        decoder = get_decoder(ts) if ts is not None else None
    except (NotImplementedError, ValueError):
        decoder = None
    if ts is not None and getattr(ts, "is_compressed", False) and (decoder is None or not decoder.is_available):
        return InputError(f"{path}: the pixel data is compressed as {name}, and no installed decoder reads it; install "
                          f"medlens's DICOM decoders again (pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls "
                          f"python-gdcm, or pylibjpeg-libjpeg, GPL) or re-export the file uncompressed.")
    return InputError(f"{path}: the DICOM pixel data ({name}) cannot be decoded ({type(exc).__name__}: {one_line(exc)}); "
                      f"the file is corrupt or truncated. Re-export it from the PACS or viewer.")


def _read_dicom_dataset(path: Path, frame: Optional[int], window: Any) -> ScanImage:
    """The steps of reading: header, pixel checks, decoding, intensities, geometry, the header kept for outputs."""
    notes: list[str] = []
    ds = _open(path, notes)
    _refuse_without_pixels(path, ds)
    rows, cols, n_frames, samples, bits = _pixel_header(path, ds, frame)
    volume = n_frames > 1 and frame is None
    if volume and samples > 1:  # refused before decoding: a colour volume is not something medlens explains
        raise InputError(f"{path}: a multi-frame colour DICOM cannot be read as a volume; choose one frame (frame=/--frame).")
    arr = _decode(path, ds)
    _check_decoded_shape(path, arr, rows, cols, n_frames, samples)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    stored = int(ds.get("BitsStored", bits) or bits)
    stored = stored if 1 <= stored <= bits else bits  # a BitsStored above BitsAllocated is not valid DICOM
    if photometric == "PALETTE COLOR":  # stored values are indices into the file's colour tables
        arr, stored, samples = _apply_palette(path, ds, arr, volume, notes)
    if n_frames > 1:
        if frame is not None:
            arr = arr[frame]
            notes.append(f"frame {frame} of {n_frames}")
        else:
            notes.append(f"multi-frame DICOM: {n_frames} frames read as a volume")
    values = arr.astype(np.float32)
    if samples > 1:
        notes.append(f"colour DICOM ({photometric}) read as RGB")
        nominal: Optional[tuple[float, float]] = (0.0, float(2**stored - 1))
        layout = "color"
    else:
        values, nominal = _grayscale(ds, values, window, stored, photometric, notes)
        layout = "volume" if volume else "gray"
    spacing, affine = _geometry(ds, volume, frame, n_frames, notes)
    modality = str(ds.get("Modality", "")).strip()
    if modality:
        notes.append(f"DICOM modality {modality}")
    header = ds.copy()
    for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if key in header:
            delattr(header, key)
    return ScanImage(np.ascontiguousarray(values, dtype=np.float32), path, "dicom", notes, spacing, layout, nominal,
                     affine, (header,))


def _open(path: Path, notes: list[str]) -> Any:
    try:
        return _dcmread(path, notes)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged headers (even NotImplementedError)
        raise InputError(f"{path}: not a valid DICOM file ({type(exc).__name__}: {one_line(exc)}). The file may be corrupt "
                         f"or truncated; re-export it from the PACS or viewer.") from None


def _refuse_without_pixels(path: Path, ds: Any) -> None:
    """A DICOMDIR, a report, a header without its pixels: each refused with what it is."""
    if "PixelData" in ds or "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        return
    if "DirectoryRecordSequence" in ds or str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage:
        raise InputError(f"{path} is a DICOMDIR, an index of the DICOM files on a disc or folder, not an image; give "
                         f"one of the image files it lists, or the folder holding one series.")
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


def _decode(path: Path, ds: Any) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom and its plugins raise many types for broken or unsupported data
        raise _decode_error(path, ds, exc) from None
    except BaseException as exc:  # a Rust decoder (pylibjpeg-rle) panics on some damaged data: pyo3's PanicException
        if type(exc).__name__ != "PanicException":
            raise
        raise _decode_error(path, ds, exc) from None


def _check_decoded_shape(path: Path, arr: np.ndarray, rows: int, cols: int, n_frames: int, samples: int) -> None:
    """The decoded array must be what the header says: pydicom counts frames from the data's length when
    NumberOfFrames is missing or wrong, and a volume posing as one image must not reach a 2-D model."""
    expected = (rows, cols) + ((samples,) if samples > 1 else ())
    expected = ((n_frames,) if n_frames > 1 else ()) + expected
    if tuple(arr.shape) != expected:
        raise InputError(f"{path}: the pixel data holds an array of shape {tuple(arr.shape)}, but the header describes "
                         f"{' x '.join(map(str, expected))} (NumberOfFrames {n_frames}); the header does not match the "
                         f"pixels. Fix NumberOfFrames or re-export the file from the PACS or viewer.")


def _apply_palette(path: Path, ds: Any, arr: np.ndarray, volume: bool, notes: list[str]) -> tuple[np.ndarray, int, int]:
    try:
        arr = apply_color_lut(arr, ds)
        stored = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:  # noqa: BLE001 - missing or damaged palette tables
        raise InputError(f"{path}: a PALETTE COLOR image whose colour tables cannot be used ({type(exc).__name__}: "
                         f"{one_line(exc)}); re-export it as RGB or grayscale.") from None
    notes.append("PALETTE COLOR: the file's colour tables applied")
    if volume:
        raise InputError(f"{path}: a multi-frame colour DICOM cannot be read as a volume; choose one frame (frame=/--frame).")
    return arr, (stored if stored in (8, 16) else 16), 3


def _grayscale(ds: Any, values: np.ndarray, window: Any, stored: int, photometric: str,
               notes: list[str]) -> tuple[np.ndarray, Optional[tuple[float, float]]]:
    """Modality LUT, then VOI LUT or window, then MONOCHROME1 inverted: the values and their nominal range."""
    nominal: Optional[tuple[float, float]] = None
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
            nominal = (0.0, float(2**stored - 1))  # stored values of an unsigned image: 0 .. 2^BitsStored - 1
    if photometric == "MONOCHROME1":
        if nominal is not None:
            values = nominal[0] + nominal[1] - values
        else:
            values = float(values.min()) + float(values.max()) - values
        notes.append("MONOCHROME1: intensities inverted so that bright means dense")
    return values, nominal


def _geometry(ds: Any, volume: bool, frame: Optional[int], n_frames: int,
              notes: list[str]) -> tuple[Optional[tuple[float, ...]], Optional[np.ndarray]]:
    """Pixel spacing (in `pixels` axis order) and affine: of the image, of the chosen frame, or of the whole stack
    of a multi-frame file (enhanced functional groups, RT Dose frame offsets)."""
    frames = frame_affines(ds, n_frames) if n_frames > 1 else None
    if n_frames > 1 and frame is not None:
        affine = frames[frame] if frames else None
    elif volume:
        affine = stack_affine(frames, notes) if frames else None
    else:
        affine = patient_affine(ds)
    plane = pixel_spacing(ds)
    if plane is None and frames:
        plane = (float(np.linalg.norm(frames[0][:3, 0])), float(np.linalg.norm(frames[0][:3, 1])))
    if plane is None and "PixelSpacing" in ds:
        notes.append(f"PixelSpacing {ds.get('PixelSpacing')!s} is not a usable spacing (zero, negative or damaged): "
                     f"the image is treated as having no physical spacing")
    if plane is None:
        return None, affine
    if not volume:
        return plane, affine
    if affine is not None:
        depth = float(np.linalg.norm(affine[:3, 0]))
    else:
        try:
            depth = abs(float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)) or 1.0
        except (TypeError, ValueError):
            depth = 1.0
    return (depth, *plane), affine
