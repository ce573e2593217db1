"""Targets beyond classes: `SegmentationTarget` (a class's logits summed over a region of a per-pixel output) and
`BoxTarget` (pytorch-grad-cam's Faster R-CNN box score), and the one place their scores are taken.

Each target kind provides its score as a function of the model's output (`RegionScores.forward`). `explain()` wraps
the model in `RegionScores` for the call, so every method (CAMs, gradients, IG, LRP, perturbations, surrogates)
explains the wrapped output's columns exactly as it explains classes: no method indexes a segmentation map itself.
A region fixed per image (the model's own predicted mask) is one column per (target, image); the grid picks each
image's own column, so perturbed copies of image b are scored against image b's region whatever batch they run in.
`SimilarityTarget`s (an encoder's embedding against a reference) are wrapped the same way, in `similarity_targets`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from medlens.errors import MethodError, ModelError, TargetError
from medlens.core.similarity_targets import SimilarityTarget, wrap_for_similarity
from medlens.tensor.autograd import logits_of

Region = Union[str, torch.Tensor, Sequence[float], None]


@dataclass(frozen=True)
class SegmentationTarget:
    """Explain a segmentation model's class over a region: the score is the sum of that class's logits there.

    Args:
        label: the class, by index or name (as the model's labels spell it).
        region: "predicted" (the model's own mask for that class on each image: argmax over classes, or logit > 0 for
            one-channel and multi-label models), a mask tensor of the output's spatial shape (or one per image,
            (B, *spatial)); nonzero = inside), a box (x0, y0, x1, y1) in input pixels (x1, y1 exclusive; 3-D:
            (x0, y0, z0, x1, y1, z1)), or None for the whole image.
    """

    label: Union[int, str]
    region: Any = "predicted"

    def describe(self) -> str:
        """A short text for names and provenance, e.g. "lesion@predicted"."""
        region = self.region
        if region is None:
            where = "image"
        elif isinstance(region, str):
            where = region
        elif isinstance(region, torch.Tensor):
            where = "mask"
        else:
            where = "box(" + ",".join(f"{float(v):g}" for v in region) + ")"
        return f"{self.label}@{where}"


@dataclass(frozen=True)
class BoxTarget:
    """Explain a detector's detections of `label` at `box`: for each detection of that label whose IoU with the box
    is at least `iou_threshold`, its IoU plus its score, summed (pytorch-grad-cam's `FasterRCNNBoxScoreTarget`,
    which takes only the best-overlapping detection; the two agree when one detection of the label overlaps).

    Args:
        label: the detector's class, by index or name.
        box: (x0, y0, x1, y1) in input pixels, as torchvision's detectors give boxes.
        iou_threshold: the smallest IoU that counts as the same detection (default 0.5).
    """

    label: Union[int, str]
    box: Sequence[float]
    iou_threshold: float = 0.5

    def describe(self) -> str:
        """A short text for names and provenance, e.g. "lesion@box(10,10,40,40)"."""
        return f"{self.label}@box(" + ",".join(f"{float(v):g}" for v in self.box) + ")"


def is_region_target(item: Any) -> bool:
    return isinstance(item, (SegmentationTarget, BoxTarget, SimilarityTarget))


def has_region_targets(targets: Any) -> bool:
    """Whether `targets=` (any of its accepted forms) holds a SegmentationTarget, BoxTarget or SimilarityTarget."""
    if is_region_target(targets):
        return True
    if isinstance(targets, (list, tuple)):
        return any(has_region_targets(t) for t in targets)
    return False


class RegionScores(nn.Module):
    """The model with its output turned into target scores (B, columns): one column per target (a per-image region:
    one per target and image). Holds the model as `model`; no parameters of its own."""

    def __init__(self, model: nn.Module, task: str, scorers: list[tuple[int, torch.Tensor, Optional[tuple]]]) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.scorers = scorers  # (class index, masks (M, S) float or box (1, 4), None or (iou_threshold,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.task == "detection":
            return torch.stack([_box_scores(self.scorers, image) for image in detections_of(out, x.shape[0])])
        logits = segmentation_logits(out, x)
        flat = logits.flatten(2)  # (n, K, S)
        return torch.cat([flat[:, k] @ masks.to(flat.dtype).T for k, masks, _ in self.scorers], dim=1)


def _box_scores(scorers: list, image: Mapping[str, torch.Tensor]) -> torch.Tensor:
    boxes, labels, scores = image["boxes"], image["labels"], image["scores"]
    columns = []
    for k, box, (threshold,) in scorers:
        if len(boxes) == 0:
            columns.append(scores.new_zeros(()))
            continue
        from torchvision.ops import box_iou

        iou = box_iou(box.to(boxes), boxes)[0]
        match = (iou >= threshold) & (labels == k)
        columns.append((iou[match] + scores[match]).sum())
    return torch.stack(columns)


def detections_of(out: Any, batch: int) -> list:
    """A detector's output as a list of per-image dicts with boxes, labels and scores; a ModelError otherwise."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):  # torchscript detectors: (losses, dets)
        out = out[1]
    if (isinstance(out, list) and len(out) == batch
            and all(isinstance(d, Mapping) and {"boxes", "labels", "scores"} <= set(d) for d in out)):
        return out
    raise ModelError(f"a BoxTarget needs a detector returning one dict per image with 'boxes', 'labels' and "
                     f"'scores' (torchvision's detectors in eval mode); this model returned {type(out).__name__}.")


