"""The one training loop every recipe runs through: start, epochs (augmentation, guided losses, weight average),
validation with the localisation checks, selection and checkpoint, final metrics; seeded and logged.

Owns `train(recipe, ...)`, its steps, and `train_brain` / `train_phantom`, which name a bundled recipe and override it.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from medlens.data.figshare import minmax_scale
from medlens.errors import InputError
from medlens.io.files import atomic_write
from medlens.training.augment import affine_jitter, lesion_crops
from medlens.training.guided import guided_step
from medlens.training.metrics import confusion_matrix, metrics_from_confusion, predict
from medlens.training.recipes import BRAIN_RECIPES, PHANTOM_RECIPES, Recipe, recipe_record, with_overrides
from medlens.training.segmentation import train_segmentation
from medlens.training.splits import Split, TrainingData, check_data, load_data
from medlens.training.guided import has_cam_head
from medlens.training.validation import (baseline_localisation, cam_localisation, input_localisation, selection_key,
                                        selection_text, transformer_localisation)
from medlens.training.weights import (WeightAverage, build_network, freeze_batchnorm, init_path, init_weights,
                                      save_state, share_head_gradient, shared_head_parameters)

PathLike = Union[str, Path]
Say = Callable[[str], None]
VAL_BATCH = 64


@dataclass
class _Run:
    """A run in progress: the recipe, the trained model, the model validated and kept (the weight average's copy, or
    the model itself), the optimiser and its schedule, the generator of the order and the augmentation."""

    recipe: Recipe
    model: nn.Module
    eval_model: nn.Module
    average: Optional[WeightAverage]
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: Optional[tuple] = None
    best_acc: float = -1.0
    best_state: Optional[dict[str, torch.Tensor]] = None


@dataclass
class _Validation:
    """The validation split as model input, its masks, whether the localisation checks run, and their baselines."""

    x: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    watch: bool
    baselines: dict[str, float]


@contextlib.contextmanager
def _run_log(name: str, out: Optional[Path], log: Optional[Say]) -> Iterator[Say]:
    """A `say` that time-stamps a line, appends it to out/NAME.train.log (when writing) and shows it."""
    from tqdm import tqdm

    log_file = open(out / f"{name}.train.log", "a") if out is not None else None

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()
        (log or tqdm.write)(line)

    try:
        yield say
    finally:
        if log_file is not None:
            log_file.close()


def _start(recipe: Recipe, data: TrainingData, out: Optional[Path]) -> _Run:
    """Seed, build the network from its starting weights, the weight average, AdamW and the one-cycle schedule."""
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    size = getattr(recipe.data, "size", 160)
    model = build_network(recipe.network, len(data.classes), size)
    init_weights(model, recipe.init, out)
    o = recipe.optimiser
    average = WeightAverage(model, o.ema_decay) if o.ema_decay else None
    eval_model = build_network(recipe.network, len(data.classes), size) if average else model
    params = shared_head_parameters(model) if recipe.tune == "shared-head" else model.parameters()
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    steps = math.ceil(len(data.train.labels) / o.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=o.epochs * steps, pct_start=o.warmup)
    return _Run(recipe, model, eval_model, average, opt, sched, gen, steps)


def _validation(recipe: Recipe, val: Split, say: Say) -> _Validation:
    """The validation input; the localisation checks run for a guided recipe whose validation images all have a region."""
    x = (minmax_scale(val.images) - recipe.data.mean) / recipe.data.std
    watch = recipe.guidance.guide != "none" and bool(val.has_region.all())
    baselines = baseline_localisation(val.masks) if watch else {}
    if watch:
        say("val baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in baselines.items()))
    return _Validation(x, val.labels, val.masks, watch, baselines)


def _batch(run: _Run, train: Split, idx: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One batch as model input and its masks, after the recipe's augmentation (affine jitter loses the masks)."""
    x01, masks = minmax_scale(train.images[idx]), train.masks[idx]
    if run.recipe.augment == "lesion-crop":
        x01, masks, _ = lesion_crops(x01, masks, run.gen)
    elif run.recipe.augment == "affine":
        x01, masks = affine_jitter(x01, run.gen), None
    return (x01 - run.recipe.data.mean) / run.recipe.data.std, masks


def _train_epoch(run: _Run, train: Split, epoch: int, quiet: bool) -> dict[str, float]:
    """One pass over the training split in a seeded order: loss, step, schedule, weight average; the epoch's means."""
    from tqdm import tqdm

    r = run.recipe
    run.model.train()
    if r.optimiser.freeze_batchnorm:
        freeze_batchnorm(run.model)
    perm = torch.randperm(len(train.labels), generator=run.gen)
    total_loss, total_guided, correct, seen = 0.0, 0.0, 0, 0
    bar = tqdm(range(run.steps), desc=f"{r.name} epoch {epoch}/{r.optimiser.epochs}", unit="batch", leave=False,
               disable=quiet)
    for b in bar:
        idx = perm[b * r.optimiser.batch_size: (b + 1) * r.optimiser.batch_size]
        xb, masks = _batch(run, train, idx)
        yb = train.labels[idx]
        loss, logits, guided = guided_step(run.model, xb, yb, masks, r.guidance, r.optimiser.label_smoothing)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if r.tune == "shared-head":
            share_head_gradient(run.model)
        run.opt.step()
        run.sched.step()
        if run.average is not None:
            run.average.update(run.model)
        total_loss += float(loss.detach()) * len(idx)
        total_guided += guided * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    return {"train_loss": total_loss / seen, "train_guided": total_guided / seen, "train_acc": correct / seen}


