"""Read -> prepare -> explain for one input under a `Plan`: an `Outcome` with the result, the prepared input, the
prediction, the region (when given) and its pointing-game and energy scores, what was noted, and the timings.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from medlens.core.digests import tensor_digest
from medlens.core.explain import explain
from medlens.core.result import ExplanationResult
from medlens.errors import InputError
from medlens.evaluation.localisation import energy_in_box, pointing_game
from medlens.io.formats import DEFAULT_FORMATS
from medlens.io import PreparedInput, ScanImage, prepare, read_image, spec_for
from medlens.io.regions import Region, read_region, region_beside, region_mask
from medlens.core.region_targets import has_region_targets
from medlens.core.sliding_window import WINDOW_OPTIONS, take_window
from medlens.pipeline.segmentation import explained_region, segmentation_output, targets_on_grid
from medlens.pipeline.plan import Plan

RegionArg = Union[None, str, Path, Region]  # None: no region; "auto": a box file beside the image; a path; a Region


@dataclass
class Outcome:
    """One input explained: what a front end shows or writes."""

    result: ExplanationResult
    prepared: PreparedInput  # the model's input tensor, the grayscale display image, the notes, the scan as read
    source: Optional[Path] = None  # the file (or DICOM series folder) it came from
    region: Optional[torch.Tensor] = None  # boolean mask on the input's grid
    region_on_scan: Optional[torch.Tensor] = None  # the same region on the scan's own plane (2-D), for pictures
    region_on_scan_of: Optional[Callable[[], torch.Tensor]] = field(default=None, repr=False)  # makes it when asked
    region_source: Optional[Path] = None
    region_scores: Optional[dict[str, dict[str, dict[str, float]]]] = None  # method -> target name -> metric -> value
    notes: list[str] = field(default_factory=list)  # what reading, preparing and the region lookup noted
    seconds: dict[str, float] = field(default_factory=dict)  # read, explain
    formats: tuple[str, ...] = DEFAULT_FORMATS  # what the plan asked to write
    signed: bool = False  # pictures draw the raw signed maps (the request's --signed)
    segmentation_logits: Optional[torch.Tensor] = None  # (K, *grid) per-pixel logits, when `dicom` writes a SEG

    @property
    def scores_regions(self) -> bool:
        """Whether the targets are regions (a segmentation model): the outputs are then region scores, not classes."""
        return self.result.has_provenance("region_targets")

    def prediction(self) -> dict[str, float]:
        """Class label (or index) -> probability, for the one image; empty for region targets, whose outputs are sums
        of logits over a region (a softmax over them means nothing): see `scores`."""
        if self.scores_regions:
            return {}
        probs = self.result.probabilities[0].detach().float().cpu().tolist()
        labels = self.result.labels or [str(i) for i in range(len(probs))]
        return {str(label): float(p) for label, p in zip(labels, probs)}

    def scores(self) -> dict[str, float]:
        """For region targets, target name -> the region score explained (the sum of the class's logits over the
        region), for the one image; empty for a classifier (see `prediction`)."""
        if not self.scores_regions:
            return {}
        values = self.result.logits[0].detach().float().cpu().tolist()
        return {str(name): float(values[t]) for name, t in zip(self.target_names(), self.result.targets[0].tolist())}

    def target_names(self) -> list[str]:
        return self.result.target_names()[0]

    def picture_region(self) -> Optional[torch.Tensor]:
        """The region on the scan's own plane, where pictures are drawn (made on first use: only pictures need it),
        or None."""
        if self.region_on_scan is None and self.region_on_scan_of is not None:
            self.region_on_scan, self.region_on_scan_of = self.region_on_scan_of(), None
        return self.region_on_scan

    def region_provenance(self) -> Optional[dict[str, Any]]:
        """What provenance.json says of the region: its file, its size on the input's grid, and the scores."""
        if self.region is None:
            return None
        return {"file": str(self.region_source) if self.region_source else None,
                "pixels_on_input_grid": int(self.region.sum()),
                "metrics": self.region_scores,
                "note": "pointing_game: 1 if the map's peak lies in the region (within 15/224 of the largest side); "
                        "energy_in_region: share of the map's positive mass inside the region (as medlens evaluate)"}


def read_input(plan: Plan, path: Union[str, Path]) -> PreparedInput:
    """Read a scan file (or DICOM series folder) and prepare it for the plan's model."""
    return read_with_shape(plan, Path(path))[0]


