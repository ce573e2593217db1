"""The perturbation family's shared base (baselines, batched model evaluation) and its sliding/random masks.

Owns `occlusion` and `rise`; `lime` and `kernelshap` (superpixel surrogates) live in
`surrogate.py` and reuse the baselines and the batched evaluator defined here.

Conventions shared by the family:
- f is the raw logit of each target (option `output="probability"` uses softmax, or sigmoid for a
  multi-label model). Every perturbed batch is evaluated once and yields the scores of ALL targets.
- A perturbed input is `baseline + (x - baseline) * keep`, with the baseline resolved per image by
  `medlens.core.baselines.resolve_baseline` ("zero", "mean", "blur", "background", a float or a tensor); its name and values
  go to the method's provenance.
- Model calls run in inference mode, `batch_size` perturbed inputs at a time; randomness comes only
  from `ctx.generator(method name)`; a tqdm bar shows on a terminal for long runs; Ctrl-C
  (KeyboardInterrupt) closes the bar and propagates (the model is restored by `borrowed_model`).
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from medlens.core.baselines import resolve_baseline, scan_black
from medlens.core.batching import chunks
from medlens.core.context import ExplainContext
from medlens.errors import MethodError
from medlens.core.options import positive_int
from medlens.core.registry import MethodSpec, register

PROGRESS_MIN_EVALS = 256  # below this many model evaluations no progress bar is shown


# ------------------------------------------------------------------------------------------- options
def check_output(options: Mapping[str, Any]) -> str:
    output = options.get("output", "logit")
    if output not in ("logit", "probability"):
        raise MethodError(f"option output must be 'logit' or 'probability', got {output!r}.")
    return output


def per_axis(value: Any, ndim: int, name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """An int or a tuple of ints (one per spatial axis) -> a tuple of ints, each within 1..axis size."""
    if isinstance(value, (int,)) and not isinstance(value, bool):
        values = (int(value),) * ndim
    elif isinstance(value, (tuple, list)) and len(value) == ndim and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        values = tuple(int(v) for v in value)
    else:
        raise MethodError(
            f"option {name} must be an integer or a tuple of {ndim} integers (one per spatial axis of the input "
            f"{tuple(shape)}), got {value!r}."
        )
    if any(v < 1 for v in values):
        raise MethodError(f"option {name} must be positive, got {value!r}.")
    return tuple(min(v, s) for v, s in zip(values, shape))


# ------------------------------------------------------------------------------------- model batching
def scores_of(ctx: ExplainContext, logits: torch.Tensor, image: int, output: str) -> torch.Tensor:
    """(n, K) logits -> (n, T) values of f for the targets of `image`."""
    if output == "probability":
        logits = torch.sigmoid(logits) if ctx.multi_label else torch.softmax(logits, dim=1)
    return logits[:, ctx.targets[image]]


class Progress:
    """A tqdm bar over model evaluations, shown only on a terminal and for long runs; always closed."""

    def __init__(self, total: int, desc: str, enabled: Optional[bool]) -> None:
        if enabled is None:
            isatty = getattr(sys.stderr, "isatty", None)
            enabled = total >= PROGRESS_MIN_EVALS and bool(isatty and isatty())
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="eval", leave=False)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate(
    ctx: ExplainContext,
    image: int,
    n: int,
    make_batch: Callable[[int, int], torch.Tensor],
    batch_size: int,
    output: str,
    progress: Progress,
    consume: Optional[Callable[[int, int, torch.Tensor], None]] = None,
) -> Optional[torch.Tensor]:
    """Evaluate n perturbed copies of image `image`, `batch_size` at a time: f for all its targets.

    `make_batch(lo, hi)` builds inputs lo..hi-1; returns (n, T) scores, or streams them to
    `consume(lo, hi, scores)` (then returns None) so that nothing of size n x input is kept.
    """
    out = [] if consume is None else None
    forward = ctx.fast_forward()  # BatchNorm folded, channels-last: the model's values to float rounding
    with torch.inference_mode():
        for lo, hi in chunks(n, batch_size):
            batch = make_batch(lo, hi)
            s = scores_of(ctx, forward(batch), image, output).to(torch.float64)
            if consume is None:
                out.append(s)
            else:
                consume(lo, hi, s)
            progress.update(hi - lo)
    return torch.cat(out) if out is not None else None


def base_scores(ctx: ExplainContext, output: str) -> torch.Tensor:
    """f(x) for every image and target slot: (B, T), float64, from the call's shared logits."""
    return torch.stack([scores_of(ctx, ctx.logits[i : i + 1], i, output)[0] for i in range(ctx.x.shape[0])]).double()


