"""Synthetic MRI-like lesion phantoms with exact ground truth: 2-D slices and small 3-D volumes, seeded.

Owns the generator of heads (skull, textured tissue, ventricles, bias field, noise), lesions with exact masks, and
the "shortcut" variant whose burned-in corner marker correlates with the class.

Each case is drawn from its own generator seeded by (seed, index), so case i is the same whatever n is.
Construction (2-D and 3-D alike): image = clamp(bias * (anatomy + lesion) + noise, 0, 1) where `lesion` is
strictly positive exactly on the lesion mask and zero elsewhere, and the lesion lies inside the brain where
nothing is clamped; so the image differs from its lesion-free `background` exactly on the mask.
The marker (shortcut variant) is a tag of constant intensity painted over its exact `marker_masks` region in a
corner outside the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from medlens.errors import InputError

LABELS: tuple[str, ...] = ("normal", "lesion")
MARKER_MODES = ("none", "correlated", "random", "always", "never")


@dataclass(frozen=True)
class PhantomSet:
    """A batch of phantom cases.

    images: float32 (N, 1, *S) in [0, 1]; labels: long (N,) (0 = normal, 1 = lesion);
    lesion_masks / marker_masks: bool (N, 1, *S), exact; backgrounds: the same images without the lesion;
    has_marker: bool (N,).
    """

    images: torch.Tensor
    labels: torch.Tensor
    lesion_masks: torch.Tensor
    marker_masks: torch.Tensor
    backgrounds: torch.Tensor
    has_marker: torch.Tensor
    label_names: tuple[str, ...] = LABELS

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _case_generator(seed: int, index: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index) * 7919 + salt) % (2**62))


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=gen))


def _smooth_noise(gen: torch.Generator, shape: Sequence[int], cells: int) -> torch.Tensor:
    """Noise drawn on a coarse grid of `cells` per axis and upsampled smoothly to `shape` (zero mean, ~unit std)."""
    dims = len(shape)
    coarse = torch.randn((1, 1) + (cells,) * dims, generator=gen)
    mode = "bicubic" if dims == 2 else "trilinear"
    return F.interpolate(coarse, size=tuple(shape), mode=mode, align_corners=False)[0, 0]


def _grid(shape: Sequence[int]) -> list[torch.Tensor]:
    """Coordinates in [-1, 1] (pixel centres) for each axis, broadcast to `shape`."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in shape]
    return list(torch.meshgrid(*axes, indexing="ij"))


def _ellipsoid(coords: list[torch.Tensor], centre: Sequence[float], radii: Sequence[float], angle: float = 0.0) -> torch.Tensor:
    """Normalised radius r (r <= 1 inside) of an ellipse/ellipsoid, rotated by `angle` in the last two axes."""
    d = [c - c0 for c, c0 in zip(coords, centre)]
    if angle:
        ca, sa = torch.cos(torch.tensor(angle)), torch.sin(torch.tensor(angle))
        a, b = d[-2], d[-1]
        d[-2], d[-1] = ca * a - sa * b, sa * a + ca * b
    return torch.sqrt(sum((di / r) ** 2 for di, r in zip(d, radii)))


