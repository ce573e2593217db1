"""The evaluation run: every (method, metric) pair over a dataset, summarised with bootstrap intervals.

`evaluate()` reads a folder of images with boxes (or takes in-memory samples), explains each batch with each
method (timed), scores every metric, adds the localisation baselines, and writes
`metrics.csv`, `metrics.md`, `run.json` and plots (matplotlib Agg), every file atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from medlens.errors import InputError, MethodError, OutputError
from medlens.io.regions import boxes_to_mask
from medlens.evaluation import faithfulness as F
from medlens.evaluation import localisation as L
from medlens.evaluation import trust as TR
from medlens.evaluation.stats import bootstrap_ci

METRICS = (
    "deletion", "insertion", "road_morf", "road_lerf", "average_drop", "increase_in_confidence",
    "pointing_game", "energy_in_box", "iou", "dice", "auprc",
    "randomization", "completeness", "max_sensitivity", "sparseness",
)
LOCALISATION = ("pointing_game", "energy_in_box", "iou", "dice", "auprc")
BASELINES = ("baseline:center", "baseline:prior")
COLUMNS = ("method", "metric", "target", "n", "value", "ci_low", "ci_high")
# Which direction is better, for the Markdown table and the docs.
HIGHER_IS_BETTER = {
    "deletion": False, "insertion": True, "road_morf": False, "road_lerf": True, "average_drop": False,
    "increase_in_confidence": True, "pointing_game": True, "energy_in_box": True, "iou": True, "dice": True,
    "auprc": True, "randomization": False, "completeness": False, "max_sensitivity": False, "sparseness": True,
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------- data
@dataclass
class Sample:
    """One evaluation item: x (C, *s) prepared for the model, mask (*s) boolean, class name or index."""

    x: torch.Tensor
    mask: torch.Tensor
    label: Union[str, int, None]
    name: str = ""


def _natural_key(path: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _spec_of(model: nn.Module) -> Any:
    from medlens.core.input_spec import InputSpec

    spec = getattr(model, "input_spec", None)
    return spec if spec is not None else InputSpec()


def completeness_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The completeness check each method claims: LRP's conservation (sum = f(x)), f(x) - f(baseline) with the
    method's own default baseline (integrated gradients, KernelSHAP), else the metric's default (zero). A
    `baseline` given in the metric's options wins for every method."""
    from medlens.core.registry import get_spec

    if "baseline" in options or not isinstance(method, str):  # a user-supplied callable claims nothing
        return dict(options)
    spec = get_spec(method)
    if spec.completeness == "conservation":
        return {**options, "baseline": None}
    if spec.completeness == "baseline":
        return {**options, "baseline": spec.options.get("baseline", "zero")}
    return dict(options)


def prepare_image(path: Path, spec: Any) -> torch.Tensor:
    """Read an image and prepare it as the model's InputSpec says, through the same reader and preparation as
    `medlens explain` (`medlens.io`): (C, H, W) float32."""
    from medlens.io import prepare, read_image
    from medlens.core.input_spec import InputSpec

    if not isinstance(spec, InputSpec):
        spec = InputSpec.from_dict(spec) if isinstance(spec, dict) else InputSpec()
    dims = len(spec.size) if spec.size else 2
    return prepare(read_image(path), spec, dims=dims).tensor[0]


def box_mask(box_file: Optional[Path], size: tuple[int, int]) -> torch.Tensor:
    """Boolean (H, W) mask of the YOLO boxes in `box_file` (`label xc yc w h` per line, normalised), rasterised as
    `medlens explain --region` does (`medlens.io.regions.boxes_to_mask`). No file: an empty mask."""
    if box_file is None or not box_file.is_file():
        return torch.zeros(*size, dtype=torch.bool)
    try:
        text = box_file.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # a binary or unreadable file
        raise InputError(f"{box_file}: cannot read the box file ({type(exc).__name__}); expected text lines 'label x_center "
                         f"y_center width height'.") from None
    boxes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        try:
            box = tuple(float(v) for v in parts[1:5])
            if not all(math.isfinite(v) for v in box):
                raise ValueError
        except ValueError:
            raise InputError(f"{box_file}: cannot read the box line {line!r}; expected 'label x_center y_center width height'.") from None
        boxes.append(box)
    return boxes_to_mask(boxes, size)


