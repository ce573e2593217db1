"""The probe pass that checks a description against its model: one forward pass on an input of the spec's size and
range (`probe_outputs`), and what the first convolution says about channels and 2-D/3-D (`convolution_channels_dims`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from medlens.core.input_spec import InputSpec
from medlens.core.layers import first_convolution
from medlens.errors import ModelError, short_message
from medlens.models.torchvision_tasks import detector_classes
from medlens.tensor.autograd import logits_of

DEFAULT_PROBE_SIZE = {2: (224, 224), 3: (32, 64, 64)}  # the probe's size when the spec gives none


def convolution_channels_dims(model: nn.Module) -> tuple[Optional[int], int]:
    """Input channels and spatial dimensions from the model's first convolution.

    Args:
        model: the module.

    Returns:
        (channels or None when there is no convolution with weights, 2 or 3).
    """
    conv = first_convolution(model)
    weight = getattr(conv, "weight", None) if conv is not None else None
    if weight is None:
        return None, 2
    channels = int(weight.shape[1]) * int(getattr(conv, "groups", 1) or 1)
    return channels, 3 if weight.dim() == 5 else 2


def probe_input(spec: InputSpec, size: tuple[int, ...]) -> torch.Tensor:
    """(1, C, *size): a ramp over [0, 1] along the last axis, normalised as the spec says, so the model's first input
    spans the range its real inputs have (TorchXRayVision, say, warns about an all-zero input, which [-1024, 1024]
    models never see).

    Args:
        spec: the input spec (channels, mean, std).
        size: the spatial size.

    Returns:
        The probe input, float32 on the CPU.
    """
    ramp = torch.linspace(0.0, 1.0, size[-1]).expand((1, int(spec.channels)) + tuple(size))
    mean = torch.tensor(spec._per_channel(spec.mean), dtype=torch.float32)
    std = torch.tensor(spec._per_channel(spec.std), dtype=torch.float32)
    if mean.numel() != spec.channels or std.numel() != spec.channels:
        return ramp.clone()  # a spec whose statistics do not fit its channels is refused by the caller's checks
    shape = (1, int(spec.channels)) + (1,) * len(size)
    return ((ramp - mean.view(shape)) / std.view(shape)).contiguous()


def probe_outputs(model: nn.Module, spec: InputSpec, dims: int, source: str) -> int:
    """K, the number of classes (per pixel for a segmentation model): `probe_task`'s first value."""
    return probe_task(model, spec, dims, source)[0]


def probe_task(model: nn.Module, spec: InputSpec, dims: int, source: str) -> tuple[int, str]:
    """The number of classes K and the task ("classification", or "segmentation" for per-pixel logits), from one forward pass (no grad, eval mode, the model's mode restored) on an input of
    the spec's size (else its declared patch size) and range.

    Args:
        model: the module.
        spec: the checked input spec.
        dims: 2 or 3, for the probe's size when the spec gives none.
        source: the model's name in messages.

    Returns:
        (K, task): the size of the logits' second axis (classes, or classes per pixel) and the task it shows.

    Raises:
        ModelError: the model cannot run on such an input, or returns neither (batch, classes) nor per-pixel logits.
    """
    patch = (spec.extra or {}).get("patch_size")  # a segmentation model's window, when it declares one
    size = tuple(spec.size or patch or DEFAULT_PROBE_SIZE[3 if dims == 3 else 2])
    x = probe_input(spec, size)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the spec does not fit the model
        raise ModelError(
            f"{source}: the model could not run on a {tuple(x.shape)} input ({type(exc).__name__}: {short_message(exc)}). "
            f"Tell medlens what it takes: --input-size and --channels, or a sidecar JSON with size and channels."
        ) from None
    finally:
        model.train(was_training)
    if _detections(out, x.shape[0]):  # torchvision-style detections: one dict of boxes, labels, scores per image
        return detector_classes(model) or 0, "detection"
    out = logits_of(out)
    if isinstance(out, torch.Tensor) and out.dim() == x.dim() and out.shape[0] == x.shape[0]:
        return int(out.shape[1]), "segmentation"  # per-pixel logits (B, K, *spatial): K classes per pixel
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"{source}: the model returns {shape}, not logits of shape (batch, classes) or per-pixel "
                         f"logits (batch, classes, *spatial).")
    return int(out.shape[1]), "classification"


def _detections(out: Any, batch: int) -> bool:
    from medlens.core.region_targets import detections_of

    try:
        detections_of(out, batch)
    except ModelError:
        return False
    return True
