"""The evaluation tables of docs/evaluation.md: every registered method on the bundled models.

Parts (each writes metrics.csv, metrics.md, run.json and plots to OUT/<part>/):

- brain-fast: the 17 methods that cost at most a few passes (CAM, gradient, LRP families), all 15 metrics,
  on a seeded subset of the figshare *test* split (never an image the model was trained on);
- brain-localisation: the 17 fast methods with the five localisation metrics (no model call per metric) on a
  larger seeded subset of the test split (`--limit`), beside the centre and prior baselines;
- brain-perturbation: occlusion, RISE, LIME, KernelSHAP at their defaults on a smaller subset, every metric
  except randomisation and max-sensitivity (each of those re-explains an image 8 times: minutes per image);
- brain-subset: the 17 fast methods on that same smaller subset and metrics, so all 21 compare on equal images;
- phantom-lesion: every method and metric on fresh phantom cases (seed 3, the model card's test seed) with
  the exact lesion masks (perturbation methods again on a smaller subset, without the two re-explaining metrics);
- phantom-lesion-perturbation: only the perturbation half of phantom-lesion (`--limit-slow 0`: every phantom);
- phantom-shortcut: the shortcut model on lesion cases of its own kind (marker present), localisation scored
  twice: against the burned-in marker (a method that exposes the shortcut scores high) and against the lesion.

    python benchmarks/evaluate_bundled.py brain-fast --data PATH/brain-tumor-figshare --limit 40
    python benchmarks/evaluate_bundled.py phantom-lesion phantom-shortcut

Run parts in parallel processes on a multi-core machine; each uses one torch thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PERTURBATION = ["occlusion", "rise", "lime", "kernelshap"]
REEXPLAINING = {"randomization", "max_sensitivity"}


def _fast_methods() -> list[str]:
    """The registry's methods that cost a few passes and apply to a CNN (not the attention family's)."""
    import medlens

    return [m for m in medlens.methods() if m not in PERTURBATION and not medlens.method_info(m).get("needs_attention")]


def _all_metrics() -> list[str]:
    from medlens.evaluation.metrics import METRICS

    return list(METRICS)


def _brain(args, part: str) -> None:
    import medlens
    from medlens.data.figshare import scan_folder
    from medlens.evaluation_run import evaluate

    if args.data is None or not Path(args.data).is_dir():
        raise SystemExit(f"{part}: needs --data, a copy of the figshare brain tumour set (not found: {args.data}).")
    from medlens.evaluation.metrics import LOCALISATION

    model = medlens.load_model(args.model)
    test = [f"{s.class_name}/{s.image_path.name}" for s in scan_folder(args.data, splits=["test"])]
    if part == "brain-localisation":
        methods, metrics, limit = _fast_methods(), list(LOCALISATION), args.limit
    elif part == "brain-fast":
        methods, metrics, limit = _fast_methods(), _all_metrics(), args.limit
    elif part == "brain-subset":  # the fast methods again, on the perturbation methods' images and metrics
        methods, metrics, limit = _fast_methods(), [m for m in _all_metrics() if m not in REEXPLAINING], args.limit_slow
    else:
        methods, metrics, limit = PERTURBATION, [m for m in _all_metrics() if m not in REEXPLAINING], args.limit_slow
    out = results_folder(Path(args.out), args.model, part)
    evaluate(model, args.data, methods=methods, metrics=metrics, limit=limit, seed=args.seed,
             out=out, include=test, progress=True)


def results_folder(out: Path, model: str, part: str) -> Path:
    """Where a brain part's results go: OUT/<part> for the default `brain-tumor-mri`, OUT/<model>/<part> for any other
    name (the earlier models, among them `brain-tumor-mri-v4`, the default until 7 Dec 2026)."""
    return out / part if model == "brain-tumor-mri" else out / model / part


def _phantom_samples(name: str, n: int, marker_masks: bool = False) -> list[dict]:
    from medlens.training.train import phantom_data, phantom_prepare

    cases = phantom_data(name, "test", n=n)
    x = phantom_prepare(cases.images)
    samples = []
    for i in range(len(cases)):
        label = cases.label_names[int(cases.labels[i])]
        if marker_masks:
            if not bool(cases.has_marker[i]):
                continue
            mask = cases.marker_masks[i, 0]
        else:
            mask = cases.lesion_masks[i, 0]
        samples.append({"image": x[i], "mask": mask, "label": label})
    return samples


def _phantom(args, part: str) -> None:
    import medlens
    from medlens.evaluation_run import evaluate
    from medlens.evaluation.metrics import LOCALISATION

    name = "phantom-lesion" if part == "phantom-lesion-perturbation" else part
    model = medlens.load_model(name)
    out = Path(args.out) / name
    slow_metrics = [m for m in _all_metrics() if m not in REEXPLAINING]
    if name == "phantom-lesion":  # phantom-lesion-perturbation: only the second half (e.g. on more phantoms)
        samples = _phantom_samples(name, args.phantoms)
        if part == "phantom-lesion":
            evaluate(model, samples, methods=_fast_methods(), metrics=_all_metrics(), seed=args.seed, out=out / "fast",
                     progress=True)
        evaluate(model, samples, methods=PERTURBATION, metrics=slow_metrics, limit=args.limit_slow, seed=args.seed,
                 out=out / "perturbation", progress=True)
        return
    # the shortcut model: lesion cases carry the marker; localisation against the marker, then the lesion
    lesion_cases = [s for s in _phantom_samples(name, args.phantoms) if s["label"] == "lesion"]
    marker_cases = _phantom_samples(name, args.phantoms, marker_masks=True)
    loc = list(LOCALISATION)
    for region, samples in (("marker", marker_cases), ("lesion", lesion_cases)):
        evaluate(model, samples, methods=_fast_methods(), metrics=loc, seed=args.seed, out=out / f"{region}-fast",
                 progress=True)
        evaluate(model, samples, methods=PERTURBATION, metrics=loc, limit=args.limit_slow, seed=args.seed,
                 out=out / f"{region}-perturbation", progress=True)


ARROWS = {"deletion": "↓", "insertion": "↑", "road_morf": "↓", "road_lerf": "↑", "average_drop": "↓",
          "increase_in_confidence": "↑", "pointing_game": "↑", "energy_in_box": "↑", "iou": "↑", "dice": "↑",
          "auprc": "↑", "randomization": "↓", "completeness": "↓", "max_sensitivity": "↓", "sparseness": "↑"}
SHORT = {"increase_in_confidence": "incr. conf.", "average_drop": "avg drop", "pointing_game": "pointing",
         "energy_in_box": "energy", "randomization": "random.", "max_sensitivity": "max sens.",
         "completeness": "complet."}


def summary_table(folders: list[Path], metrics: list[str], label: str = "") -> str:
    """One compact Markdown table (means over all images; n and 95% intervals are in each metrics.csv)."""
    import csv

    from medlens.core.registry import all_specs

    values: dict[str, dict[str, str]] = {}
    n: dict[str, dict[str, str]] = {}
    seconds: dict[str, float] = {}
    for folder in folders:
        earlier = set(values)  # the baselines of the first folder are kept (same data, more images)
        with open(folder / "metrics.csv") as fh:
            for row in csv.DictReader(fh):
                if row["target"] == "all" and row["method"] not in earlier:
                    values.setdefault(row["method"], {})[row["metric"]] = row["value"]
                    n.setdefault(row["method"], {})[row["metric"]] = row["n"]
        seconds.update(json.loads((folder / "run.json").read_text())["seconds_per_image"])
    metrics = [m for m in metrics if any(m in v for v in values.values())]
    head = "| method | " + " | ".join(f"{SHORT.get(m, m)} {ARROWS[m]}" for m in metrics) + " | s/image | n |"
    lines = [head, "|---" + "|---:" * (len(metrics) + 2) + "|"]
    claims = {name: spec.completeness for name, spec in all_specs().items()}
    for method, vals in values.items():
        cells = []
        for m in metrics:
            v = vals.get(m, "")
            if m == "completeness" and v not in ("", "nan") and claims.get(method) is None:
                cells.append("–")  # the method claims no completeness: its value (against zero) means nothing
                continue
            cells.append(f"{float(v):.3f}" if v not in ("", "nan") else "")
        sec = f"{seconds[method]:.2f}" if method in seconds else ""
        counts = sorted({int(c) for c in n[method].values()})
        lines.append(f"| {label}{method} | " + " | ".join(cells) + f" | {sec} | {'/'.join(map(str, counts))} |")
    return "\n".join(lines)


def shortcut_table(out: Path) -> str:
    """Per method: where the shortcut model's map falls, on the marker or on the lesion (same lesion cases)."""
    import csv

    rows: dict[str, dict[str, float]] = {}
    for region in ("marker", "lesion"):
        for kind in ("fast", "perturbation"):
            path = out / "phantom-shortcut" / f"{region}-{kind}" / "metrics.csv"
            if not path.is_file():
                continue
            with open(path) as fh:
                for row in csv.DictReader(fh):
                    if row["target"] == "all" and row["metric"] in ("pointing_game", "energy_in_box"):
                        key = (region, row["metric"])
                        rows.setdefault(row["method"], {}).setdefault(key, float(row["value"]))
    lines = ["| method | pointing: marker | pointing: lesion | energy: marker | energy: lesion | exposes the shortcut |",
             "|---|---:|---:|---:|---:|---|"]
    for method, v in rows.items():
        cells = [v.get(("marker", "pointing_game")), v.get(("lesion", "pointing_game")),
                 v.get(("marker", "energy_in_box")), v.get(("lesion", "energy_in_box"))]
        text = " | ".join("" if c is None else f"{c:.3f}" for c in cells)
        verdict = ""
        if not method.startswith("baseline") and None not in cells:
            if cells[2] <= cells[3]:
                verdict = "no"
            else:  # more of the map on the marker than on the lesion; "yes" when its peak is on the marker too
                verdict = "yes" if cells[0] >= 0.5 else "partly (peak beside the marker)"
        lines.append(f"| {method} | {text} | {verdict} |")
    return "\n".join(lines)


