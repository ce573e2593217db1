"""Reference images methods and metrics compare an input with: the one Gaussian blur and the one baseline resolver.

`resolve_baseline` turns a `baseline=` option ("zero", "spec-zero", "mean", "blur", "background", a number or a tensor)
into a tensor broadcastable to the input plus provenance notes; `make_baseline` gives it at full input shape;
`scan_black` is the scale's black in a model's input space and `air_level` the scan's own black measured from its frame:
what "zero" means when the model carries its input spec.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from medlens.core.model_description import describe
from medlens.core.options import finite_number
from medlens.errors import MethodError

BaselineSpec = Union[str, float, int, torch.Tensor]
BASELINE_NAMES = ("zero", "spec-zero", "mean", "blur", "background")
SPEC_ZERO_NOTE = "0 in the model's input space (after its normalisation: the normalisation's mean, not the scan's black)"


def scan_black(model: Any) -> Optional[torch.Tensor]:
    """The scan's black in the model's input space, per channel (1, C): (0 - mean) / std of the model's input spec
    (its intensity scale maps the scan's black to 0 before normalising); None when the model carries no spec or
    black is 0 there anyway (mean 0), so that "zero" is then the plain 0."""
    spec = describe(model).input_spec if model is not None else None
    if spec is None or not hasattr(spec, "_per_channel"):
        return None
    try:
        mean = torch.tensor(spec._per_channel(spec.mean), dtype=torch.float32)
        std = torch.tensor(spec._per_channel(spec.std), dtype=torch.float32)
    except (TypeError, ValueError):
        return None
    if mean.numel() != int(spec.channels) or std.numel() != int(spec.channels) or bool((mean == 0).all()):
        return None
    return ((0.0 - mean) / std)[None]


#: the frame's median is taken as the scan's black (its air) only when it lies in this darkest share of the image's
#: range above the intensity scale's black: the noise floor of air in a magnitude image, never a grey border
AIR_SHARE_OF_RANGE = 0.05


def air_level(x: torch.Tensor, black: torch.Tensor) -> torch.Tensor:
    """Per image and channel (B, C) the scan's black as measured in x (B, C, *s): the median of its outer frame (the air
    around the body, with its noise floor and the JPEG ringing above the scale's 0) when that lies between the scale's
    `black` (1, C) and `black` plus AIR_SHARE_OF_RANGE of the image's range; the scale's `black` otherwise."""
    black = black.to(device=x.device, dtype=x.dtype).reshape(1, -1).expand(x.shape[0], -1)
    flat = x.detach().flatten(2)
    frame = torch.stack([border_median(x[i].detach()) for i in range(x.shape[0])])
    reach = AIR_SHARE_OF_RANGE * (flat.amax(dim=2) - black)
    dark = (frame >= black) & (frame - black <= reach)
    return torch.where(dark, frame, black)


def _black_reference(x: torch.Tensor, black: Optional[torch.Tensor], nd: int) -> tuple[torch.Tensor, dict[str, Any]]:
    if black is None or black.shape[-1] != x.shape[1]:
        return torch.zeros((1, 1) + (1,) * nd, dtype=x.dtype, device=x.device), {
            "baseline_reference": "0 (the scan's black: the model has no input normalisation that moves it)"}
    level = air_level(x, black)
    ref = level.reshape(*level.shape, *([1] * nd))
    return ref, {"baseline_reference": "the scan's black in the model's input space: the median of the image's outer "
                 f"frame (its air) where that lies in the darkest {AIR_SHARE_OF_RANGE:.0%} of its range, else "
                 "(0 - mean) / std of the input spec",
                 "baseline_values": [[round(float(v), 6) for v in row] for row in level]}


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, *s) over its 1, 2 or 3 spatial axes, reflect-padded, in torch.

    The kernel reaches 3 sigma; on an axis shorter than that it is cut to the axis and renormalised."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    nd = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    out = x
    for axis in range(nd):
        size = out.shape[2 + axis]
        r = min(radius, size - 1)
        k = kernel[radius - r : radius + r + 1] if r < radius else kernel
        k = k / k.sum()
        shape = [1] * nd
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = r  # F.pad lists pads from the last axis backwards
        pad[2 * (nd - 1 - axis) + 1] = r
        padded = F.pad(out, pad, mode="reflect") if r > 0 else out
        out = conv(padded, weight, groups=c)
    return out


def border_median(img: torch.Tensor) -> torch.Tensor:
    """Per channel median of the outer frame of one image (C, *s); the frame is ~3% of each side thick."""
    c = img.shape[0]
    spatial = img.shape[1:]
    frame = torch.zeros(spatial, dtype=torch.bool, device=img.device)
    for axis, size in enumerate(spatial):
        width = max(1, int(round(0.03 * size)))
        idx = [slice(None)] * len(spatial)
        idx[axis] = slice(0, width)
        frame[tuple(idx)] = True
        idx[axis] = slice(size - width, size)
        frame[tuple(idx)] = True
    return img.reshape(c, -1)[:, frame.reshape(-1)].median(dim=1).values


def _fraction_of_smallest_side(fraction: float, minimum: float = 0.0) -> Callable[[torch.Tensor], float]:
    return lambda x: max(minimum, fraction * min(x.shape[2:]))


def resolve_baseline(
    x: torch.Tensor, baseline: BaselineSpec, blur_sigma: Optional[float] = None, *,
    names: Sequence[str] = BASELINE_NAMES,
    default_blur_sigma: Callable[[torch.Tensor], float] = _fraction_of_smallest_side(0.05),
    black: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The reference for x (B, C, *s): a tensor broadcastable to x, and notes for provenance.

    "zero": the scan's black in the model's input space (`black`, per channel, from `scan_black(model)`; 0 when
    None); "spec-zero": 0 in the model's input space (after normalisation: a grey for most models); "mean": each image's per-channel mean; "blur": a Gaussian blur of the image (sigma in pixels,
    `blur_sigma`, by default `default_blur_sigma(x)`: 5% of the smallest spatial side); "background": each
    image's per-channel median of its outer frame (~3% of each side), the usual air/background intensity of a
    scan or radiograph; a number: that value; a tensor: used as given (broadcast to x). `names`: the names a
    caller accepts.
    """
    b, c = x.shape[:2]
    nd = x.dim() - 2
    notes: dict[str, Any] = {"baseline": baseline if isinstance(baseline, (str, int, float)) else "tensor"}
    refused = f"baseline must be one of {', '.join(names)}, a number or a tensor, got {baseline!r}."
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(device=x.device, dtype=x.dtype), x.shape), notes
        except RuntimeError:
            raise MethodError(
                f"the baseline tensor has shape {tuple(baseline.shape)}, which does not broadcast to the input "
                f"{tuple(x.shape)}; give one shaped like the input (or like one image)."
            ) from None
    if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float)):
        raise MethodError(refused)
    if isinstance(baseline, (int, float)):
        value = finite_number(baseline, "baseline")
        return torch.full((1, 1) + (1,) * nd, value, dtype=x.dtype, device=x.device), notes
    name = baseline.strip().lower()
    if name not in names:
        raise MethodError(refused)
    if name == "zero":
        ref, said = _black_reference(x, black, nd)
        notes.update(said)
        return ref, notes
    if name == "spec-zero":
        notes["baseline_reference"] = SPEC_ZERO_NOTE
        return torch.zeros((1, 1) + (1,) * nd, dtype=x.dtype, device=x.device), notes
    if name == "mean":
        ref = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        notes["baseline_values"] = [[round(float(v), 6) for v in row] for row in ref.reshape(b, c)]
        return ref, notes
    if name == "background":
        ref = torch.stack([border_median(x[i]) for i in range(b)]).reshape(b, c, *([1] * nd))
        notes["baseline_values"] = [[round(float(v), 6) for v in row] for row in ref.reshape(b, c)]
        return ref, notes
    sigma = finite_number(blur_sigma, "blur_sigma", above=0.0) if blur_sigma is not None else default_blur_sigma(x)
    notes["blur_sigma"] = round(sigma, 4)
    return gaussian_blur(x, sigma), notes


