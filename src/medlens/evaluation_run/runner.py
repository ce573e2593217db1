"""`evaluate()`: a request checked once by the pipeline, images read and prepared by it, each batch explained by
it per method (timed), every registered metric scored, the localisation baselines added, then tables and plots.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from medlens.core.model_description import describe
from medlens.errors import InputError, MethodError, OutputError
from medlens.evaluation.metrics import LOCALISATION, METRICS
from medlens.evaluation_run.dataset import FolderDataset, read_include
from medlens.evaluation_run.parallel import EvaluateTaskFactory, score_on_executor
from medlens.evaluation_run.scoring import Tally, region_prior, score_images
from medlens.evaluation_run.segmentation import SEGMENTATION_METRICS, score_segmentation, segmentation_metrics
from medlens.evaluation_run.tables import rows_to_csv, rows_to_markdown, summarise
from medlens.io.files import atomic_write
from medlens.pipeline import ExplainRequest, WorkerRecipe, plan_for, read_input

BASELINES = ("baseline:center", "baseline:prior")


def _names(value: Union[str, Iterable[str], None]) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in items if v.strip()]


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
    executor: str = "serial",
    workers: int = 2,
    ray_address: Optional[str] = None,
    model_source: Optional[str] = None,
    model_options: Optional[dict[str, Any]] = None,
) -> list[dict[str, Any]]:
    """Run every (method, metric) pair over `dataset` and return the summary rows
    {method, metric, target, n, value, ci_low, ci_high}; with `out`, also write the files.

    dataset: a folder path (one sub-folder per class, `N.txt` YOLO box beside each image) or a sequence of
    samples (dicts with 'image' (C, *s), 'mask' (*s), 'label'). Each image is explained for its true class
    when the class name is one of the model's labels, otherwise for the predicted class (recorded in
    run.json). `target` in the rows is the explained class name, plus `all` over every image. Localisation
    metrics also get rows for `baseline:center` and `baseline:prior`. `include` (a list, or a text file with
    one `class/N.jpg` per line) restricts a folder to those images, e.g. a model's held-out test split.

    `executor` "processes" or "ray" (with `workers`, `ray_address`) scores groups of batches in worker processes
    that load the model themselves: they need `model_source` (what `load_model` takes, with `model_options`) and a
    folder `dataset`. The rows are those of the serial run (same batches, seeds and order).

    A segmentation model (described as one) is evaluated on region scores (`medlens.evaluation_run.segmentation`):
    each image's predicted region of each foreground class is explained; `metrics` default to those that apply, and
    the others are refused with the reason; the serial executor only."""
    if not _names(methods):
        raise MethodError("no method was given; pass methods such as 'gradcam,layercam'.")
    plan = plan_for(model, ExplainRequest.build(_names(methods), layer=layer, seed=int(seed)))
    segmentation = describe(model).task == "segmentation"  # region scores: evaluation_run.segmentation
    metric_names, options = _metrics_for(segmentation, metrics, metric_options, executor)
    include = read_include(include)
    if isinstance(dataset, (str, Path)):
        data: Any = FolderDataset(dataset, lambda path: read_input(plan, path).tensor[0], include)
    else:
        data = dataset
    order = _subset(len(data), limit, seed)
    prior = region_prior(plan, data, order) if any(m in LOCALISATION for m in metric_names) else (None, 0)
    factory = None if executor == "serial" else _task_factory(
        plan, executor, dataset, model_source, model_options, include, metric_names, options, batch_size, prior)

    started = time.perf_counter()
    if segmentation:
        tally = _with_bar(len(order), progress, lambda on_images: score_segmentation(
            plan, data, order, metric_names, options, prior, batch_size, on_images=on_images))
    elif factory is None:
        tally = _with_bar(len(order), progress, lambda on_images: score_images(
            plan, data, order, metric_names, options, prior, batch_size, on_images=on_images))
    else:
        tally = _with_bar(len(order), progress, lambda on_images: score_on_executor(
            factory, order, executor=executor, workers=workers, ray_address=ray_address, on_images=on_images))
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
            "probabilities": "region score (sum of logits)" if segmentation else
                             "sigmoid" if describe(model).multi_label else "softmax",
            "executor": executor if factory is None else {"name": executor, "workers": workers},
        })
    return rows


def _metrics_for(segmentation: bool, metrics: Any, metric_options: Optional[dict[str, dict[str, Any]]],
                 executor: str) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The metric names and options of a run; a segmentation model gets those that apply to region scores."""
    if segmentation and not _names(metrics):
        metrics = list(SEGMENTATION_METRICS)
    metric_names, options = _metric_settings(metrics, metric_options)
    if segmentation:
        metric_names = segmentation_metrics(metric_names)
        if executor != "serial":
            raise InputError(f"a segmentation model is evaluated with the serial executor only for now; drop "
                             f"--executor {executor}.")
    return metric_names, options


