"""Faithfulness metrics: does removing what a map calls important change the model's output?

Deletion / insertion AUC, ROAD (most- and least-relevant first, noisy linear imputation), Average Drop
and Increase in Confidence. All are batched over images and targets, work on 2-D and 3-D inputs, and score
the model's probability of each target by default (softmax, or sigmoid when `model.multi_label`).

Conventions shared by every function here:
- `x` is (B, C, *s), `maps` is (B, T, *s), `targets` is (B, T) class indices.
- Pixels (voxels) are ranked by the map's raw value, highest first; ties are broken by raster order
  (a stable sort), so a constant map removes pixels top-left first. All channels of a pixel go together.
- Model calls run under `torch.inference_mode()` in chunks of at most `chunk` perturbed inputs, through the
  folded fast forward of the perturbation methods (`medlens.accel.fast_forward`: the model's values to float rounding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
import torch.nn.functional as F

from medlens.core.baselines import gaussian_blur
from medlens.errors import InputError
from medlens.evaluation.noise import image_key, noise_generator
from medlens.evaluation.forwards import (  # noqa: F401 - re-exported: these lived here before forwards.py
    FOLD_FROM, FORWARD_BATCH, distinct_rows, given_scores, model_scores, pick, scoring,
)

Baseline = Union[str, float, torch.Tensor]


@dataclass(frozen=True)
class CurveResult:
    """A score per (image, target) plus the curve it summarises.

    values: (B, T) the summary (area under the curve, or its mean for ROAD).
    curves: (B, T, K) the model's score after each perturbation step.
    fractions: (K,) the fraction of pixels removed (or inserted) at each step.
    baseline: how removed pixels were filled, recorded for provenance.
    """

    values: torch.Tensor
    curves: torch.Tensor
    fractions: torch.Tensor
    baseline: str
    notes: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- helpers
def check_batch(x: torch.Tensor, maps: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None) -> None:
    """Insist on (B, C, *s) inputs, (B, T, *s) maps and (B, T) targets that agree with each other."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        raise InputError(f"x must be a (B, C, H, W) or (B, C, D, H, W) tensor, got {getattr(x, 'shape', type(x))}.")
    if maps is not None:
        if maps.dim() != x.dim() or maps.shape[0] != x.shape[0] or tuple(maps.shape[2:]) != tuple(x.shape[2:]):
            raise InputError(
                f"maps must have shape (B, T, *spatial) matching x {tuple(x.shape)}; got {tuple(maps.shape)}. "
                f"Pass result[method] from medlens.explain()."
            )
    if targets is not None:
        if targets.dim() != 2 or targets.shape[0] != x.shape[0] or (maps is not None and targets.shape[1] != maps.shape[1]):
            raise InputError(f"targets must be (B, T) class indices matching the maps; got {tuple(targets.shape)}.")


def relevance_rank(maps: torch.Tensor) -> torch.Tensor:
    """(B, T, P) position of each pixel in the most-relevant-first order (0 = highest value).

    Ties are broken by raster order (stable sort), so the result is deterministic for constant maps."""
    flat = maps.flatten(2)
    flat = torch.nan_to_num(flat, nan=float("-inf"))
    order = torch.argsort(flat, dim=2, descending=True, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(flat.shape[2], device=flat.device).expand_as(order)
    rank.scatter_(2, order, positions)
    return rank


def make_baseline(x: torch.Tensor, baseline: Baseline, blur_sigma: Optional[float] = None) -> tuple[torch.Tensor, str]:
    """The reference image that replaces removed pixels, and a description of it for provenance.

    "zero": all zeros (the dataset mean for standardised inputs); "mean": each image's per-channel mean;
    "blur": a Gaussian blur of the image (sigma defaults to 1/20 of the smallest spatial side);
    a number: that constant; a tensor broadcastable to x: used as is."""
    if isinstance(baseline, torch.Tensor):
        return torch.broadcast_to(baseline.to(x), x.shape).clone(), "tensor"
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline)), f"constant {float(baseline):g}"
    if baseline in ("zero", "spec-zero"):
        return torch.zeros_like(x), str(baseline)
    if baseline == "mean":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True).expand_as(x).clone(), "per-image channel mean"
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(1.0, min(x.shape[2:]) / 20.0)
        return gaussian_blur(x, float(sigma)), f"gaussian blur sigma={float(sigma):g}px"
    raise InputError(f"unknown baseline {baseline!r}; use 'zero', 'mean', 'blur', a number or a tensor.")


