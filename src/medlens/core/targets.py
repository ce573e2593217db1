"""Turning the user's `targets=` into a (B, T) tensor of class indices, checked against the model.

Accepts None, an int, a list (same for every image), a list of lists (one per image), class names, or a
tensor; defaults as docs/api.md says (top-1, or every class at p >= 0.5 for multi-label models).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from medlens.errors import TargetError


def _index(item: Any, labels: Optional[Sequence[str]], n_classes: int) -> int:
    if isinstance(item, str):
        if not labels:
            raise TargetError(
                f"target {item!r} is a class name, but the model carries no labels; give class indices "
                f"0..{n_classes - 1}, or give the model labels (a sidecar JSON or --labels)."
            )
        name = item.strip()
        exact = [i for i, l in enumerate(labels) if str(l) == name]
        if exact:  # an exact match wins: labels may differ only in case
            return exact[0]
        folded = [i for i, l in enumerate(labels) if str(l).lower() == name.lower()]
        if len(folded) > 1:
            raise TargetError(f"class name {item!r} matches {', '.join(repr(labels[i]) for i in folded)} when case is "
                              f"ignored; give it exactly as the model spells it, or give the index.")
        if not folded:
            raise TargetError(f"unknown class name {item!r}. This model's classes are: {', '.join(map(str, labels))}.")
        return folded[0]
    if isinstance(item, bool) or not isinstance(item, (int,)) and not (
        isinstance(item, torch.Tensor) and item.dim() == 0 and not item.is_floating_point()
    ):
        try:
            import numpy as np

            if isinstance(item, np.integer):
                item = int(item)
            else:
                raise TypeError
        except TypeError:
            raise TargetError(f"a target must be a class index or a class name, not {item!r}") from None
    index = int(item)
    if not 0 <= index < n_classes:
        raise TargetError(f"target index {index} is out of range: this model has {n_classes} classes (0..{n_classes - 1}).")
    return index


def class_index(item: Any, labels: Optional[Sequence[str]], n_classes: int) -> int:
    """The class index of `item` (an index or a class name) among `n_classes` classes named `labels`.

    Raises:
        TargetError: an index out of range, an unknown or ambiguous name, a name without labels, not a class.
    """
    return _index(item, labels, n_classes)


def check_target_names(targets: Sequence[Any], labels: Sequence[str]) -> None:
    """Fail early (before any image is read) on a target index out of range or an unknown class name."""
    for t in targets:
        if isinstance(t, int) and t < 0:
            raise TargetError(f"target index {t} is out of range: this model has {len(labels)} classes (0..{len(labels) - 1}).")
        _index(t, labels, len(labels))


def default_targets(logits: torch.Tensor, multi_label: bool) -> tuple[torch.Tensor, str]:
    """Top-1 per image; for multi-label models every class with p >= 0.5 (top-1 when none is).

    When images of a batch have different numbers of positive classes, every image is explained for the
    union of them, so the result stays a (B, T) grid; the returned note says so.
    """
    top1 = logits.argmax(dim=1, keepdim=True)
    if not multi_label:
        return top1, "top-1 class of each image"
    positive = torch.sigmoid(logits) >= 0.5
    per_image = [torch.nonzero(row).flatten().tolist() or [int(t)] for row, t in zip(positive, top1.flatten())]
    lengths = {len(p) for p in per_image}
    if len(lengths) == 1:
        return torch.tensor(per_image, dtype=torch.long, device=logits.device), "classes with p >= 0.5 (top-1 when none)"
    union = sorted({c for p in per_image for c in p})
    grid = torch.tensor([union] * logits.shape[0], dtype=torch.long, device=logits.device)
    return grid, "union over the batch of classes with p >= 0.5, so every image has the same targets"


def resolve_targets(
    targets: Any,
    logits: torch.Tensor,
    labels: Optional[Sequence[str]] = None,
    multi_label: bool = False,
) -> tuple[torch.Tensor, str]:
    """(B, T) long tensor of class indices on the logits' device, and a note on how it was chosen."""
    if logits.dim() != 2:
        raise TargetError(f"the model must return logits of shape (batch, classes); it returned shape {tuple(logits.shape)}.")
    batch, n_classes = logits.shape
    if targets is None:
        return default_targets(logits, multi_label)
    if isinstance(targets, torch.Tensor):
        if targets.is_floating_point():
            raise TargetError("targets must be class indices (integers), not floats.")
        targets = targets.tolist()
    if isinstance(targets, (int, float, str)) or (hasattr(targets, "__index__") and not isinstance(targets, (list, tuple))):
        targets = [targets]
    if not isinstance(targets, (list, tuple)) or len(targets) == 0:
        raise TargetError("targets must be None, a class, a list of classes, or one list of classes per image; got an empty or unknown value.")
    if all(isinstance(t, (list, tuple)) for t in targets):
        if len(targets) != batch:
            raise TargetError(
                f"targets gives {len(targets)} lists but the batch has {batch} images: give one list per image, "
                f"or a single list used for every image."
            )
        lengths = {len(t) for t in targets}
        if len(lengths) != 1 or 0 in lengths:
            raise TargetError(f"every image needs the same number of targets; got lists of lengths {sorted(lengths)}.")
        grid = [[_index(t, labels, n_classes) for t in row] for row in targets]
        note = "one list per image, as given"
    elif any(isinstance(t, (list, tuple)) for t in targets):
        raise TargetError("targets mixes classes and lists of classes; give either one list for all images or one list per image.")
    else:
        row = [_index(t, labels, n_classes) for t in targets]
        grid = [row] * batch
        note = "the same classes for every image, as given"
    return torch.tensor(grid, dtype=torch.long, device=logits.device), note