def segmentation_logits(out: Any, x: torch.Tensor) -> torch.Tensor:
    """The per-pixel logits (B, K, *spatial) in a segmentation model's output; a ModelError otherwise."""
    logits = logits_of(out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != x.dim() or logits.shape[0] != x.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"a SegmentationTarget needs per-pixel logits (batch, classes, *spatial) with the input's "
                         f"{x.dim() - 2} spatial axes; for input {tuple(x.shape)} the model returned {shape}.")
    return logits


def _class_index(label: Any, labels: Sequence[str], n_classes: int) -> int:
    from medlens.core.targets import class_index

    return class_index(label, labels or None, n_classes)


def _box_mask(box: Any, x_shape: tuple, out_shape: tuple, what: str) -> torch.Tensor:
    n_axes = len(out_shape)
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise TargetError(f"{what}: a region must be 'predicted', a mask tensor, a box or None, not {box!r}.") from None
    if len(values) != 2 * n_axes:
        raise TargetError(f"{what}: a box on a {n_axes}-D image has {2 * n_axes} numbers "
                          f"({'x0, y0, x1, y1' if n_axes == 2 else 'x0, y0, z0, x1, y1, z1'}); got {len(values)}.")
    lo, hi = values[:n_axes][::-1], values[n_axes:][::-1]  # given x first; axes are (..., y, x)
    size = x_shape[-n_axes:]
    if any(a < 0 or b > s or b <= a for a, b, s in zip(lo, hi, size)):
        raise TargetError(f"{what}: the box {tuple(values)} is not inside the image of size "
                          f"{' x '.join(map(str, size[::-1]))} (x first), or is empty; give x0 < x1 <= width, "
                          f"y0 < y1 <= height, in input pixels.")
    mask = torch.zeros(out_shape, dtype=torch.bool)
    index = []
    for a, b, s_in, s_out in zip(lo, hi, size, out_shape):
        scale = s_out / s_in
        start = int(a * scale)
        index.append(slice(start, max(start + 1, int(round(b * scale)))))
    mask[tuple(index)] = True
    return mask


def _region_masks(target: SegmentationTarget, k: int, logits: torch.Tensor, x: torch.Tensor, multi_label: bool,
                  name: str) -> torch.Tensor:
    """(M, *spatial) bool masks: one for every image (M = B) or one shared (M = 1)."""
    batch, n_classes, spatial = logits.shape[0], logits.shape[1], tuple(logits.shape[2:])
    region, what = target.region, f"target {name}"
    if region is None:
        return torch.ones((1, *spatial), dtype=torch.bool)
    if isinstance(region, str):
        if region != "predicted":
            raise TargetError(f"{what}: region {region!r} is not known; use 'predicted', a mask, a box or None.")
        masks = logits[:, k] > 0 if multi_label or n_classes == 1 else logits.argmax(dim=1) == k
        masks = masks.cpu()
        for b in range(batch):
            if not masks[b].any():
                raise MethodError(f"the model found nothing for {target.label!r} in image {b} of the batch (its "
                                  f"predicted region is empty), so there is no region to explain; give a region "
                                  f"(a mask, a box, or None for the whole image; on the command line --region BOX or a mask file) to "
                                  f"explain the class there anyway.")
        return masks
    if isinstance(region, torch.Tensor):
        mask = region.detach().cpu()
        if mask.shape == spatial:
            mask = mask[None]
        elif mask.dim() == len(spatial) + 2 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if tuple(mask.shape[1:]) != spatial or mask.shape[0] not in (1, batch):
            raise TargetError(f"{what}: the mask has shape {tuple(region.shape)}, but the model's output is "
                              f"{' x '.join(map(str, spatial))} per image; give a mask of that size (or one per "
                              f"image, ({batch}, {', '.join(map(str, spatial))})).")
        mask = mask != 0
        if not mask.flatten(1).any(dim=1).all():
            raise TargetError(f"{what}: the mask is empty (no nonzero pixel) for at least one image.")
        return mask
    return _box_mask(region, tuple(x.shape), spatial, what)[None]


