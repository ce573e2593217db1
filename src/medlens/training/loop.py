"""The training loops of the bundled models: epochs, augmentation, guided losses, weight average, checkpoints, metrics.

Owns `train_brain` (figshare layout: one folder per class, YOLO boxes) and `train_phantom`, both seeded and logged.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from medlens.data.figshare import CLASSES, CREDIT, box_to_mask, load_arrays, minmax_scale, scan_folder
from medlens.data.phantom import LABELS
from medlens.errors import InputError
from medlens.io.files import atomic_write
from medlens.models.networks import PhantomCNN, SmallResNet
from medlens.models.zoo import bundled_models, load_state_dict_checked
from medlens.training.augment import affine_jitter, inpaint_regions, lesion_crops
from medlens.training.guided import cam_guidance_loss, input_attention_loss, rrr_loss
from medlens.training.validation import (baseline_localisation, cam_localisation, input_localisation, selection_key,
                                        selection_text)
from medlens.training.recipes import (BRAIN_RECIPES, PHANTOM_RECIPES, PHANTOM_SEEDS, check_guidance, phantom_data,
                                      phantom_prepare, plain)

PathLike = Union[str, Path]


def save_state(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: torch.save(model.state_dict(), fh))


def confusion_matrix(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, K) counts: row = true class, column = predicted class."""
    idx = true.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor, labels: list[str]) -> dict[str, Any]:
    """Overall accuracy, per-class accuracy (recall) and the confusion matrix as plain JSON-able values."""
    total, correct = int(cm.sum()), int(cm.diag().sum())
    per_class = {name: (float(cm[i, i]) / float(cm[i].sum()) if cm[i].sum() > 0 else float("nan"))
                 for i, name in enumerate(labels)}
    return {"n": total, "accuracy": correct / max(total, 1), "per_class_accuracy": per_class,
            "confusion_matrix": cm.tolist(), "labels": list(labels)}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 64, prepare: Optional[Callable] = None) -> torch.Tensor:
    """Predicted class per row of x (batched, eval mode)."""
    model.eval()
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i: i + batch_size]
        out.append(model(prepare(xb) if prepare is not None else xb).argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class WeightAverage:
    """Exponential moving average of a model's parameters and float buffers (BatchNorm statistics included).

    Evaluating and checkpointing the average rather than the last step gives a steadier model on small data."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.state[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.state[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.state)


def _mean_over_regions(per_image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A guided loss's batch value: the sum over images divided by the number of images that have a region."""
    return per_image.sum() / masks.flatten(1).any(1).sum().clamp_min(1)


def _pixel_term(name: str, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, masks: torch.Tensor,
                recipe: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-image loss) of a pixel-level guide: "rrr" (Ross et al.'s input-gradient penalty) or "input" (the
    attention loss on gradient x input)."""
    if name == "rrr":
        return rrr_loss(model, xb, masks)
    alphas = torch.rand(len(xb)) if recipe.get("input_alpha", "image") == "path" else None
    return input_attention_loss(model, xb, yb, masks, float(recipe.get("input_temperature", 1.0)), alphas)


def guided_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, masks: Optional[torch.Tensor],
                recipe: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One batch's loss: cross-entropy (+ guide_weight x the mean guided loss over images with a region). A guide is
    "cam", a pixel-level term ("rrr", "input"), or "cam+" one of them (the term weighted by `<term>_weight`, on the
    first `<term>_images` images of the batch: double backpropagation costs about 3x)."""
    guide, weight = recipe.get("guide", "none"), float(recipe.get("guide_weight", 0.0))
    if guide == "none" or weight == 0.0 or masks is None:
        logits = model(xb)
        guided = torch.zeros(())
    else:
        parts = guide.split("+")
        pixel = parts[-1] if parts[-1] != "cam" else None
        if parts[0] == "cam":
            logits, per_image = cam_guidance_loss(model, xb, yb, masks, float(recipe.get("energy_weight", 1.0)))
            guided = _mean_over_regions(per_image, masks)
            if pixel is not None:
                k = int(recipe.get(f"{pixel}_images") or len(xb))
                _, per = _pixel_term(pixel, model, xb[:k], yb[:k], masks[:k], recipe)
                guided = guided + float(recipe.get(f"{pixel}_weight", 1.0)) * _mean_over_regions(per, masks[:k])
        else:
            logits, per_image = _pixel_term(pixel, model, xb, yb, masks, recipe)
            guided = _mean_over_regions(per_image, masks)
            if recipe.get("input_alpha", "image") == "path" and pixel == "input":  # those were the path points' logits
                logits = model(xb)
    ce = F.cross_entropy(logits, yb, label_smoothing=float(recipe.get("label_smoothing", 0.0)))
    return ce + weight * guided, logits, float(guided.detach())


def _init_path(init: Optional[str], out_dir: Path) -> Optional[Path]:
    """Where the starting weights are: a bundled model's, a recipe's trained earlier into the same out folder (a stage
    of a two-stage recipe), or a state-dict file; None: random weights. Missing first-stage weights are refused."""
    if not init:
        return None
    if init in bundled_models():
        return Path(bundled_models()[init]["weights"])
    if init in BRAIN_RECIPES:
        path = out_dir / f"{init}.pt"
        if not path.is_file():
            raise InputError(f"this recipe starts from {init}'s weights, which are not bundled and not in {out_dir}: run "
                             f"`medlens train {init}` with the same --out first, or give --init FILE.")
        return path
    return Path(init)


def _init_weights(model: nn.Module, init: Optional[str], out_dir: Path) -> None:
    """Load the starting weights named by `init` (see _init_path) into model."""
    path = _init_path(init, out_dir)
    if path is not None:
        load_state_dict_checked(model, path, f"the starting weights {init!r}")


def train_brain(
    data_root: PathLike,
    out_dir: PathLike,
    name: str = "brain-tumor-mri",
    epochs: Optional[int] = None,
    size: Optional[int] = None,
    seed: int = 0,
    threads: int = 2,
    cache_dir: Optional[PathLike] = None,
    log: Optional[Callable[[str], None]] = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a brain model (recipe `name`, options overridden by keyword) on the figshare-layout folder's train split;
    writes the best-by-validation weights, the log and the metrics to out_dir as NAME.pt / .train.log / .metrics.json."""
    from tqdm import tqdm

    r = dict(BRAIN_RECIPES[name], seed=seed)
    r.update({k: v for k, v in overrides.items() if v is not None})
    if epochs is not None:
        r["epochs"] = int(epochs)
    if size is not None:
        r["size"] = int(size)
    torch.set_num_threads(threads)
    boxed = torch.tensor([s.box[0] == s.box[0] for s in scan_folder(data_root, ["train"], require_boxes=False)])
    check_guidance(r, boxed, f"the train split of {data_root}")  # before anything is decoded or written
    _init_path(r.get("init"), Path(out_dir))  # a missing first stage too
    data = {s: load_arrays(data_root, s, r["size"], cache_dir=cache_dir, progress=True, require_boxes=False)
            for s in ("train", "val", "test")}
    has_region = ~torch.isnan(data["train"]["boxes"]).any(1)
    if r.get("inpaint_region"):  # the control model: every split's slices with the region in-painted
        for s, d in data.items():
            check_guidance(r, ~torch.isnan(d["boxes"]).any(1), f"the {s} split of {data_root}")
            masks = torch.stack([box_to_mask(b, r["size"]) for b in d["boxes"]])
            d["images"] = inpaint_regions(minmax_scale(d["images"]), masks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / f"{name}.train.log", "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        log_file.write(line + "\n")
        log_file.flush()
        (log or tqdm.write)(line)

    t0 = time.time()
    say(f"{name}: recipe {json.dumps(plain(r))}")
    for s, d in data.items():
        say(f"{s}: {len(d['labels'])} slices, per class {torch.bincount(d['labels'], minlength=3).tolist()}")
    size_px = r["size"]
    train_masks = torch.stack([box_to_mask(b, size_px) if ok else torch.zeros(size_px, size_px, dtype=torch.bool)
                               for b, ok in zip(data["train"]["boxes"], has_region)])
    torch.manual_seed(r["seed"])
    gen = torch.Generator().manual_seed(r["seed"])
    kwargs = {"num_classes": len(CLASSES), "in_channels": 1, "widths": r["widths"], "last_stride": r["last_stride"]}
    model = SmallResNet(**kwargs)
    _init_weights(model, r.get("init"), out_dir)
    average = WeightAverage(model, r["ema_decay"]) if r.get("ema_decay") else None
    eval_model = SmallResNet(**kwargs) if average else model
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    xtr, ytr = data["train"]["images"], data["train"]["labels"]
    steps_per_epoch = math.ceil(len(ytr) / r["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps_per_epoch, pct_start=0.15)
    mean, std = r["mean"], r["std"]
    xval = (minmax_scale(data["val"]["images"]) - mean) / std
    val_boxed = ~torch.isnan(data["val"]["boxes"]).any(1)
    val_masks = torch.stack([box_to_mask(b, size_px) if ok else torch.zeros(size_px, size_px, dtype=torch.bool)
                             for b, ok in zip(data["val"]["boxes"], val_boxed)])
    watch = r["guide"] != "none" and bool(val_boxed.all())
    val_baselines = baseline_localisation(val_masks) if watch else {}
    if watch:
        say("val baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in val_baselines.items()))
    best: Optional[tuple] = None
    best_acc = -1.0
    history = []
    for epoch in range(1, r["epochs"] + 1):
        model.train()
        if r.get("freeze_batchnorm"):  # fine-tuning: BatchNorm keeps its statistics, so the maps a guided loss shapes
            for module in model.modules():  # in training are the maps the model shows in use (eval mode)
                if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                    module.eval()
        perm = torch.randperm(len(ytr), generator=gen)
        total_loss, total_guided, correct, seen = 0.0, 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{r['epochs']}", unit="batch", leave=False)
        for b in bar:
            idx = perm[b * r["batch_size"]: (b + 1) * r["batch_size"]]
            x01, mb = minmax_scale(xtr[idx]), train_masks[idx]
            if r["augment"] == "lesion-crop":
                x01, mb, _ = lesion_crops(x01, mb, gen)
            elif r["augment"] == "affine":
                x01, mb = affine_jitter(x01, gen), None
            yb = ytr[idx]
            loss, logits, guided = guided_step(model, (x01 - mean) / std, yb, mb, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if average is not None:
                average.update(model)
            total_loss += float(loss.detach()) * len(idx)
            total_guided += guided * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        if average is not None:  # validate and checkpoint the weight average
            average.copy_to(eval_model)
        eval_model.eval()
        with torch.no_grad():
            vlogits = torch.cat([eval_model(xval[i: i + 64]) for i in range(0, len(xval), 64)])
        vloss = float(F.cross_entropy(vlogits, data["val"]["labels"]))
        vacc = float((vlogits.argmax(1) == data["val"]["labels"]).float().mean())
        loc = cam_localisation(eval_model, xval, data["val"]["labels"], val_masks) if watch else {}
        if watch and "input" in r["guide"]:  # and the pixel-level maps: gradient x input, integrated gradients
            for kind, steps in (("input", 0), ("integrated", 16 if r.get("select") == "pixel" else None)):
                if steps is not None:
                    pixel = input_localisation(eval_model, xval, data["val"]["labels"], val_masks, n_steps=steps)
                    loc.update({f"{kind}_{k}": v for k, v in pixel.items()})
        key = selection_key(r, loc, val_baselines, vacc, vloss)
        improved = best is None or key > best
        if improved:
            best, best_acc = key, vacc
            save_state(eval_model, out_dir / f"{name}.pt")
        history.append({"epoch": epoch, "train_loss": total_loss / seen, "train_guided": total_guided / seen,
                        "train_acc": correct / seen, "val_loss": vloss, "val_acc": vacc,
                        **{(f"val_{k}" if k.startswith(("input_", "integrated_")) else f"val_gradcam_{k}"): v for k, v in loc.items()}})
        say(f"epoch {epoch:3d}/{r['epochs']} train loss {total_loss / seen:.4f} (guided {total_guided / seen:.4f}) "
            f"acc {correct / seen:.4f} | val loss {vloss:.4f} acc {vacc:.4f}"
            + (f" gradcam pointing {loc['pointing_game']:.3f} energy {loc['energy_in_box']:.3f}" if loc else "")
            + "".join(f" {label} pointing {loc[kind + '_pointing_game']:.3f} energy {loc[kind + '_energy_in_box']:.3f}"
                      for kind, label in (("input", "gradient x input"), ("integrated", "integrated gradients"))
                      if kind + "_pointing_game" in loc)
            + f"{'  * best, saved' if improved else ''} | {time.time() - t0:.0f} s")
    train_seconds = time.time() - t0
    model.load_state_dict(torch.load(out_dir / f"{name}.pt", weights_only=True))
    results = {}
    for s in ("val", "test"):
        pred = predict(model, data[s]["images"], prepare=lambda xb: (minmax_scale(xb) - mean) / std)
        results[s] = metrics_from_confusion(confusion_matrix(pred, data[s]["labels"], len(CLASSES)), list(CLASSES))
    summary = {"model": name, "recipe": plain(r), "best_val_accuracy": best_acc, "train_seconds": train_seconds,
               "selection": selection_text(r, watch),
               "val_baselines": val_baselines,
               "threads": threads, "history": history, "val": results["val"], "test": results["test"],
               "data_credit": CREDIT,
               "split_counts": {k: torch.bincount(d["labels"], minlength=3).tolist() for k, d in data.items()}}
    atomic_write(out_dir / f"{name}.metrics.json", json.dumps(summary, indent=2))
    say(f"done in {train_seconds:.0f} s; kept val acc {best_acc:.4f}; test acc {results['test']['accuracy']:.4f} "
        f"per class {results['test']['per_class_accuracy']}; confusion {results['test']['confusion_matrix']}")
    log_file.close()
    return summary


def train_phantom(
    name: str,
    out_dir: Optional[PathLike],
    epochs: Optional[int] = None,
    seed: int = 0,
    threads: int = 2,
    log: Optional[Callable[[str], None]] = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train `phantom-lesion` or `phantom-shortcut` on freshly generated phantoms; writes weights and metrics.
    Overrides (e.g. guide="cam", guide_weight=1, n_train=400) change the recipe; out_dir None writes nothing and
    returns the trained model under "model"."""
    from tqdm import tqdm

    if name not in PHANTOM_RECIPES:
        raise InputError(f"unknown phantom model {name!r}; expected one of {sorted(PHANTOM_RECIPES)}.")
    torch.set_num_threads(threads)
    r = dict(PHANTOM_RECIPES[name], seed=seed, guide="none", guide_weight=0.0, augment="none")
    r.update({k: v for k, v in overrides.items() if v is not None})
    if epochs is not None:
        r["epochs"] = int(epochs)
    contrast = r.get("lesion_contrast")
    train = phantom_data(name, "train", n=r["n_train"], lesion_contrast=contrast)
    val = phantom_data(name, "val", n=r["n_val"], lesion_contrast=contrast)
    check_guidance(r, train.lesion_masks.flatten(1).any(1), f"the {name} training phantoms")
    out = Path(out_dir) if out_dir is not None else None
    log_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / f"{name}.train.log", "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        if log_file is not None:
            log_file.write(line + "\n")
            log_file.flush()
        (log or tqdm.write)(line)

    t0 = time.time()
    say(f"{name}: recipe {json.dumps(plain(r))}")
    torch.manual_seed(r["seed"])
    gen = torch.Generator().manual_seed(r["seed"])
    model = PhantomCNN(num_classes=len(LABELS), in_channels=1, widths=r["widths"])
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    xtr, ytr, mtr = phantom_prepare(train.images), train.labels, train.lesion_masks[:, 0]
    xval, yval = phantom_prepare(val.images), val.labels
    steps = math.ceil(len(ytr) / r["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r["lr"], total_steps=r["epochs"] * steps, pct_start=0.2)
    best, best_state, history = (-1.0, float("inf")), None, []
    for epoch in range(1, r["epochs"] + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for b in tqdm(range(steps), desc=f"{name} epoch {epoch}/{r['epochs']}", unit="batch", leave=False, disable=out is None):
            idx = perm[b * r["batch_size"]: (b + 1) * r["batch_size"]]
            xb, mb = xtr[idx], mtr[idx]
            if r["augment"] == "lesion-crop":
                xb, mb, _ = lesion_crops(xb, mb, gen)
            loss, logits, _ = guided_step(model, xb, ytr[idx], mb, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == ytr[idx]).sum())
            seen += len(idx)
        model.eval()
        with torch.no_grad():
            vlogits = model(xval)
        vloss = float(F.cross_entropy(vlogits, yval))
        vacc = float((vlogits.argmax(1) == yval).float().mean())
        improved = (vacc, -vloss) > (best[0], -best[1])
        if improved:
            best = (vacc, vloss)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out is not None:
                save_state(model, out / f"{name}.pt")
        history.append({"epoch": epoch, "train_loss": total_loss / seen, "train_acc": correct / seen, "val_loss": vloss, "val_acc": vacc})
        say(f"epoch {epoch}/{r['epochs']} train loss {total_loss / seen:.4f} acc {correct / seen:.4f} | "
            f"val loss {vloss:.4f} acc {vacc:.4f}{'  * best, saved' if improved else ''} | {time.time() - t0:.0f} s")
    train_seconds = time.time() - t0
    model.load_state_dict(best_state)
    model.eval()
    if out is None:
        return {"model": model, "recipe": plain(r), "best_val_accuracy": best[0], "history": history}
    results: dict[str, Any] = {}
    test = phantom_data(name, "test")
    cm = confusion_matrix(predict(model, test.images, prepare=phantom_prepare), test.labels, len(LABELS))
    results["test"] = metrics_from_confusion(cm, list(LABELS))
    if name == "phantom-shortcut":  # how much the model leans on the marker
        for mode in ("random", "never", "always"):
            other = phantom_data(name, "test", marker=mode)
            cm = confusion_matrix(predict(model, other.images, prepare=phantom_prepare), other.labels, len(LABELS))
            results[f"test_marker_{mode}"] = metrics_from_confusion(cm, list(LABELS))
    summary = {"model": name, "recipe": plain(r), "data_seeds": PHANTOM_SEEDS, "best_val_accuracy": best[0],
               "train_seconds": train_seconds, "threads": threads, "history": history, **results}
    atomic_write(out / f"{name}.metrics.json", json.dumps(summary, indent=2))
    say(f"done in {train_seconds:.0f} s; test acc {results['test']['accuracy']:.4f}"
        + "".join(f"; {k} acc {v['accuracy']:.4f}" for k, v in results.items() if k != "test"))
    log_file.close()
    return summary
