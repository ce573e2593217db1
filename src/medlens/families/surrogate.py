"""Superpixel surrogates of the perturbation family: `lime` (weighted ridge) and `kernelshap` (Shapley kernel).

Both switch features (SLIC superpixels of the grayscale image, or a regular grid; 2-D and 3-D) between
the image and a baseline, evaluate the model in batches, and fit a linear model in torch (float64).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

import torch

from medlens.core.context import ExplainContext
from medlens.core.baselines import resolve_baseline, scan_black
from medlens.errors import MethodError
from medlens.core.options import finite_float, positive_int
from medlens.core.registry import MethodSpec, register
from medlens.families.perturbation import (
    COMMON,
    Progress,
    base_scores,
    check_output,
    common_notes,
    evaluate,
)


# --------------------------------------------------------------------------------------- segmentation
def grid_segments(spatial: tuple[int, ...], n_segments: int, device: torch.device) -> torch.Tensor:
    """A regular grid of about n_segments cells, cells as close to cubic as the shape allows: labels (*spatial)."""
    nd = len(spatial)
    geo = math.prod(spatial) ** (1.0 / nd)
    counts = [max(1, min(s, int(round(n_segments ** (1.0 / nd) * s / geo)))) for s in spatial]
    label = torch.zeros(spatial, dtype=torch.long, device=device)
    for axis, (s, g) in enumerate(zip(spatial, counts)):
        idx = torch.div(torch.arange(s, device=device) * g, s, rounding_mode="floor")
        shape = [1] * nd
        shape[axis] = s
        label = label * g + idx.view(shape)
    return label


def slic_segments(image: torch.Tensor, n_segments: int, compactness: float) -> torch.Tensor:
    """SLIC superpixels (scikit-image) of one image (C, *spatial), on its channel mean scaled to [0, 1]."""
    from skimage.segmentation import slic

    gray = image.mean(dim=0).double()
    lo, hi = gray.min(), gray.max()
    gray = (gray - lo) / (hi - lo) if hi > lo else torch.zeros_like(gray)
    labels = slic(gray.cpu().numpy(), n_segments=n_segments, compactness=compactness, channel_axis=None,
                  start_label=0, enforce_connectivity=True)
    return torch.as_tensor(labels, dtype=torch.long, device=image.device)


def superpixels(image: torch.Tensor, n_segments: int = 50, segmentation: str = "slic",
                compactness: float = 0.3) -> torch.Tensor:
    """The features lime and kernelshap use for one image (C, *spatial): labels 0..F-1 of shape (*spatial).

    Public so that a caller can rebuild a region mask from the `top_regions` in lime's provenance:
    `torch.isin(superpixels(x[i], ...), torch.tensor(segment_ids))` with the same options."""
    if segmentation not in ("slic", "grid"):
        raise MethodError(f"option segmentation must be 'slic' or 'grid', got {segmentation!r}.")
    if segmentation == "grid":
        labels = grid_segments(tuple(image.shape[1:]), n_segments, image.device)
    else:
        labels = slic_segments(image, n_segments, compactness)
    _, labels = torch.unique(labels, return_inverse=True)  # contiguous 0..F-1
    return labels.reshape(image.shape[1:])


def segments_of(ctx: ExplainContext, image: int, options: Mapping[str, Any]) -> torch.Tensor:
    """Labels 0..F-1 (*spatial) for one image; cached in the call so lime and kernelshap share them."""
    n_segments = positive_int(options, "n_segments")
    compactness = finite_float(options, "compactness", above=0.0)
    key = ("perturbation.segments", image, options["segmentation"], n_segments, compactness)
    if key not in ctx.cache:
        ctx.cache[key] = superpixels(ctx.x[image], n_segments, options["segmentation"], compactness)
    return ctx.cache[key]


def perturbed(xi: torch.Tensor, ri: torch.Tensor, labels: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Inputs (n, C, *s) with feature j of image xi kept where z[:, j] == 1 and the baseline elsewhere."""
    keep = torch.index_select(z.to(xi.dtype), 1, labels.reshape(-1)).reshape(z.shape[0], 1, *labels.shape)
    return torch.addcmul(ri, xi - ri, keep)  # ri + (xi - ri) * keep, (n, C, *s)


