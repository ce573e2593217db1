"""The localisation checks a guided training run is selected by, on the validation split's boxes.

Owns the pointing game and energy in the box of the class activation map, gradient x input, integrated gradients and
a transformer's Grad-CAM, rollout and transformer attribution, the baselines', and the rule an epoch is kept by.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from medlens.evaluation.localisation import center_map, energy_in_box, pointing_game, prior_maps
from medlens.core.explain import explain
from medlens.training.guided import class_activation_maps, features_and_logits

if TYPE_CHECKING:
    from medlens.training.recipes import Selection


@torch.no_grad()
def cam_localisation(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Mean pointing game and energy in the box of the target class's CAM (= Grad-CAM at the last stage), upsampled
    bilinearly to the input: the validation check of a guided run; and "picture_pointing_game", the share of images
    whose positive part (Grad-CAM's picture, after its ReLU) exists and peaks in the box (a blank picture misses)."""
    maps, _ = cam_maps(model, x, targets, tuple(masks.shape[-2:]))
    return {"pointing_game": float(pointing_game(maps, masks).nanmean()),
            "energy_in_box": float(energy_in_box(maps, masks).nanmean()),
            "picture_pointing_game": float(picture_pointing(maps, masks).nanmean())}


@torch.no_grad()
def cam_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
             size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the target class's CAM of each image upsampled bilinearly to `size`, (N, 1, *size); the logits (N, K)), in
    eval mode, 64 images per pass."""
    model.eval()
    maps, logits = [], []
    for i in range(0, len(x), 64):
        features, out = features_and_logits(model, x[i: i + 64])
        cams = class_activation_maps(features, model.fc, targets[i: i + 64])
        maps.append(F.interpolate(cams[:, None], size=size, mode="bilinear", align_corners=False))
        logits.append(out)
    return torch.cat(maps), torch.cat(logits)


def picture_pointing(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image (N,), 1.0 where the map's maximum is positive and lies in the region, 0.0 where not (a map <= 0
    everywhere, whose positive part is blank, misses), nan where the region is empty; maps (N, 1 or none, *s)."""
    flat = maps.reshape(len(maps), -1)
    inside = masks.reshape(len(masks), -1).bool()
    hit = (flat.amax(1) > 0) & inside.gather(1, flat.argmax(1, keepdim=True))[:, 0]
    return torch.where(inside.any(1), hit.to(flat.dtype), torch.full_like(flat[:, 0], float("nan")))


def input_localisation(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                       n_steps: int = 0) -> dict[str, float]:
    """Mean pointing game and energy in the box of medlens' gradient x input of the target (LRP-epsilon on this ReLU
    network, and integrated gradients' integrand at the image), or with n_steps > 0 of its integrated gradients from
    the zero baseline in that many Gauss-Legendre points: the validation checks of an input-guided run. The maps are
    the method registry's, with the reference the training guide uses (0 in the model's input space, "spec-zero"; the
    maps `medlens explain` shows start from the scan's black), so that `medlens train` reproduces the bundled models."""
    model.eval()
    method, options = (("integratedgradients", {"n_steps": n_steps, "baseline": "spec-zero"}) if n_steps
                       else ("inputxgradient", {"reference": "spec-zero"}))
    maps = torch.cat([explain(model, x[i: i + 64], methods=method, targets=targets[i: i + 64, None].tolist(), **options)[method]
                      for i in range(0, len(x), 64)])
    return {"pointing_game": float(pointing_game(maps, masks).nanmean()),
            "energy_in_box": float(energy_in_box(maps, masks).nanmean())}


