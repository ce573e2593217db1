"""`evaluate()`: a request checked once by the pipeline, images read and prepared by it, each batch explained by
it per method (timed), every registered metric scored, the localisation baselines added, then tables and plots.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

import medlens.evaluation.localisation as L
from medlens.errors import InputError, MethodError, OutputError
from medlens.evaluation.faithfulness import model_scores
from medlens.evaluation.metrics import LOCALISATION, METRICS, CurvePart, MetricCall, MetricScore, get_metric
from medlens.evaluation_run.dataset import FolderDataset, Sample, as_sample, box_mask, read_include
from medlens.evaluation_run.plots import write_plots
from medlens.evaluation_run.tables import rows_to_csv, rows_to_markdown, summarise
from medlens.io import read_image
from medlens.io.files import atomic_write
from medlens.pipeline import ExplainRequest, Plan, explain_batch, plan_for, read_input

BASELINES = ("baseline:center", "baseline:prior")


@dataclass
class Tally:
    """What scoring some images gave: per-image values, curve sums, seconds per method, notes. Tallies of
    disjoint image sets merge, so a run can be split across workers."""

    values: dict[tuple[str, str], list[tuple[str, float]]] = field(default_factory=dict)
    curves: dict[str, dict[str, CurvePart]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    target_rules: dict[str, int] = field(default_factory=lambda: {"true class": 0, "predicted class": 0})
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, method: str, metric: str, names: Sequence[str], score: MetricScore) -> None:
        bucket = self.values.setdefault((method, metric), [])
        for b, name in enumerate(names):
            bucket.extend((name, float(v)) for v in score.values[b].tolist())
        if score.note is not None:
            self.notes.setdefault(metric, score.note)
        if score.method_note is not None:
            key, value = score.method_note
            self.notes.setdefault(metric, {}).setdefault(key, {})[method] = value
        for curve, part in score.curves.items():
            by_method = self.curves.setdefault(curve, {})
            by_method[method] = part if method not in by_method else by_method[method].plus(part)

    def merge(self, other: "Tally") -> "Tally":
        for key, entries in other.values.items():
            self.values.setdefault(key, []).extend(entries)
        for curve, by_method in other.curves.items():
            mine = self.curves.setdefault(curve, {})
            for method, part in by_method.items():
                mine[method] = part if method not in mine else mine[method].plus(part)
        for method, s in other.seconds.items():
            self.seconds[method] = self.seconds.get(method, 0.0) + s
        for rule, n in other.target_rules.items():
            self.target_rules[rule] = self.target_rules.get(rule, 0) + n
        for metric, note in other.notes.items():
            self.notes.setdefault(metric, note)
        return self


def _names(value: Union[str, Iterable[str], None]) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in items if v.strip()]


def _label_index(label: Union[str, int, None], labels: Sequence[str], n_classes: int) -> Optional[int]:
    if label is None:
        return None
    if isinstance(label, int):
        return label if 0 <= label < n_classes else None
    if not labels:
        return None
    norm = lambda s: re.sub(r"[\s_\-]+", " ", str(s).strip().lower())  # noqa: E731
    return {norm(l): i for i, l in enumerate(labels)}.get(norm(label))


def region_prior(plan: Plan, data: Any, order: Sequence[int]) -> tuple[Optional[torch.Tensor], int]:
    """The mean region mask over the images (the `baseline:prior` map); box files need no image decoding."""
    total, count = None, 0
    for i in order:
        if isinstance(data, FolderDataset):
            path, _ = data.items[i]
            spec = getattr(plan.model, "input_spec", None)
            size = tuple(spec.size[-2:]) if getattr(spec, "size", None) else read_image(path).spatial_shape[-2:]
            mask = box_mask(path.with_suffix(".txt"), size)
        else:
            mask = as_sample(data[i]).mask
        if total is not None and total.shape != mask.shape:
            return None, 0
        total = mask.float() if total is None else total + mask.float()
        count += 1
    return total, count


def score_images(plan: Plan, data: Any, order: Sequence[int], metrics: Sequence[str], options: dict[str, dict[str, Any]],
                 prior: tuple[Optional[torch.Tensor], int], batch_size: int = 8,
                 on_images: Optional[Callable[[int], None]] = None) -> Tally:
    """Explain and score the images `order` of `data` in batches; `on_images(n)` after each batch (progress)."""
    model, seed, layer = plan.model, int(plan.request.seed or 0), plan.request.layer
    methods = [s.name for s in plan.specs]
    labels = list(getattr(model, "labels", None) or [])
    region_metrics = [m for m in metrics if m in LOCALISATION]
    tally = Tally(seconds={m: 0.0 for m in methods})
    prior_total, prior_count = prior
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    for bi, batch in enumerate(batches):
        groups: dict[tuple, list[Sample]] = {}
        for s in (as_sample(data[i]) for i in batch):
            groups.setdefault(tuple(s.x.shape), []).append(s)  # images of one shape share a batch
        for group in groups.values():
            x = torch.stack([s.x for s in group]).to(plan.device)
            masks = torch.stack([s.mask for s in group]).to(plan.device)
            logits = model_scores(model, x, "logit", chunk=batch_size)
            chosen = []
            for s, row in zip(group, logits):
                idx = _label_index(s.label, labels, logits.shape[1])
                tally.target_rules["true class" if idx is not None else "predicted class"] += 1
                chosen.append([idx if idx is not None else int(row.argmax())])
            targets = torch.tensor(chosen, dtype=torch.long, device=plan.device)
            names = [labels[t[0]] if labels and t[0] < len(labels) else str(t[0]) for t in chosen]
            for m in methods:  # one call per method: its seconds include its own passes (its cost run alone)
                t0 = time.perf_counter()
                maps = explain_batch(plan, x, targets, methods=[m])[m]
                tally.seconds[m] += time.perf_counter() - t0
                for metric in metrics:
                    call = MetricCall(model, x, maps, targets, masks, m, options[metric], layer, seed, seed + bi)
                    tally.add(m, metric, names, get_metric(metric).score(call))
            baselines = {}
            if region_metrics:
                baselines["baseline:center"] = L.center_map(x.shape[2:], x.shape[0], x.device)
                if prior_total is not None:
                    baselines["baseline:prior"] = L.prior_maps(masks, prior_total.to(x.device), prior_count)
            for name, maps in baselines.items():
                for metric in region_metrics:
                    call = MetricCall(model, x, maps, targets, masks, name, options[metric], layer, seed, seed + bi)
                    tally.add(name, metric, names, get_metric(metric).score(call))
        if on_images is not None:
            on_images(len(batch))
    return tally


def evaluate(
    model: nn.Module,
    dataset: Any,
    methods: Union[str, Sequence[str]],
    metrics: Union[str, Sequence[str], None] = None,
    limit: Optional[int] = None,
    seed: int = 0,
    out: Union[str, Path, None] = None,
    batch_size: int = 8,
    layer: Optional[str] = None,
    metric_options: Optional[dict[str, dict[str, Any]]] = None,
    progress: bool = False,
    include: Union[str, Path, Iterable[str], None] = None,
) -> list[dict[str, Any]]:
    """Run every (method, metric) pair over `dataset` and return the summary rows
    {method, metric, target, n, value, ci_low, ci_high}; with `out`, also write the files.

    dataset: a folder path (one sub-folder per class, `N.txt` YOLO box beside each image) or a sequence of
    samples (dicts with 'image' (C, *s), 'mask' (*s), 'label'). Each image is explained for its true class
    when the class name is one of the model's labels, otherwise for the predicted class (recorded in
    run.json). `target` in the rows is the explained class name, plus `all` over every image. Localisation
    metrics also get rows for `baseline:center` and `baseline:prior`. `include` (a list, or a text file with
    one `class/N.jpg` per line) restricts a folder to those images, e.g. a model's held-out test split."""
    if not _names(methods):
        raise MethodError("no method was given; pass methods such as 'gradcam,layercam'.")
    plan = plan_for(model, ExplainRequest.build(_names(methods), layer=layer, seed=int(seed)))
    metric_names = _names(metrics) or list(METRICS)
    unknown = [m for m in metric_names if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}; the metrics are: {', '.join(METRICS)}.")
    bad = [k for k in (metric_options or {}) if k not in METRICS]
    if bad:
        raise InputError(f"metric_options names unknown metric(s) {', '.join(bad)}.")
    options = {m: dict((metric_options or {}).get(m, {})) for m in metric_names}
    include = read_include(include)
    if isinstance(dataset, (str, Path)):
        data: Any = FolderDataset(dataset, lambda path: read_input(plan, path).tensor[0], include)
    else:
        data = dataset
    order = list(range(len(data)))
    if limit is not None:
        if int(limit) < 1:
            raise InputError(f"--limit must be at least 1, not {limit}.")
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(int(seed))).tolist()
        order = sorted(perm[: int(limit)])
    prior = region_prior(plan, data, order) if any(m in LOCALISATION for m in metric_names) else (None, 0)

    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm  # only when a progress bar is asked for

        bar = tqdm(total=len(order), desc="evaluate", unit="image")
    try:
        tally = score_images(plan, data, order, metric_names, options, prior, batch_size,
                             on_images=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    method_names = [s.name for s in plan.specs]
    present = method_names + [b for b in BASELINES if any(k[0] == b for k in tally.values)]
    rows = summarise(tally.values, present, metric_names, int(seed))
    if out is not None:
        _write(Path(out), rows, tally, {
            "data": str(dataset) if isinstance(dataset, (str, Path)) else type(dataset).__name__,
            "n_images": len(order), "seed": int(seed), "methods": method_names, "metrics": metric_names,
            "limit": limit, "layer": layer, "include": None if include is None else len(include),
            "targets": tally.target_rules, "metric_notes": tally.notes,
            "metric_options": {k: {kk: repr(vv) for kk, vv in v.items()} for k, v in options.items() if v},
            "seconds_per_image": {m: tally.seconds[m] / max(len(order), 1) for m in method_names},
            "elapsed_s": round(time.perf_counter() - started, 3),
            "probabilities": "sigmoid" if getattr(model, "multi_label", False) else "softmax",
        })
    return rows


def _write(out_dir: Path, rows: list[dict[str, Any]], tally: Tally, settings: dict[str, Any]) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir}: {exc}") from None
    atomic_write(out_dir / "metrics.csv", rows_to_csv(rows))
    atomic_write(out_dir / "metrics.md", rows_to_markdown(rows, settings["seconds_per_image"], settings))
    settings["plots"] = write_plots(out_dir, rows, tally.curves)
    atomic_write(out_dir / "run.json", json.dumps(settings, indent=2, default=str))


__all__ = ["BASELINES", "Tally", "evaluate", "region_prior", "score_images"]