def _trapezoid(curves: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(curves, fractions.to(curves), dim=-1)


def _counts(fractions: torch.Tensor, n_pixels: int) -> torch.Tensor:
    return torch.round(fractions.double() * n_pixels).long()


def _jobs(B: int, T: int, K: int, device: torch.device) -> torch.Tensor:
    """(B*T*K, 3) rows (b, t, k) in raster order: image, target slot, step."""
    grid = torch.meshgrid(torch.arange(B), torch.arange(T), torch.arange(K), indexing="ij")
    return torch.stack([g.reshape(-1) for g in grid], dim=1).to(device)


def _scored_steps(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, counts: torch.Tensor, order: str,
    output: str, chunk: int, make: Callable[..., torch.Tensor],
    ends: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    known: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """Scores (B, T, K) of the target: for each (image b, target t, step k) the first counts[k] pixels of the map
    in `order` are `removed`, and `make(bs, removed)` builds the (n, C, *s) inputs of a chunk of such jobs.
    Up to `chunk` jobs (several images, targets and steps) go through the model in one batch; `make` also gets the
    jobs' target slots and steps (ROAD draws each job's noise from a generator of its own).

    `ends=(start, fill)`: a step that removes nothing is `start[b]` and one that removes everything `fill[b]`,
    whatever the map: those are scored once per distinct image (once for all images when the fill is a
    constant), not once per (image, target); `known`: the (B, K) scores of `start` and of `fill` where the caller
    has them (the unperturbed image's), which are then not scored again."""
    B, T = targets.shape
    K = counts.numel()
    rank = relevance_rank(maps if order == "morf" else -maps)  # (B, T, P)
    counts, targets = counts.to(x.device), targets.to(x.device)
    P = rank.shape[2]
    jobs = _jobs(B, T, K, x.device)
    scores = torch.empty(B, T, K, dtype=torch.float32, device=x.device)
    step = max(1, int(chunk))
    with scoring(model, x, output) as score:
        for at, src, got in ((counts == 0, ends[0], known[0]), (counts == P, ends[1], known[1])) if ends else ():
            if bool(at.any()):
                if got is None:
                    rows, index = distinct_rows(src)
                    got = torch.cat([score(rows[i:i + step]) for i in range(0, rows.shape[0], step)])[index]
                scores[:, :, at] = pick(got, targets)[:, :, None]
        if ends is not None:
            jobs = jobs[(counts[jobs[:, 2]] > 0) & (counts[jobs[:, 2]] < P)]
        for i in range(0, jobs.shape[0], step):
            bs, ts, ks = jobs[i:i + step].unbind(1)
            removed = (rank[bs, ts] < counts[ks][:, None]).view(bs.numel(), *x.shape[2:])
            s = score(make(bs, removed, ts, ks))
            scores[bs, ts, ks] = s.gather(1, targets[bs, ts][:, None]).squeeze(1)
    return scores


def _perturbation_curve(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, start: torch.Tensor,
    fill: torch.Tensor, counts: torch.Tensor, order: str, output: str, chunk: int,
    known: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None),
) -> torch.Tensor:
    """Scores (B, T, K): at step k the first counts[k] pixels in `order` take their value from `fill`,
    the others from `start` (`known`: see `_scored_steps`)."""
    return _scored_steps(model, x, maps, targets, counts, order, output, chunk,
                         lambda bs, removed, *_: torch.where(removed[:, None], fill[bs], start[bs]), ends=(start, fill),
                         known=known)


# --------------------------------------------------------------------------------------------- deletion / insertion
def deletion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 20,
    baseline: Baseline = "zero",
    blur_sigma: Optional[float] = None,
    output: str = "probability",
    chunk: int = 64,
    logits: Optional[torch.Tensor] = None,
) -> CurveResult:
    """Deletion AUC (Petsiuk et al., RISE, 2018): remove pixels most-relevant first, replacing them by the
    baseline, and integrate the target's score over the fraction removed (trapezoid on [0, 1],
    steps + 1 points). Lower is better: a faithful map makes the score fall early.
    `logits`: the model's (B, K) logits on `x` when the caller has them (`ExplanationResult.logits`): the curve's
    first point (nothing removed) is then taken from them instead of another pass of every image."""
    check_batch(x, maps, targets)
    ref, desc = make_baseline(x, baseline, blur_sigma)
    P = int(torch.tensor(x.shape[2:]).prod())
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    given = None if logits is None else given_scores(model, logits, x, targets, output)
    curves = _perturbation_curve(model, x, maps, targets, x, ref, _counts(fractions, P), "morf", output, chunk,
                                 known=(given, None))
    return CurveResult(_trapezoid(curves, fractions), curves, fractions.float(), desc, {"output": output})


