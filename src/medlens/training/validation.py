"""The localisation checks a guided training run is selected by, on the validation split's boxes.

Owns the pointing game and energy in the box of the class activation map and of gradient x input, and the baselines'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medlens.evaluation.localisation import center_map, energy_in_box, pointing_game, prior_maps
from medlens.training.guided import class_activation_maps, features_and_logits


@torch.no_grad()
def cam_localisation(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean pointing game and energy in the box of the target class's CAM (= Grad-CAM at the last stage), upsampled
    bilinearly to the input: the validation check of a guided run."""
    model.eval()
    maps = []
    for i in range(0, len(x), 64):
        features, _ = features_and_logits(model, x[i: i + 64])
        cams = class_activation_maps(features, model.fc, targets[i: i + 64])
        maps.append(F.interpolate(cams[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False))
    maps = torch.cat(maps)
    return {"pointing_game": float(pointing_game(maps, masks).nanmean()),
            "energy_in_box": float(energy_in_box(maps, masks).nanmean())}


def input_localisation(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean pointing game and energy in the box of the target logit's gradient x input (LRP-epsilon on this ReLU
    network, and integrated gradients' integrand at the image): the validation check of an input-guided run."""
    model.eval()
    maps = []
    for i in range(0, len(x), 64):
        xb = x[i: i + 64].detach().requires_grad_(True)
        grads, = torch.autograd.grad(model(xb).gather(1, targets[i: i + 64, None]).sum(), xb)
        maps.append((grads * xb).sum(1, keepdim=True).detach())
    maps = torch.cat(maps)
    return {"pointing_game": float(pointing_game(maps, masks).nanmean()),
            "energy_in_box": float(energy_in_box(maps, masks).nanmean())}


def baseline_localisation(masks: torch.Tensor) -> dict[str, float]:
    """The centre and (leave-one-out) prior baselines' pointing game and energy on these masks."""
    centre = center_map(tuple(masks.shape[-2:]), batch=len(masks))
    prior = prior_maps(masks, masks.float().sum(0), len(masks))
    return {f"{name} {metric.__name__}": float(metric(maps, masks).nanmean())
            for name, maps in (("centre", centre), ("prior", prior)) for metric in (pointing_game, energy_in_box)}
