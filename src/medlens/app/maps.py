"""The session's map store: raw maps keyed by (model, input, method, the method's own options, target, seed), filled
through `medlens.pipeline` only for what is missing, so moving a view slider or adding a model never recomputes a map.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from medlens.app.catalogue import ModelEntry
from medlens.core.registry import get_spec
from medlens.io import PreparedInput
from medlens.pipeline import ExplainRequest, explain_prepared, plan_for
from medlens.pipeline.segmentation import explained_region


@dataclass(frozen=True)
class MapKey:
    model: str
    input: str  # the input's digest plus the slice (and window) it was prepared with
    method: str
    options: str  # JSON of the options this method takes (others do not change its map)
    target: int
    seed: Optional[int]


def method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of `options` that `method` takes (the registry's option names)."""
    accepted = set(get_spec(method).options)
    return {k: v for k, v in sorted(options.items()) if k in accepted}


def map_key(model: str, input_id: str, method: str, options: Mapping[str, Any], target: int,
            seed: Optional[int]) -> MapKey:
    spec = get_spec(method)
    return MapKey(model, input_id, spec.name, json.dumps(method_options(spec.name, options), sort_keys=True, default=str),
                  int(target), seed if spec.stochastic else None)


@dataclass
class ModelRun:
    """What one model said about one prepared input: probabilities, default targets, the input and its region."""

    probabilities: dict[str, float]
    default_targets: list[int]
    prepared: PreparedInput
    region: Optional[np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)  # method -> the ExplanationResult's provenance
    # a segmentation model: class -> the model's predicted mask of that class on the input's grid (the region each of
    # its maps explains, outlined on them), and class -> the region score explained (the sum of its logits there)
    regions: dict[int, np.ndarray] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


class MapStore:
    """Per session: maps and model runs, computed on demand. `computed` counts explain calls (tests check it)."""

    def __init__(self) -> None:
        self.maps: dict[MapKey, np.ndarray] = {}
        self.runs: dict[tuple[str, str], ModelRun] = {}
        # (model, input, region) -> the prepared input and the region on its grid
        self.inputs: dict[tuple[str, str, str], tuple[PreparedInput, Optional[np.ndarray]]] = {}
        self.computed = 0
        self.seconds: list[float] = []

    def run_of(self, model: str, input_id: str) -> Optional[ModelRun]:
        return self.runs.get((model, input_id))

    def ensure(self, entry: ModelEntry, input_id: str, prepared: PreparedInput, region: Optional[np.ndarray],
               methods: Sequence[str], options: Mapping[str, Any], targets: Optional[Sequence[int]],
               seed: Optional[int]) -> dict[tuple[str, int], np.ndarray]:
        """(method, target) -> raw map (*spatial) for the model on the input; computes only the missing ones, in one
        pipeline call that shares passes. `targets` None: the model's default targets (top-1; multi-label p >= 0.5)."""
        run = self.runs.get((entry.key, input_id))
        wanted = list(targets) if targets is not None else (run.default_targets if run else None)
        missing = [m for m in methods if wanted is None or any(
            map_key(entry.key, input_id, m, options, t, seed) not in self.maps for t in wanted)]
        if missing:
            self._compute(entry, input_id, prepared, region, missing, options, wanted, seed)
            run = self.runs[(entry.key, input_id)]
            wanted = list(targets) if targets is not None else run.default_targets
        return {(m, t): self.maps[map_key(entry.key, input_id, m, options, t, seed)] for m in methods for t in wanted}

    def _compute(self, entry: ModelEntry, input_id: str, prepared: PreparedInput, region: Optional[np.ndarray],
                 methods: Sequence[str], options: Mapping[str, Any], targets: Optional[list[int]],
                 seed: Optional[int]) -> None:
        used = {k: v for m in methods for k, v in method_options(m, options).items()}
        request = ExplainRequest.build(list(methods), targets=targets, seed=seed, options=used)
        t0 = time.perf_counter()
        with entry.borrow() as model:  # a private copy: explain() hooks it for the length of one call
            plan = plan_for(model, request)
            outcome = explain_prepared(plan, prepared)
            regions = _predicted_regions(plan, prepared, outcome)
        self.seconds.append(time.perf_counter() - t0)
        self.computed += 1
        result = outcome.result
        region_targets = result.provenance.get("region_targets")
        # a segmentation model's maps come in target slots; each slot explains one class (over its predicted region)
        chosen = ([int(t["class"]) for t in region_targets["targets"]] if region_targets
                  else result.targets[0].tolist())
        for method in result:
            maps = result[method][0].detach().float().cpu().numpy()
            for j, t in enumerate(chosen):
                self.maps[map_key(entry.key, input_id, method, options, t, seed)] = maps[j]
        run = self.runs.get((entry.key, input_id))
        if run is None:
            default = chosen if (targets is None or region_targets) else _top_targets(result)
            run = ModelRun(outcome.prediction(), default, prepared, region)
            self.runs[(entry.key, input_id)] = run
        run.regions.update(regions)
        run.scores.update(outcome.scores())
        for method in result:
            run.provenance[method] = dict(result.provenance)


def _predicted_regions(plan: Any, prepared: PreparedInput, outcome: Any) -> dict[int, np.ndarray]:
    """class -> the region a segmentation model's map of that class explains (its predicted mask), on the grid."""
    found = outcome.result.provenance.get("region_targets")
    if not found:
        return {}
    out = {}
    for target, info in zip(plan.targets or [], found["targets"]):
        mask = explained_region(plan, prepared.tensor, [target])
        if mask is not None:
            out[int(info["class"])] = mask.numpy()
    return out


def _top_targets(result: Any) -> list[int]:
    probs = result.probabilities[0]
    multi = bool(result.multi_label)
    if multi:
        chosen = [i for i, p in enumerate(probs.tolist()) if p >= 0.5]
        return chosen or [int(probs.argmax())]
    return [int(probs.argmax())]