#: the gradient methods' "blur" baseline: strongly blurred (a tenth of the smallest side, at least 1 voxel), so
#: fine structure is gone and the coarse intensity layout stays
GRADIENT_BLUR_SIGMA = _fraction_of_smallest_side(0.1, minimum=1.0)


def make_baseline(x: torch.Tensor, baseline: Any, black: Optional[torch.Tensor] = None,
                  notes: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """The gradient methods' baseline for x at x's full shape: "zero" (the scan's black, `black`), "spec-zero", "blur",
    a number, or a tensor broadcastable to x (integrated gradients' path start); what it is goes into `notes`."""
    ref, said = resolve_baseline(x, baseline, names=("zero", "spec-zero", "blur"), default_blur_sigma=GRADIENT_BLUR_SIGMA,
                                 black=black)
    if notes is not None:
        notes.update({k: v for k, v in said.items() if k != "baseline"})
    return torch.broadcast_to(ref, x.shape).clone()


def reference_of(x: torch.Tensor, reference: Any, black: Optional[torch.Tensor], notes: dict[str, Any]) -> torch.Tensor:
    """The reference point of input x gradient and LRP's input layer: "zero" (the scan's black in the model's input
    space) or "spec-zero" (0 in that space, the plain x); a tensor broadcastable to x. Notes say which."""
    name = str(reference).strip().lower()
    if name not in ("zero", "spec-zero"):
        raise MethodError(f"option reference must be 'zero' (the scan's black) or 'spec-zero' (0 after the model's "
                          f"normalisation), got {reference!r}.")
    ref, said = resolve_baseline(x, name, names=("zero", "spec-zero"), black=black)
    notes["reference"] = said["baseline_reference"]
    return ref
