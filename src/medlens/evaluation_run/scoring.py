"""Scoring images: each batch explained through the pipeline per method (timed), every requested metric of the
registry scored, the localisation baselines added; the result is a `Tally` that merges across workers.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from medlens.core.model_description import describe
import medlens.evaluation.localisation as L
from medlens.evaluation.faithfulness import model_scores
from medlens.evaluation.metrics import LOCALISATION, CurvePart, MetricCall, MetricScore, get_metric
from medlens.evaluation_run.dataset import FolderDataset, Sample, as_sample, true_mask
from medlens.io import read_image
from medlens.pipeline import Plan, explain_batch


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

    def to_record(self) -> dict[str, Any]:
        """As JSON values (Ray hands records over as JSON); `from_record` gives the same tally back."""
        return {
            "values": [[method, metric, entries] for (method, metric), entries in self.values.items()],
            "curves": {curve: {method: {"x": list(part.x), "total": part.total.tolist(), "dtype": str(part.total.dtype),
                                        "count": part.count, "x_labels": list(part.x_labels) if part.x_labels else None}
                               for method, part in by_method.items()} for curve, by_method in self.curves.items()},
            "seconds": self.seconds, "target_rules": self.target_rules,
            "notes": json.loads(json.dumps(self.notes, default=str)),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Tally":
        curves = {curve: {method: CurvePart(part["x"], torch.tensor(part["total"], dtype=getattr(torch, part["dtype"].split(".")[-1])),
                                            part["count"], part["x_labels"])
                          for method, part in by_method.items()} for curve, by_method in record["curves"].items()}
        values = {(method, metric): [(name, float(v)) for name, v in entries] for method, metric, entries in record["values"]}
        return cls(values, curves, dict(record["seconds"]), dict(record["target_rules"]), dict(record["notes"]))

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
    """The mean region mask over the images (the `baseline:prior` map); box and mask files need no image decoding."""
    total, count = None, 0
    for i in order:
        if isinstance(data, FolderDataset):
            path, _ = data.items[i]
            spec = describe(plan.model).input_spec
            size = tuple(spec.size[-2:]) if spec is not None and spec.size else read_image(path).spatial_shape[-2:]
            mask = true_mask(path, tuple(size))
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
    """Explain and score the images `order` of `data` in batches; `on_images(n)` after each batch (progress). The
    values do not depend on the batch size: the metrics that draw noise draw each image's from its own generator."""
    model, seed, layer = plan.model, int(plan.request.seed or 0), plan.request.layer
    methods = [s.name for s in plan.specs]
    labels = list(describe(model).labels)
    region_metrics = [m for m in metrics if m in LOCALISATION]
    tally = Tally(seconds={m: 0.0 for m in methods})
    prior_total, prior_count = prior
    batches = [list(order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    for batch in batches:
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
                    call = MetricCall(model, x, maps, targets, masks, m, options[metric], layer, seed, logits)
                    tally.add(m, metric, names, get_metric(metric).score(call))
            baselines = {}
            if region_metrics:
                baselines["baseline:center"] = L.center_map(x.shape[2:], x.shape[0], x.device)
                if prior_total is not None:
                    baselines["baseline:prior"] = L.prior_maps(masks, prior_total.to(x.device), prior_count)
            for name, maps in baselines.items():
                for metric in region_metrics:
                    call = MetricCall(model, x, maps, targets, masks, name, options[metric], layer, seed)
                    tally.add(name, metric, names, get_metric(metric).score(call))
        if on_images is not None:
            on_images(len(batch))
    return tally


__all__ = ["Tally", "region_prior", "score_images"]
