"""Localisation metrics: does a map point at the annotated region (a box or mask)?

Pointing game, energy in the region, IoU and Dice after thresholding, AUPRC; and the two baselines every
localisation score is reported beside: a centre-of-image map and an average-mask prior.

Every function takes maps (B, T, *s) and masks (B, *s) (boolean, the region per image; the same region is
used for every target slot) and returns (B, T) float values. An image with an empty mask has no region to
find: its values are NaN and the runner leaves it out (its `n` counts only images with a region).
Maps are never NaN-producing: constant and all-zero maps give the defined values documented per function.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from medlens.errors import InputError


def _check(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    if maps.dim() < 3 or masks.dim() != maps.dim() - 1 or masks.shape[0] != maps.shape[0] or tuple(masks.shape[1:]) != tuple(maps.shape[2:]):
        raise InputError(
            f"masks must have shape (B, *spatial) matching maps (B, T, *spatial) = {tuple(maps.shape)}; got {tuple(masks.shape)}."
        )
    return masks.to(maps.device).bool()


def _nan_where_empty(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    empty = ~masks.flatten(1).any(dim=1)  # (B,)
    return torch.where(empty[:, None], torch.full_like(values, float("nan")), values)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: Optional[float] = None) -> torch.Tensor:
    """1 if the map's maximum lies within `tolerance` pixels (Euclidean, in pixel units) of the region,
    else 0 (Zhang et al., 2016). The default, None, is TorchRay's 15 px on a 224 px input scaled to this
    map: 15 / 224 of its largest side (15 px at 224, about 4.3 px at 64). 0 asks for a hit inside. Ties for the maximum are resolved as the first
    maximal pixel in raster order (row-major), so a constant or all-zero map points at the top-left
    corner. Higher is better; compare with `baseline:center`."""
    masks = _check(maps, masks)
    B, T = maps.shape[:2]
    spatial = tuple(maps.shape[2:])
    flat = torch.nan_to_num(maps.flatten(2), nan=float("-inf"))
    # argmax on the first occurrence, made explicit (torch documents first-index ties only for some devices)
    peak = flat.amax(dim=2, keepdim=True)
    idx = torch.arange(flat.shape[2], device=flat.device)
    first = torch.where(flat == peak, idx, flat.shape[2]).amin(dim=2)  # (B, T)
    # squared distance from each map's peak to every pixel, summed axis by axis: (B, T, *spatial), exact in float32
    d2 = torch.zeros((B, T) + (1,) * len(spatial), device=maps.device)
    rest = first
    for axis in reversed(range(len(spatial))):
        n = spatial[axis]
        coord, rest = rest % n, rest // n
        along = (torch.arange(n, device=maps.device, dtype=torch.float32) - coord[..., None].float()) ** 2
        shape = [B, T] + [1] * len(spatial)
        shape[2 + axis] = n
        d2 = d2 + along.view(shape)
    nearest = torch.where(masks[:, None], d2, float("inf")).flatten(2).amin(dim=2)
    tol = 15.0 * max(spatial) / 224.0 if tolerance is None else float(tolerance)
    hit = (nearest <= tol ** 2 + 1e-9).float()
    return _nan_where_empty(hit, masks)


def energy_in_box(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing game (Wang et al., Score-CAM, 2020): the share of the map's positive part
    that falls inside the region, sum(relu(map) * mask) / sum(relu(map)), in [0, 1]. Higher is better;
    a uniform map scores the region's area fraction. A map with no positive value has no energy to place:
    it scores that same chance level (the area fraction) rather than a division by zero."""
    masks = _check(maps, masks)
    pos = maps.clamp_min(0).flatten(2)
    m = masks.flatten(1)[:, None, :].to(pos.dtype)
    total = pos.sum(dim=2)
    inside = (pos * m).sum(dim=2)
    area = m.mean(dim=2).expand_as(total)
    value = torch.where(total > 0, inside / total.clamp_min(1e-30), area)
    return _nan_where_empty(value, masks)


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] (for thresholding only); a constant map becomes all zeros."""
    flat = maps.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (flat - lo) / span.clamp_min(1e-30), torch.zeros_like(flat)).view_as(maps)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each row of (N, P) values in [0, 1]: the bin edge maximising the between-class
    variance of a `bins`-bin histogram. Rows without two distinct levels get threshold 1 (nothing above)."""
    N = values.shape[0]
    idx = (values.clamp(0, 1) * (bins - 1)).round().long()
    hist = torch.zeros(N, bins, dtype=torch.float64, device=values.device)
    hist.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    p = hist / hist.sum(dim=1, keepdim=True)
    levels = torch.arange(bins, dtype=torch.float64, device=values.device) / (bins - 1)
    w0 = p.cumsum(dim=1)
    mu = (p * levels).cumsum(dim=1)
    mu_t = mu[:, -1:]
    w1 = 1 - w0
    between = (mu_t * w0 - mu) ** 2 / (w0 * w1).clamp_min(1e-30)
    between = torch.where((w0 > 0) & (w1 > 1e-12), between, torch.full_like(between, -1.0))
    k = between.argmax(dim=1)
    # class 0 = levels <= k; the threshold sits halfway to the next level
    thr = (k.double() + 0.5) / (bins - 1)
    valid = between.amax(dim=1) >= 0
    return torch.where(valid, thr, torch.ones_like(thr)).to(values.dtype)