def insertion(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 20,
    baseline: Baseline = "blur",
    blur_sigma: Optional[float] = None,
    output: str = "probability",
    chunk: int = 64,
    logits: Optional[torch.Tensor] = None,
) -> CurveResult:
    """Insertion AUC (RISE): start from the baseline (a blurred image by default) and put the original
    pixels back most-relevant first; integrate the target's score. Higher is better.
    `logits`: the model's (B, K) logits on `x` when the caller has them: the curve's last point (everything put
    back, i.e. `x`) is then taken from them instead of another pass of every image."""
    check_batch(x, maps, targets)
    ref, desc = make_baseline(x, baseline, blur_sigma)
    P = int(torch.tensor(x.shape[2:]).prod())
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    given = None if logits is None else given_scores(model, logits, x, targets, output)
    curves = _perturbation_curve(model, x, maps, targets, ref, x, _counts(fractions, P), "morf", output, chunk,
                                 known=(None, given))
    return CurveResult(_trapezoid(curves, fractions), curves, fractions.float(), desc, {"output": output})


# --------------------------------------------------------------------------------------------- ROAD
def _neighbour_offsets(n_spatial: int) -> list[tuple[tuple[int, ...], float]]:
    """Neighbours and weights of the linear imputation: in 2-D the ROAD weights (edge neighbours 1/6,
    diagonal 1/12); in 3-D face neighbours 2, edge neighbours 1, corners 0 (only ratios matter)."""
    import itertools

    out = []
    for off in itertools.product((-1, 0, 1), repeat=n_spatial):
        k = sum(o != 0 for o in off)
        if k == 0:
            continue
        w = (1 / 6 if k == 1 else 1 / 12) if n_spatial == 2 else (2.0 if k == 1 else 1.0 if k == 2 else 0.0)
        if w:
            out.append((off, w))
    return out


def _neighbour_sum(v: torch.Tensor, offsets: list[tuple[tuple[int, ...], float]]) -> torch.Tensor:
    """sum_o w_o * v[i + o] for (N, C, *s), zero outside the image (shifted slices, no convolution)."""
    n_spatial = v.dim() - 2
    padded = F.pad(v, [1, 1] * n_spatial)
    out = torch.zeros_like(v)
    for off, w in offsets:
        index = [slice(None), slice(None)] + [slice(1 + o, 1 + o + n) for o, n in zip(off, v.shape[2:])]
        out.add_(padded[tuple(index)], alpha=w)
    return out


