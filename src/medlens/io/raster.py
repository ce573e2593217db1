"""Reading raster images (PNG, JPEG, TIFF, BMP) into a `ScanImage`, through Pillow and, for TIFF, tifffile.

Owns bit depths (8/16-bit nominal ranges), alpha, palettes, EXIF rotation, frames of multi-page files and MINISWHITE.
"""
from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medlens.errors import InputError
from medlens.io.limits import check_size
from medlens.io.scan import ScanImage, one_line


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
        import tifffile  # optional (comes with scikit-image): without it Pillow reads TIFF
    except ImportError:
        return None
    notes: list[str] = []
    try:
        with tifffile.TiffFile(str(path)) as tf:
            series = tf.series[0]
            axes, shape = series.axes, tuple(series.shape)
            if "Y" not in axes or "X" not in axes:
                return None
            height, width = shape[axes.index("Y")], shape[axes.index("X")]
            per_pixel = math.prod(shape) / max(1, height * width)  # pages and samples: all are decoded at once
            check_size(path, (height, width), volume=False, bytes_per_value=per_pixel * (series.dtype.itemsize + 4))
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


def _decode(img: Image.Image, path: Path, kind: str, frame: Optional[int], notes: list[str]) -> np.ndarray:
    """The pixels of an opened image (the chosen frame; palette, CMYK, YCbCr ... converted; EXIF rotation applied)."""
    n_frames = getattr(img, "n_frames", 1)
    if frame is not None:
        if not 0 <= frame < n_frames:
            raise InputError(f"{path}: frame {frame} does not exist; the file has {n_frames} frame(s) (0..{n_frames - 1}).")
        img.seek(frame)
        notes.append(f"frame {frame} of {n_frames}")
    elif n_frames > 1:
        notes.append(f"the file has {n_frames} frames; the first was used (choose another with frame=/--frame)")
    if kind == "jpeg":
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("P", "PA"):
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode == "1":
        img = img.convert("L")
    return np.asarray(img)


def read_raster(path: Path, kind: str, frame: Optional[int]) -> ScanImage:
    if kind == "tiff":
        scan = _read_tiff(path, frame)
        if scan is not None:
            return scan
    notes: list[str] = []
    try:
        with warnings.catch_warnings():  # medlens applies its own size limits (below), in the user's terms
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)  # reads the header only; Pillow's own bomb guard (MAX_IMAGE_PIXELS) stays on
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: {one_line(exc)} (Pillow's guard, PIL.Image.MAX_IMAGE_PIXELS); medlens refuses it before "
                         f"decoding. Crop or downsample it first.") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable {kind.upper()} image (the file is corrupt or has the wrong extension); re-export it.") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open the image ({one_line(exc)}); check the file.") from None
    except (ValueError, SyntaxError, struct.error, EOFError) as exc:  # broken headers Pillow does not wrap
        raise InputError(f"{path}: not a readable {kind.upper()} image ({type(exc).__name__}: {one_line(exc)}); the file is "
                         f"corrupt or truncated. Re-export it.") from None
    with img:
        width, height = img.size
        check_size(path, (height, width), volume=False, bytes_per_value=len(img.getbands()) * 8)
        try:
            arr = _decode(img, path, kind, frame, notes)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, TypeError, ...) for damaged files
            raise InputError(f"{path}: the image data cannot be decoded ({type(exc).__name__}: {one_line(exc)}); the file "
                             f"may be truncated or corrupt.") from None
    return _finish_raster(arr, path, kind, notes, _nominal_of(arr.dtype, notes))
