"""torchvision's segmentation (fcn_*, deeplabv3_*, lraspp_*) and detection (fasterrcnn_*, retinanet_*, fcos_*)
architectures built for a local state dict: no weights and no backbone weights (nothing downloads), the auxiliary
head and the number of classes read from the weights; and a detector's number of classes for its description.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch
from torch import nn

def builder_options(builder: Any, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The keyword arguments that keep a torchvision builder offline and fit the weights: `weights_backbone=None`
    wherever the builder takes it (its default downloads ImageNet weights), and `aux_loss` when the weights hold an
    auxiliary classifier.

    Args:
        builder: torchvision's builder function for the architecture.
        state: the state dict to load.

    Returns:
        Extra keyword arguments for the builder.
    """
    params = inspect.signature(builder).parameters
    extra: dict[str, Any] = {}
    if "weights_backbone" in params:
        extra["weights_backbone"] = None
    if "aux_loss" in params:
        extra["aux_loss"] = any(key.startswith("aux_classifier.") for key in state)
    return extra


def detection_classes(arch: str, state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """A torchvision detector's number of classes (background included) from its weights; None for other models."""
    if state.get("roi_heads.box_predictor.cls_score.weight") is not None:
        return int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    logits = state.get("head.classification_head.cls_logits.weight")
    if logits is None:
        return None
    anchors = 9 if arch.startswith("retinanet") else 1  # RetinaNet: 3 scales x 3 ratios per position
    return int(logits.shape[0]) // anchors


def detector_classes(model: nn.Module) -> Optional[int]:
    """The number of classes a torchvision-style detector scores (background included), from its head; None when
    the model has no such head."""
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    cls_score = getattr(predictor, "cls_score", None)
    if isinstance(cls_score, nn.Linear):
        return int(cls_score.out_features)
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is not None and isinstance(getattr(head, "num_classes", None), int):
        return int(head.num_classes)
    return None
