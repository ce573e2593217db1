"""The metric registry: every evaluation metric as one `MetricSpec` (name, family, direction, whether it needs a
region, and a `score` function of one `MetricCall`), mirroring the method registry. A new metric is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

import medlens.evaluation.faithfulness as F
import medlens.evaluation.localisation as L
import medlens.evaluation.trust as TR
from medlens.core.registry import get_spec
from medlens.errors import InputError


@dataclass
class MetricCall:
    """One batch to score: the model, inputs (B, C, *s), one method's maps (B, T, *s), targets (B, T), masks (B, *s)."""

    model: nn.Module
    x: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    masks: Optional[torch.Tensor]
    method: str
    options: Mapping[str, Any] = field(default_factory=dict)
    layer: Any = None
    seed: int = 0  # the run's seed: methods re-explained inside a metric use it (as the maps were made with it), and
    # metrics that draw noise seed each image's (or job's) generator alike from it: a value depends on the image alone
    logits: Optional[torch.Tensor] = None  # the model's (B, K) logits on x when the caller has them (saves passes)


@dataclass
class CurvePart:
    """A batch's share of a mean curve: the x positions (or named steps), the sum of its curves, how many curves."""

    x: Sequence[float]
    total: torch.Tensor
    count: int
    x_labels: Optional[Sequence[str]] = None

    def plus(self, other: "CurvePart") -> "CurvePart":
        return CurvePart(self.x, self.total + other.total, self.count + other.count, self.x_labels)