def _validate(run: _Run, val: _Validation) -> tuple[float, float, dict[str, float]]:
    """(loss, accuracy, localisation checks) of the model kept (the weight average, if any) on validation."""
    if run.average is not None:
        run.average.copy_to(run.eval_model)
    model = run.eval_model.eval()
    with torch.no_grad():
        logits = torch.cat([model(val.x[i: i + VAL_BATCH]) for i in range(0, len(val.x), VAL_BATCH)])
    loss = float(F.cross_entropy(logits, val.labels))
    acc = float((logits.argmax(1) == val.labels).float().mean())
    checks = {}
    if val.watch:
        localisation = cam_localisation if has_cam_head(model) else transformer_localisation
        checks = localisation(model, val.x, val.labels, val.masks)
    if val.watch and "input" in run.recipe.guidance.guide:  # the pixel-level maps: gradient x input, integrated gradients
        integrated = 16 if run.recipe.selection.rule in ("pixel", "picture") else None
        for kind, steps in (("input", 0), ("integrated", integrated)):
            if steps is not None:
                pixel = input_localisation(model, val.x, val.labels, val.masks, n_steps=steps)
                checks.update({f"{kind}_{k}": v for k, v in pixel.items()})
    return loss, acc, checks


def _select(run: _Run, val: _Validation, loss: float, acc: float, checks: dict[str, float], out: Optional[Path]) -> bool:
    """Keep the epoch if the selection rule ranks it above the best so far (and write its weights); whether it was."""
    key = selection_key(run.recipe.selection, checks, val.baselines, acc, loss)
    if run.best is not None and not key > run.best:
        return False
    run.best, run.best_acc = key, acc
    run.best_state = {k: v.detach().clone() for k, v in run.eval_model.state_dict().items()}
    if out is not None:
        save_state(run.eval_model, out / f"{run.recipe.name}.pt")
    return True


def _epoch_line(run: _Run, entry: dict[str, Any], checks: dict[str, float], kept: bool, seconds: float) -> str:
    """The log line of an epoch: training and validation loss and accuracy, the localisation checks, kept or not."""
    line = (f"epoch {entry['epoch']:3d}/{run.recipe.optimiser.epochs} train loss {entry['train_loss']:.4f} (guided "
            f"{entry['train_guided']:.4f}) acc {entry['train_acc']:.4f} | val loss {entry['val_loss']:.4f} acc "
            f"{entry['val_acc']:.4f}")
    if checks:
        line += f" gradcam pointing {checks['pointing_game']:.3f} energy {checks['energy_in_box']:.3f}"
        if "picture_pointing_game" in checks:
            line += f" picture pointing {checks['picture_pointing_game']:.3f}"
    for kind, label in (("input", "gradient x input"), ("integrated", "integrated gradients"), ("rollout", "rollout"),
                        ("attribution", "transformer attribution")):
        if kind + "_pointing_game" in checks:
            line += f" {label} pointing {checks[kind + '_pointing_game']:.3f} energy {checks[kind + '_energy_in_box']:.3f}"
    return line + f"{'  * best, saved' if kept else ''} | {seconds:.0f} s"


def _epochs(run: _Run, data: TrainingData, val: _Validation, out: Optional[Path], say: Say, t0: float) -> None:
    """Every epoch: train, validate, select and checkpoint, record the history and log it."""
    for epoch in range(1, run.recipe.optimiser.epochs + 1):
        entry: dict[str, Any] = {"epoch": epoch, **_train_epoch(run, data.train, epoch, quiet=out is None)}
        loss, acc, checks = _validate(run, val)
        kept = _select(run, val, loss, acc, checks, out)
        entry.update({"val_loss": loss, "val_acc": acc})
        entry.update({(f"val_{k}" if k.startswith(("input_", "integrated_", "rollout_", "attribution_")) else f"val_gradcam_{k}"): v
                      for k, v in checks.items()})
        run.history.append(entry)
        say(_epoch_line(run, entry, checks, kept, time.time() - t0))


