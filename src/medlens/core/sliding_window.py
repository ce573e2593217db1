"""Explaining a volume larger than the model's window: `SlidingWindow` (`explain(sliding_window=...)`), the blended
full-volume logits, and their input gradient accumulated window by window, so memory is bounded by the window.

Why our own and not MONAI's `sliding_window_inference`: MONAI's function is differentiable, but it keeps every
window's graph alive until the backward pass, so the gradient of a whole 256x256x128 volume costs as much memory as
running the model on the whole volume at once. Here the blended logits come from one custom autograd function:
its forward runs the windows without a graph, and its backward runs them again one at a time (one window's graph
alive at a time), adding each window's input gradient. Since the blended output is a weighted sum of window outputs,
out = sum_w pad_w(m * f(x_w)) / count, the gradient of any region score is exactly the sum of the windows' own;
the positions, padding and blending (constant or Gaussian importance map, sigma = 0.125 x window) are MONAI's, and
the tests check the logits against MONAI's function and the maps against one graph over the blended output.

Methods that only need the input gradient run through it: saliency, input x gradient, integrated gradients (per
path point) and SmoothGrad. Methods that hook a layer (the CAM family, LRP) or perturb the input in patches would
see one window at a time, not the volume; they are refused with the option's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import MethodError, ModelError
from medlens.tensor.autograd import logits_of

WINDOW_OPTIONS = ("sliding_window", "sliding_window_overlap", "sliding_window_blend")
WINDOWED_METHODS = ("saliency", "inputxgradient", "integratedgradients", "smoothgrad")
BLENDS = ("constant", "gaussian")
SIGMA_SCALE = 0.125  # MONAI's default: sigma = 0.125 x the window's size on each axis


@dataclass(frozen=True)
class SlidingWindow:
    """How a volume is cut into windows: the window's spatial size (D, H, W) (2-D: (H, W)), the fraction of a window
    that neighbours share (MONAI's `overlap`, default 0.25) and how overlapping outputs are blended ("constant":
    plain mean, MONAI's default; "gaussian": centre-weighted, as nnU-Net)."""

    size: tuple[int, ...]
    overlap: float = 0.25
    blend: str = "constant"

    def record(self) -> dict[str, Any]:
        """The settings as JSON-ready data, for the provenance."""
        return {"size": list(self.size), "overlap": self.overlap, "blend": self.blend,
                "sigma_scale": SIGMA_SCALE if self.blend == "gaussian" else None}


def parse_window(value: Any, what: str = "sliding_window") -> Optional[tuple[int, ...]]:
    """A window size from a tuple/list of ints or a text "96,96,96"; None stays None.

    Raises:
        MethodError: anything but 2 or 3 positive integers.
    """
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return None
    items = value.replace("x", ",").split(",") if isinstance(value, str) else value
    try:
        size = tuple(int(str(v).strip()) for v in items)
    except (TypeError, ValueError):
        size = ()
    if len(size) not in (2, 3) or any(s <= 0 for s in size):
        raise MethodError(f"{what} must be the window's size as 2 or 3 positive integers, e.g. (96, 96, 96) "
                          f"(--window 96,96,96); got {value!r}.")
    return size


def declared_window(model: nn.Module, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options with the model's declared patch size as `sliding_window` (its input spec's `extra["patch_size"]`,
    from a sidecar's "patch_size"), unless the options give one (or "none", to explain the volume at once).

    Args:
        model: the model (medlens-loaded or not).
        options: the request's options.

    Returns:
        The options, with "sliding_window" set when the model declares a patch size and the options say nothing.
    """
    from medlens.core.model_description import describe

    spec = describe(model).input_spec
    patch = (spec.extra or {}).get("patch_size") if spec is not None else None
    if patch is None or "sliding_window" in options:
        return dict(options)
    return {**options, "sliding_window": tuple(parse_window(patch, "the model's patch_size"))}


def take_window(options: Mapping[str, Any]) -> tuple[Optional[SlidingWindow], dict[str, Any]]:
    """The sliding window asked for in a call's options, and the options without its keys.

    Raises:
        MethodError: a bad size, an overlap outside [0, 1), an unknown blend, or overlap/blend without a size.
    """
    options = dict(options)
    size = parse_window(options.pop("sliding_window", None))
    overlap = options.pop("sliding_window_overlap", None)
    blend = options.pop("sliding_window_blend", None)
    if size is None:
        if overlap is not None or blend is not None:
            raise MethodError("sliding_window_overlap and sliding_window_blend need sliding_window=(D, H, W), the "
                              "window's size (--window D,H,W).")
        return None, options
    overlap = 0.25 if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise MethodError(f"sliding_window_overlap must be a number in [0, 1), e.g. 0.25; got {overlap!r}.")
    blend = "constant" if blend is None else blend
    if blend not in BLENDS:
        raise MethodError(f"sliding_window_blend must be one of {', '.join(BLENDS)}; got {blend!r}.")
    return SlidingWindow(size, float(overlap), blend), options


def checked_window(options: Mapping[str, Any], method_names: Sequence[str]) -> dict[str, Any]:
    """The options without the sliding window's keys, once the window and the methods asked with it are checked.

    Raises:
        MethodError: a bad window setting, or a method that cannot run window by window.
    """
    window, rest = take_window(options)
    if window is not None:
        _check_methods(method_names)
    return rest


def _check_methods(method_names: Sequence[str]) -> None:
    refused = [name for name in method_names if name not in WINDOWED_METHODS]
    if refused:
        raise MethodError(f"method(s) {', '.join(refused)} cannot run with sliding_window (--window): they hook a "
                          f"layer or perturb the input, and would see one window at a time, not the volume. Use "
                          f"{', '.join(WINDOWED_METHODS)}, or explain the volume at once (sliding_window='none'; "
                          f"--window none).")


def window_starts(image: Sequence[int], size: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Every window's first voxel, as MONAI's `dense_patch_slices` places them: a step of int(size x (1 - overlap))
    (the whole axis when the window spans it), the last window pushed back inside the image."""
    per_axis = []
    for n, w in zip(image, size):
        step = w if w == n else max(int(w * (1 - overlap)), 1)
        count = next((d for d in range(math.ceil(n / step)) if d * step + w >= n), 0) + 1
        per_axis.append([i * step - max(i * step + w - n, 0) for i in range(count)])
    grids = torch.meshgrid(*[torch.tensor(a) for a in per_axis], indexing="ij")
    return [tuple(int(g.flatten()[i]) for g in grids) for i in range(grids[0].numel())]


def importance_map(size: Sequence[int], blend: str, device: torch.device) -> torch.Tensor:
    """The weight of each voxel of a window's output (MONAI's `compute_importance_map`): ones, or a Gaussian with
    sigma = 0.125 x the window's size, clamped below at 1e-3."""
    weights = torch.ones(tuple(size), device=device)
    if blend == "gaussian":
        for axis, w in enumerate(size):
            t = torch.arange(-(w - 1) / 2.0, (w - 1) / 2.0 + 1, device=device)
            shape = [1] * len(size)
            shape[axis] = w
            weights = weights * torch.exp(t ** 2 / (-2 * (w * SIGMA_SCALE) ** 2)).view(shape)
    return weights.clamp_min(max(float(weights.min()), 1e-3))


def _window_logits(model: nn.Module, piece: torch.Tensor) -> torch.Tensor:
    out = logits_of(model(piece))
    if not isinstance(out, torch.Tensor) or out.dim() != piece.dim() or out.shape[2:] != piece.shape[2:]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"a sliding window needs per-voxel logits of the window's size: for a window "
                         f"{tuple(piece.shape)} the model returned {shape}. Use a window the model's output matches, "
                         f"or explain without --window.")
    return out


class _Plan:
    """The padded image's windows, weights and the normalising count of one call (MONAI's zero padding when the
    image is smaller than the window along an axis)."""

    def __init__(self, x: torch.Tensor, window: SlidingWindow) -> None:
        spatial = tuple(x.shape[2:])
        if len(window.size) != len(spatial):
            raise MethodError(f"sliding_window {window.size} has {len(window.size)} axes, but the input "
                              f"{tuple(x.shape)} has {len(spatial)} spatial axes; give one size per axis.")
        extra = [max(w - n, 0) for w, n in zip(window.size, spatial)]
        self.pads = [p for e in reversed(extra) for p in (e // 2, e - e // 2)]  # F.pad order: last axis first
        self.crop = tuple(slice(e // 2, e // 2 + n) for e, n in zip(extra, spatial))
        self.padded = tuple(n + e for n, e in zip(spatial, extra))
        self.starts = window_starts(self.padded, window.size, window.overlap)
        self.weights = importance_map(window.size, window.blend, x.device).to(x.dtype)
        count = torch.zeros(self.padded, device=x.device, dtype=x.dtype)
        for where in self.slices():
            count[where] += self.weights
        self.count = count

    def slices(self) -> list[tuple[slice, ...]]:
        size = self.weights.shape
        return [tuple(slice(s, s + w) for s, w in zip(start, size)) for start in self.starts]


class _BlendedLogits(torch.autograd.Function):
    """Blended logits with a backward that runs one window of one image at a time (input gradient only): a batch
    (integrated gradients' path points, SmoothGrad's noisy copies) adds volume-sized buffers, not window graphs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, model: nn.Module, window: SlidingWindow) -> torch.Tensor:
        plan = _Plan(x, window)
        padded = F.pad(x, plan.pads)
        out = None
        for where in plan.slices():
            for b in range(x.shape[0]):
                y = _window_logits(model, padded[(slice(b, b + 1), slice(None), *where)])
                if out is None:
                    out = y.new_zeros((x.shape[0], y.shape[1], *plan.padded))
                out[(slice(b, b + 1), slice(None), *where)] += y * plan.weights
        ctx.save_for_backward(x)
        ctx.model, ctx.plan = model, plan
        return (out / plan.count)[(..., *plan.crop)]

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        plan = ctx.plan
        grad = grad_out.new_zeros((*grad_out.shape[:2], *plan.padded))
        grad[(..., *plan.crop)] = grad_out
        grad = grad / plan.count
        padded = F.pad(x.detach(), plan.pads)
        grad_in = torch.zeros_like(padded)
        for where in plan.slices():
            for b in range(x.shape[0]):
                at = (slice(b, b + 1), slice(None), *where)
                with torch.enable_grad():
                    piece = padded[at].detach().requires_grad_(True)
                    y = _window_logits(ctx.model, piece)
                    (g,) = torch.autograd.grad(y, piece, grad[at] * plan.weights)
                grad_in[at] += g
        return grad_in[(slice(None), slice(None), *plan.crop)], None, None


class WindowedModel(nn.Module):
    """The model run over the input by sliding window: its output is the blended logits (B, K, *spatial); the
    gradient with respect to the input is taken window by window. Holds the model as `model`."""

    def __init__(self, model: nn.Module, window: SlidingWindow) -> None:
        super().__init__()
        self.model = model
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BlendedLogits.apply(x, self.model, self.window)


def windowed_model(model: nn.Module, window: Optional[SlidingWindow], method_names: Sequence[str],
                   x: torch.Tensor) -> nn.Module:
    """The model to explain: `model` itself without a window, else `model` in a `WindowedModel`.

    Args:
        model: the model as given.
        window: the call's `SlidingWindow`, or None.
        method_names: the requested methods (registry names).
        x: the input batch (B, C, *spatial).

    Returns:
        The model, or the model in a WindowedModel.

    Raises:
        MethodError: a method that cannot run window by window, or a window with the wrong number of axes.
    """
    if window is None:
        return model
    _check_methods(method_names)
    if len(window.size) != x.dim() - 2:
        raise MethodError(f"sliding_window {window.size} has {len(window.size)} axes, but the input {tuple(x.shape)} "
                          f"has {x.dim() - 2} spatial axes; give one size per axis.")
    return WindowedModel(model, window)