def wrap_for_targets(model: nn.Module, x: torch.Tensor, targets: Any, labels: Sequence[str], multi_label: bool,
                     task: str) -> tuple[RegionScores, torch.Tensor, list[str], dict[str, Any]]:
    """The model wrapped so that its output is the targets' scores, the (B, T) grid of columns for each image, a name
    per target slot and a provenance record. Runs the model once (no graph) to see its output and predicted regions.

    Args:
        model: the model as given (in eval mode, inside the call's borrowed state).
        x: the input batch (B, C, *spatial).
        targets: a SegmentationTarget, BoxTarget, SimilarityTarget (handed to `similarity_targets`), or a list of
            them (plain classes become SegmentationTarget(class,
            "predicted") on a segmentation model); None on a segmentation model: every class but the first.
        labels: the model's class names (may be empty).
        multi_label: whether the classes are independent (sigmoid): then "predicted" is logit > 0.
        task: "segmentation" or "detection" as described, or "classification" when only the targets say otherwise.

    Returns:
        (wrapped model, grid (B, T) long, names (T,), provenance dict).

    Raises:
        TargetError: an unknown class, a mask of the wrong size, a box outside the image, targets per image.
        MethodError: an empty predicted region, or a detector with no detection matching a BoxTarget.
        ModelError: the output is not per-pixel logits or detections.
    """
    if isinstance(targets, SimilarityTarget) or (isinstance(targets, (list, tuple))
                                                 and any(isinstance(t, SimilarityTarget) for t in targets)):
        return wrap_for_similarity(model, x, list(targets) if isinstance(targets, (list, tuple)) else [targets])
    with torch.no_grad():
        out = model(x)
    if isinstance(targets, (list, tuple)) and any(isinstance(t, (list, tuple)) and not _is_box(t) for t in targets):
        raise TargetError("segmentation and box targets are the same for every image; give one list of targets.")
    items = list(targets) if isinstance(targets, (list, tuple)) else ([] if targets is None else [targets])
    detector = any(isinstance(t, BoxTarget) for t in items) or task == "detection"
    batch = x.shape[0]
    if detector:
        return _wrap_detector(model, x, out, items, labels)
    logits = segmentation_logits(out, x)
    n_classes = logits.shape[1]
    if not items:
        items = [SegmentationTarget(k) for k in range(1 if n_classes > 1 else 0, n_classes)]
    scorers, grid_columns, names, records = [], [], [], []
    column = 0
    for item in items:
        target = item if isinstance(item, SegmentationTarget) else SegmentationTarget(item)
        k = _class_index(target.label, labels, n_classes)
        name = (labels[k] if labels else str(k)) + "@" + target.describe().split("@", 1)[1]
        masks = _region_masks(target, k, logits, x, multi_label, name)
        scorers.append((k, masks.flatten(1).to(logits.device, torch.float32), None))
        grid_columns.append([column + (b if masks.shape[0] > 1 else 0) for b in range(batch)])
        column += masks.shape[0]
        names.append(name)
        records.append({"name": name, "class": k, "region": target.describe().split("@", 1)[1],
                        "pixels": masks.flatten(1).sum(dim=1).tolist()})
    grid = torch.tensor(grid_columns, dtype=torch.long, device=x.device).T.contiguous()
    return RegionScores(model, "segmentation", scorers), grid, names, {"kind": "segmentation", "targets": records}


