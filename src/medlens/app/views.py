"""What the app draws from raw maps: thresholded overlays with an outline of what remains, shared colour scales,
ensemble maps with their agreement, and difference maps centred at zero. Pure functions of arrays (no Streamlit).

Rendering goes through `medlens.io.render` (its colour scales, `blend`, outlines and colour bars); maps are
normalised only here, for drawing and combining, never in what is stored or exported as raw.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medlens.errors import InputError
from medlens.evaluation.trust import spearman
from medlens.io.render import (DIVERGING_CMAP, OUTLINE_RGB, best_slice, blend, color_scale, display_label, outline_of,
                               render_rgb, shown)

COLOUR_MAPS = ("auto", "inferno", "viridis", "magma", "jet", "RdBu_r", "coolwarm")
THRESHOLD_RGB = (0, 220, 255)  # outline of what the threshold keeps: cyan, apart from the region's green
TOP_FRACTION = 0.1  # top-k overlap: the top 10% of pixels of each map

Scale = tuple[str, float, float]


@dataclass(frozen=True)
class ViewSettings:
    """How maps are drawn; changing these redraws, never recomputes."""

    opacity: float = 0.75
    cmap: str = "auto"  # "auto": inferno for non-negative maps, RdBu_r centred at 0 for signed ones
    threshold_mode: str = "quantile"  # "quantile": hide the lowest fraction of |map|; "value": below a share of the max
    threshold: float = 0.0
    shared_scale: bool = False  # one colour scale across the whole grid
    signed: bool = False  # every map's raw signed values, not each method as defined (Grad-CAM's positive part)


def drawn(amap: np.ndarray, method: str, settings: ViewSettings) -> tuple[np.ndarray, str]:
    """(what the picture draws of a raw map, how): each method as its registry entry says, or signed when asked."""
    from medlens.core.registry import all_specs

    spec = all_specs().get(method)
    display = "signed" if settings.signed or spec is None else spec.display
    return shown(np.asarray(amap, dtype=np.float32), display), display


def scale_for(maps: Sequence[np.ndarray], cmap: str = "auto") -> Scale:
    """The colour scale of one or several maps (medlens's rule), with the colour map replaced when one is chosen."""
    flat = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps]) if maps else np.zeros(1, np.float32)
    name, vmin, vmax = color_scale(flat)
    return (name if cmap == "auto" else cmap, vmin, vmax)


def kept(amap: np.ndarray, mode: str, level: float, scale: Optional[Scale] = None) -> np.ndarray:
    """Boolean mask of what the threshold keeps: |map| at or above its `level` quantile ("quantile"), or at or above
    `level` times the scale's largest magnitude ("value"). Level 0 keeps everything."""
    magnitude = np.abs(np.asarray(amap, dtype=np.float32))
    if level <= 0:
        return np.ones(magnitude.shape, dtype=bool)
    if mode == "quantile":
        if not 0 <= level < 1:
            raise InputError(f"a quantile threshold must be in [0, 1), not {level}.")
        cutoff = float(np.quantile(magnitude, level))
        return (magnitude >= cutoff) & (magnitude > 0)
    if mode == "value":
        top = max(abs(scale[1]), abs(scale[2])) if scale else float(magnitude.max())
        return magnitude >= level * top
    raise InputError(f"unknown threshold mode {mode!r}; use 'quantile' or 'value'.")


def overlay_planes(display: np.ndarray, amap: np.ndarray, region: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[int]]:
    """(image, map, region) of the plane an overlay draws (a volume: the slice with the largest map mass), and k."""
    if amap.ndim == 3:  # a 3-D model's map: the slice with the largest mass, as medlens's overlays do
        k = best_slice(amap)
        return (display[k] if display.ndim == 3 else display), amap[k], (region[k] if region is not None and region.ndim == 3 else region), k
    return display, amap, region, None


def overlay_rgb(display: np.ndarray, amap: np.ndarray, scale: Scale, settings: ViewSettings,
                region: Optional[np.ndarray] = None) -> tuple[np.ndarray, Optional[int]]:
    """uint8 RGB: the map blended on the image below the threshold hidden, the kept part outlined (cyan), the region
    outlined (green); and the slice drawn for a volume."""
    image, plane, region_plane, k = overlay_planes(np.asarray(display, dtype=np.float32), np.asarray(amap, dtype=np.float32), region)
    keep = kept(plane, settings.threshold_mode, settings.threshold, scale)
    rgb = blend(image, np.where(keep, plane, 0.0), scale, alpha=settings.opacity)
    if settings.threshold > 0:
        rgb[outline_of(keep)] = THRESHOLD_RGB
    if region_plane is not None:
        rgb[outline_of(region_plane)] = OUTLINE_RGB
    return rgb, k


