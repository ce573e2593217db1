"""The `medlens evaluate` command: every (method, metric) pair over a folder, with a progress bar.

It loads the model as `medlens explain` does, calls `medlens.evaluation_run.evaluate()` and prints where the files went.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import click

from medlens.cli.commands import load_model_for_cli
from medlens.errors import MethodError
from medlens.evaluation.metrics import METRICS
from medlens.evaluation_run import evaluate
from medlens.io.files import ensure_writable


@click.command("evaluate")
@click.option("--model", "model_source", required=True,
              help="A bundled name, a model file (with its sidecar JSON), a local HuggingFace folder, torchvision:ARCH or "
                   "timm:ARCH (with --weights) or xrv:NAME.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local weights file for an architecture name.")
@click.option("--labels", default=None, help="Comma-separated class names, when the model carries none.")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="A folder with one sub-folder per class; each image N.jpg has a YOLO box file N.txt (or a mask "
                   "image N_mask.png) beside it.")
@click.option("--methods", required=True, help="Comma-separated method names, e.g. gradcam,layercam (see `medlens methods`).")
@click.option("--metrics", default=None, help=f"Comma-separated metric names. Default: all ({','.join(METRICS)}); for a "
                                               f"segmentation model, those that apply to a region score.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for metrics.csv, metrics.md and plots.")
@click.option("--limit", type=int, default=None, help="Evaluate a seeded random subset of N images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the subset, noise, randomisation and bootstrap.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images explained together.")
@click.option("--layer", default=None, help="Target layer name for layer-based methods (default: chosen automatically).")
@click.option("--include", "include_file", default=None, type=click.Path(dir_okay=False),
              help="A text file listing the images to use, one class/N.jpg per line (e.g. the test split).")
@click.option("--allow-pickle", is_flag=True, default=False, help="Load a pickled model file (torch.save(model)); loading it runs the code it holds, so only for files you trust.")
@click.option("--executor", type=click.Choice(["serial", "processes", "ray"]), default="serial", show_default=True,
              help="Where batches are scored: this process, worker processes, or Ray (pip install \"medlens[ray]\").")
@click.option("--workers", type=int, default=2, show_default=True, help="Workers for processes or ray, one torch thread each.")
@click.option("--ray-address", default=None, help="An existing Ray cluster to join (default: a local one for the run).")
def evaluate_command(model_source: str, weights: Optional[str], labels: Optional[str], data_dir: str, methods: str,
                     metrics: Optional[str], out_dir: str,
                     limit: Optional[int], seed: int, batch_size: int, layer: Optional[str],
                     include_file: Optional[str], allow_pickle: bool, executor: str, workers: int,
                     ray_address: Optional[str]) -> None:
    """Score explanation methods on a dataset: faithfulness, localisation (with baselines) and trust."""
    if batch_size < 1:
        raise MethodError(f"--batch-size must be at least 1, got {batch_size}.")
    if workers < 1:
        raise MethodError(f"--workers must be at least 1, got {workers}.")
    made = _missing_folders(Path(out_dir))
    ensure_writable(out_dir)  # before any work: a wrong --out is found in a second, not after the whole run
    model_options = {k: v for k, v in dict(weights=weights, labels=labels, allow_pickle=allow_pickle or None).items()
                     if v is not None}  # what worker processes load the model with, too
    try:
        model = load_model_for_cli(model_source, **model_options)
        rows = evaluate(model, data_dir, methods, metrics, limit=limit, seed=seed, out=out_dir,
                        batch_size=batch_size, layer=layer, progress=True, include=include_file, executor=executor,
                        workers=workers, ray_address=ray_address, model_source=model_source,
                        model_options=model_options)
    except BaseException:
        for folder in made:  # folders made for this run and left empty (an unknown method, a model that failed) go too
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    click.echo(f"wrote {len(rows)} rows to {out_dir}/metrics.csv (and metrics.md, run.json, plots)")


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first (what creating it makes)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


COMMANDS = [evaluate_command]