class FolderDataset:
    """A folder with one sub-folder per class, each image `N.jpg` with its box file `N.txt` beside it
    (the layout of ../shared/data/brain-tumor-figshare). Images are prepared with the model's InputSpec."""

    def __init__(self, root: Union[str, Path], spec: Any, include: Optional[Iterable[str]] = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"the data folder {self.root} does not exist; give a folder with one sub-folder per class.")
        self.spec = spec
        self.items: list[tuple[Path, str]] = []
        for cls in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for img in sorted((p for p in cls.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key):
                self.items.append((img, cls.name))
        if include is not None:
            wanted = {str(w).strip().replace("\\", "/") for w in include if str(w).strip()}
            present = {f"{cls}/{img.name}" for img, cls in self.items}
            missing = sorted(wanted - present)
            if missing:
                raise InputError(f"{len(missing)} listed image(s) are not under {self.root}, e.g. {missing[0]}; "
                                 f"list paths as class/N.jpg relative to the data folder.")
            self.items = [(img, cls) for img, cls in self.items if f"{cls}/{img.name}" in wanted]
        if not self.items:
            raise InputError(f"no images found under {self.root}: expected sub-folders per class holding .jpg/.png files.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Sample:
        path, cls = self.items[i]
        x = prepare_image(path, self.spec)
        return Sample(x, box_mask(path.with_suffix(".txt"), tuple(x.shape[1:])), cls, f"{cls}/{path.name}")


def _as_sample(item: Any) -> Sample:
    if isinstance(item, Sample):
        return item
    if isinstance(item, dict):
        return Sample(torch.as_tensor(item["image"]).float(), torch.as_tensor(item["mask"]).bool(), item.get("label"), str(item.get("name", "")))
    if isinstance(item, (tuple, list)) and len(item) >= 3:
        return Sample(torch.as_tensor(item[0]).float(), torch.as_tensor(item[1]).bool(), item[2])
    raise InputError("each dataset item must be a Sample, a dict with 'image', 'mask', 'label', or a tuple (image, mask, label).")


# --------------------------------------------------------------------------------------------- files
def atomic_write(path: Path, data: Union[str, bytes]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r["method"], r["metric"], r["target"], r["n"], _fmt(r["value"]), _fmt(r["ci_low"]), _fmt(r["ci_high"])])
    return buf.getvalue()


def rows_to_markdown(rows: Sequence[dict[str, Any]], seconds: dict[str, float], settings: dict[str, Any]) -> str:
    """One table, methods down, metrics across, over all targets: value [ci_low, ci_high]."""
    metrics = [m for m in METRICS if any(r["metric"] == m for r in rows)]
    methods: list[str] = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    cell = {(r["method"], r["metric"]): r for r in rows if r["target"] == "all"}
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in metrics}
    lines = [
        "# Evaluation", "",
        f"{settings.get('n_images')} images from `{settings.get('data')}`; seed {settings.get('seed')}; "
        f"mean over images with a 95% bootstrap interval; ↑ higher is better, ↓ lower is better.", "",
        "| method | " + " | ".join(f"{m} {arrows[m]}" for m in metrics) + " | s/image |",
        "|---|" + "---|" * len(metrics) + "---|",
    ]
    for method in methods:
        cells = []
        for m in metrics:
            r = cell.get((method, m))
            cells.append("" if r is None else f"{_fmt(r['value'])} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]")
        sec = seconds.get(method)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {'' if sec is None else f'{sec:.4f}'} |")
    return "\n".join(lines) + "\n"


def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