def localisation_comparison(out: Path, models: list[str], metrics: tuple[str, ...] = ("pointing_game", "energy_in_box")) -> str:
    """Methods down; for each metric one column per model (brain-localisation results), baselines last."""
    import csv

    values: dict[str, dict[tuple[str, str], float]] = {}
    counts: dict[str, int] = {}
    for model in models:
        folder = results_folder(out, model, "brain-localisation")
        with open(folder / "metrics.csv") as fh:
            for row in csv.DictReader(fh):
                if row["target"] == "all" and row["metric"] in metrics:
                    values.setdefault(row["method"], {})[(model, row["metric"])] = float(row["value"])
                    counts[model] = int(row["n"])
    head = "| method | " + " | ".join(f"{SHORT.get(m, m)} {ARROWS[m]} `{model}`" for m in metrics for model in models) + " |"
    lines = [head, "|---" + "|---:" * (len(metrics) * len(models)) + "|"]
    order = [m for m in values if not m.startswith("baseline")] + [m for m in values if m.startswith("baseline")]
    for method in order:
        cells = [values[method].get((model, m)) for m in metrics for model in models]
        lines.append(f"| {method} | " + " | ".join("" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines.append("")
    lines.append("Slices: " + ", ".join(f"`{m}` {counts.get(m, 0)}" for m in models) + " (the same seeded test-split subset).")
    return "\n".join(lines)


def summarise(out: Path) -> None:
    metrics = list(ARROWS)
    parts = {
        "brain (figshare test split), fast methods, every metric": [out / "brain-fast"],
        "brain (figshare test split), every method on the perturbation subset": [out / "brain-subset",
                                                                                  out / "brain-perturbation"],
        "phantom-lesion": [out / "phantom-lesion" / "fast", out / "phantom-lesion" / "perturbation"],
        "phantom-shortcut, localisation against the marker": [out / "phantom-shortcut" / "marker-fast",
                                                              out / "phantom-shortcut" / "marker-perturbation"],
        "phantom-shortcut, localisation against the lesion": [out / "phantom-shortcut" / "lesion-fast",
                                                              out / "phantom-shortcut" / "lesion-perturbation"],
    }
    for title, folders in parts.items():
        folders = [f for f in folders if (f / "metrics.csv").is_file()]
        if folders:
            print(f"### {title}\n\n{summary_table(folders, metrics)}\n")
    print(f"### phantom-shortcut: marker or lesion?\n\n{shortcut_table(out)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+",
                        choices=["brain-fast", "brain-localisation", "brain-subset", "brain-perturbation", "phantom-lesion", "phantom-lesion-perturbation",
                                 "phantom-shortcut", "summary", "compare-brain"])
    parser.add_argument("--data", default=None, help="the figshare brain tumour folder (brain parts)")
    parser.add_argument("--out", default="results")
    parser.add_argument("--model", default="brain-tumor-mri",
                        help="brain parts: the bundled brain model (results of any other name go to OUT/<model>/<part>)")
    parser.add_argument("--limit", type=int, default=40, help="test-split images for the fast brain methods")
    parser.add_argument("--limit-slow", type=int, default=10,
                        help="images for the perturbation methods (0: all; phantoms: of the --phantoms cases)")
    parser.add_argument("--phantoms", type=int, default=100, help="phantom test cases (about half with a lesion)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.limit_slow = None if args.limit_slow == 0 else args.limit_slow
    torch.set_num_threads(args.threads)
    for part in args.parts:
        if part == "summary":
            summarise(Path(args.out))
            continue
        if part == "compare-brain":
            models = ["brain-tumor-mri-v1", "brain-tumor-mri-v2", "brain-tumor-mri-v3", "brain-tumor-mri-v4",
                      "brain-tumor-mri"]
            # a column for each model whose results are in OUT (brain-tumor-mri-v3 is no longer bundled: its column
            # comes from the results kept when it was the default; v4's were taken while it was the default, under
            # OUT/brain-localisation, and moved to OUT/brain-tumor-mri-v4/ when it was renamed)
            models = [m for m in models if (results_folder(Path(args.out), m, "brain-localisation") / "metrics.csv").is_file()]
            if not models:
                raise SystemExit(f"compare-brain: no brain-localisation results under {args.out}: run the "
                                 f"brain-localisation part first (once per --model).")
            print(localisation_comparison(Path(args.out), models))
            continue
        t0 = time.perf_counter()
        (_brain if part.startswith("brain") else _phantom)(args, part)
        seconds = time.perf_counter() - t0
        where = results_folder(Path(args.out), args.model, part) if part.startswith("brain") else Path(args.out, part)
        where.mkdir(parents=True, exist_ok=True)
        Path(where, "wall.json").write_text(json.dumps({"part": part, "seconds": seconds}) + "\n")
        print(f"{part}: {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
