"""Size limits on scans, checked from a file's header before its pixels are decoded (decompression bombs included).

Owns the limits (module defaults, `MEDLENS_<NAME>` environment variables, `set_limits()`) and the one check `check_size`.

Defaults: a 2-D image side above `MAX_SIDE_2D` (volumes: `MAX_SIDE_3D`) is downsampled with a note; a side above
`HARD_SIDE_2D` (`HARD_SIDE_3D`), more than `HARD_PIXELS_2D` pixels (`HARD_VOXELS_3D` voxels), or more than
`HARD_BYTES` bytes of decoded data is refused before decoding. Override one for a process with the environment
(e.g. `MEDLENS_HARD_PIXELS_2D=300000000`) or in Python with `set_limits(hard_pixels_2d=...)` (None restores it).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence

from medlens.errors import InputError

MAX_SIDE_2D = 4096  # above this a 2-D image is downsampled (with a note)
HARD_SIDE_2D = 16384  # above this a 2-D image is refused
MAX_SIDE_3D = 512  # above this a volume is downsampled (with a note)
HARD_SIDE_3D = 2048  # above this a volume is refused
HARD_PIXELS_2D = 16384 * 8192  # more pixels than this (about 134 million) are refused
HARD_VOXELS_3D = 1024**3  # more voxels than this are refused
HARD_BYTES = 4 * 1024**3  # more decoded bytes than this (4 GiB, as the header claims them) are refused


@dataclass(frozen=True)
class SizeLimits:
    """The limits in force; each field has a module default and a `MEDLENS_<FIELD IN CAPITALS>` environment variable."""

    max_side_2d: int = MAX_SIDE_2D
    hard_side_2d: int = HARD_SIDE_2D
    max_side_3d: int = MAX_SIDE_3D
    hard_side_3d: int = HARD_SIDE_3D
    hard_pixels_2d: int = HARD_PIXELS_2D
    hard_voxels_3d: int = HARD_VOXELS_3D
    hard_bytes: int = HARD_BYTES


_overrides: dict[str, int] = {}
_lock = threading.Lock()


def _positive(name: str, value: object, where: str) -> int:
    try:
        number = int(str(value).replace("_", ""))
    except ValueError:
        number = 0
    if number <= 0:
        raise InputError(f"the size limit {name}={value!r} ({where}) must be a positive whole number, e.g. {name}=100000000.")
    return number


def current_limits() -> SizeLimits:
    """The limits in force now: module defaults, then `MEDLENS_*` environment variables, then `set_limits()` values."""
    values: dict[str, int] = {}
    for f in fields(SizeLimits):
        env = f"MEDLENS_{f.name.upper()}"
        if os.environ.get(env, "").strip():
            values[f.name] = _positive(env, os.environ[env].strip(), "environment variable")
    with _lock:
        values.update(_overrides)
    return replace(SizeLimits(), **values)


def set_limits(**limits: Optional[int]) -> SizeLimits:
    """Set limits for this process by field name (`hard_pixels_2d=10**9`); None restores the default. Returns the limits now."""
    known = {f.name for f in fields(SizeLimits)}
    unknown = sorted(set(limits) - known)
    if unknown:
        raise InputError(f"unknown size limit(s) {', '.join(unknown)}; the limits are {', '.join(sorted(known))}.")
    with _lock:
        for name, value in limits.items():
            if value is None:
                _overrides.pop(name, None)
            else:
                _overrides[name] = _positive(name, value, "set_limits")
    return current_limits()


def size_text(n_bytes: float) -> str:
    """A byte count for people: "812 bytes", "3.1 MiB", "4.0 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{int(n_bytes)} bytes"


def check_size(path: Path, shape: Sequence[int], volume: bool, bytes_per_value: float = 4.0) -> None:
    """Refuse a scan whose claimed shape (spatial sides, optionally with samples per pixel last for colour) is too large.

    shape: the spatial shape as the header claims it ((H, W) or (D, H, W)); bytes_per_value: decoded bytes per pixel
    (all samples), used for the memory limit. Raises InputError naming the limit and how to raise it.
    """
    limits = current_limits()
    dims = [int(s) for s in shape]
    what, unit = ("volume", "voxels") if volume else ("image", "pixels")
    text = " x ".join(map(str, dims))
    if any(s < 0 for s in dims):
        raise InputError(f"{path}: the header claims a negative size ({text}); the file is corrupt. Re-export it.")
    n = 1
    for s in dims:
        n *= s
    limit, name = (limits.hard_voxels_3d, "HARD_VOXELS_3D") if volume else (limits.hard_pixels_2d, "HARD_PIXELS_2D")
    if n > limit:
        raise InputError(f"{path}: the {what} is {text} = {n:,} {unit}, above medlens's limit of {limit:,} ({name}); "
                         f"crop or downsample it first, or raise the limit with MEDLENS_{name}.")
    hard, name = (limits.hard_side_3d, "HARD_SIDE_3D") if volume else (limits.hard_side_2d, "HARD_SIDE_2D")
    if dims and max(dims) > hard:
        raise InputError(f"{path}: the {what} is {text} and medlens refuses {what}s with a side above {hard} "
                         f"(limit {name}={hard}); crop or downsample it first, or raise the limit with MEDLENS_{name}.")
    claimed = n * float(bytes_per_value)
    if claimed > limits.hard_bytes:
        raise InputError(f"{path}: the {what} ({text}) would take {size_text(claimed)} once decoded, above medlens's "
                         f"limit of {size_text(limits.hard_bytes)} (HARD_BYTES); crop or downsample it first, or "
                         f"raise the limit with MEDLENS_HARD_BYTES.")


__all__ = ["HARD_BYTES", "HARD_PIXELS_2D", "HARD_SIDE_2D", "HARD_SIDE_3D", "HARD_VOXELS_3D", "MAX_SIDE_2D", "MAX_SIDE_3D",
           "SizeLimits", "check_size", "current_limits", "set_limits", "size_text"]
