"""PNG encoding for medlens's pictures: 8-bit gray, RGB or RGBA arrays to PNG bytes, every row "Up"-filtered (the
first "None") and deflated at level 1 (with Intel's ISA-L deflate, the `isal` package, where it is installed; else
zlib).

Why not Pillow's encoder: it tries each PNG filter on every row and keeps the best, which costs more than the
compression itself; on a 512 x 512 RGB overlay Pillow at level 1 took 16.3 ms, this 7.8 ms with zlib and 2.0 ms with
ISA-L, files within 1.4 % of Pillow's size (`benchmarks/bench_png.py`); both deflates run without the GIL (the
batch writer thread's other work still takes it: docs/batch.md). A picture is deflated as a `DeflatedRows` part,
ended on a byte boundary, so a picture made of others one under the other (the panel of one-target overlays) is
written from their parts without deflating its rows again (`png_from_parts`). The files are plain PNG (IHDR, one
IDAT, IEND; no metadata): `tests/test_writer_speed.py` and `tests/test_png_parts.py` read them back with Pillow
pixel for pixel.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from medlens.errors import OutputError

try:  # the same deflate format as zlib's, 4-5x faster at level 1; the pixels are the same either way
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _zlib = zlib

_COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: gray, RGB, RGBA
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_NONE, _UP = 0, 2  # PNG filter types: the bytes as they are; each byte minus the byte above it
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, no preset dictionary (a multiple of 31, as RFC 1950 asks)
_LAST_BLOCK = b"\x03\x00"  # an empty final block (fixed codes): ends a deflate stream of parts ended by sync flushes
_ADLER_BASE = 65521


@dataclass(frozen=True)
class DeflatedRows:
    """One picture's filtered rows, deflated as a run of blocks ended on a byte boundary (not a whole stream), so
    that the parts of pictures of one width and kind follow each other in one stream; with their Adler-32 and length.
    """

    width: int
    height: int
    channels: int
    deflated: bytes
    adler32: int
    length: int


def deflate_rows(pixels: Any, level: int = 1) -> DeflatedRows:
    """`pixels` (as `encode_png` takes them) filtered and deflated as a part of a PNG's image data.

    The first row is filtered "None" (its bytes as they are, what "Up" gives over the zero row above a picture's
    first), so a part is the same wherever it stands in a stack.

    Args:
        pixels: the image: uint8 (H, W), (H, W, 3) or (H, W, 4), or a PIL image in mode L, RGB or RGBA.
        level: the deflate level (see `encode_png`).

    Returns:
        The part: its size and kind, the deflated rows, their Adler-32 and their length before deflating.

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
    filtered[0, 0], filtered[1:, 0] = _NONE, _UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8: modulo 256, as the filter is defined
    compressor = _zlib.compressobj(level, _zlib.DEFLATED, -15)  # raw deflate: the zlib wrapper is added per file
    deflated = compressor.compress(filtered) + compressor.flush(_zlib.Z_SYNC_FLUSH)
    return DeflatedRows(width, height, channels, deflated, _zlib.adler32(filtered), filtered.size)


def png_from_parts(parts: Sequence[DeflatedRows]) -> bytes:
    """PNG bytes of the pictures of `parts` one under the other (all of one width and kind), their deflated rows
    joined in one stream without deflating them again.

    Args:
        parts: `deflate_rows` parts, top first.

    Returns:
        The PNG file's bytes (one IDAT; its zlib checksum over all the parts' rows).

    Raises:
        OutputError: for no parts, or parts of different widths or kinds.
    """
    if not parts or any((p.width, p.channels) != (parts[0].width, parts[0].channels) for p in parts):
        raise OutputError("a PNG is made of one or more parts of one width and kind.")
    checksum, length = 1, 0
    for part in parts:
        checksum, length = _adler32_combine(checksum, part.adler32, part.length), length + part.length
    data = b"".join([_ZLIB_HEADER, *(p.deflated for p in parts), _LAST_BLOCK, struct.pack(">I", checksum)])
    header = struct.pack(">IIBBBBB", parts[0].width, sum(p.height for p in parts), 8,
                         _COLOUR_TYPES[parts[0].channels], 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", data), _chunk(b"IEND", b"")))


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
    return png_from_parts([deflate_rows(pixels, level)])


def _adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings one after the other, from each one's and the second's length (as zlib's
    `adler32_combine`: the sum of the second's bytes is offset by the first's sum once per byte of the second)."""
    low = (first & 0xFFFF) + (second & 0xFFFF) - 1
    rest = second_length % _ADLER_BASE
    high = (first >> 16) + (second >> 16) + rest * (first & 0xFFFF) - rest
    return (low % _ADLER_BASE) | ((high % _ADLER_BASE) << 16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))  # over type and data, without first joining them (the IDAT is large)
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc & 0xFFFFFFFF)))