def _finish(run: _Run, data: TrainingData, val: _Validation, out: Optional[Path], threads: int, seconds: float,
            say: Say) -> dict[str, Any]:
    """Load the kept weights; with an out folder, the metrics of the reported splits, written as NAME.metrics.json."""
    r = run.recipe
    run.model.load_state_dict(run.best_state)
    run.model.eval()
    if out is None:
        return {"model": run.model, "recipe": recipe_record(r), "best_val_accuracy": run.best_acc, "history": run.history}
    prepare = lambda xb: (minmax_scale(xb) - r.data.mean) / r.data.std  # noqa: E731
    results = {k: metrics_from_confusion(confusion_matrix(predict(run.model, s.images, prepare=prepare), s.labels,
                                                          len(data.classes)), data.classes)
               for k, s in data.reports().items()}
    summary = {"model": r.name, "recipe": recipe_record(r), "best_val_accuracy": run.best_acc, "train_seconds": seconds,
               "selection": selection_text(r.selection, val.watch, averaged=run.average is not None,
                                            transformer=not has_cam_head(run.model)),
               "val_baselines": val.baselines, "threads": threads, "history": run.history, **results, **data.record}
    atomic_write(out / f"{r.name}.metrics.json", json.dumps(summary, indent=2))
    test = results["test"]
    say(f"done in {seconds:.0f} s; kept val acc {run.best_acc:.4f}; test acc {test['accuracy']:.4f} per class "
        f"{test['per_class_accuracy']}; confusion {test['confusion_matrix']}"
        + "".join(f"; {k} acc {v['accuracy']:.4f}" for k, v in results.items() if k.startswith("test_")))
    return summary


def train(recipe: Recipe, out_dir: Optional[PathLike], data_root: Optional[PathLike] = None, threads: int = 2,
          cache_dir: Optional[PathLike] = None, log: Optional[Say] = None) -> dict[str, Any]:
    """Train one recipe, seeded, keeping the epoch the recipe's selection rule ranks first.

    Args:
        recipe: what to train (see `medlens.training.recipes`).
        out_dir: where NAME.pt (the kept weights), NAME.train.log and NAME.metrics.json go; None writes nothing.
        data_root: the figshare folder, for a brain recipe.
        threads: torch CPU threads.
        cache_dir: where decoded figshare slices are kept between runs.
        log: where log lines go (default: above the progress bar).

    Returns:
        The metrics written (with "test" etc.); with out_dir None, {"model", "recipe", "best_val_accuracy", "history"}.

    Raises:
        InputError: missing first-stage weights, missing or malformed data, an option without the regions it needs:
            all before anything is decoded or written.
    """
    torch.set_num_threads(threads)
    out = Path(out_dir) if out_dir is not None else None
    if recipe.is_segmentation:  # per-pixel classes on the phantoms' masks: its own short loop
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        with _run_log(recipe.name, out, log) as say:
            say(f"{recipe.name}: recipe {json.dumps(recipe_record(recipe))}")
            return train_segmentation(recipe, out, threads, say)
    check_data(recipe, data_root)  # the folder and its regions, then a missing first stage: before anything is decoded
    init_path(recipe.init, out)  # or written
    data = load_data(recipe, data_root, cache_dir)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with _run_log(recipe.name, out, log) as say:
        t0 = time.time()
        say(f"{recipe.name}: recipe {json.dumps(recipe_record(recipe))}")
        for line in data.description:
            say(line)
        run = _start(recipe, data, out)
        val = _validation(recipe, data.val, say)
        _epochs(run, data, val, out, say, t0)
        return _finish(run, data, val, out, threads, time.time() - t0, say)


def train_brain(data_root: PathLike, out_dir: PathLike, name: str = "brain-tumor-mri", epochs: Optional[int] = None,
                size: Optional[int] = None, seed: int = 0, threads: int = 2, cache_dir: Optional[PathLike] = None,
                log: Optional[Say] = None, **overrides: Any) -> dict[str, Any]:
    """Train the brain recipe `name`, options overridden by their flat names (see `with_overrides`), on the figshare
    folder; writes NAME.pt / .train.log / .metrics.json to out_dir (see `train`)."""
    recipe = with_overrides(BRAIN_RECIPES[name], epochs=epochs, size=size, seed=seed, **overrides)
    return train(recipe, out_dir, data_root=data_root, threads=threads, cache_dir=cache_dir, log=log)


def train_phantom(name: str, out_dir: Optional[PathLike], epochs: Optional[int] = None, seed: int = 0, threads: int = 2,
                  log: Optional[Say] = None, **overrides: Any) -> dict[str, Any]:
    """Train `phantom-lesion` or `phantom-shortcut` on freshly generated phantoms, options overridden by their flat
    names (e.g. guide="cam", guide_weight=1, n_train=400); out_dir None writes nothing and returns the model (see
    `train`)."""
    if name not in PHANTOM_RECIPES:
        raise InputError(f"unknown phantom model {name!r}; expected one of {sorted(PHANTOM_RECIPES)}.")
    return train(with_overrides(PHANTOM_RECIPES[name], epochs=epochs, seed=seed, **overrides), out_dir, threads=threads,
                 log=log)
