"""Drawing maps for people: colour scales, overlays with a colour bar and an optional region outline, panels.

Maps are normalised here and only here (one colour scale per method shared by its targets); numpy and Pillow
compose the images, matplotlib supplies only colour maps other than the defaults (no figures, no backend).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medlens.errors import OutputError
from medlens.io.colour_tables import colour_table
from medlens.io.png_encode import encode_png

SEQUENTIAL_CMAP = "inferno"  # perceptual colour map for non-negative maps
DIVERGING_CMAP = "RdBu_r"  # diverging colour map centred at 0 for signed maps
OVERLAY_ALPHA = 0.75  # the opacity of the strongest map value
OUTLINE_RGB = (0, 255, 120)  # the region outline: a green that none of the colour maps uses

# --------------------------------------------------------------------------------------------- drawing
# Overlays and panels are composed directly with numpy and Pillow (matplotlib only supplies the colour
# maps): a 6-method x 14-finding chest X-ray renders in about a second instead of the better part of a
# minute with one matplotlib figure per overlay.

MIN_TILE_SIDE = 224  # small inputs are enlarged (nearest neighbour, whole factors) to at least this size
MIN_PANEL_TILE_SIDE = 224  # the same for each cell of a panel


@functools.lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    table = colour_table(cmap)  # the default maps' own tables: no matplotlib import before the first overlay
    if table is not None:
        return table
    from matplotlib import colormaps

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _font(size: int = 13) -> Any:
    """The default font at `size`, its rendered text kept: a batch draws the same labels, names and numbers on every
    picture, and rasterising a line costs about 0.2 ms (ImageDraw takes the kept mask exactly as a fresh one)."""
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()
    font.getmask2 = functools.lru_cache(maxsize=2048)(font.getmask2)  # masks are only read, never changed
    return font


SCALE_PERCENTILE = 99.5  # maps of many values are coloured up to this percentile of |map| (higher ones saturate)
SCALE_MIN_VALUES = 1024  # below this many values the scale spans them all


def color_scale(maps: np.ndarray) -> tuple[str, float, float]:
    """(colour map, vmin, vmax) for maps of one method: 'inferno' on [0, a] if none is negative, else 'RdBu_r' on
    [-a, a] (so 0 is the neutral colour), with a the 99.5th percentile of |map| for maps of 1024 values or more,
    else the largest magnitude. Pixel-level maps (LRP, gradients) put a few extreme pixels far above the rest; a
    scale set by them leaves the whole overlay faint, so those few saturate instead (raw values in maps.npz)."""
    finite = maps[np.isfinite(maps)]
    if finite.size == 0:
        return SEQUENTIAL_CMAP, 0.0, 1.0
    magnitude = np.abs(finite)
    a = float(np.percentile(magnitude, SCALE_PERCENTILE)) if finite.size >= SCALE_MIN_VALUES else float(magnitude.max())
    if a <= 0:  # a map that is zero almost everywhere: its largest value still sets the scale
        a = float(magnitude.max())
    if float(finite.min()) >= 0:
        return SEQUENTIAL_CMAP, 0.0, a if a > 0 else 1.0
    return DIVERGING_CMAP, -a, a


#: how a method's map is drawn (the registry's `display` field): the positive part, the signed values, or |map|
DISPLAYS = ("positive", "signed", "magnitude")
DISPLAY_LABELS = {"positive": "positive part, as defined", "signed": "signed: red for, blue against",
                  "magnitude": "|map|, as defined"}


def shown(amap: np.ndarray, display: str = "signed") -> np.ndarray:
    """What a picture draws of a raw map: its positive part ("positive", e.g. Grad-CAM, whose definition ends in a
    ReLU), its absolute value ("magnitude", e.g. Simonyan's saliency) or the raw signed values ("signed")."""
    if display == "positive":
        return np.maximum(amap, 0.0)
    if display == "magnitude":
        return np.abs(amap)
    if display != "signed":
        raise OutputError(f"unknown display {display!r}; use one of {', '.join(DISPLAYS)}.")
    return amap


def display_label(display: str, scale: tuple[str, float, float]) -> str:
    """The colour bar's caption: what the colours show (a signed map without negative values says so)."""
    if display == "signed" and scale[1] >= 0:
        return "signed (no negative values)"
    return DISPLAY_LABELS.get(display, display)


def empty_note(raw: np.ndarray, display: str) -> list[str]:
    """A title line for a positive-part picture of a map with no positive value (drawn blank, as defined)."""
    if display != "positive":
        return []
    top = float(np.max(raw)) if raw.size else -np.inf
    if not np.isfinite(top):  # a NaN or infinity somewhere: the largest finite value (-inf: none)
        top = float(np.max(raw, where=np.isfinite(raw), initial=-np.inf))
    if np.isfinite(top) and top <= 0:
        return ["no positive part: the map is <= 0 everywhere (--signed draws it)"]
    return []


def best_slice(volume_map: np.ndarray) -> int:
    """The axial slice (axis 0) of a (D, H, W) map with the largest mass (sum of absolute values)."""
    return int(np.abs(volume_map).reshape(volume_map.shape[0], -1).sum(axis=1).argmax())


def _plane(image: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray, Optional[int]]:
    if amap.ndim == 3:
        k = best_slice(amap)
        return image[k] if image.ndim == 3 else image, amap[k], k
    return image, amap, None


def blend(image: np.ndarray, amap: np.ndarray, scale: tuple[str, float, float], alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """uint8 RGB (H, W, 3): the grayscale `image` in [0, 1] with `amap` coloured by `scale` on top.

    The colour's opacity grows with the map's magnitude (alpha * sqrt(|value| / scale)), so the anatomy stays
    readable where the map is near zero and strong evidence is drawn almost opaque. On a diverging (signed) scale it
    grows linearly (alpha * |value| / scale): the square root's steep rise from zero, with the light colours near the
    middle of a diverging map, drew every zero crossing as a dark line once maps are drawn smooth at the scan's size.
    """
    cmap, vmin, vmax = scale
    span = vmax - vmin if vmax > vmin else 1.0
    t = (np.asarray(amap) - vmin) / span  # a new array: cleaned and clipped in place
    np.clip(np.nan_to_num(t, copy=False), 0.0, 1.0, out=t)
    index = (t * 255.0 + 0.5).astype(np.intp)
    if vmin < 0 < vmax:  # alpha * |2t - 1|
        weight = np.abs(2.0 * t - 1.0)
    else:  # alpha * sqrt(t)
        weight = np.sqrt(t)
    np.multiply(weight, alpha, out=weight)
    under = np.clip(image, 0.0, 1.0) * 255.0  # (1 - weight) * gray
    np.multiply(under, 1.0 - weight, out=under)
    table = _lut(cmap)
    out = np.empty(t.shape + (3,), dtype=np.uint8)
    # (1 - weight) * gray + weight * colour + 0.5, one colour plane at a time and in place: the same float32 operations
    # as on (H, W, 3) arrays, 4x faster on a 512 x 512 overlay (issue 28)
    for channel in range(3):
        plane = np.take(table[:, channel], index)
        np.multiply(plane, weight, out=plane)
        plane = np.add(plane, under, out=plane if plane.dtype == under.dtype else None)  # float64 for such an image
        np.add(plane, 0.5, out=plane)
        if not 0.0 <= alpha <= 1.0:  # else a mix of two values in [0, 255], + 0.5: the cast's truncation rounds it
            np.clip(plane, 0, 255, out=plane)
        out[..., channel] = plane
    return out


def _enlarge(rgb: np.ndarray, min_side: int = MIN_TILE_SIDE) -> np.ndarray:
    factor = max(1, int(np.ceil(min_side / max(rgb.shape[:2]))))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _wrap(lines: Sequence[str], width: int) -> list[str]:
    """`lines` broken at spaces so that each fits in `width` pixels (a word longer than that stays whole)."""
    return list(_wrapped(tuple(lines), width))


@functools.lru_cache(maxsize=512)
def _wrapped(lines: tuple[str, ...], width: int) -> tuple[str, ...]:
    """`_wrap`, measured once per layout: a batch draws the same titles at the same width again and again."""
    font = _font()
    out: list[str] = []
    for line in lines:
        current = ""
        for word in line.split(" "):
            candidate = f"{current} {word}" if current else word
            if current and font.getlength(candidate) > width - 8:
                out.append(current)
                current = word
            else:
                current = candidate
        out.append(current)
    return tuple(out)


def _tile(rgb: np.ndarray, lines: Sequence[str], min_side: int = MIN_TILE_SIDE, n_lines: int = 0) -> np.ndarray:
    """uint8 RGB (h, w, 3): the enlarged overlay under a header with `lines` of text (wrapped to the tile's width;
    padded to `n_lines` so the tiles of a panel row line up). Pictures are put together as arrays (`_stack`): only
    the text goes through Pillow."""
    from PIL import Image, ImageDraw

    body = _enlarge(rgb, min_side)
    font = _font()
    lines = _wrap(lines, body.shape[1])
    lines = lines + [""] * max(0, n_lines - len(lines))
    header = Image.new("RGB", (body.shape[1], 6 + 17 * len(lines)), "white")
    draw = ImageDraw.Draw(header)
    for n, line in enumerate(lines):
        draw.text((4, 3 + 17 * n), line, fill="black", font=font)
    return np.concatenate([np.asarray(header), body], axis=0)


def _colour_bar(width: int, scale: tuple[str, float, float], label: str = "") -> Any:
    """A PIL strip: the colour map from vmin to vmax with the raw values at its ends (and 0 when signed), and
    `label` (what the colours show) under it."""
    from PIL import Image, ImageDraw

    cmap, vmin, vmax = scale
    font = _font(12)
    margin = 8
    bar_w = max(16, width - 2 * margin)
    strip = Image.new("RGB", (width, 50 if label else 34), "white")
    strip.paste(_ramp(cmap, bar_w), (margin, 2))
    draw = ImageDraw.Draw(strip)
    draw.text((margin, 16), _fmt(vmin), fill="black", font=font)
    right = _fmt(vmax)
    draw.text((margin + bar_w - int(draw.textlength(right, font=font)), 16), right, fill="black", font=font)
    if vmin < 0 < vmax:
        draw.text((margin + bar_w // 2 - 3, 16), "0", fill="black", font=font)
    if label:
        draw.text((margin, 32), label, fill="black", font=font)
    return strip


@functools.lru_cache(maxsize=32)
def _ramp(cmap: str, width: int) -> Any:
    """The colour bar's ramp, drawn once per colour map and width (pasted, never changed)."""
    from PIL import Image

    ramp = _lut(cmap)[np.linspace(0, 255, width).astype(np.int64)].astype(np.uint8)
    return Image.fromarray(np.repeat(ramp[None], 12, axis=0))


def _stack(parts: Sequence[Any]) -> np.ndarray:
    """The parts (uint8 RGB arrays or PIL images) one under the other, left-aligned, on white."""
    arrays = [np.asarray(p) for p in parts]
    out = np.full((sum(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays), 3), 255, dtype=np.uint8)
    y = 0
    for a in arrays:
        out[y:y + a.shape[0], :a.shape[1]] = a
        y += a.shape[0]
    return out


def _png(img: Any) -> bytes:
    return encode_png(img)  # uint8 RGB (medlens's own encoder: see medlens.io.png_encode)


def outline_of(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean 2-D region: inside it, with a 4-neighbour outside it (or at the border)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return m & ~interior


def _with_outline(rgb: np.ndarray, region: Optional[np.ndarray]) -> np.ndarray:
    """`rgb` (an overlay just blended, owned by the caller) with the region's outline drawn on it, in place."""
    if region is None:
        return rgb
    edge = outline_of(region)
    if rgb.flags.c_contiguous:  # by the outline's flat indices: a boolean-mask assignment walks every pixel (0.4 ms)
        rgb.reshape(-1, 3)[np.flatnonzero(edge)] = OUTLINE_RGB
    else:
        rgb[edge] = OUTLINE_RGB
    return rgb


def _region_plane(region: Optional[np.ndarray], k: Optional[int]) -> Optional[np.ndarray]:
    if region is None:
        return None
    return region[k] if (k is not None and region.ndim == 3) else region


def render_overlay(image: np.ndarray, amap: np.ndarray, *, title: str = "", scale: Optional[tuple[str, float, float]] = None,
                   region: Optional[np.ndarray] = None, display: str = "signed") -> bytes:
    """PNG bytes: the grayscale `image` (values in [0, 1]) with `amap` on top, a title and a colour bar of raw values
    labelled with what it shows; `region` (a boolean mask of the map's shape) is drawn as a green outline. `display`
    (see `shown`) says whether the raw map's positive part, its magnitude or its signed values are drawn.

    For a volume (D, H, W) the slice with the largest map mass is drawn and named in the title.
    """
    rgb, lines, scale, label = overlay_cell(image, amap, title=title, scale=scale, region=region, display=display)
    return render_rgb(rgb, lines, scale, label=label)


def overlay_cell(image: np.ndarray, amap: np.ndarray, *, title: str = "", scale: Optional[tuple[str, float, float]] = None,
                 region: Optional[np.ndarray] = None, display: str = "signed") -> tuple[np.ndarray, list[str], Any, str]:
    """What `render_overlay` draws before encoding: the blended uint8 RGB (region outlined), its title lines, its
    colour scale and the bar's caption. A panel of the same maps takes the RGBs (`render_panel(drawn=...)`) instead
    of blending every map a second time."""
    image = _display_ready(image, amap.shape)
    lines = ([title] if title else []) + empty_note(amap, display)
    amap = shown(amap, display)
    scale = scale or color_scale(amap)
    img2d, map2d, k = _plane(image, amap)
    if k is not None:
        lines.append(f"slice {k} of {amap.shape[0]} (largest map mass)")
    return _with_outline(blend(img2d, map2d, scale), _region_plane(region, k)), lines, scale, display_label(display, scale)


def render_rgb(rgb: np.ndarray, lines: Sequence[str], scale: tuple[str, float, float], label: str = "") -> bytes:
    """PNG bytes: an overlay already drawn (uint8 RGB, e.g. by `blend`), enlarged under its title `lines`, with the
    colour bar of `scale` (captioned `label`) below it (the app draws thresholded overlays this way)."""
    return _png(overlay_picture(rgb, lines, scale, label))


def overlay_picture(rgb: np.ndarray, lines: Sequence[str], scale: tuple[str, float, float], label: str = "") -> np.ndarray:
    """What `render_rgb` encodes: the uint8 RGB picture of the overlay under its title, over its colour bar."""
    tile = _tile(rgb, lines)
    return _stack([tile, _colour_bar(tile.shape[1], scale, label)])


def render_panel(image: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str], *,
                 scales: Optional[Mapping[str, tuple[str, float, float]]] = None, region: Optional[np.ndarray] = None,
                 displays: Optional[Mapping[str, str]] = None,
                 drawn: Optional[Mapping[str, Sequence[np.ndarray]]] = None) -> bytes:
    """PNG bytes: a grid of methods (rows) x targets (columns), `maps[method]` being (T, *spatial) raw maps; each row
    has one colour scale (shared by its targets) shown under it, drawn as `displays[method]` says (default signed).
    `drawn[method][target]`: the cells already blended by `overlay_cell` with the same scale and region (reused)."""
    return _png(panel_picture(image, maps, titles, scales=scales, region=region, displays=displays, drawn=drawn))


def panel_picture(image: np.ndarray, maps: Mapping[str, np.ndarray], titles: Sequence[str], *,
                  scales: Optional[Mapping[str, tuple[str, float, float]]] = None, region: Optional[np.ndarray] = None,
                  displays: Optional[Mapping[str, str]] = None,
                  drawn: Optional[Mapping[str, Sequence[np.ndarray]]] = None) -> np.ndarray:
    """What `render_panel` encodes: the panel's uint8 RGB picture (same arguments). With one target per method on a
    plane it is the methods' overlays (`overlay_picture`) one under the other, which `medlens.io.formats` writes
    from the overlays' own PNG rows."""
    rows = []
    for name, raw in maps.items():
        display = (displays or {}).get(name, "signed")
        per_target = shown(raw, display)
        scale = (scales or {}).get(name) or color_scale(per_target)
        cells = []
        done = (drawn or {}).get(name)
        for col in range(len(per_target)):
            amap = per_target[col]
            k = best_slice(amap) if amap.ndim == 3 else None
            lines = ([f"{name}: {titles[col]}"] + empty_note(raw[col], display)
                     + ([f"slice {k} (largest map mass)"] if k is not None else []))
            if done is not None:  # blended by overlay_cell already: the grayscale is not needed again
                rgb = done[col]
            else:
                img2d, map2d, _ = _plane(_display_ready(image, amap.shape), amap)
                rgb = _with_outline(blend(img2d, map2d, scale), _region_plane(region, k))
            cells.append((rgb, lines, len(_wrap(lines, _enlarge(rgb, MIN_PANEL_TILE_SIDE).shape[1]))))
        n_lines = max(c[2] for c in cells)
        tiles = [_tile(rgb, lines, MIN_PANEL_TILE_SIDE, n_lines) for rgb, lines, _ in cells]
        width = sum(t.shape[1] for t in tiles) + 4 * (len(tiles) - 1)
        row = np.full((max(t.shape[0] for t in tiles), width, 3), 255, dtype=np.uint8)
        x = 0
        for t in tiles:
            row[:t.shape[0], x:x + t.shape[1]] = t
            x += t.shape[1] + 4
        rows.append(_stack([row, _colour_bar(tiles[0].shape[1], scale, display_label(display, scale))]))
    if not rows:
        return np.full((1, 1, 3), 255, dtype=np.uint8)
    return _stack(rows)


def _display_ready(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The grayscale display image resized to the map's spatial shape (when the caller did not), in [0, 1]."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and len(shape) == 2 and image.shape[-1] in (3, 4):
        image = image[..., :3].mean(axis=-1)
    if tuple(image.shape) != tuple(shape):
        t = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        mode = "trilinear" if len(shape) == 3 else "bilinear"
        if t.dim() - 2 != len(shape):
            raise OutputError(f"the display image {image.shape} does not match the maps {tuple(shape)}.")
        image = F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)[0, 0].numpy()
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 1:
        image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return image


