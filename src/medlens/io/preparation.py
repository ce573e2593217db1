"""Preparing a read scan for a model: `prepare` (slice, channels, size, intensity scale, normalisation), `load_input`.

Owns `PreparedInput`, the resampling filters (Pillow's box filter in torch) and what a model's spec is (`spec_for`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from medlens.core.input_spec import InputSpec
from medlens.core.layers import first_convolution
from medlens.core.model_description import describe
from medlens.errors import InputError
from medlens.io.readers import read_image, take_slice
from medlens.io.scan import PathLike, ScanImage


@dataclass
class PreparedInput:
    """A scan prepared for a model: the tensor, a grayscale display image aligned with it, and the notes."""

    tensor: torch.Tensor  # (1, C, *spatial) float32
    display: np.ndarray  # (H, W) or (D, H, W) float32 in [0, 1], same spatial size as the tensor
    notes: list[str]
    scan: ScanImage
    spec: InputSpec


def model_dims(model: Any) -> int:
    """2 or 3: the spatial dimensionality a model takes (its spec's size, else its first convolution)."""
    spec = describe(model).input_spec
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
    spec = describe(model).input_spec
    if spec is not None:
        return spec
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
    s = n_in / n_out and f = max(s, 1) (when enlarging: the input pixel under c). Rows sum to 1.
    (`box_resize` reuses them per (n_in, n_out, dtype): a batch of same-sized scans computes them once.)"""
    return _box_weights(int(n_in), int(n_out), dtype).clone()


@lru_cache(maxsize=64)
def _box_weights(n_in: int, n_out: int, dtype: torch.dtype) -> torch.Tensor:
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
    """t: (N, C, *spatial) -> (N, C, *size) by Pillow's BOX filter, axis by axis (2-D and 3-D), in float.

    Each output pixel is the mean of a run of input pixels (`box_weights`' non-zero run). A 2-D float32 image on the
    CPU (every scan `medlens batch` reads) goes to Pillow's own BOX filter, whose weights these are, plane by plane:
    sums in double, in C, without the GIL (0.4 ms for 512 x 512 -> 160 x 160 on one thread, against 1.3 for float32
    matrix products and 1.6-2.4 for the running sums; issue 28). Other inputs (volumes, float64) take differences of
    float64 running sums, a few operations per input pixel; above `RUNNING_SUMS_UP_TO` values (large volumes) those
    copies would take 4x the input's memory, so the weights are applied as float matrix products, axis by axis."""
    if len(size) == 2 and t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 4:
        return _box_resize_pillow(t, size)
    if t.numel() > RUNNING_SUMS_UP_TO:
        return _box_resize_dense(t, size)
    out = t.double()
    for axis in reversed(range(len(size))):  # the last (contiguous) axis first: the later ones have less to sum
        dim, n_out = 2 + axis, int(size[axis])
        if out.shape[dim] == n_out:
            continue
        first, last, count = (v.to(out.device) for v in _box_windows(int(out.shape[dim]), n_out))
        sums = out.cumsum(dim)  # window sum = sums[last] - sums[first] + out[first]
        out = (sums.index_select(dim, last) - sums.index_select(dim, first) + out.index_select(dim, first)) \
            / count.view([-1] + [1] * (out.dim() - 1 - dim))
    return out.to(t.dtype).contiguous()


RUNNING_SUMS_UP_TO = 1 << 24  # values: 64 MB of float32 (a 256^3 volume); larger inputs take the matrix products


def _box_resize_pillow(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """`box_resize` of (N, C, H, W) float32 by Pillow ("F" images: double sums, the output rounded to float32 once)."""
    from PIL import Image

    planes = t.detach().contiguous().numpy()
    out = np.empty(planes.shape[:2] + (int(size[0]), int(size[1])), dtype=np.float32)
    for index in np.ndindex(*planes.shape[:2]):
        out[index] = np.asarray(Image.fromarray(planes[index]).resize((int(size[1]), int(size[0])), Image.BOX))
    return torch.from_numpy(out)


def _box_resize_dense(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """`box_resize` as one matrix product per axis in the input's float type (memory: about the input's size)."""
    out = t
    for axis, n_out in enumerate(size):
        dim = 2 + axis
        if out.shape[dim] == n_out:
            continue
        w = _box_weights(int(out.shape[dim]), int(n_out), out.dtype).to(out.device)  # kept: never modified
        out = torch.movedim(torch.movedim(out, dim, -1) @ w.T, -1, dim)
    return out.contiguous()


@lru_cache(maxsize=64)
def _box_windows(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per output pixel: the first and the last input pixel of its box window, and their count (float64)."""
    inside = _box_weights(n_in, n_out, torch.float64) > 0
    count = inside.sum(dim=1)
    first = inside.to(torch.int8).argmax(dim=1)
    return first, first + count - 1, count.to(torch.float64)


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