@dataclass
class MetricScore:
    """(B, T) values, what run.json notes of the metric (once per run, and per method), and curve sums."""

    values: torch.Tensor
    note: Optional[dict[str, Any]] = None
    method_note: Optional[tuple[str, Any]] = None  # (key, value): run.json notes[metric][key][method] = value
    curves: dict[str, CurvePart] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    family: str  # faithfulness, localisation or trust
    higher_is_better: bool
    score: Callable[[MetricCall], MetricScore]
    needs_region: bool = False  # localisation: scored against the box or mask; the baselines get rows too
    summary: str = ""


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> MetricSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"metric {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def metric_names() -> tuple[str, ...]:
    """Every metric, in the order tables list them."""
    return tuple(_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown metric {name!r}; the metrics are: {', '.join(_REGISTRY)}.") from None


def completeness_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The completeness check each method claims: LRP's conservation (sum = f(x)), f(x) - f(baseline) with the
    method's own default baseline (integrated gradients, KernelSHAP), else the metric's default (zero). A
    `baseline` given in the metric's options wins for every method."""
    if "baseline" in options or not isinstance(method, str):  # a user-supplied callable claims nothing
        return dict(options)
    spec = get_spec(method)
    if spec.completeness == "conservation":
        return {**options, "baseline": None}
    if spec.completeness == "baseline":
        return {**options, "baseline": spec.options.get("baseline", "zero")}
    return dict(options)


# --------------------------------------------------------------------------------------------- the entries
def _given(c: MetricCall) -> dict[str, Any]:
    """The call's logits on x as a keyword, when it has them (deletion, insertion and completeness reuse them)."""
    return {} if c.logits is None else {"logits": c.logits}


def _curve(name: str) -> Callable[[MetricCall], MetricScore]:
    def score(c: MetricCall) -> MetricScore:
        res = getattr(F, name)(c.model, c.x, c.maps, c.targets, **{**_given(c), **c.options})
        part = CurvePart(res.fractions.tolist(), res.curves.sum(dim=(0, 1)).cpu(), res.curves.shape[0] * res.curves.shape[1])
        return MetricScore(res.values, note={"baseline": res.baseline, **res.notes}, curves={name: part})
    return score


def _road(name: str) -> Callable[[MetricCall], MetricScore]:
    def score(c: MetricCall) -> MetricScore:
        res = getattr(F, name)(c.model, c.x, c.maps, c.targets, **{"seed": c.seed, **c.options})
        return MetricScore(res.values, note={"imputation": res.baseline, "fractions": res.fractions.tolist()})
    return score


def _confidence(name: str) -> Callable[[MetricCall], MetricScore]:
    return lambda c: MetricScore(getattr(F, name)(c.model, c.x, c.maps, c.targets, **c.options))


def _region(name: str) -> Callable[[MetricCall], MetricScore]:
    return lambda c: MetricScore(getattr(L, name)(c.maps, c.masks, **c.options))


def _randomization(c: MetricCall) -> MetricScore:
    res = TR.randomization(c.model, c.x, c.targets, c.method, layer=c.layer, original=c.maps, **{"seed": c.seed, **c.options})
    count = c.x.shape[0] * c.targets.shape[1]
    steps = list(range(len(res.layers)))
    curves = {f"randomization:{k}": CurvePart(steps, getattr(res, k).sum(dim=(0, 1)).cpu(), count, list(res.layers))
              for k in ("spearman", "ssim")}
    return MetricScore(res.values, note={"similarity": "Spearman of |map| after the full cascade", "threshold": res.threshold},
                       curves=curves)


def _completeness(c: MetricCall) -> MetricScore:
    res = TR.completeness(c.model, c.x, c.maps, c.targets, **_given(c), **completeness_options(c.method, c.options))
    return MetricScore(res.values, method_note=("reference", res.reference))


def _max_sensitivity(c: MetricCall) -> MetricScore:
    return MetricScore(TR.max_sensitivity(c.model, c.x, c.targets, c.method, layer=c.layer, original=c.maps,
                                          **{"seed": c.seed, **c.options}))


for _name, _higher, _summary in (("deletion", False, "area under the score as the most relevant pixels are removed"),
                                 ("insertion", True, "area under the score as the most relevant pixels are inserted")):
    register_metric(MetricSpec(_name, "faithfulness", _higher, _curve(_name), summary=_summary))
for _name, _higher in (("road_morf", False), ("road_lerf", True)):
    register_metric(MetricSpec(_name, "faithfulness", _higher, _road(_name),
                               summary="ROAD: removal with noisy linear imputation, most/least relevant first"))
register_metric(MetricSpec("average_drop", "faithfulness", False, _confidence("average_drop"),
                           summary="score drop when only the explanation-weighted image is shown"))
register_metric(MetricSpec("increase_in_confidence", "faithfulness", True, _confidence("increase_in_confidence"),
                           summary="share of images whose score rises on the explanation-weighted image"))
for _name, _summary in (("pointing_game", "1 if the map's peak lies in the region"),
                        ("energy_in_box", "share of positive map mass inside the region"),
                        ("iou", "IoU of the Otsu-thresholded map and the region"),
                        ("dice", "Dice of the Otsu-thresholded map and the region"),
                        ("auprc", "area under precision-recall of map values against the region")):
    register_metric(MetricSpec(_name, "localisation", True, _region(_name), needs_region=True, summary=_summary))
register_metric(MetricSpec("randomization", "trust", False, _randomization,
                           summary="similarity to the map after cascading weight randomisation (sanity check)"))
register_metric(MetricSpec("completeness", "trust", False, _completeness,
                           summary="relative gap between the map's sum and the output difference it claims"))
register_metric(MetricSpec("max_sensitivity", "trust", False, _max_sensitivity,
                           summary="largest relative map change under small input noise"))
register_metric(MetricSpec("sparseness", "trust", True, lambda c: MetricScore(TR.sparseness(c.maps)),
                           summary="Gini index of |map|"))

METRICS = metric_names()
LOCALISATION = tuple(n for n in METRICS if _REGISTRY[n].needs_region)
HIGHER_IS_BETTER = {n: s.higher_is_better for n, s in _REGISTRY.items()}

__all__ = ["CurvePart", "HIGHER_IS_BETTER", "LOCALISATION", "METRICS", "MetricCall", "MetricScore", "MetricSpec",
           "completeness_options", "get_metric", "metric_names", "register_metric"]