def _task_factory(plan: Any, executor: str, dataset: Any, model_source: Optional[str],
                  model_options: Optional[dict[str, Any]], include: Any, metric_names: list[str],
                  options: dict[str, dict[str, Any]], batch_size: int, prior: Any) -> "EvaluateTaskFactory":
    """What worker processes need to score groups of batches: the model by source, the folder, the metrics."""
    if model_source is None or not isinstance(dataset, (str, Path)):
        raise InputError(f"the {executor} executor runs workers that load the model and read the folder themselves: "
                         f"give the model by name or file (model_source=) and the data as a folder.")
    request = replace(plan.request, methods=tuple(s.name for s in plan.specs))  # the registry's names
    recipe = WorkerRecipe(str(model_source), dict(model_options or {}), request, threads=1)  # a core per worker
    return EvaluateTaskFactory(recipe, str(dataset), include, metric_names, options, batch_size, prior)


def _metric_settings(metrics: Union[str, Sequence[str], None],
                     metric_options: Optional[dict[str, dict[str, Any]]]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The metric names (default: all) and each one's options, every name checked against the metric registry."""
    metric_names = _names(metrics) or list(METRICS)
    unknown = [m for m in metric_names if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}; the metrics are: {', '.join(METRICS)}.")
    bad = [k for k in (metric_options or {}) if k not in METRICS]
    if bad:
        raise InputError(f"metric_options names unknown metric(s) {', '.join(bad)}.")
    return metric_names, {m: dict((metric_options or {}).get(m, {})) for m in metric_names}


def _subset(n: int, limit: Optional[int], seed: int) -> list[int]:
    """The image indices to score: all, or a seeded random `limit` of them in their order."""
    order = list(range(n))
    if limit is not None:
        if int(limit) < 1:
            raise InputError(f"--limit must be at least 1, not {limit}.")
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(int(seed))).tolist()
        order = sorted(perm[: int(limit)])
    return order


def _with_bar(total: int, progress: bool, work: Callable[[Optional[Callable[[int], Any]]], Tally]) -> Tally:
    """`work(on_images)`, with a progress bar over `total` images when one is asked for."""
    if not progress:
        return work(None)
    from tqdm.auto import tqdm  # only when a progress bar is asked for

    bar = tqdm(total=total, desc="evaluate", unit="image")
    try:
        return work(bar.update)
    finally:
        bar.close()


def _write(out_dir: Path, rows: list[dict[str, Any]], tally: Tally, settings: dict[str, Any]) -> None:
    """metrics.csv, metrics.md, the plots and run.json (last); an earlier evaluation's plots that this one does not
    draw are removed, so the folder holds one evaluation's files."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {out_dir}: {exc}") from None
    earlier = _earlier_plots(out_dir)
    atomic_write(out_dir / "metrics.csv", rows_to_csv(rows))
    atomic_write(out_dir / "metrics.md", rows_to_markdown(rows, settings["seconds_per_image"], settings))
    # lazy: matplotlib takes seconds to import, and every CLI command imports this module
    from medlens.evaluation_run.plots import write_plots

    settings["plots"] = write_plots(out_dir, rows, tally.curves)
    atomic_write(out_dir / "run.json", json.dumps(settings, indent=2, default=str))
    for name in earlier - set(settings["plots"]):
        with contextlib.suppress(OSError):
            (out_dir / name).unlink()


def _earlier_plots(out_dir: Path) -> set[str]:
    """The plot files an earlier evaluation's run.json in `out_dir` lists (plain names in that folder only)."""
    try:
        plots = json.loads((out_dir / "run.json").read_text()).get("plots") or []
    except (OSError, ValueError, AttributeError):
        return set()
    return {p for p in plots if isinstance(p, str) and p == Path(p).name and p.endswith(".png")}


__all__ = ["BASELINES", "Tally", "evaluate", "region_prior", "score_images"]