def overlay_png(display: np.ndarray, amap: np.ndarray, lines: Sequence[str], scale: Scale, settings: ViewSettings,
                region: Optional[np.ndarray] = None, how: str = "") -> bytes:
    """PNG bytes of one annotated overlay (title lines, colour bar of raw values captioned with `how` the map is
    drawn: "positive", "signed" or "magnitude", see `drawn`)."""
    rgb, k = overlay_rgb(display, amap, scale, settings, region)
    return render_rgb(rgb, list(lines) + ([f"slice {k} (largest map mass)"] if k is not None else []), scale,
                      label=display_label(how, scale) if how else "")


def normalised(amap: np.ndarray) -> np.ndarray:
    """The map divided by its largest magnitude (sign kept): maps of different models and methods become comparable."""
    amap = np.asarray(amap, dtype=np.float32)
    top = float(np.abs(amap).max()) if amap.size else 0.0
    return amap / top if top > 0 else np.zeros_like(amap)


def resized(amap: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The map resampled (bilinear / trilinear) to `shape` (models of different input sizes)."""
    amap = np.asarray(amap, dtype=np.float32)
    if tuple(amap.shape) == tuple(shape):
        return amap
    if amap.ndim != len(shape):
        raise InputError(f"a {amap.ndim}-D map cannot be compared with a {len(shape)}-D one; choose maps of the same kind.")
    t = torch.from_numpy(np.ascontiguousarray(amap))[None, None]
    mode = "bilinear" if amap.ndim == 2 else "trilinear"
    return F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)[0, 0].numpy()


def ensemble(maps: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """(weighted mean, per-pixel spread) of the normalised maps, on the first map's grid. Weights are >= 0 and
    rescaled to sum 1; the spread is the standard deviation across members."""
    if len(maps) < 1:
        raise InputError("an ensemble needs at least one map; explain with several models or methods first.")
    w = np.asarray(weights if weights is not None else [1.0] * len(maps), dtype=np.float64)
    if w.shape != (len(maps),) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise InputError("ensemble weights must be one non-negative number per map, not all zero.")
    shape = np.asarray(maps[0]).shape
    stack = np.stack([normalised(resized(m, shape)) for m in maps])
    mean = np.tensordot(w / w.sum(), stack, axes=1).astype(np.float32)
    return mean, stack.std(axis=0).astype(np.float32)


def agreement(maps: Sequence[np.ndarray]) -> dict[str, float]:
    """How far maps agree: mean pairwise Spearman rank correlation and mean pairwise overlap (IoU) of their top 10%
    pixels; NaN for fewer than two maps."""
    if len(maps) < 2:
        return {"spearman": float("nan"), "top_k_overlap": float("nan"), "pairs": 0}
    shape = np.asarray(maps[0]).shape
    flat = torch.from_numpy(np.stack([resized(m, shape).ravel() for m in maps]))
    k = max(1, int(round(TOP_FRACTION * flat.shape[1])))
    tops = [set(torch.topk(row, k).indices.tolist()) for row in flat]
    rhos, overlaps = [], []
    for i, j in combinations(range(len(maps)), 2):
        rhos.append(float(spearman(flat[i:i + 1], flat[j:j + 1])[0]))
        overlaps.append(len(tops[i] & tops[j]) / len(tops[i] | tops[j]))
    return {"spearman": float(np.mean(rhos)), "top_k_overlap": float(np.mean(overlaps)), "pairs": len(rhos)}


def difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """normalised(a) - normalised(b) on a's grid: positive where a puts more (relative) evidence than b."""
    return normalised(a) - normalised(resized(b, np.asarray(a).shape))


def centred_scale(amap: np.ndarray) -> Scale:
    """A diverging scale centred at zero (difference maps), symmetric about 0 even when all values have one sign."""
    top = float(np.abs(amap).max()) if np.asarray(amap).size else 0.0
    top = top if top > 0 else 1.0
    return (DIVERGING_CMAP, -top, top)
