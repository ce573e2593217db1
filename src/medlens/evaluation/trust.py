"""Trust metrics: sanity checks an explanation must pass before anyone reads it.

Cascading model-parameter randomisation (Adebayo et al., 2018), completeness / conservation with a
tolerance, max-sensitivity under small input noise (Yeh et al., 2019) and sparseness (Gini index).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from medlens.core.explain import explain
from medlens.errors import InputError
from medlens.core.baselines import resolve_baseline, scan_black
from medlens.evaluation.faithfulness import Baseline, check_batch, make_baseline
from medlens.evaluation.forwards import distinct_rows, given_scores, model_scores, pick
from medlens.evaluation.noise import uniform_per_image

MethodLike = Union[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]]


def explain_maps(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, method: MethodLike, layer: Any = None,
    seed: Optional[int] = 0, options: Optional[dict[str, Any]] = None,
) -> torch.Tensor:
    """(B, T, *s) maps of `method` (a registered name, or a callable (model, x, targets) -> maps)."""
    if callable(method):
        return method(model, x, targets).detach().float()
    result = explain(model, x, methods=method, targets=targets, layer=layer, seed=seed, **(options or {}))
    return result[next(iter(result))]


# --------------------------------------------------------------------------------------------- similarity
def rank_average(v: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based) of each row of (N, P), ties given their average rank (as scipy.stats.rankdata)."""
    N, P = v.shape
    order = torch.argsort(v, dim=1, stable=True)
    sorted_v = v.gather(1, order)
    ranks_sorted = torch.arange(1, P + 1, dtype=torch.float64, device=v.device).expand(N, P).clone()
    # average over runs of equal values: run id by cumulative count of value changes
    change = torch.ones_like(sorted_v, dtype=torch.long)
    change[:, 1:] = (sorted_v[:, 1:] != sorted_v[:, :-1]).long()
    run = change.cumsum(dim=1) - 1
    sums = torch.zeros(N, P, dtype=torch.float64, device=v.device).scatter_add_(1, run, ranks_sorted)
    counts = torch.zeros(N, P, dtype=torch.float64, device=v.device).scatter_add_(1, run, torch.ones_like(ranks_sorted))
    avg = (sums / counts.clamp_min(1)).gather(1, run)
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of (N, P) pairs. Two constant rows count as identical (1);
    one constant row against a varying one as unrelated (0)."""
    ra, rb = rank_average(a.double()), rank_average(b.double())
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    na, nb = ra.norm(dim=1), rb.norm(dim=1)
    rho = (ra * rb).sum(dim=1) / (na * nb).clamp_min(1e-30)
    rho = torch.where((na > 0) & (nb > 0), rho, torch.where((na == 0) & (nb == 0), torch.ones_like(rho), torch.zeros_like(rho)))
    return rho.float()


def _unit(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return torch.where(hi > lo, (flat - lo) / (hi - lo).clamp_min(1e-30), torch.zeros_like(flat)).view_as(maps)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (scikit-image) of each pair of (N, *s) maps after per-map min-max scaling to [0, 1], with the
    largest odd window (at most 7) that fits the map. numpy is used here only to call scikit-image."""
    from skimage.metrics import structural_similarity

    ua, ub = _unit(a.double()).cpu().numpy(), _unit(b.double()).cpu().numpy()
    win = min(7, min(a.shape[1:]))
    win = win if win % 2 == 1 else win - 1
    out = []
    for i in range(a.shape[0]):
        if win < 3:
            out.append(float(1 - abs(ua[i] - ub[i]).mean()))
        else:
            out.append(float(structural_similarity(ua[i], ub[i], data_range=1.0, win_size=win)))
    return torch.tensor(out, dtype=torch.float32)


# --------------------------------------------------------------------------------------------- randomisation
@dataclass(frozen=True)
class RandomisationResult:
    """Cascading randomisation, top layer first.

    layers: the name of the lowest module randomised at each step (the cascade is cumulative).
    spearman, ssim: (B, T, L) similarity of |map| after each step to |map| of the original model.
    values: (B, T) Spearman similarity after the whole cascade (lower is better).
    passes: (B, T) bool, values < threshold.
    """

    layers: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor
    values: torch.Tensor
    passes: torch.Tensor
    threshold: float
    notes: dict[str, Any] = field(default_factory=dict)


