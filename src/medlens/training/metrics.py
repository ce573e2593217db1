"""Classification metrics of a trained model: predictions in batches, the confusion matrix and accuracies.

Owns the JSON-able metrics a training run writes for its validation and test splits.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn


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
