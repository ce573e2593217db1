"""Evaluating a segmentation model's explanations: each image's predicted region of each foreground class explained
(the score is the sum of the class's logits over that region), scored by the metrics that apply to such a score.

Deletion, insertion and completeness follow the region score (the sum of the class's logits over the region predicted
on the unperturbed image, held fixed), not a softmax; the localisation metrics compare the map with the annotated
region (the true mask or box), and an image without one has no value for them. The metrics defined on class
probabilities, and those that re-explain the image, are refused with the reason (`refused_metrics`).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch

import medlens.evaluation.localisation as L
from medlens.core.model_description import describe
from medlens.core.region_targets import RegionScores, SegmentationTarget, segmentation_logits
from medlens.errors import InputError
from medlens.evaluation.metrics import LOCALISATION, MetricCall, get_metric
from medlens.evaluation_run.dataset import Sample, as_sample
from medlens.evaluation_run.scoring import Tally
from medlens.pipeline import Plan, explain_batch

#: the metrics that apply to a region score, in table order; the default of `medlens evaluate` on a segmentation model
SEGMENTATION_METRICS = ("deletion", "insertion", "pointing_game", "energy_in_box", "iou", "dice", "auprc", "sparseness",
                        "completeness")
_PROBABILITY = ("they compare class probabilities; a segmentation target's score is a sum of logits over a region, "
                "which has no probability, so a relative drop or rise of it is not the quantity they define")
_REEXPLAIN = ("it re-explains the image for a class index; for a region target that path is not implemented yet")
WHY_NOT = {
    "average_drop": _PROBABILITY, "increase_in_confidence": _PROBABILITY,
    "road_morf": "ROAD's imputation is scored on class outputs here; on a region score it is not implemented yet",
    "road_lerf": "ROAD's imputation is scored on class outputs here; on a region score it is not implemented yet",
    "randomization": _REEXPLAIN, "max_sensitivity": _REEXPLAIN,
}
CURVES = ("deletion", "insertion")  # scored on the region score itself: output="logit"


def segmentation_metrics(requested: Optional[Sequence[str]]) -> list[str]:
    """The metrics of a segmentation run: those asked for (default: `SEGMENTATION_METRICS`), each checked.

    Raises:
        InputError: a metric that does not apply to a region score, with the reason and the ones that do.
    """
    names = list(requested) if requested else list(SEGMENTATION_METRICS)
    refused = [n for n in names if n not in SEGMENTATION_METRICS]
    if refused:
        reasons = "; ".join(f"{n}: {WHY_NOT.get(n, 'not defined for region scores')}" for n in refused)
        raise InputError(f"metric(s) {', '.join(refused)} do not apply to a segmentation model's explanations ({reasons})."
                         f" Choose from {', '.join(SEGMENTATION_METRICS)}.")
    return names


def foreground_classes(model: Any, n_classes: int) -> list[tuple[int, str]]:
    """(index, label) of every class but the first (the background); the only class of a one-channel model."""
    labels = list(describe(model).labels)
    classes = range(1, n_classes) if n_classes > 1 else range(1)
    return [(k, labels[k] if k < len(labels) else str(k)) for k in classes]


def predicted_masks(logits: torch.Tensor, k: int, multi_label: bool) -> torch.Tensor:
    """(B, *spatial) bool: where the model predicts class k (argmax; logit > 0 for independent or single classes)."""
    if multi_label or logits.shape[1] == 1:
        return logits[:, k] > 0
    return logits.argmax(dim=1) == k


def region_scorer(model: Any, k: int, regions: torch.Tensor) -> RegionScores:
    """The model with its output turned into the region scores (N, B): column b is the sum of class k's logits over
    image b's region (held fixed), for any input. Perturbed copies of image b are scored by column b. It carries the
    model's input spec, so that "zero" is the scan's black for it as for the model (completeness)."""
    scorer = RegionScores(model, "segmentation", [(k, regions.flatten(1).float(), None)])
    scorer.input_spec = describe(model).input_spec
    return scorer


def score_segmentation(plan: Plan, data: Any, order: Sequence[int], metrics: Sequence[str],
                       options: dict[str, dict[str, Any]], prior: tuple[Optional[torch.Tensor], int],
                       batch_size: int = 8, on_images: Optional[Callable[[int], None]] = None) -> Tally:
    """Explain and score the images `order` of `data` in batches, per foreground class: the predicted region
    explained with each method, then every metric (see the module docstring); the localisation baselines added.
    Images where the model predicts no pixel of the class are counted in the notes and not explained."""
    model, seed, layer = plan.model, int(plan.request.seed or 0), plan.request.layer
    methods = [s.name for s in plan.specs]
    multi = describe(model).multi_label
    tally = Tally(seconds={m: 0.0 for m in methods}, target_rules={"predicted region": 0})
    empty: dict[str, int] = {}
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    for batch in batches:
        groups: dict[tuple, list[Sample]] = {}
        for s in (as_sample(data[i]) for i in batch):
            groups.setdefault(tuple(s.x.shape), []).append(s)
        for group in groups.values():
            x = torch.stack([s.x for s in group]).to(plan.device)
            truth = torch.stack([s.mask for s in group]).to(plan.device)
            with torch.no_grad():
                logits = segmentation_logits(model(x), x)
            for k, label in foreground_classes(model, logits.shape[1]):
                regions = predicted_masks(logits, k, multi)
                keep = regions.flatten(1).any(dim=1)
                empty[label] = empty.get(label, 0) + int((~keep).sum())
                if keep.any():
                    tally.target_rules["predicted region"] += int(keep.sum())
                    _score_class(plan, tally, x[keep], regions[keep], truth[keep], k, label, methods, metrics,
                                 options, prior, (layer, seed))
        if on_images is not None:
            on_images(len(batch))
    tally.notes["segmentation"] = {
        "score": "the sum of the class's logits over the region the model predicts on the unperturbed image (held "
                 "fixed); deletion and insertion follow that score (output logit), not a probability",
        "region_explained": "the model's predicted mask of each class but the background",
        "localisation_against": "the annotated region (mask image N_mask.png or box file N.txt beside each image)",
        "images_with_empty_predicted_region": empty}
    return tally


def _score_class(plan: Plan, tally: Tally, x: torch.Tensor, regions: torch.Tensor, truth: torch.Tensor, k: int,
                 label: str, methods: Sequence[str], metrics: Sequence[str], options: dict[str, dict[str, Any]],
                 prior: tuple[Optional[torch.Tensor], int], seeds: tuple[Any, int]) -> None:
    """One class on the images where it is predicted: each method's maps of the region score, every metric."""
    layer, seed = seeds
    scorer = region_scorer(plan.model, k, regions)
    columns = torch.arange(x.shape[0], device=x.device)[:, None]  # image b's score is column b
    names = [label] * x.shape[0]
    target = [SegmentationTarget(k, region=regions.cpu())]
    for m in methods:
        t0 = time.perf_counter()
        maps = explain_batch(plan, x, target, methods=[m])[m]
        tally.seconds[m] += time.perf_counter() - t0
        for metric in metrics:
            opts = {**options[metric], "output": "logit"} if metric in CURVES else options[metric]
            call = MetricCall(scorer, x, maps, columns, truth, m, opts, layer, seed)
            tally.add(m, metric, names, get_metric(metric).score(call))
    region_metrics = [m for m in metrics if m in LOCALISATION]
    if not region_metrics:
        return
    baselines = {"baseline:center": L.center_map(x.shape[2:], x.shape[0], x.device)}
    total, count = prior
    if total is not None and tuple(total.shape) == tuple(x.shape[2:]):
        baselines["baseline:prior"] = L.prior_maps(truth, total.to(x.device), count)
    for name, maps in baselines.items():
        for metric in region_metrics:
            call = MetricCall(scorer, x, maps, columns, truth, name, options[metric], layer, seed)
            tally.add(name, metric, names, get_metric(metric).score(call))


__all__ = ["SEGMENTATION_METRICS", "WHY_NOT", "foreground_classes", "predicted_masks", "region_scorer",
           "score_segmentation", "segmentation_metrics"]
