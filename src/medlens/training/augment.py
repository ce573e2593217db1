"""Training augmentation on batches of [0, 1] images: random affine jitter, random resized crops that keep the lesion,
and the region in-painting of a control model (the lesion removed). Every transform is one affine grid per image.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from medlens.core.baselines import gaussian_blur


def _uniform(n: int, gen: torch.Generator, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def intensity_jitter(x01: torch.Tensor, gen: torch.Generator, gamma: float = 0.25, contrast: float = 0.1) -> torch.Tensor:
    """Random gamma (exp(U(-gamma, gamma))) and contrast (1 + U(-contrast, contrast)) per image, clamped to [0, 1]."""
    n = x01.shape[0]
    g = torch.exp(_uniform(n, gen) * gamma).view(n, 1, 1, 1)
    c = (1.0 + _uniform(n, gen) * contrast).view(n, 1, 1, 1)
    return (x01.clamp(0, 1) ** g * c).clamp(0, 1)


def warp(x: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample x (N, C, H, W) on the affine grids theta (N, 2, 3) (output coords -> input coords, in [-1, 1])."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def affine_jitter(x01: torch.Tensor, gen: torch.Generator, rotate_deg: float = 12.0, scale: float = 0.1,
                  shift: float = 0.06) -> torch.Tensor:
    """v1's augmentation: random flip, rotation, scale and shift (one affine grid), then gamma/contrast jitter."""
    n = x01.shape[0]
    angle = _uniform(n, gen) * math.radians(rotate_deg)
    s = 1.0 + _uniform(n, gen) * scale
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * flip, -sin, _uniform(n, gen) * shift
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * flip, cos, _uniform(n, gen) * shift
    return intensity_jitter(warp(x01, theta).clamp(0, 1), gen)


def region_extent(masks: torch.Tensor) -> torch.Tensor:
    """Bounding box of each bool mask (N, H, W) in normalised coords [-1, 1]: (N, 4) = x0, y0, x1, y1 of the
    outer pixel edges. An empty mask gives a zero-size box at the centre."""
    n, h, w = masks.shape
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(h).expand(n, h)
    xs = torch.arange(w).expand(n, w)
    y0 = torch.where(rows, ys, h).amin(1).float()
    y1 = torch.where(rows, ys, -1).amax(1).float() + 1
    x0 = torch.where(cols, xs, w).amin(1).float()
    x1 = torch.where(cols, xs, -1).amax(1).float() + 1
    empty = ~rows.any(1)
    box = torch.stack([x0 / w * 2 - 1, y0 / h * 2 - 1, x1 / w * 2 - 1, y1 / h * 2 - 1], 1)
    return torch.where(empty[:, None], torch.zeros_like(box), box)


def lesion_crop_params(masks: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.7, 1.0),
                       rotate_deg: float = 10.0, flip: bool = True) -> torch.Tensor:
    """Affine grids (N, 2, 3) of random resized square crops that contain each mask's whole bounding box.

    Crop side: U(scale) of the image side, enlarged to fit the box; position: uniform among the positions that
    contain the box and stay in the image. Then a random flip and a rotation up to
    `rotate_deg` about the crop centre, dropped (angle 0) for an image where it would turn a box corner out."""
    n = masks.shape[0]
    box = region_extent(masks)
    bw, bh = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    side = _uniform(n, gen, *scale) * 2  # crop side in normalised units (the image is 2 wide)
    side = torch.maximum(side, torch.maximum(bw, bh) * 1.02).clamp(max=2.0)
    half = side / 2
    centre = []
    for lo_edge, hi_edge in ((box[:, 0], box[:, 2]), (box[:, 1], box[:, 3])):
        # box inside: c in [hi_edge - half, lo_edge + half]; crop in the image: c in [-1 + half, 1 - half]. Both
        # intervals are non-empty and intersect, because the box lies in the image and the side fits the box
        lo = torch.maximum(hi_edge - half, -1 + half)
        hi = torch.minimum(lo_edge + half, 1 - half).clamp_min(lo)
        centre.append(lo + (hi - lo) * torch.rand(n, generator=gen))
    cx, cy = centre
    angle = _uniform(n, gen) * math.radians(rotate_deg)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    corners = torch.stack([torch.stack([box[:, i], box[:, j]], 1) for i, j in ((0, 1), (2, 1), (0, 3), (2, 3))], 1)  # (N, 4, 2)
    rel = (corners - torch.stack([cx, cy], 1)[:, None]) / half[:, None, None]
    cos, sin = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    # output coords u of a corner: rotate back by -angle (the flip keeps |u| the same)
    ux = cos * rel[..., 0] + sin * rel[..., 1]
    uy = -sin * rel[..., 0] + cos * rel[..., 1]
    fits = (ux.abs() <= 1).all(1) & (uy.abs() <= 1).all(1)
    angle = torch.where(fits, angle, torch.zeros_like(angle))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = half * cos * sign, -half * sin, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = half * sin * sign, half * cos, cy
    return theta


def lesion_crops(x01: torch.Tensor, masks: torch.Tensor, gen: torch.Generator,
                 scale: tuple[float, float] = (0.7, 1.0), rotate_deg: float = 10.0,
                 theta: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random resized crops (flip, small rotation, intensity jitter) that keep each lesion's box in view.

    x01 (N, C, H, W) in [0, 1], masks bool (N, H, W) -> (images, masks warped the same way (nearest), theta)."""
    if theta is None:
        theta = lesion_crop_params(masks, gen, scale=scale, rotate_deg=rotate_deg)
    images = intensity_jitter(warp(x01, theta).clamp(0, 1), gen)
    warped = warp(masks[:, None].float(), theta, mode="nearest")[:, 0] > 0.5
    return images, warped, theta


def inpaint_regions(x01: torch.Tensor, masks: torch.Tensor, sigmas: tuple[float, ...] = (3.0, 9.0, 27.0, 81.0),
                    min_weight: float = 0.05) -> torch.Tensor:
    """Each image's region (masks (N, *s), True inside) replaced by a smooth fill from its surroundings: the normalised
    Gaussian convolution of the pixels outside the region, sum G * x * known / sum G * known, at the smallest sigma whose
    weight sum(G * known) reaches `min_weight` at that pixel (near the edge a local fill, deep inside a wider one).
    Pixels outside the region are unchanged and the fill never reads a pixel inside it: the lesion is gone, only the
    region's smooth outline remains. For a control model trained on slices without their tumour."""
    region = masks.bool()[:, None].expand_as(x01)
    known = (~region).to(x01.dtype)
    out = x01.clone()
    todo = region.clone()
    for sigma in sigmas:
        rows = todo.flatten(1).any(1).nonzero()[:, 0]  # only the images with pixels still to fill
        if len(rows) == 0:
            break
        weight = gaussian_blur(known[rows], sigma)
        fill = gaussian_blur(x01[rows] * known[rows], sigma) / weight.clamp_min(1e-12)
        take = todo[rows] & ((weight >= min_weight) | (sigma == sigmas[-1]))
        out[rows] = torch.where(take, fill, out[rows])
        todo[rows] &= ~take
    return out