def transformer_localisation(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                             masks: torch.Tensor) -> dict[str, float]:
    """Mean pointing game and energy in the box of a vision transformer's Grad-CAM at the default layer (keys as
    `cam_localisation`'s), attention rollout ("rollout_...") and transformer attribution ("attribution_..."): the
    registry's maps, as `medlens explain` shows them; the validation checks of a guided transformer."""
    model.eval()
    methods = {"gradcam": "", "attention_rollout": "rollout_", "transformer_attribution": "attribution_"}
    found: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    for i in range(0, len(x), 64):
        maps = explain(model, x[i: i + 64], methods=list(methods), targets=targets[i: i + 64, None].tolist())
        for m in methods:
            found[m].append(maps[m])
    checks = {}
    for m, prefix in methods.items():
        maps = torch.cat(found[m])
        checks[f"{prefix}pointing_game"] = float(pointing_game(maps, masks).nanmean())
        checks[f"{prefix}energy_in_box"] = float(energy_in_box(maps, masks).nanmean())
    return checks


def baseline_localisation(masks: torch.Tensor) -> dict[str, float]:
    """The centre and (leave-one-out) prior baselines' pointing game and energy on these masks."""
    centre = center_map(tuple(masks.shape[-2:]), batch=len(masks))
    prior = prior_maps(masks, masks.float().sum(0), len(masks))
    return {f"{name} {metric.__name__}": float(metric(maps, masks).nanmean())
            for name, maps in (("centre", centre), ("prior", prior)) for metric in (pointing_game, energy_in_box)}


def selection_key(selection: "Selection", checks: dict[str, float], baselines: dict[str, float], val_accuracy: float,
                  val_loss: float) -> tuple:
    """The order epochs are kept by (higher is better). Unguided: validation accuracy, then loss. Guided: epochs whose
    Grad-CAM beats the centre's pointing game by 0.10 and has twice the prior's energy in the box come first (for an
    input guide, whose gradient x input also beats the centre; for a transformer, whose attention rollout and
    transformer attribution also do). With the rule "pixel": among those, epochs at or above
    `val_accuracy_floor` first, then the higher of the gradient x input and integrated-gradients pointing game; with
    "picture", the picture pointing game of Grad-CAM's positive part before that."""
    if not checks:
        return (False, val_accuracy, -val_loss)
    meets = checks["pointing_game"] >= baselines["centre pointing_game"] + 0.10 \
        and checks["energy_in_box"] >= 2 * baselines["prior energy_in_box"]
    for pixel_or_token in ("input", "rollout", "attribution"):
        if f"{pixel_or_token}_pointing_game" in checks:
            meets = meets and checks[f"{pixel_or_token}_pointing_game"] > baselines["centre pointing_game"]
    if selection.rule not in ("pixel", "picture"):
        return (meets, val_accuracy, -val_loss)
    pixel = max(checks["input_pointing_game"], checks.get("integrated_pointing_game", 0.0))
    floor = val_accuracy >= float(selection.val_accuracy_floor)
    if selection.rule == "picture":
        return (meets, floor, checks["picture_pointing_game"], pixel, val_accuracy, -val_loss)
    return (meets, floor, pixel, val_accuracy, -val_loss)


def selection_text(selection: "Selection", guided: bool, averaged: bool = True, transformer: bool = False) -> str:
    """The rule of selection_key in words, for the run's metrics (`averaged`: the run keeps a weight average;
    `transformer`: its rollout and transformer attribution are checked too)."""
    kept = "the weight average of the epoch" if averaged else "the epoch"
    if selection.rule in ("pixel", "picture"):
        first = ("the highest validation pointing game of Grad-CAM's positive part (a blank picture misses), then "
                 if selection.rule == "picture" else "")
        return (f"{kept}, among those that pass the Grad-CAM and gradient x input checks and reach "
                f"the validation accuracy floor, with {first}the highest validation pointing game of gradient x input "
                "or integrated gradients")
    return f"{kept} with the best validation accuracy" + (
        " among those whose validation Grad-CAM beats the centre baseline's pointing game by 0.10 and has twice the "
        "prior's energy in the box" + (" and whose attention rollout and transformer attribution beat the centre's "
                                       "pointing game" if transformer else "") + " (if any)" if guided else "")