def _draw_case(shape: tuple[int, ...], gen: torch.Generator, with_lesion: bool, with_marker: bool,
               lesion_contrast: tuple[float, float], lesion_radius: tuple[float, float]):
    dims = len(shape)
    coords = _grid(shape)
    # head: an ellipse (2-D) / ellipsoid (3-D) with a skull ring, brain tissue, ventricles
    head_r = [_u(gen, 0.68, 0.8) for _ in range(dims)]
    head_c = [_u(gen, -0.05, 0.05) for _ in range(dims)]
    tilt = _u(gen, -0.3, 0.3)
    r_head = _ellipsoid(coords, head_c, head_r, tilt)
    skull_t = _u(gen, 0.08, 0.12)
    brain = r_head <= 1.0 - skull_t
    skull = (r_head <= 1.0) & ~brain
    base = _u(gen, 0.3, 0.4)
    texture = 0.05 * _smooth_noise(gen, shape, 6) + 0.03 * _smooth_noise(gen, shape, 14)
    # grey/white matter-like variation: a smoothed threshold pattern
    gm = torch.sigmoid(4 * _smooth_noise(gen, shape, 10)) * 0.08
    anatomy = torch.zeros(shape)
    anatomy = torch.where(brain, base + texture + gm, anatomy)
    anatomy = torch.where(skull, _u(gen, 0.55, 0.65) + 0.04 * _smooth_noise(gen, shape, 12), anatomy)
    vent_r = [r * _u(gen, 0.18, 0.24) for r in head_r]
    vent_r[-1] *= 0.6
    for side in (-1, 1):
        centre = list(head_c)
        centre[-1] = head_c[-1] + side * vent_r[-1] * 1.1
        vent = _ellipsoid(coords, centre, vent_r, tilt) <= 1.0
        anatomy = torch.where(vent & brain, torch.full(shape, 0.12), anatomy)
    anatomy = anatomy.clamp_min(0.0)
    # lesion: a lobulated blob inside the brain, away from skull and ventricles
    lesion = torch.zeros(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    if with_lesion:
        for _ in range(50):
            radius = _u(gen, *lesion_radius)
            radii = [radius * _u(gen, 0.75, 1.25) for _ in range(dims)]
            centre = [c + _u(gen, -0.55, 0.55) * r for c, r in zip(head_c, head_r)]
            r_les = _ellipsoid(coords, centre, radii, _u(gen, -1.5, 1.5))
            wobble = 1.0 + 0.18 * _smooth_noise(gen, shape, 5)
            cand = r_les <= wobble
            inner = r_head <= 1.0 - skull_t - 0.06
            if cand.any() and bool((cand & ~inner).sum() == 0):
                mask = cand
                break
        else:  # pragma: no cover - the loop virtually always places the lesion
            raise RuntimeError("could not place a lesion inside the phantom head")
        amp = _u(gen, *lesion_contrast)
        profile = 0.7 + 0.3 * torch.clamp(1.0 - r_les, 0.0, 1.0) + 0.05 * _smooth_noise(gen, shape, 16).clamp(-1, 1)
        lesion = torch.where(mask, amp * profile, torch.zeros(shape))
    # scanner effects: smooth multiplicative bias field and additive noise
    bias = 1.0 + 0.12 * _smooth_noise(gen, shape, 3).clamp(-1.5, 1.5)
    noise = 0.015 * torch.randn(shape, generator=gen)
    background = (bias * anatomy + noise).clamp(0.0, 1.0)
    image = (bias * (anatomy + lesion) + noise).clamp(0.0, 1.0)
    marker = torch.zeros(shape, dtype=torch.bool)
    if with_marker:
        marker = _marker_mask(shape)
        image = torch.where(marker, torch.full(shape, 0.7), image)
        background = torch.where(marker, torch.full(shape, 0.7), background)
    return image, mask, marker, background


def _marker_mask(shape: tuple[int, ...]) -> torch.Tensor:
    """A corner tag (an 'L'-like letter in a frame) in the top-left corner, outside any head; same in every case."""
    s = max(4, shape[-1] // 9)
    o = max(1, shape[-1] // 32)
    tag = torch.zeros(s, s, dtype=torch.bool)
    tag[0, :] = tag[-1, :] = tag[:, 0] = tag[:, -1] = True  # frame
    tag[1 : s - 2, 2] = True  # letter stem
    tag[s - 3, 2 : s - 2] = True  # letter foot
    mask = torch.zeros(shape, dtype=torch.bool)
    if len(shape) == 2:
        mask[o : o + s, o : o + s] = tag
    else:  # a tag on a few slices of the volume's first-rows corner
        depth = max(1, shape[0] // 4)
        mask[:depth, o : o + s, o : o + s] = tag
    return mask


def _make(n: int, shape: tuple[int, ...], seed: int, marker: str, marker_rate: float, positive_rate: float,
          lesion_contrast: tuple[float, float], lesion_radius: tuple[float, float]) -> PhantomSet:
    if n < 0:
        raise InputError(f"the number of phantom cases must be >= 0, got {n}.")
    if marker not in MARKER_MODES:
        raise InputError(f"unknown marker mode {marker!r}; expected one of {list(MARKER_MODES)}.")
    if min(shape) < 16:
        raise InputError(f"phantom size {shape} is too small; expected at least 16 pixels per axis.")
    images, labels, masks, markers, backgrounds = [], [], [], [], []
    for i in range(n):
        gen = _case_generator(seed, i, salt=len(shape))
        positive = bool(torch.rand((), generator=gen) < positive_rate)
        if marker == "correlated":
            keep = bool(torch.rand((), generator=gen) < marker_rate)
            has_marker = positive if keep else not positive
        elif marker == "random":
            has_marker = bool(torch.rand((), generator=gen) < 0.5)
        else:
            has_marker = marker == "always"
        image, mask, mk, bg = _draw_case(shape, gen, positive, has_marker, lesion_contrast, lesion_radius)
        images.append(image)
        labels.append(int(positive))
        masks.append(mask)
        markers.append(mk)
        backgrounds.append(bg)
    empty = (0, 1) + tuple(shape)
    stack = lambda xs, dtype: torch.stack(xs).unsqueeze(1) if xs else torch.zeros(empty, dtype=dtype)  # noqa: E731
    marker_masks = stack(markers, torch.bool)
    return PhantomSet(
        images=stack(images, torch.float32),
        labels=torch.tensor(labels, dtype=torch.long),
        lesion_masks=stack(masks, torch.bool),
        marker_masks=marker_masks,
        backgrounds=stack(backgrounds, torch.float32),
        has_marker=marker_masks.flatten(1).any(1) if n else torch.zeros(0, dtype=torch.bool),
    )


def phantom_2d(
    n: int,
    size: int = 64,
    seed: int = 0,
    marker: str = "none",
    marker_rate: float = 1.0,
    positive_rate: float = 0.5,
    lesion_contrast: tuple[float, float] = (0.18, 0.3),
    lesion_radius: tuple[float, float] = (0.08, 0.16),
) -> PhantomSet:
    """n MRI-like axial slices (size x size) with or without a bright lesion, exact masks, deterministic in seed.

    marker: "none"; "correlated" (the shortcut variant: the corner tag is present on lesion cases and absent on
    normal ones, each case independently with probability `marker_rate`, otherwise the other way round);
    "random" (present with probability 0.5, independent of the class); "always"; "never".
    lesion_radius is a fraction of the half-width of the image.
    """
    return _make(n, (int(size), int(size)), seed, marker, marker_rate, positive_rate, lesion_contrast, lesion_radius)


def phantom_3d(
    n: int,
    size: Union[int, Sequence[int]] = 32,
    seed: int = 0,
    marker: str = "none",
    marker_rate: float = 1.0,
    positive_rate: float = 0.5,
    lesion_contrast: tuple[float, float] = (0.18, 0.3),
    lesion_radius: tuple[float, float] = (0.12, 0.2),
) -> PhantomSet:
    """n small MRI-like volumes (D, H, W) with or without a lesion; same construction and guarantees as phantom_2d."""
    shape = (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)
    if len(shape) != 3:
        raise InputError(f"a 3-D phantom size needs 3 numbers (D, H, W), got {size}.")
    return _make(n, shape, seed, marker, marker_rate, positive_rate, lesion_contrast, lesion_radius)


def shortcut_set(n: int, size: int = 64, seed: int = 0, marker_rate: float = 1.0) -> PhantomSet:
    """The shortcut variant's data: faint lesions, and a corner marker that tracks the class (see phantom_2d)."""
    return phantom_2d(n, size=size, seed=seed, marker="correlated", marker_rate=marker_rate, lesion_contrast=(0.06, 0.1))
