"""Resizing maps to input resolution in torch, for 1-, 2- and 3-D spatial axes alike, and the fast memory layout.

Methods compute at their own resolution (a layer's grid, superpixels, a window grid) and call
`upsample_to()` once; no numpy or cv2 in between.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_SMALL_GRID = 16  # up to this many cells per axis, resizing by matrix products beats F.interpolate on the CPU


def upsample_to(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, M, *s) -> (N, M, *size) by (bi/tri)linear interpolation; returns the input when sizes match."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = _MODES.get(len(size))
    if mode is None:
        raise ValueError(f"cannot resize maps with {len(size)} spatial axes")
    if maps.device.type == "cpu" and maps.dtype in (torch.float32, torch.float64) and max(maps.shape[2:]) <= _SMALL_GRID:
        return _separable_resize(maps, size)
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


@functools.lru_cache(maxsize=64)
def linear_resize_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(n_out, n_in): 1-D linear interpolation with align_corners=False, F.interpolate's source positions and
    weights computed as it does, in `dtype` (cached: a CAM call asks for the same few)."""
    scale = torch.tensor(n_in, dtype=dtype) / n_out
    position = (scale * (torch.arange(n_out, dtype=dtype) + 0.5) - 0.5).clamp_min(0)
    low = position.long().clamp_max(n_in - 1)
    high = (low + 1).clamp_max(n_in - 1)
    fraction = (position - low.to(dtype)).clamp(0, 1)
    rows = torch.arange(n_out)
    matrix = torch.zeros(n_out, n_in, dtype=dtype)
    matrix.index_put_((rows, low), 1 - fraction, accumulate=True)
    matrix.index_put_((rows, high), fraction, accumulate=True)
    return matrix.to(device=device)


def _separable_resize(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(Bi/tri)linear resizing as one small matrix product per axis (the interpolation is separable): the same
    values as F.interpolate up to float rounding, 2-3x faster from a CAM's 7x7 grid to 224x224 (1 thread)."""
    out = maps.contiguous()
    last = len(size) - 1
    for axis in range(len(size)):  # the last axis last: one product (rows, in) @ (in, out) writes the result in place
        matrix = linear_resize_matrix(out.shape[2 + axis], size[axis], maps.dtype, maps.device)
        shape = list(out.shape)
        if axis == last:
            out = out.reshape(-1, shape[-1]) @ matrix.T
        else:  # (out, in) @ (before, in, after), batched over `before`, on the still small later axes
            before, after = math.prod(shape[: 2 + axis]), math.prod(shape[3 + axis:])
            out = torch.matmul(matrix, out.reshape(before, shape[2 + axis], after))
        shape[2 + axis] = size[axis]
        out = out.reshape(shape)
    return out


def spatial_dims(t: torch.Tensor, leading: int) -> tuple[int, ...]:
    """The axis indices after the first `leading` axes (the spatial ones)."""
    return tuple(range(leading, t.dim()))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same values in channels-last memory order (4-D and 5-D), which CPU convolutions run markedly faster on."""
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t