def parameter_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters directly, in definition order (the top of the network is last)."""
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def randomise_module(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw the module's own parameters: tensors of two or more dims from He-normal N(0, 2 / fan_in),
    vectors (biases, norm scales) from N(0, rms^2) with rms the original root-mean-square (0.1 when 0)."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(noise * math.sqrt(2.0 / max(fan_in, 1)))
            else:
                rms = float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0
                p.copy_(noise * (rms if rms > 0 else 0.1))


def randomization(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    method: MethodLike,
    layer: Any = None,
    max_steps: int = 8,
    threshold: float = 0.5,
    seed: int = 0,
    absolute: bool = True,
    options: Optional[dict[str, Any]] = None,
    original: Optional[torch.Tensor] = None,
) -> RandomisationResult:
    """Cascading model-parameter randomisation on a deep copy of `model` (the model itself is untouched).

    Parameterised modules are re-drawn from the output down, cumulatively, in at most `max_steps` steps
    (consecutive modules are grouped when there are more); after each step the same targets are explained
    again and compared with the original map by Spearman rank correlation and SSIM (of |map| when
    `absolute`, as sign flips under random weights are not evidence of sensitivity). A method that explains
    the model must lose similarity; the check passes when the final Spearman similarity is below
    `threshold`. An edge detector, which ignores the model, keeps similarity near 1 and fails."""
    check_batch(x, None, targets)
    if isinstance(layer, nn.Module):
        raise InputError("for randomisation give the target layer by name (a string), as the model is deep-copied.")
    base = original if original is not None else explain_maps(model, x, targets, method, layer, seed, options)
    work = copy.deepcopy(model)
    modules = parameter_modules(work)[::-1]
    if not modules:
        raise InputError("the model has no parameters to randomise.")
    steps = max(1, min(int(max_steps), len(modules)))
    size = math.ceil(len(modules) / steps)
    groups = [modules[i:i + size] for i in range(0, len(modules), size)]
    gen = torch.Generator().manual_seed(int(seed))
    B, T = targets.shape
    ref = (base.abs() if absolute else base).reshape(B * T, *x.shape[2:])
    rhos, ssims, names = [], [], []
    for group in groups:
        for _, module in group:
            randomise_module(module, gen)
        maps = explain_maps(work, x, targets, method, layer, seed, options)
        cur = (maps.abs() if absolute else maps).reshape(B * T, *x.shape[2:])
        rhos.append(spearman(ref.flatten(1), cur.flatten(1)).view(B, T))
        ssims.append(ssim(ref, cur).view(B, T))
        names.append(group[-1][0] or type(group[-1][1]).__name__)
    rho = torch.stack(rhos, dim=2)
    sim = torch.stack(ssims, dim=2)
    values = rho[..., -1]
    return RandomisationResult(names, rho, sim, values, values < threshold, float(threshold),
                               {"absolute": absolute, "seed": int(seed), "steps": len(groups)})


# --------------------------------------------------------------------------------------------- completeness
@dataclass(frozen=True)
class CompletenessResult:
    """values: (B, T) |sum(map) - delta| / max(|delta|, 1e-6); holds: within atol + rtol * |delta|."""

    values: torch.Tensor
    holds: torch.Tensor
    attribution_sum: torch.Tensor
    delta: torch.Tensor
    reference: str


def completeness(
    model: nn.Module,
    x: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    baseline: Optional[Baseline] = "zero",
    rtol: float = 0.05,
    atol: float = 1e-4,
    logits: Optional[torch.Tensor] = None,
) -> CompletenessResult:
    """Completeness / conservation: the map's sum should equal the target logit's change
    delta = f_t(x) - f_t(baseline) (completeness, integrated gradients, DeepLIFT, SHAP), or f_t(x) itself
    when `baseline is None` (conservation, LRP). Checked with a tolerance, never exact float equality.
    `logits`: the model's (B, K) logits on `x` when the caller has them (`ExplanationResult.logits`, or those
    `medlens evaluate` picks its targets with): f(x) is then read from them and only the baseline goes through
    the model (one pass for a constant baseline, none for conservation)."""
    check_batch(x, maps, targets)
    B = x.shape[0]
    given = None if logits is None else given_scores(model, logits, x, targets, "logit")
    if baseline is None:
        scores = given if given is not None else model_scores(model, x, "logit")
        delta, ref = pick(scores, targets), "f(x) (conservation)"
    else:
        black = scan_black(model) if isinstance(baseline, str) and baseline == "zero" else None
        if black is not None:  # the methods' "zero" (integrated gradients) is the scan's black in the model's input space
            baseline = resolve_baseline(x, "zero", black=black)[0]  # per image, as the methods measure it
        xb, desc = make_baseline(x, baseline)
        desc = "zero: the scan's black" if black is not None else desc
        rows, index = distinct_rows(xb)  # each distinct baseline image scored once (a constant one: once in all)
        if given is None:
            both = model_scores(model, torch.cat([x, rows]), "logit")  # one borrow, one folded copy, one batch
            given, at_baseline = both[:B], both[B:]
        else:
            at_baseline = model_scores(model, rows, "logit")
        delta, ref = pick(given, targets) - pick(at_baseline[index], targets), f"f(x) - f({desc})"
    total = maps.flatten(2).double().sum(dim=2).float()
    err = (total - delta).abs()
    return CompletenessResult(err / delta.abs().clamp_min(1e-6), err <= atol + rtol * delta.abs(), total, delta, ref)


# --------------------------------------------------------------------------------------------- sensitivity / sparseness
def max_sensitivity(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    method: MethodLike,
    radius: float = 0.02,
    samples: int = 8,
    seed: int = 0,
    layer: Any = None,
    options: Optional[dict[str, Any]] = None,
    chunk: Optional[int] = None,
    original: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Max-sensitivity (Yeh et al., 2019): max over `samples` uniform perturbations
    |delta| <= radius * (max(x) - min(x)) of ||e(x + delta) - e(x)|| / ||e(x)|| (Frobenius norms, same
    targets). Lower is better. When e(x) is all zero the denominator is 1 (the absolute change).
    Each image's perturbations come from a generator of its own, seeded from `seed` and the image's values
    (`medlens.evaluation.noise`): its value does not depend on the other images of the batch, nor on its place there,
    and different images get independent noise.
    The noisy copies of all images are explained in one call (the method batches its own passes), or
    `chunk` inputs (rounded to whole sets of the B images) at a time when memory asks for it."""
    check_batch(x, None, targets)
    base = original if original is not None else explain_maps(model, x, targets, method, layer, seed, options)
    B, T = targets.shape
    dims = tuple(range(1, x.dim()))
    span = (x.amax(dim=dims, keepdim=True) - x.amin(dim=dims, keepdim=True))
    u = uniform_per_image(x, int(samples), int(seed)).to(x) * 2 - 1
    xs = (x[None] + u * radius * span[None]).reshape(-1, *x.shape[1:])  # (S*B, C, *s), sample-major
    ts = targets.repeat(int(samples), 1)
    per = xs.shape[0] if chunk is None else max(1, int(chunk) // max(1, B)) * B
    outs = [explain_maps(model, xs[i:i + per], ts[i:i + per], method, layer, seed, options) for i in range(0, xs.shape[0], per)]
    maps = torch.cat(outs).view(int(samples), B, T, -1)
    ref = base.reshape(1, B, T, -1)
    num = (maps - ref).norm(dim=3)
    den = ref.norm(dim=3)
    den = torch.where(den > 0, den, torch.ones_like(den))
    return (num / den).amax(dim=0)


def sparseness(maps: torch.Tensor) -> torch.Tensor:
    """Gini index of |map| per (image, target) (Chalasani et al., 2020): with a_1 <= ... <= a_n,
    G = sum_i (2i - n - 1) a_i / (n sum_i a_i), in [0, 1 - 1/n]. 0 for a constant or all-zero map,
    near 1 when one pixel holds everything. Higher is sparser."""
    a = maps.abs().flatten(2).double().sort(dim=2).values
    n = a.shape[2]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
    total = a.sum(dim=2)
    g = ((2 * i - n - 1) * a).sum(dim=2) / (n * total).clamp_min(1e-300)
    return torch.where(total > 0, g, torch.zeros_like(g)).float()
