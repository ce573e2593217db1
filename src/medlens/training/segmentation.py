"""Training a segmentation recipe (`Recipe.is_segmentation`): the phantoms' exact lesion masks as per-pixel classes,
cross-entropy plus soft Dice, AdamW with the one-cycle rate, the epoch with the best validation Dice kept; seeded.

Owns `train_segmentation` (which `loop.train` hands segmentation recipes to) and `dice_scores`, the Dice the model
card and the tests report: per lesion image, and how often a normal image gets any lesion pixel.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medlens.io.files import atomic_write
from medlens.training.recipes import Recipe, phantom_data, phantom_prepare, recipe_record
from medlens.training.weights import build_network, save_state

LABELS = ("background", "lesion")


def dice_scores(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, batch: int = 64) -> dict[str, Any]:
    """Dice of the predicted lesion mask (argmax) against the true mask on the images that have a lesion; on those
    without, the share where the model predicts any lesion pixel.

    Args:
        model: the segmentation network (eval mode), logits (N, 2, *S).
        images: phantom images (N, 1, *S) in [0, 1] as generated (prepared here).
        masks: their exact lesion masks, bool (N, 1, *S).
        batch: images per forward pass.

    Returns:
        {"dice_mean", "dice_median", "n_lesion", "normal_false_positive_rate", "n_normal", "pixel_accuracy"}.
    """
    with torch.no_grad():
        pred = torch.cat([model(phantom_prepare(images[i:i + batch])).argmax(1) for i in range(0, len(images), batch)])
    truth = masks[:, 0]
    has = truth.flatten(1).any(1)
    inter = (pred.bool() & truth).flatten(1).sum(1).float()
    dice = 2 * inter / (pred.bool().flatten(1).sum(1) + truth.flatten(1).sum(1)).clamp(min=1).float()
    any_pred = pred.bool().flatten(1).any(1)
    return {"dice_mean": float(dice[has].mean()) if has.any() else float("nan"),
            "dice_median": float(dice[has].median()) if has.any() else float("nan"), "n_lesion": int(has.sum()),
            "normal_false_positive_rate": float(any_pred[~has].float().mean()) if (~has).any() else 0.0,
            "n_normal": int((~has).sum()), "pixel_accuracy": float((pred.bool() == truth).float().mean())}


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the soft Dice loss of the lesion class over the batch."""
    prob = torch.softmax(logits, dim=1)[:, 1]
    truth = target.float()
    soft_dice = 1 - (2 * (prob * truth).sum() + 1) / (prob.sum() + truth.sum() + 1)
    return F.cross_entropy(logits, target) + soft_dice


def train_segmentation(recipe: Recipe, out: Optional[Path], threads: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Train a segmentation recipe on generated phantoms; with `out`, write NAME.pt (the kept weights) and
    NAME.metrics.json (recipe, history, test Dice).

    Args:
        recipe: a recipe whose network is a segmentation network.
        out: the output folder, or None to write nothing.
        threads: torch CPU threads (already set by the caller; recorded).
        say: where log lines go.

    Returns:
        The metrics (with "test"); with `out` None also "model".
    """
    t0 = time.time()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    train, val, test = (phantom_data(recipe.name, split, data=recipe.data) for split in ("train", "val", "test"))
    say(f"phantoms: train {len(train)} (lesion {int(train.labels.sum())}), val {len(val)}, test {len(test)}")
    model = build_network(recipe.network, len(LABELS))
    o = recipe.optimiser
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    steps = math.ceil(len(train) / o.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=o.epochs * steps, pct_start=o.warmup)
    x_all, y_all = phantom_prepare(train.images), train.lesion_masks[:, 0].long()
    history, best, best_state = [], -1.0, None
    for epoch in range(1, o.epochs + 1):
        model.train()
        perm, total = torch.randperm(len(train), generator=gen), 0.0
        for b in range(steps):
            idx = perm[b * o.batch_size:(b + 1) * o.batch_size]
            loss = _loss(model(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        scores = dice_scores(model, val.images, val.lesion_masks)
        kept = scores["dice_mean"] > best
        if kept:
            best, best_state = scores["dice_mean"], {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out is not None:
                save_state(model, out / f"{recipe.name}.pt")
        history.append({"epoch": epoch, "train_loss": total / len(train), **{f"val_{k}": v for k, v in scores.items()}})
        say(f"epoch {epoch:3d}/{o.epochs} train loss {total / len(train):.4f} | val Dice {scores['dice_mean']:.4f} "
            f"normal false positives {scores['normal_false_positive_rate']:.3f}{'  * best, saved' if kept else ''} | "
            f"{time.time() - t0:.0f} s")
    model.load_state_dict(best_state)
    model.eval()
    summary = {"model": recipe.name, "task": "segmentation", "labels": list(LABELS), "recipe": recipe_record(recipe),
               "best_val_dice": best, "train_seconds": time.time() - t0, "threads": threads, "history": history,
               "test": dice_scores(model, test.images, test.lesion_masks), "n_train": len(train), "n_val": len(val),
               "n_test": len(test)}
    say(f"done in {summary['train_seconds']:.0f} s; kept val Dice {best:.4f}; test Dice {summary['test']['dice_mean']:.4f} "
        f"(median {summary['test']['dice_median']:.4f}); normal false positives "
        f"{summary['test']['normal_false_positive_rate']:.3f}")
    if out is None:
        return {**summary, "model": model}
    atomic_write(out / f"{recipe.name}.metrics.json", json.dumps(summary, indent=2))
    return summary