def _is_box(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and all(isinstance(v, (int, float)) for v in item)


def _wrap_detector(model: nn.Module, x: torch.Tensor, out: Any, items: list, labels: Sequence[str]) -> tuple:
    detections = detections_of(out, x.shape[0])
    if not items or not all(isinstance(t, BoxTarget) for t in items):
        raise TargetError("a detector is explained for boxes: give medlens.BoxTarget(label, box) targets.")
    scorers, names, records = [], [], []
    for target in items:
        if labels or not isinstance(target.label, int) or isinstance(target.label, bool) or target.label < 0:
            k = _class_index(target.label, labels, len(labels))
        else:  # a detector without names: any class index it may give
            k = int(target.label)
        box = torch.tensor([list(map(float, target.box))], dtype=torch.float32)
        if box.shape != (1, 4) or not (box[0, 2] > box[0, 0] and box[0, 3] > box[0, 1]):
            raise TargetError(f"BoxTarget box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1; got {tuple(target.box)}.")
        if not 0 < float(target.iou_threshold) <= 1:
            raise TargetError(f"BoxTarget iou_threshold must be in (0, 1]; got {target.iou_threshold!r}.")
        scorer = (k, box.to(x.device), (float(target.iou_threshold),))
        name = (labels[k] if labels else str(k)) + "@" + target.describe().split("@", 1)[1]
        found = [float(_box_scores([scorer], d)[0]) for d in detections]
        for b, value in enumerate(found):
            if value == 0.0:
                raise MethodError(f"the detector found no {name.split('@')[0]!r} detection with IoU >= "
                                  f"{target.iou_threshold} with the box {tuple(target.box)} in image {b} of the "
                                  f"batch; give the box of one of its detections (it found "
                                  f"{len(detections[b]['boxes'])} in all).")
        scorers.append(scorer)
        names.append(name)
        records.append({"name": name, "class": k, "box": list(map(float, target.box)),
                        "iou_threshold": float(target.iou_threshold), "score": found})
    grid = torch.arange(len(items), device=x.device).repeat(x.shape[0], 1)
    return RegionScores(model, "detection", scorers), grid, names, {"kind": "detection", "targets": records}


def region_layer(model: nn.Module, x: torch.Tensor, layer: Any, task: str,
                 needed: bool = True) -> tuple[Any, Optional[str]]:
    """The CAM layer for a segmentation or detection model, and a note when it was chosen here (`needed=False`: no
    method reads a layer, so the model is not run over every module; the layer is returned as given).

    A dotted name is looked up in the model as given (the wrapper holds it as `model`). Chosen automatically: for a
    segmentation model the last module with a spatial output that is not already the output's shape (so not the
    segmentation head, whose Grad-CAM would only restate the logits); for a torchvision-style detector the last such
    module of its backbone's body (`backbone.body`, as pytorch-grad-cam's detection tutorial), else of `backbone`.
    """
    if isinstance(layer, str):
        from medlens.core.layers import resolve_target_layer

        return resolve_target_layer(model, x, layer).module, None
    if layer is not None or task == "similarity" or not needed:  # an encoder: the general rule (a ViT's last block's first norm)
        return layer, None
    root = model
    if task == "detection":
        root = getattr(getattr(model, "backbone", None), "body", None) or getattr(model, "backbone", None) or model
    seen: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda m, _i, out: seen.append((m, out))) for m in root.modules() if m is not model]
    try:
        with torch.no_grad():
            out = model(x[:1])
    finally:
        for handle in handles:
            handle.remove()
    final = segmentation_logits(out, x[:1]).shape if task != "detection" else None
    spatial = [m for m, o in seen if isinstance(o, torch.Tensor) and o.dim() == x.dim() and o.shape[2:].numel() > 1
               and o.shape != final]
    if not spatial:
        return None, None  # the general rule decides (and says why when nothing fits)
    where = "its backbone's" if root is not model else "the model's"
    return spatial[-1], f"the last module with a spatial output in {where} layers, before the {task} head"


def inner_name(name: str, record: Optional[dict]) -> str:
    """A layer's dotted name in the model as given, not in the wrapper."""
    if record is not None and name.startswith("model."):
        return name[len("model."):]
    return name


def check_region_options(per_method: Mapping[str, Mapping[str, Any]], kind: str = "segmentation",
                         output: str = "logit") -> None:
    """Region scores are sums of logits: a softmax over them (perturbation's output="probability", or the call's
    output="log-probability" or "contrast") means nothing; and the region is fixed on the input as given, so CAM's
    test-time augmentation (aug_smooth, aug_flip) would misplace it."""
    if output != "logit":
        what = "a cosine similarity" if kind == "similarity" else "a sum over a region"
        raise MethodError(f"output={output!r} compares a class with the others, but a {kind} target's score is {what}; "
                          f"explain it with output='logit' (the default).")
    if kind == "similarity":  # a reference fixed in embedding space: a moved input is fine, a softmax is not
        asked = [name for name, options in per_method.items() if options.get("output") == "probability"]
        if asked:
            raise MethodError(f"{', '.join(asked)}: output='probability' is a softmax over classes, but a similarity "
                              f"target's score is a cosine similarity; use output='logit'.")
        return
    moved = [name for name, options in per_method.items() if options.get("aug_smooth") or options.get("aug_flip")]
    if moved:
        raise MethodError(f"{', '.join(moved)}: aug_smooth / aug_flip move the input, but a segmentation or box "
                          f"target's region stays where it is on the unmoved image; explain without them.")
    asked = [name for name, options in per_method.items() if options.get("output") == "probability"]
    if asked:
        raise MethodError(f"{', '.join(asked)}: output='probability' is a softmax over classes, but a segmentation or "
                          f"box target's score is a sum over a region; use output='logit'.")


def region_scores(columns: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The wrapped model's columns (B, M) and the grid (B, T) -> each image's target scores (B, T) and the slot grid
    (B, T) = 0..T-1, so that the result's `.logits[:, t]` is the explained score of slot t."""
    scores = columns.gather(1, grid)
    return scores, torch.arange(grid.shape[1], device=grid.device).repeat(grid.shape[0], 1)