def binarise(maps: torch.Tensor, threshold: Union[str, float] = "otsu") -> torch.Tensor:
    """Boolean (B, T, *s): the per-map min-max normalised map above `threshold` ("otsu" or a number in
    [0, 1]). A constant or all-zero map selects nothing."""
    norm = _normalise(maps)
    flat = norm.flatten(2)
    if threshold == "otsu":
        thr = otsu_threshold(flat.reshape(-1, flat.shape[2])).view(*flat.shape[:2], 1)
    elif isinstance(threshold, (int, float)) and 0 <= float(threshold) <= 1:
        thr = torch.full((*flat.shape[:2], 1), float(threshold), dtype=flat.dtype, device=flat.device)
    else:
        raise InputError(f"threshold must be 'otsu' or a number in [0, 1], not {threshold!r}.")
    span = maps.flatten(2).amax(dim=2, keepdim=True) - maps.flatten(2).amin(dim=2, keepdim=True)
    return ((flat > thr) & (span > 0)).view_as(maps)


def iou(maps: torch.Tensor, masks: torch.Tensor, threshold: Union[str, float] = "otsu") -> torch.Tensor:
    """Intersection over union of the thresholded map (see `binarise`) with the region. Higher is better;
    a map that selects nothing scores 0."""
    masks = _check(maps, masks)
    pred = binarise(maps, threshold).flatten(2)
    m = masks.flatten(1)[:, None, :]
    inter = (pred & m).sum(dim=2).float()
    union = (pred | m).sum(dim=2).float()
    return _nan_where_empty(inter / union.clamp_min(1), masks)


def dice(maps: torch.Tensor, masks: torch.Tensor, threshold: Union[str, float] = "otsu") -> torch.Tensor:
    """Dice = 2 |A and B| / (|A| + |B|) of the thresholded map and the region. Higher is better."""
    masks = _check(maps, masks)
    pred = binarise(maps, threshold).flatten(2)
    m = masks.flatten(1)[:, None, :]
    inter = (pred & m).sum(dim=2).float()
    size = pred.sum(dim=2).float() + m.sum(dim=2).float()
    return _nan_where_empty(2 * inter / size.clamp_min(1), masks)


def auprc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Area under the precision-recall curve of the map's values as a pixel classifier of the region,
    as average precision: sum over distinct thresholds of (R_n - R_{n-1}) P_n (ties form one threshold,
    as in scikit-learn's average_precision_score). Higher is better; a constant map scores the region's
    area fraction (chance)."""
    masks = _check(maps, masks)
    B, T = maps.shape[:2]
    flat = torch.nan_to_num(maps.flatten(2).double(), nan=float("-inf"))
    labels = masks.flatten(1)[:, None, :].expand_as(flat).double()
    order = torch.argsort(flat, dim=2, descending=True, stable=True)
    v = flat.gather(2, order)
    y = labels.gather(2, order)
    tp = y.cumsum(dim=2)
    fp = (1 - y).cumsum(dim=2)
    # only the last position of each run of equal values is a threshold
    last = torch.ones_like(v, dtype=torch.bool)
    last[..., :-1] = v[..., 1:] != v[..., :-1]
    n_pos = y.sum(dim=2, keepdim=True)
    precision = tp / (tp + fp)
    recall = tp / n_pos.clamp_min(1)
    prev_recall = torch.zeros_like(recall)
    # recall at the previous threshold: carry forward the recall of the last threshold seen
    rec_at_thr = torch.where(last, recall, torch.zeros_like(recall))
    cummax = rec_at_thr.cummax(dim=2).values
    prev_recall[..., 1:] = cummax[..., :-1]
    ap = torch.where(last, (recall - prev_recall) * precision, torch.zeros_like(recall)).sum(dim=2)
    return _nan_where_empty(ap.float(), masks)


# --------------------------------------------------------------------------------------------- baselines
def center_map(shape: Sequence[int], batch: int = 1, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """`baseline:center`: an isotropic Gaussian bump at the centre of the image, sigma a quarter of each
    side, shape (batch, 1, *shape). It knows nothing about the image: a method should beat it."""
    axes = [((torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n - 0.5) / 0.25 for n in shape]
    grids = torch.meshgrid(*axes, indexing="ij")
    bump = torch.exp(-0.5 * sum(g ** 2 for g in grids))
    return bump.expand(batch, 1, *shape).clone()


def prior_maps(masks: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """`baseline:prior`: the average region of the *other* images of the dataset (leave-one-out), so an
    image's own mask never leaks into its prior. masks (B, *s) are this batch's masks, `total` is the sum of
    all masks of the dataset (*s) and `count` their number. Returns (B, 1, *s)."""
    m = masks.float()
    if count > 1:
        prior = (total.to(m)[None] - m) / (count - 1)
    else:
        prior = total.to(m)[None].expand_as(m).clone()
    return prior[:, None]
