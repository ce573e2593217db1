"""Resizing maps to input resolution in torch, for 1-, 2- and 3-D spatial axes alike, and the fast memory layout.

Methods compute at their own resolution (a layer's grid, superpixels, a window grid) and call
`upsample_to()` once; no numpy or cv2 in between.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample_to(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(N, M, *s) -> (N, M, *size) by (bi/tri)linear interpolation; returns the input when sizes match."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = _MODES.get(len(size))
    if mode is None:
        raise ValueError(f"cannot resize maps with {len(size)} spatial axes")
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


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