def common_notes(ctx: ExplainContext, options: Mapping[str, Any], baseline_notes: Mapping[str, Any]) -> None:
    ctx.method_notes.update(baseline_notes)
    ctx.method_notes["f"] = (
        "raw logit of each target" if options.get("output", "logit") == "logit"
        else ("sigmoid probability" if ctx.multi_label else "softmax probability") + " of each target"
    )


# ------------------------------------------------------------------------------------------ occlusion
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window origins along one axis: 0, stride, ... while the previous window ends before the edge.

    ceil((size - window) / stride) + 1 windows; the last one may stick out and is cut at the edge
    (captum's Occlusion does the same, so the two agree exactly)."""
    count = int(math.ceil((size - window) / stride)) + 1
    return [i * stride for i in range(count)]


def _occlusion(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    x = ctx.x
    b = x.shape[0]
    spatial = ctx.spatial_shape
    nd = len(spatial)
    window = per_axis(options["window"], nd, "window", spatial)
    stride = per_axis(options["stride"] if options["stride"] is not None else options["window"], nd, "stride", spatial)
    batch_size = positive_int(options, "batch_size")
    output = check_output(options)
    ref, notes = resolve_baseline(x, options["baseline"], options.get("blur_sigma"), black=scan_black(ctx.model))
    ref = ref.expand_as(x)
    starts = [window_starts(s, w, st) for s, w, st in zip(spatial, window, stride)]
    grid = tuple(len(s) for s in starts)
    n_windows = math.prod(grid)
    origins = torch.cartesian_prod(*[torch.tensor(s) for s in starts]).reshape(n_windows, nd).tolist()
    common_notes(ctx, options, notes)
    ctx.method_notes.update(window=list(window), stride=list(stride), windows_per_image=n_windows,
                            batch_size=batch_size, model_evaluations=b * n_windows)
    f_x = base_scores(ctx, output)
    t = ctx.targets.shape[1]
    diffs = torch.empty(b, t, n_windows, dtype=torch.float64, device=x.device)

    with Progress(b * n_windows, "occlusion", options.get("progress")) as progress:
        for i in range(b):
            xi, ri = x[i], ref[i]

            def make_batch(lo: int, hi: int) -> torch.Tensor:
                batch = xi.unsqueeze(0).repeat(hi - lo, *([1] * xi.dim()))
                for k in range(lo, hi):
                    region = (slice(None),) + tuple(slice(o, o + w) for o, w in zip(origins[k], window))
                    batch[(k - lo,) + region] = ri[region]
                return batch

            scores = evaluate(ctx, i, n_windows, make_batch, batch_size, output, progress)
            diffs[i] = (f_x[i][:, None] - scores.T)

    # Spread each window's difference over the pixels it covers and average: a transposed convolution
    # with a box kernel (sum over covering windows), divided by the same of ones (the count).
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    box = torch.ones((1, 1) + window, dtype=torch.float64, device=x.device)
    total = conv_t(diffs.reshape(b * t, 1, *grid), box, stride=stride)
    count = conv_t(torch.ones((1, 1) + grid, dtype=torch.float64, device=x.device), box, stride=stride)
    crop = (Ellipsis,) + tuple(slice(0, s) for s in spatial)
    attribution = total[crop] / count[crop]
    return attribution.reshape(b, t, *spatial).float()


# ---------------------------------------------------------------------------------------------- RISE
def rise_masks(
    grids: torch.Tensor, shifts: torch.Tensor, cell: Sequence[int], spatial: Sequence[int]
) -> torch.Tensor:
    """Smooth RISE masks (n, 1, *spatial) from binary low-res grids (n, 1, *g) and shifts (n, nd).

    Each grid is upsampled (bi/trilinear) to g*cell and cropped at its own random offset (< cell)."""
    n = grids.shape[0]
    nd = len(spatial)
    up_size = [g * c for g, c in zip(grids.shape[2:], cell)]
    mode = "bilinear" if nd == 2 else "trilinear"
    up = F.interpolate(grids, size=up_size, mode=mode, align_corners=False)
    out = torch.empty((n, 1) + tuple(spatial), dtype=grids.dtype, device=grids.device)
    for k in range(n):
        region = tuple(slice(int(o), int(o) + s) for o, s in zip(shifts[k], spatial))
        out[k, 0] = up[(k, 0) + region]
    return out


def _rise(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    x = ctx.x
    b, c = x.shape[:2]
    spatial = ctx.spatial_shape
    nd = len(spatial)
    n_masks = positive_int(options, "n_masks")
    batch_size = positive_int(options, "batch_size")
    output = check_output(options)
    p_keep = options["p_keep"]
    if isinstance(p_keep, bool) or not isinstance(p_keep, (int, float)) or not 0 < p_keep <= 1:
        raise MethodError(f"option p_keep must be a probability in (0, 1], got {p_keep!r}.")
    p_keep = float(p_keep)
    if options["cell_size"] is None:
        cell = tuple(max(1, int(math.ceil(s / 7))) for s in spatial)  # a 7-cell grid per axis, as in the paper
    else:
        cell = per_axis(options["cell_size"], nd, "cell_size", spatial)
    grid_shape = tuple(int(math.ceil(s / cl)) + 1 for s, cl in zip(spatial, cell))
    ref, notes = resolve_baseline(x, options["baseline"], options.get("blur_sigma"), black=scan_black(ctx.model))
    ref = ref.expand_as(x)
    common_notes(ctx, options, notes)
    ctx.method_notes.update(cell_size=list(cell), grid=[g - 1 for g in grid_shape], n_masks=n_masks, p_keep=p_keep,
                            batch_size=batch_size, model_evaluations=b * n_masks)

    # All randomness drawn up front from the call's generator: the masks do not depend on batch_size.
    gen = ctx.generator("rise")
    grids = (torch.rand((n_masks, 1) + grid_shape, generator=gen, device=x.device) < p_keep).to(x.dtype)
    shifts = torch.stack([torch.randint(0, cl, (n_masks,), generator=gen, device=x.device) for cl in cell], dim=1)
    t = ctx.targets.shape[1]
    n_pix = math.prod(spatial)
    saliency = torch.zeros(b, t, n_pix, dtype=torch.float64, device=x.device)

    forward = ctx.fast_forward()  # BatchNorm folded, channels-last: the model's values to float rounding
    with Progress(b * n_masks, "rise", options.get("progress")) as progress, torch.inference_mode():
        for lo, hi in chunks(n_masks, batch_size):
            masks = rise_masks(grids[lo:hi], shifts[lo:hi], cell, spatial)  # (n, 1, *S), reused by every image
            flat = masks.reshape(hi - lo, n_pix).double()
            for i in range(b):
                batch = ref[i] + (x[i] - ref[i]) * masks
                s = scores_of(ctx, forward(batch), i, output).double()  # (n, T)
                saliency[i] += s.T @ flat
                progress.update(hi - lo)
    saliency = saliency / (n_masks * p_keep)
    return saliency.reshape(b, t, *spatial).float().clone()


# ------------------------------------------------------------------------------------------ registry
COMMON = {"baseline": "zero", "blur_sigma": None, "batch_size": 64, "output": "logit", "progress": None}

register(MethodSpec(
    name="occlusion", family="perturbation",
    summary="Occlusion: slide a window replaced by a baseline; each pixel gets the mean score drop of the windows "
            "covering it (Zeiler & Fergus 2014; same values as captum's Occlusion).",
    run=_occlusion, needs_gradients=False, needs_layer=False, supports_3d=True, stochastic=False,
    cost="one forward per window position, batched",
    options={"window": 16, "stride": 8, **COMMON},
))
register(MethodSpec(
    name="rise", family="perturbation",
    summary="RISE: score-weighted sum of random smooth masks, upsampled coarse binary grids with random shifts "
            "(Petsiuk et al. 2018).",
    run=_rise, needs_gradients=False, needs_layer=False, supports_3d=True, stochastic=True,
    cost="one forward per mask (n_masks), batched",
    options={"n_masks": 2000, "cell_size": None, "p_keep": 0.5, **COMMON},
))