def linear_impute(
    x: torch.Tensor,
    removed: torch.Tensor,
    noise: float = 0.01,
    generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
    tol: float = 1e-5,
    max_iter: int = 2000,
) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al., ICML 2022), in torch for 2-D and 3-D.

    Every removed pixel takes the weighted mean of its in-bounds neighbours (known or removed), which is a
    sparse symmetric positive-definite system; it is solved by Jacobi-preconditioned conjugate gradients
    (relative residual <= tol, float32 unless x is float64), batched over images, then Gaussian noise of standard deviation `noise` is added to the removed pixels.
    x: (N, C, *s); removed: (N, *s) or (N, 1, *s) boolean. When every pixel is removed there is nothing to
    interpolate from and the removed pixels become 0 (plus noise). `generator`: one for the whole batch, or one per
    image (its row of noise drawn from it alone)."""
    N, C = x.shape[:2]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    u = removed.reshape(N, 1, *x.shape[2:]).to(dtype)
    xd = x.to(dtype)
    offsets = _neighbour_offsets(x.dim() - 2)

    def nb(v: torch.Tensor) -> torch.Tensor:  # weighted neighbour sum, zero outside the image
        return _neighbour_sum(v, offsets)

    uu = u.expand(N, C, *x.shape[2:]).contiguous()
    s = nb(torch.ones_like(uu))
    rhs = nb(xd * (1 - uu)).mul_(uu)
    inv_diag = torch.where(uu > 0, 1 / s.clamp_min(1e-12), torch.zeros_like(s))

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (s * v).sub_(nb(v)).mul_(uu)

    dims = tuple(range(2, x.dim()))
    sol = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dims, keepdim=True)
    bnorm = rhs.flatten(2).norm(dim=2).clamp_min(1e-30)
    for _ in range(max_iter):
        if ((r.flatten(2).norm(dim=2) / bnorm) <= tol).all():
            break
        Ap = apply(p)
        pAp = (p * Ap).sum(dims, keepdim=True)
        alpha = torch.where(pAp > 0, rz / pAp.clamp_min(1e-30), torch.zeros_like(pAp))
        sol.addcmul_(alpha.expand_as(p), p)
        r.sub_(alpha * Ap)
        z = r * inv_diag
        rz_new = (r * z).sum(dims, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = p.mul_(beta).add_(z)
        rz = rz_new
    out = torch.where(uu > 0, sol, xd).to(x.dtype)
    if noise:
        if isinstance(generator, (list, tuple)):
            eps = torch.stack([torch.randn(out.shape[1:], generator=g, dtype=out.dtype, device="cpu")
                               for g in generator])
        else:
            eps = torch.randn(out.shape, generator=generator, dtype=out.dtype, device="cpu")
        eps = eps.to(out.device)
        out = out + noise * eps * uu.to(out.dtype)
    return out


def road(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    order: str = "morf",
    fractions: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    noise: float = 0.01,
    seed: int = 0,
    output: str = "probability",
    chunk: int = 64,
) -> CurveResult:
    """ROAD: Remove And Debias (Rong et al., 2022). For each fraction f, remove the top-f (order="morf",
    most relevant first) or bottom-f (order="lerf", least relevant first) pixels of the map, fill them by
    noisy linear imputation, and score the target. The value is the mean score over the fractions.
    MoRF: lower is better; LeRF: higher is better. The noise of each image, target slot and fraction comes from a
    generator of its own, seeded from `seed`, the image's values, the slot and the fraction's place
    (`medlens.evaluation.noise`): an image's value does not depend on the other images of the batch, nor on its place
    there, and different images get independent noise."""
    check_batch(x, maps, targets)
    if order not in ("morf", "lerf"):
        raise InputError(f"order must be 'morf' or 'lerf', not {order!r}.")
    fr = torch.tensor([float(f) for f in fractions], dtype=torch.float64)
    if fr.numel() == 0 or (fr < 0).any() or (fr > 1).any():
        raise InputError(f"fractions must lie in [0, 1]; got {list(fractions)}.")
    P = int(torch.tensor(x.shape[2:]).prod())
    keys = [image_key(image) for image in x] if noise else []

    def make(bs: torch.Tensor, removed: torch.Tensor, ts: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        generators = [noise_generator(int(seed), keys[b], t, k)
                      for b, t, k in zip(bs.tolist(), ts.tolist(), ks.tolist())] if noise else None
        return linear_impute(x[bs], removed, noise=noise, generator=generators)

    scores = _scored_steps(model, x, maps, targets, _counts(fr, P), order, output, chunk, make)
    return CurveResult(scores.mean(dim=2), scores, fr.float(), f"noisy linear imputation (noise={noise:g})",
                       {"order": order, "output": output, "seed": int(seed)})


def road_morf(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, **kw: Any) -> CurveResult:
    """ROAD, most relevant first (lower is better)."""
    return road(model, x, maps, targets, order="morf", **kw)


def road_lerf(model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, **kw: Any) -> CurveResult:
    """ROAD, least relevant first (higher is better)."""
    return road(model, x, maps, targets, order="lerf", **kw)


# --------------------------------------------------------------------------------------------- Average Drop / IC
def _explanation_scores(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, output: str, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Y (B, T): the score on x; O (B, T): the score on x * m, where m is the map's positive part divided by
    its maximum (an all-zero or non-positive map gives m = 0, i.e. an all-zero image)."""
    check_batch(x, maps, targets)
    B, T = targets.shape
    pos = maps.clamp_min(0).flatten(2)
    peak = pos.amax(dim=2, keepdim=True)
    m = torch.where(peak > 0, pos / peak.clamp_min(1e-30), torch.zeros_like(pos)).view(B, T, 1, *x.shape[2:])
    masked = (x[:, None] * m).reshape(B * T, *x.shape[1:])
    both = model_scores(model, torch.cat([x, masked]), output, chunk)  # one borrow, one folded copy, full chunks
    o = both[B:].view(B, T, -1).gather(2, targets.to(both.device)[..., None]).squeeze(2)
    return pick(both[:B], targets), o


def average_drop(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, output: str = "probability", chunk: int = 64
) -> torch.Tensor:
    """Average Drop (Chattopadhay et al., Grad-CAM++, 2018), per (image, target): max(0, Y - O) / Y, a
    fraction in [0, 1] (the paper reports its mean in percent). Y is the target's probability on the image,
    O on the image multiplied by the map rescaled to [0, 1]. Lower is better."""
    y, o = _explanation_scores(model, x, maps, targets, output, chunk)
    return (y - o).clamp_min(0) / y.abs().clamp_min(1e-12)


def increase_in_confidence(
    model: nn.Module, x: torch.Tensor, maps: torch.Tensor, targets: torch.Tensor, output: str = "probability", chunk: int = 64
) -> torch.Tensor:
    """Increase in Confidence (Grad-CAM++): 1 where O > Y, else 0, per (image, target); its mean is the
    fraction of images whose score rises when only the explanation is shown. Higher is better."""
    y, o = _explanation_scores(model, x, maps, targets, output, chunk)
    return (o > y).float()