def _line_style(i: int) -> dict[str, Any]:
    """A distinct colour and dash for the i-th method (20 colours, then a new dash), so 20+ lines stay apart."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](i % 20), "linestyle": ("-", "--", ":", "-.")[(i // 20) % 4]}


def _plots(out: Path, rows: Sequence[dict[str, Any]], curves: dict[str, dict[str, Any]], random_curves: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    if curves:
        names = [k for k in ("deletion", "insertion") if any(k in c for c in curves.values())]
        fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
        for ax, metric in zip(axes[0], names):
            for i, (method, c) in enumerate(curves.items()):
                if metric in c:
                    fr, total, count = c[metric]
                    ax.plot(fr.numpy(), (total / max(count, 1)).numpy(), label=method, **_line_style(i))
            ax.set_xlabel("fraction of pixels " + ("removed" if metric == "deletion" else "inserted"))
            ax.set_ylabel("mean score of the target")
            ax.set_title(f"{metric} curves")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        _save_figure(fig, out / "deletion_curves.png")
        plt.close(fig)
        written.append("deletion_curves.png")
    metrics = [m for m in METRICS if any(r["metric"] == m and r["target"] == "all" for r in rows)]
    if metrics:
        cols = min(3, len(metrics))
        nrows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            sel = [r for r in rows if r["metric"] == metric and r["target"] == "all"]
            vals = [r["value"] for r in sel]
            err = [[max(0.0, r["value"] - r["ci_low"]) if not math.isnan(r["value"]) else 0 for r in sel],
                   [max(0.0, r["ci_high"] - r["value"]) if not math.isnan(r["value"]) else 0 for r in sel]]
            colors = ["0.6" if r["method"].startswith("baseline:") else "C0" for r in sel]
            ax.bar(range(len(sel)), vals, yerr=err, color=colors, capsize=3)
            ax.set_xticks(range(len(sel)))
            ax.set_xticklabels([r["method"] for r in sel], rotation=40, ha="right", fontsize=7)
            ax.set_title(f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)", fontsize=9)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        fig.tight_layout()
        _save_figure(fig, out / "metric_bars.png")
        plt.close(fig)
        written.append("metric_bars.png")
    if random_curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
        for key, ax in zip(("spearman", "ssim"), axes[0]):
            for i, (method, c) in enumerate(random_curves.items()):
                total, count, names = c[key], c["count"], c["layers"]
                ax.plot(range(len(names)), (total / max(count, 1)).numpy(), marker="o", label=method, **_line_style(i))
                ax.set_xticks(range(len(names)))
                ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
            ax.set_ylim(-1.05 if key == "spearman" else -0.05, 1.05)
            ax.set_xlabel("randomised down to (cumulative, top first)")
            ax.set_ylabel(f"{key} to the original map")
            ax.set_title("cascading randomisation")
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.tight_layout()
        _save_figure(fig, out / "randomization_curves.png")
        plt.close(fig)
        written.append("randomization_curves.png")
    return written


# --------------------------------------------------------------------------------------------- the run
def _parse_list(value: Union[str, Iterable[str], None], what: str) -> list[str]:
    if value is None:
        return []
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    return [v for v in items if v]


def _label_index(label: Union[str, int, None], labels: Optional[Sequence[str]], n_classes: int) -> Optional[int]:
    if label is None:
        return None
    if isinstance(label, int):
        return label if 0 <= label < n_classes else None
    if not labels:
        return None
    norm = lambda s: re.sub(r"[\s_\-]+", " ", str(s).strip().lower())  # noqa: E731
    lookup = {norm(l): i for i, l in enumerate(labels)}
    return lookup.get(norm(label))


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
    from medlens.core.explain import explain
    from medlens.core.registry import get_spec

    method_names = [get_spec(m).name for m in _parse_list(methods, "methods")]
    if not method_names:
        raise MethodError("no method was given; pass methods such as 'gradcam,layercam'.")
    metric_names = _parse_list(metrics, "metrics") or list(METRICS)
    unknown = [m for m in metric_names if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {', '.join(unknown)}; the metrics are: {', '.join(METRICS)}.")
    opts = {m: dict((metric_options or {}).get(m, {})) for m in metric_names}
    bad = [k for k in (metric_options or {}) if k not in METRICS]
    if bad:
        raise InputError(f"metric_options names unknown metric(s) {', '.join(bad)}.")

    spec = _spec_of(model)
    if isinstance(include, (str, Path)):
        path = Path(include)
        if not path.is_file():
            raise InputError(f"the image list {path} does not exist; give a text file with one class/N.jpg per line.")
        include = path.read_text().splitlines()
    if include is not None:
        include = [str(i) for i in include if str(i).strip()]
    data = FolderDataset(dataset, spec, include) if isinstance(dataset, (str, Path)) else dataset
    order = list(range(len(data)))
    if limit is not None:
        if int(limit) < 1:
            raise InputError(f"--limit must be at least 1, not {limit}.")
        perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(int(seed))).tolist()
        order = sorted(perm[: int(limit)])
    labels = list(getattr(model, "labels", None) or [])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")

    loc_metrics = [m for m in metric_names if m in LOCALISATION]
    # The average-mask prior needs every mask first (cheap for box files: no image decoding needed there).
    prior_total, prior_count = None, 0
    if loc_metrics:
        for i in order:
            if isinstance(data, FolderDataset):
                path, _ = data.items[i]
                size = tuple(spec.size[-2:]) if getattr(spec, "size", None) else None
                if size is None:
                    from medlens.io import read_image

                    size = read_image(path).spatial_shape[-2:]  # a file that cannot be read: an InputError, not a traceback
                mask = box_mask(path.with_suffix(".txt"), size)
            else:
                mask = _as_sample(data[i]).mask
            if prior_total is not None and prior_total.shape != mask.shape:
                prior_total = None
                break
            prior_total = mask.float() if prior_total is None else prior_total + mask.float()
            prior_count += 1

    values: dict[tuple[str, str], list[tuple[str, float]]] = {}
    curves: dict[str, dict[str, Any]] = {}
    random_curves: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {m: 0.0 for m in method_names}
    target_rules = {"true class": 0, "predicted class": 0}
    notes: dict[str, Any] = {}
    started = time.perf_counter()

    def add(method: str, metric: str, names: list[str], v: torch.Tensor) -> None:
        bucket = values.setdefault((method, metric), [])
        for b, name in enumerate(names):
            for t in range(v.shape[1]):
                bucket.append((name, float(v[b, t])))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order), desc="evaluate", unit="image")
    try:
        # group consecutive items of equal shape into batches
        batches: list[list[int]] = []
        for i in order:
            if batches and len(batches[-1]) < batch_size:
                batches[-1].append(i)
            else:
                batches.append([i])
        for bi, batch in enumerate(batches):
            samples = [_as_sample(data[i]) for i in batch]
            groups: dict[tuple, list[Sample]] = {}
            for s in samples:
                groups.setdefault(tuple(s.x.shape), []).append(s)
            for group in groups.values():
                x = torch.stack([s.x for s in group]).to(device)
                masks = torch.stack([s.mask for s in group]).to(device)
                logits = F.model_scores(model, x, "logit", chunk=batch_size)
                tgt = []
                for s, row in zip(group, logits):
                    idx = _label_index(s.label, labels, logits.shape[1])
                    target_rules["true class" if idx is not None else "predicted class"] += 1
                    tgt.append([idx if idx is not None else int(row.argmax())])
                targets = torch.tensor(tgt, dtype=torch.long, device=device)
                names = [labels[t[0]] if labels and t[0] < len(labels) else str(t[0]) for t in tgt]
                B = x.shape[0]
                run_seed = int(seed) + bi
                # One explain() call per method, so that each method's seconds include its own forward and
                # backward passes (what a user pays to run it alone).
                method_maps = {}
                for m in method_names:
                    t0 = time.perf_counter()
                    method_maps[m] = explain(model, x, methods=m, targets=targets, layer=layer, seed=int(seed))[m]
                    seconds[m] += time.perf_counter() - t0
                baseline_maps = {}
                if loc_metrics:
                    baseline_maps["baseline:center"] = L.center_map(x.shape[2:], B, device)
                    if prior_total is not None:
                        baseline_maps["baseline:prior"] = L.prior_maps(masks, prior_total.to(device), prior_count)
                for m in method_names:
                    maps = method_maps[m]
                    for metric in metric_names:
                        o = opts[metric]
                        if metric in ("deletion", "insertion"):
                            res = getattr(F, metric)(model, x, maps, targets, **o)
                            add(m, metric, names, res.values)
                            entry = curves.setdefault(m, {})
                            prev = entry.get(metric)
                            total = res.curves.sum(dim=(0, 1)).cpu()
                            entry[metric] = (res.fractions, total if prev is None else prev[1] + total, (0 if prev is None else prev[2]) + res.curves.shape[0] * res.curves.shape[1])
                            notes.setdefault(metric, {"baseline": res.baseline, **res.notes})
                        elif metric in ("road_morf", "road_lerf"):
                            res = getattr(F, metric)(model, x, maps, targets, **{"seed": run_seed, **o})
                            add(m, metric, names, res.values)
                            notes.setdefault(metric, {"imputation": res.baseline, "fractions": res.fractions.tolist()})
                        elif metric in ("average_drop", "increase_in_confidence"):
                            add(m, metric, names, getattr(F, metric)(model, x, maps, targets, **o))
                        elif metric in LOCALISATION:
                            add(m, metric, names, getattr(L, metric)(maps, masks, **o))
                        elif metric == "randomization":
                            res = TR.randomization(model, x, targets, m, layer=layer, original=maps, **{"seed": int(seed), **o})
                            add(m, metric, names, res.values)
                            rc = random_curves.setdefault(m, {"spearman": 0, "ssim": 0, "count": 0, "layers": res.layers})
                            rc["spearman"] = rc["spearman"] + res.spearman.sum(dim=(0, 1)).cpu()
                            rc["ssim"] = rc["ssim"] + res.ssim.sum(dim=(0, 1)).cpu()
                            rc["count"] += B * targets.shape[1]
                            notes.setdefault(metric, {"similarity": "Spearman of |map| after the full cascade", "threshold": res.threshold})
                        elif metric == "completeness":
                            co = completeness_options(m, o)
                            res = TR.completeness(model, x, maps, targets, **co)
                            add(m, metric, names, res.values)
                            notes.setdefault(metric, {"reference": {}})["reference"][m] = res.reference
                        elif metric == "max_sensitivity":
                            add(m, metric, names, TR.max_sensitivity(model, x, targets, m, layer=layer, original=maps, **{"seed": int(seed), **o}))
                        elif metric == "sparseness":
                            add(m, metric, names, TR.sparseness(maps))
                for bname, bmaps in baseline_maps.items():
                    for metric in loc_metrics:
                        add(bname, metric, names, getattr(L, metric)(bmaps, masks, **opts[metric]))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    n_images = len(order)

    rows: list[dict[str, Any]] = []
    methods_out = method_names + [b for b in BASELINES if any(k[0] == b for k in values)]
    for method in methods_out:
        for metric in metric_names:
            entries = values.get((method, metric))
            if entries is None:
                continue
            groups_by_target: dict[str, list[float]] = {"all": [v for _, v in entries]}
            for name, v in entries:
                groups_by_target.setdefault(name, []).append(v)
            for target, vs in groups_by_target.items():
                n, mean, lo, hi = bootstrap_ci(vs, seed=seed)
                rows.append({"method": method, "metric": metric, "target": target, "n": n, "value": mean, "ci_low": lo, "ci_high": hi})

    if out is not None:
        out_dir = Path(out)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {out_dir}: {exc}") from None
        per_image = {m: seconds[m] / max(n_images, 1) for m in method_names}
        settings = {
            "data": str(dataset) if isinstance(dataset, (str, Path)) else type(dataset).__name__,
            "n_images": n_images, "seed": int(seed), "methods": method_names, "metrics": metric_names,
            "limit": limit, "layer": layer, "include": None if include is None else len(list(include)), "targets": target_rules, "metric_notes": notes,
            "metric_options": {k: {kk: repr(vv) for kk, vv in v.items()} for k, v in opts.items() if v},
            "seconds_per_image": per_image, "elapsed_s": round(elapsed, 3),
            "probabilities": "sigmoid" if getattr(model, "multi_label", False) else "softmax",
        }
        atomic_write(out_dir / "metrics.csv", rows_to_csv(rows))
        atomic_write(out_dir / "metrics.md", rows_to_markdown(rows, per_image, settings))
        settings["plots"] = _plots(out_dir, rows, curves, random_curves)
        atomic_write(out_dir / "run.json", json.dumps(settings, indent=2, default=str))
    return rows