def _setup(ctx: ExplainContext, options: Mapping[str, Any], name: str) -> tuple[int, int, str, torch.Tensor]:
    num_samples = positive_int(options, "num_samples", 2)
    batch_size = positive_int(options, "batch_size")
    output = check_output(options)
    ref, notes = resolve_baseline(ctx.x, options["baseline"], options.get("blur_sigma"), black=scan_black(ctx.model))
    common_notes(ctx, options, notes)
    ctx.method_notes.update(segmentation=options["segmentation"], batch_size=batch_size)
    return num_samples, batch_size, output, ref.expand_as(ctx.x)


# ----------------------------------------------------------------------------------------------- LIME
def weighted_ridge(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge with intercept and sample weights (as scikit-learn's Ridge): coef (F, T), intercept (T,), R^2 (T,)."""
    wn = w / w.sum()
    z_mean = wn @ z
    y_mean = wn @ y
    zc, yc = z - z_mean, y - y_mean
    # scikit-learn's objective: sum_n w_n (y_n - z_n b - c)^2 + alpha |b|^2 with the raw weights
    gram = zc.T @ (w[:, None] * zc)
    rhs = zc.T @ (w[:, None] * yc)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    coef = torch.linalg.solve(gram + alpha * eye, rhs)
    intercept = y_mean - z_mean @ coef
    resid = y - (z @ coef + intercept)
    ss_res = (wn[:, None] * resid**2).sum(0)
    ss_tot = (wn[:, None] * (y - y_mean) ** 2).sum(0)
    r2 = 1 - ss_res / ss_tot.clamp_min(1e-300)
    return coef, intercept, r2


def _lime(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    x = ctx.x
    b = x.shape[0]
    t = ctx.targets.shape[1]
    num_samples, batch_size, output, ref = _setup(ctx, options, "lime")
    kernel_width = finite_float(options, "kernel_width", above=0.0)
    alpha = finite_float(options, "alpha", minimum=0.0)
    top_k = positive_int(options, "top_k")
    f_x = base_scores(ctx, output)
    maps = torch.empty((b, t) + ctx.spatial_shape, dtype=torch.float32, device=x.device)
    notes: dict[str, list] = {"n_features": [], "r2": [], "intercept": [], "top_regions": []}
    with Progress(b * (num_samples - 1), "lime", options.get("progress")) as progress:
        for i in range(b):
            labels = segments_of(ctx, i, options)
            n_feat = int(labels.max()) + 1
            # Row 0 is the image itself (all features on), as in lime_image; the others are fair coin flips.
            # One generator per image, seeded alike: the map does not depend on the other images of the batch.
            z = (torch.rand(num_samples, n_feat, generator=ctx.generator("lime"), device=x.device) < 0.5).double()
            z[0] = 1.0
            y = torch.empty(num_samples, t, dtype=torch.float64, device=x.device)
            y[0] = f_x[i]
            y[1:] = evaluate(ctx, i, num_samples - 1, lambda lo, hi: perturbed(x[i], ref[i], labels, z[1 + lo : 1 + hi]),
                             batch_size, output, progress)
            # Exponential kernel on the cosine distance to the all-on row: d = 1 - sqrt(k / F).
            on = z.sum(1)
            dist = 1 - torch.sqrt(on / n_feat)
            weight = torch.sqrt(torch.exp(-(dist**2) / kernel_width**2))
            coef, intercept, r2 = weighted_ridge(z, y, weight, alpha)  # (F, T)
            maps[i] = coef.T[:, labels].float()
            sizes = torch.bincount(labels.reshape(-1), minlength=n_feat).double() / labels.numel()
            k = min(top_k, n_feat)
            top = [coef[:, s].topk(k).indices.tolist() for s in range(t)]
            notes["n_features"].append(n_feat)
            notes["r2"].append([round(float(v), 6) for v in r2])
            notes["intercept"].append([float(v) for v in intercept])
            notes["top_regions"].append([
                {"segments": ids, "weights": [float(coef[j, s]) for j in ids],
                 "area_fraction": round(float(sizes[ids].sum()), 6)} for s, ids in enumerate(top)
            ])
    ctx.method_notes.update(num_samples=num_samples, kernel_width=kernel_width, alpha=alpha, top_k=top_k,
                            model_evaluations=b * (num_samples - 1), **notes)
    ctx.method_notes["top_regions_mask"] = (
        "torch.isin(medlens.families.surrogate.superpixels(x[i], n_segments, segmentation, "
        "compactness), torch.tensor(segments))"
    )
    return maps


# ----------------------------------------------------------------------------------------- KernelSHAP
def shapley_kernel(m: int, s: torch.Tensor) -> torch.Tensor:
    """The Shapley kernel weight of one coalition of size s among m features (0 < s < m)."""
    s = s.double()
    comb = torch.exp(torch.lgamma(torch.tensor(m + 1.0)) - torch.lgamma(s + 1) - torch.lgamma(m - s + 1))
    return (m - 1) / (comb * s * (m - s))


def shapley_coalitions(m: int, budget: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Coalitions (n, m) in {0,1} and their weights, excluding the empty and the full coalition.

    Every coalition with the exact Shapley kernel weight when 2^m - 2 <= budget (the weighted least
    squares then gives the exact Shapley values). Otherwise coalition sizes are enumerated from the
    outside in (sizes 1 and m-1 first) while the budget would sample each of their subsets at least
    once, and the remaining sizes are sampled in pairs (a coalition and its complement) with size
    probability proportional to the kernel's mass per size, each sample carrying an equal share.
    """
    if m < 2:
        return torch.zeros(0, m, dtype=torch.float64, device=device), torch.zeros(0, dtype=torch.float64, device=device), True
    if 2**m - 2 <= budget:
        codes = torch.arange(1, 2**m - 1, device=device)
        z = ((codes[:, None] >> torch.arange(m, device=device)) & 1).double()
        return z, shapley_kernel(m, z.sum(1)), True
    sizes = torch.arange(1, m, dtype=torch.float64)
    mass = (m - 1) / (sizes * (m - sizes))
    mass = mass / mass.sum()  # mass[s-1]: the kernel's total weight on coalitions of size s
    rows, weights = [], []
    remaining_mass, left = 1.0, budget
    open_sizes = set(range(1, m))
    for s in range(1, m // 2 + 1):
        pair = [s] if s == m - s else [s, m - s]
        count = sum(math.comb(m, k) for k in pair)
        pair_mass = float(sum(mass[k - 1] for k in pair))
        if count > left or left * pair_mass / remaining_mass < count - 1e-8:
            break
        for k in pair:
            for combo in itertools.combinations(range(m), k):
                row = torch.zeros(m, dtype=torch.float64)
                row[list(combo)] = 1.0
                rows.append(row)
                weights.append(float(mass[k - 1]) / math.comb(m, k))
            open_sizes.discard(k)
        left -= count
        remaining_mass -= pair_mass
    if open_sizes and left >= 2:
        n_pairs = left // 2
        open_list = sorted(open_sizes)
        probs = torch.tensor([float(mass[k - 1]) for k in open_list], dtype=torch.float64)
        pick = torch.multinomial(probs, n_pairs, replacement=True, generator=gen)
        size = torch.tensor(open_list, dtype=torch.long)[pick]
        ranks = torch.rand(n_pairs, m, generator=gen).argsort(dim=1).argsort(dim=1)
        z = (ranks < size[:, None]).double()
        z = torch.stack([z, 1 - z], dim=1).reshape(2 * n_pairs, m)  # each sample next to its complement
        rows.extend(z)
        weights.extend([remaining_mass / (2 * n_pairs)] * (2 * n_pairs))
    z = torch.stack(rows).to(device) if rows else torch.zeros(0, m, dtype=torch.float64, device=device)
    return z, torch.tensor(weights, dtype=torch.float64, device=device), False


def constrained_wls(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """argmin_phi sum_n w_n (y_n - z_n . phi)^2 subject to sum(phi) = gap, per column: phi (m, T).

    Solved through its KKT system [[Z'WZ, 1], [1', 0]] [phi; lambda] = [Z'Wy; gap] in float64; a
    least-squares solution where the coalitions do not pin every feature down."""
    m = z.shape[1]
    t = y.shape[1]
    kkt = torch.zeros(m + 1, m + 1, dtype=torch.float64, device=z.device)
    kkt[:m, :m] = z.T @ (w[:, None] * z)
    kkt[:m, m] = 1.0
    kkt[m, :m] = 1.0
    rhs = torch.empty(m + 1, t, dtype=torch.float64, device=z.device)
    rhs[:m] = z.T @ (w[:, None] * y)
    rhs[m] = gap
    try:
        sol = torch.linalg.solve(kkt, rhs)
        if not torch.isfinite(sol).all():
            raise RuntimeError
    except RuntimeError:
        sol = torch.linalg.pinv(kkt) @ rhs
    return sol[:m]


def _kernelshap(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    x = ctx.x
    b = x.shape[0]
    t = ctx.targets.shape[1]
    num_samples, batch_size, output, ref = _setup(ctx, options, "kernelshap")
    f_x = base_scores(ctx, output)
    maps = torch.empty((b, t) + ctx.spatial_shape, dtype=torch.float32, device=x.device)
    notes: dict[str, list] = {"n_features": [], "exact": [], "attribution_sum": [], "output_gap": [],
                              "baseline_output": [], "model_evaluations": []}
    plans = []
    for i in range(b):
        labels = segments_of(ctx, i, options)
        m = int(labels.max()) + 1
        # One generator per image, seeded alike: the map does not depend on the other images of the batch.
        z, w, exact = shapley_coalitions(m, num_samples, ctx.generator("kernelshap"), x.device)
        plans.append((labels, m, z, w, exact))
    total = sum(p[2].shape[0] + 1 for p in plans)
    with Progress(total, "kernelshap", options.get("progress")) as progress:
        for i, (labels, m, z, w, exact) in enumerate(plans):
            # Row 0 switches every feature off: f(baseline), the other end of the efficiency constraint.
            rows = torch.cat([torch.zeros(1, m, dtype=torch.float64, device=x.device), z])
            y = evaluate(ctx, i, rows.shape[0], lambda lo, hi: perturbed(x[i], ref[i], labels, rows[lo:hi]),
                         batch_size, output, progress)
            f_b = y[0]
            gap = f_x[i] - f_b
            phi = constrained_wls(z, y[1:] - f_b, w, gap) if m > 1 else gap[None, :].clone()
            sizes = torch.bincount(labels.reshape(-1), minlength=m).double()
            # Each pixel carries its feature's share, so the map itself sums to f(x) - f(baseline).
            maps[i] = (phi / sizes[:, None]).T[:, labels].float()
            notes["n_features"].append(m)
            notes["exact"].append(exact)
            notes["attribution_sum"].append([float(v) for v in phi.sum(0)])
            notes["output_gap"].append([float(v) for v in gap])
            notes["baseline_output"].append([float(v) for v in f_b])
            notes["model_evaluations"].append(int(rows.shape[0]))
            notes.setdefault("feature_attributions", []).append(phi.T.tolist() if m <= 64 else None)
    ctx.method_notes.update(num_samples=num_samples, **notes)
    return maps


# ------------------------------------------------------------------------------------------ registry
SURROGATE = {**COMMON, "baseline": "mean", "n_segments": 50, "segmentation": "slic", "compactness": 0.3}

register(MethodSpec(
    name="lime", family="perturbation",
    summary="LIME: superpixels switched on/off at random, a kernel-weighted ridge surrogate; each pixel gets its "
            "superpixel's coefficient (Ribeiro et al. 2016).",
    run=_lime, needs_gradients=False, needs_layer=False, supports_3d=True, stochastic=True,
    cost="one forward per sample (num_samples), batched",
    options={"num_samples": 1000, "kernel_width": 0.25, "alpha": 1.0, "top_k": 5, **SURROGATE},
))
register(MethodSpec(
    name="kernelshap", family="perturbation",
    summary="KernelSHAP: Shapley-kernel weighted least squares over superpixels with paired sampling; attributions "
            "sum exactly to f(x) - f(baseline) (Lundberg & Lee 2017).",
    run=_kernelshap, needs_gradients=False, needs_layer=False, supports_3d=True, stochastic=True,
    cost="one forward per coalition (num_samples), batched",
    options={"num_samples": 2000, **SURROGATE},
    completeness="baseline",
))