def read_with_shape(plan: Plan, path: Path) -> tuple[PreparedInput, tuple[int, ...]]:
    """The prepared input and the spatial shape of the scan as read (a volume's, before a 2-D model's slice): what
    `explain_prepared_many` takes as `read_shapes`."""
    request = plan.request
    scan = read_image(path, frame=request.frame, window=request.window)
    spec = spec_for(plan.model)
    if take_window(request.options)[0] is not None:  # run window by window: the volume keeps its own size
        spec = dataclasses.replace(spec, size=None)
    return prepare(scan, spec, dims=plan.dims, slice_index=request.slice_index), scan.spatial_shape


def _resolve_region(region: RegionArg, source: Optional[Path], notes: list[str]) -> Optional[Region]:
    if region is None:
        return None
    if isinstance(region, Region):
        return region
    if isinstance(region, str) and region == "auto":
        beside = region_beside(source) if source is not None else None
        if beside is None:
            return None
        try:
            return read_region(beside)
        except InputError as exc:  # a .txt beside the image that is not a box file: said, not fatal
            notes.append(f"the file {beside.name} beside the image was not used as a region: {exc}")
            return None
    return read_region(region)


def score_region(result: ExplanationResult, mask: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """Pointing game and energy in the region of every map (method, target), as `medlens evaluate` computes them."""
    return score_regions(result, mask[None], [0])[0]


def score_regions(result: ExplanationResult, masks: torch.Tensor,
                  rows: Sequence[int]) -> list[dict[str, dict[str, dict[str, float]]]]:
    """`score_region` of several images of one result at once: image `rows[k]` against `masks[k]` (one call per
    method for them all: a mini-batch's regions cost one scoring, not one per input)."""
    names = result.target_names()
    if len(result):
        masks = masks.to(next(iter(result.values())).device)
    index = torch.as_tensor(list(rows), dtype=torch.long)
    scores: list[dict[str, dict[str, dict[str, float]]]] = [{} for _ in rows]
    for method in result:
        maps = result[method].index_select(0, index.to(result[method].device))
        hits, energy = pointing_game(maps, masks).tolist(), energy_in_box(maps, masks).tolist()
        for k, row in enumerate(rows):
            scores[k][method] = {name: {"pointing_game": float(h), "energy_in_region": float(e)}
                                 for name, h, e in zip(names[row], hits[k], energy[k])}
    return scores


def explain_batch(plan: Plan, x: torch.Tensor, targets: Any = None, *,
                  methods: Optional[Sequence[str]] = None) -> ExplanationResult:
    """Explain prepared inputs (B, C, *spatial) under the plan: the plan's methods (or a subset), its layer, seed and
    options, and its targets unless per-image `targets` are given (the evaluation run explains each image's class)."""
    specs = plan.specs if methods is None else tuple(s for s in plan.specs if s.name in set(methods))
    options = {k: v for k, v in plan.request.options.items()  # `output` (but "probability") is for every method
               if any(k in s.options for s in specs) or (k == "output" and v != "probability") or k in WINDOW_OPTIONS}
    return explain(plan.model, x.to(plan.device), methods=[s.name for s in specs],
                   targets=plan.targets if targets is None else targets, layer=plan.request.layer,
                   seed=plan.request.seed, **options)


def explain_prepared(plan: Plan, prepared: PreparedInput, *, source: Optional[Path] = None,
                     region: RegionArg = None, read_shape: Optional[tuple[int, ...]] = None) -> Outcome:
    """Explain an already prepared input under the plan; `region` adds its outline and scores. `read_shape` is
    the scan's spatial shape as read (default: the prepared scan's), which a region mask must match."""
    return explain_prepared_many(plan, [prepared], sources=[source], region=region, read_shapes=[read_shape])[0]


def explain_prepared_many(plan: Plan, prepared: Sequence[PreparedInput], *,
                          sources: Optional[Sequence[Optional[Path]]] = None, region: RegionArg = None,
                          read_shapes: Optional[Sequence[Optional[tuple[int, ...]]]] = None) -> list[Outcome]:
    """Explain prepared inputs of one shape in one `explain` call (a mini-batch): one `Outcome` per input, its
    maps those of the input explained alone (within float tolerance). `region` as for `explain_prepared`, per input.

    Raises:
        InputError: the inputs do not share one prepared shape; whatever `explain` raises for the mini-batch (the
            caller explains the inputs one at a time to find the one at fault).
    """
    return explain_pending(plan, prepared, sources=sources, region=region, read_shapes=read_shapes).outcomes()


@dataclass
class PendingOutcomes:
    """A mini-batch explained, its `Outcome`s not yet made: `outcomes()` splits the result per input and adds the
    regions and their scores, which call no model (the batch runner makes them on its writer thread while the next
    mini-batch is explained). Region targets are made at once (their regions may need the model)."""

    plan: Plan
    prepared: Sequence[PreparedInput]
    ready: Optional[list[Outcome]] = None
    whole: Optional[ExplanationResult] = None
    sources: Sequence[Optional[Path]] = ()
    read_shapes: Sequence[Optional[tuple[int, ...]]] = ()
    found: Sequence[Any] = ()
    notes: Sequence[list[str]] = ()
    targets: Any = None
    share: float = 0.0
    file_regions: Optional[list[Any]] = None  # per input: (mask on its grid, scores), None, or what making it raised

    def file_region(self, i: int) -> Optional[tuple[torch.Tensor, dict]]:
        """Input `i`'s region file as a mask on its grid and its scores (None without a file). The masks are made
        one by one (what one raises is that input's alone), the scores of the whole mini-batch in one call."""
        if self.file_regions is None:
            self.file_regions = _score_file_regions(self)
        made = self.file_regions[i]
        if isinstance(made, BaseException):
            raise made
        return made

    def outcomes(self) -> list[Outcome]:
        """One `Outcome` per input, in order."""
        if self.ready is None:
            self.ready = [self.outcome(i) for i in range(len(self.prepared))]
        return self.ready

    def outcome(self, i: int) -> Outcome:
        """Input `i`'s `Outcome` (what it raises concerns that input alone: its region)."""
        return self.ready[i] if self.ready is not None else _outcome(self, i)


def explain_pending(plan: Plan, prepared: Sequence[PreparedInput], *,
                    sources: Optional[Sequence[Optional[Path]]] = None, region: RegionArg = None,
                    read_shapes: Optional[Sequence[Optional[tuple[int, ...]]]] = None) -> PendingOutcomes:
    """`explain_prepared_many`'s model work (the explanation, the region files read): the outcomes, made on
    `outcomes()`. Raises as `explain_prepared_many`."""
    n = len(prepared)
    sources = list(sources) if sources is not None else [None] * n
    read_shapes = list(read_shapes) if read_shapes is not None else [None] * n
    shapes = {tuple(p.tensor.shape[1:]) for p in prepared}
    if len(shapes) > 1:
        raise InputError(f"a mini-batch takes inputs of one prepared shape, not {sorted(shapes)}.")
    if n > 1 and has_region_targets(plan.targets):  # region targets are mapped onto each input's own grid: one by one
        return PendingOutcomes(plan, prepared, ready=[
            explain_prepared_many(plan, [one], sources=[src], region=region, read_shapes=[shape])[0]
            for one, src, shape in zip(prepared, sources, read_shapes)])
    notes = [list(p.notes) for p in prepared]
    found = [_resolve_region(region, src, note) for src, note in zip(sources, notes)]
    first = prepared[0]
    targets = targets_on_grid(plan.targets, read_shapes[0] or first.scan.spatial_shape, tuple(first.tensor.shape[2:]),
                              plan.request.slice_index)
    t0 = time.perf_counter()
    x = first.tensor if n == 1 else torch.cat([p.tensor for p in prepared])
    whole = explain_batch(plan, x, targets if targets is not plan.targets else None)
    pending = PendingOutcomes(plan, prepared, None, whole, sources, read_shapes, found, notes, targets,
                              (time.perf_counter() - t0) / n)
    if has_region_targets(targets):  # the explained region and a DICOM Segmentation may call the model: now
        pending.outcomes()
    return pending


def _outcome(pending: PendingOutcomes, i: int) -> Outcome:
    plan, whole, one = pending.plan, pending.whole, pending.prepared[i]
    result = whole if len(pending.prepared) == 1 else split_result(whole, i, one.tensor)
    outcome = Outcome(result, one, pending.sources[i], notes=pending.notes[i], seconds={"explain": pending.share},
                      formats=plan.formats, signed=bool(getattr(plan.request, "signed", False)))
    _add_region(pending, outcome, i)
    if "dicom" in plan.formats:  # a segmentation model's predicted mask, filed as a DICOM Segmentation
        outcome.segmentation_logits = segmentation_output(plan, one.tensor, pending.targets)
    return outcome


def _add_region(pending: PendingOutcomes, outcome: Outcome, i: int) -> None:
    """The outcome's region (outlined, scored): a region file's mask on the input's grid and on the scan's plane, or
    the region a segmentation target explains."""
    plan, found, read_shape, one = pending.plan, pending.found[i], pending.read_shapes[i], outcome.prepared
    grid = tuple(one.tensor.shape[2:])
    if found is None:
        explained = explained_region(plan, one.tensor, pending.targets)
        if explained is not None:  # a segmentation target: its region is outlined and scored
            outcome.region, outcome.region_scores = explained, score_region(outcome.result, explained)
        return
    outcome.region, outcome.region_scores = pending.file_region(i)
    outcome.region_source = found.source
    plane = tuple(one.scan.spatial_shape)
    if len(grid) == 2 and len(plane) == 2:  # pictures are drawn on the scan's plane: the region there, exactly
        outcome.region_on_scan_of = functools.partial(region_mask, found, read_shape or plane, plane,
                                                      slice_index=plan.request.slice_index)


def _score_file_regions(pending: PendingOutcomes) -> list[Any]:
    """`PendingOutcomes.file_region` of every input: the masks one by one, the scores in one `score_regions` call."""
    made: list[Any] = []
    for found, read_shape, one in zip(pending.found, pending.read_shapes, pending.prepared):
        try:
            made.append(None if found is None else region_mask(
                found, read_shape or one.scan.spatial_shape, tuple(one.tensor.shape[2:]),
                slice_index=pending.plan.request.slice_index))
        except Exception as exc:  # noqa: BLE001 - raised again for this input alone (`file_region`)
            made.append(exc)
    rows = [i for i, mask in enumerate(made) if isinstance(mask, torch.Tensor)]
    if rows:
        scores = score_regions(pending.whole, torch.stack([made[i] for i in rows]), rows)
        for i, scored in zip(rows, scores):
            made[i] = (made[i], scored)
    return made


def split_result(result: ExplanationResult, i: int, x: torch.Tensor) -> ExplanationResult:
    """Image `i` of a mini-batch's result as the result of that image alone (`x`, its (1, C, *spatial) input): maps,
    logits and targets sliced, and the provenance's input shape and digest those of `x`."""
    provenance = result.provenance
    provenance["input"] = {**provenance.get("input", {}), "shape": list(x.shape), "sha256": tensor_digest(x)}
    provenance["mini_batch"] = {"index": i, "size": int(result.logits.shape[0])}
    return ExplanationResult({m: result[m][i:i + 1] for m in result}, result.logits[i:i + 1],
                             result.targets[i:i + 1], provenance, result.labels, result.multi_label)


def explain_file(plan: Plan, path: Union[str, Path], *, region: RegionArg = "auto") -> Outcome:
    """Read, prepare and explain one file (or DICOM series folder); a box file beside it is its region by default."""
    source = Path(path)
    t0 = time.perf_counter()
    prepared, read_shape = read_with_shape(plan, source)
    read_seconds = time.perf_counter() - t0
    outcome = explain_prepared(plan, prepared, source=source, region=region, read_shape=read_shape)
    outcome.seconds = {"read": read_seconds, **outcome.seconds}
    return outcome


def explain_tensor(plan: Plan, x: torch.Tensor, *, display: Optional[np.ndarray] = None,
                   region: Optional[Region] = None) -> Outcome:
    """Explain a tensor already prepared for the model (1, C, *spatial), e.g. from a notebook or the app."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or x.shape[0] != 1:
        raise InputError(f"explain_tensor takes one prepared input of shape (1, C, *spatial), not "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if display is None:
        plane = x[0].float().mean(dim=0).detach().cpu()
        lo, hi = float(plane.min()), float(plane.max())
        display = ((plane - lo) / (hi - lo) if hi > lo else torch.zeros_like(plane)).numpy()
    scan = ScanImage(np.asarray(display, dtype=np.float32), Path("<tensor>"), "tensor",
                     layout="volume" if x.dim() == 5 else "gray")
    prepared = PreparedInput(x.detach(), np.asarray(display, dtype=np.float32), [], scan, spec_for(plan.model))
    return explain_prepared(plan, prepared, region=region)
