"""Segmentation models through the pipeline: `--region` (predicted, a box, a mask file) turned into the plan's
`SegmentationTarget`s, a mask file brought onto the input's grid, and the region each image's overlays outline.

A front end calls `segmentation_plan` once; `explain_prepared` calls `targets_on_grid` and `explained_region` per image.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from medlens.core.model_description import describe
from medlens.core.targets import class_index
from medlens.core.region_targets import SegmentationTarget, has_region_targets, segmentation_logits
from medlens.core.sliding_window import WindowedModel, take_window
from medlens.errors import InputError
from medlens.io.regions import Region, read_region, region_mask
from medlens.pipeline.plan import Plan

_NUMBERS = re.compile(r"^\s*-?\d+(\.\d+)?(\s*,\s*-?\d+(\.\d+)?)+\s*$")


def region_option(value: Union[None, str, Path]) -> Any:
    """The CLI's `--region` for a segmentation model: "predicted" (also when not given), a box "x0,y0,x1,y1" (3-D:
    "x0,y0,z0,x1,y1,z1") in input pixels, or a mask file (PNG, TIFF, NIfTI) read as a `Region`.

    Raises:
        InputError: a box with a count of numbers other than 4 or 6, or an unreadable mask file.
    """
    if value is None or str(value).strip().lower() == "predicted":
        return "predicted"
    text = str(value)
    if _NUMBERS.match(text):
        numbers = tuple(float(v) for v in text.split(","))
        if len(numbers) not in (4, 6):
            raise InputError(f"--region {text}: a box is 4 numbers x0,y0,x1,y1 (3-D: 6, x0,y0,z0,x1,y1,z1) in input "
                             f"pixels; got {len(numbers)}.")
        return numbers
    return read_region(Path(text))


def is_segmentation(plan: Plan) -> bool:
    """Whether the plan's model is a segmentation model (its description says so)."""
    return describe(plan.model).task == "segmentation"


def segmentation_plan(plan: Plan, region: Any) -> Plan:
    """The plan with its targets as SegmentationTargets over `region` (see `region_option`): the classes asked for,
    or every class but the first (the background) when none were.

    Args:
        plan: a plan for a segmentation model.
        region: "predicted", a box tuple or a `Region` (a mask file).

    Returns:
        The same plan with SegmentationTarget targets.
    """
    labels = describe(plan.model).labels
    classes = list(plan.targets) if plan.targets is not None else list(range(1, max(len(labels), 2)))
    return dataclasses.replace(plan, targets=[SegmentationTarget(getattr(c, "label", c), region=region) for c in classes])


def targets_on_grid(targets: Any, scan_shape: Sequence[int], grid: Sequence[int],
                    slice_index: Optional[int]) -> Any:
    """The targets with a mask file's `Region` replaced by its mask on the prepared input's grid; others as given."""
    if not has_region_targets(targets):
        return targets
    out = []
    for target in targets:
        if isinstance(target, SegmentationTarget) and isinstance(target.region, Region):
            mask = region_mask(target.region, scan_shape, grid, slice_index=slice_index)
            target = dataclasses.replace(target, region=mask)
        out.append(target)
    return out


def explained_region(plan: Plan, x: torch.Tensor, targets: Any) -> Optional[torch.Tensor]:
    """The region the first segmentation target explains on image 0, on the input's grid (bool), for the overlays'
    outline and the region scores: the model's predicted mask, the box or the mask; None without such a target."""
    first = next((t for t in (targets or []) if isinstance(t, SegmentationTarget)), None)
    if first is None:
        return None
    region = first.region
    if isinstance(region, torch.Tensor):
        return region.reshape(x.shape[2:]).bool().cpu()
    if region is None:
        return torch.ones(x.shape[2:], dtype=torch.bool)
    if isinstance(region, str):
        window = take_window(plan.request.options)[0]  # a volume larger than the window: blended window by window
        model = WindowedModel(plan.model, window) if window is not None else plan.model
        with torch.no_grad():
            logits = segmentation_logits(model(x.to(plan.device)), x)
        k = class_index(first.label, describe(plan.model).labels or None, logits.shape[1])
        mask = logits[0, k] > 0 if logits.shape[1] == 1 else logits[0].argmax(0) == k
        return mask.cpu() if tuple(mask.shape) == tuple(x.shape[2:]) else None
    n = len(region) // 2
    mask = torch.zeros(x.shape[2:], dtype=torch.bool)
    mask[(Ellipsis, *(slice(int(a), int(round(b))) for a, b in zip(region[:n][::-1], region[n:][::-1])))] = True
    return mask


def segmentation_output(plan: Plan, x: torch.Tensor, targets: Any) -> Optional[torch.Tensor]:
    """The model's per-pixel logits (K, *spatial) for image 0 of `x`, on the CPU, when the targets are segmentation
    targets (the `dicom` format files the predicted mask as a DICOM Segmentation); None otherwise."""
    items = targets if isinstance(targets, (list, tuple)) else [targets]
    if not any(isinstance(t, SegmentationTarget) for t in items):
        return None
    with torch.no_grad():
        logits = segmentation_logits(plan.model(x[:1].to(plan.device)), x[:1])
    return logits[0].detach().float().cpu()
