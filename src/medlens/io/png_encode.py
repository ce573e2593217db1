"""PNG encoding for medlens's pictures: 8-bit gray, RGB or RGBA arrays to PNG bytes, every row "Up"-filtered and
deflated at level 1 (with Intel's ISA-L deflate, the `isal` package, where it is installed; else zlib).

Why not Pillow's encoder: it tries each PNG filter on every row and keeps the best, which costs more than the
compression itself; on a 512 x 512 RGB overlay Pillow at level 1 took 16.3 ms, this 7.8 ms with zlib and 2.0 ms with
ISA-L, files within 1.4 % of Pillow's size (`benchmarks/bench_png.py`); both deflates run without the GIL (the
batch writer thread's other work still takes it: docs/batch.md). The files are plain PNG (IHDR, one IDAT, IEND; no
metadata): `tests/test_writer_speed.py` reads them back with Pillow pixel for pixel.
"""
from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

from medlens.errors import OutputError

try:  # the same deflate format as zlib's, 4-5x faster at level 1; the pixels are the same either way
    from isal.isal_zlib import compress as _deflate
except ImportError:  # pragma: no cover - platforms without an isal wheel
    from zlib import compress as _deflate

_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: gray, RGB, RGBA
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_UP = 2  # PNG filter type "Up": each byte minus the byte above it


def encode_png(pixels: Any, level: int = 1) -> bytes:
    """PNG bytes of `pixels`: a uint8 array (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, or a PIL image in one
    of the modes L, RGB, RGBA.

    Args:
        pixels: the image.
        level: the deflate level, 0-3 (ISA-L's levels; zlib takes 0-9): 1 is fast, with files about the size of
            Pillow's at its level 1.

    Returns:
        The PNG file's bytes.

    Raises:
        OutputError: for an image that is not 8-bit gray, RGB or RGBA, or empty.
    """
    array = np.asarray(pixels)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] not in _COLOUR_TYPES or 0 in array.shape:
        raise OutputError(f"a PNG picture must be an 8-bit gray, RGB or RGBA image; got an array of shape "
                          f"{array.shape} and type {array.dtype}.")
    height, width, channels = array.shape
    rows = np.ascontiguousarray(array).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = _UP
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8: modulo 256, as the filter is defined
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", _deflate(filtered, level)),
                     _chunk(b"IEND", b"")))


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))  # over type and data, without first joining them (the IDAT is large)
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc & 0xFFFFFFFF)))
