"""Explanation-guided losses: ask a model to be right for the right reasons, given each image's region (box or mask).

Owns the differentiable class activation map of a GAP + linear head (equal to Grad-CAM at the last stage, up to a
positive scale), an attention loss that asks for the map's mass in the region (in the spirit of GAIN's external
supervision, Li et al. 2018), the same loss on the gradient x input map (what LRP-epsilon and integrated gradients
show), the input-gradient penalty outside it ("right for the right reasons", Ross et al. 2017), the same attention loss on a
vision transformer's Grad-CAM, attention rollout and transformer attribution, and one batch's loss from a recipe's guide.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import ModelError

if TYPE_CHECKING:
    from medlens.training.recipes import Guidance

GUIDES = ("none", "cam", "rrr", "cam+rrr", "input", "cam+input", "attention", "cam+attention")


def has_cam_head(model: nn.Module) -> bool:
    """Whether the model ends in a global-average-pool + linear head (`avgpool`, `fc`), whose CAM is Grad-CAM at the
    last stage without a backward pass; other models (vision transformers) are guided through `token_guidance_loss`."""
    return isinstance(getattr(model, "avgpool", None), (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)) \
        and isinstance(getattr(model, "fc", None), nn.Linear)


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last feature map (the input of `model.avgpool`) and the logits, from one forward pass with graph."""
    pool, head = getattr(model, "avgpool", None), getattr(model, "fc", None)
    if not isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)) or not isinstance(head, nn.Linear):
        raise ModelError(f"CAM guidance needs a global-average-pool + linear head (`avgpool`, `fc`); "
                         f"{type(model).__name__} has neither. Use --guide rrr, which works on any model.")
    seen: dict[str, torch.Tensor] = {}
    handle = pool.register_forward_hook(lambda module, args, out: seen.update(features=args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return seen["features"], logits


def class_activation_maps(features: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """CAM of each image's target class: sum_k w[target, k] * A_k, (N, *grid), differentiable. For a network whose
    logits are a linear head on the global average of A this is Grad-CAM at A times the number of grid cells."""
    w = head.weight[targets]  # (N, K)
    return torch.einsum("nk,nk...->n...", w, features)


def outside_energy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the share of the map's positive part that is not inside the region: 1 - sum(relu(m) * mask) /
    sum(relu(m)), maps (N, *s) at the masks' resolution (N, *s). 0 when all positive mass is inside (1 -
    energy_in_box). A map with no positive value gives 1: it points nowhere, which must not be a way out."""
    pos = maps.clamp_min(0).flatten(1)
    inside = (pos * masks.bool().flatten(1).to(pos)).sum(1)
    total = pos.sum(1)
    return torch.where(total > 0, 1 - inside / total.clamp_min(1e-30), torch.ones_like(total))


def region_attention_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, -log of the share of the map's spatial softmax inside the region: -log sum_{p in mask} softmax(m)_p,
    maps (N, *s), masks (N, *s). Near 0 when the map is much higher inside the region than anywhere outside; grows as
    mass moves out. Unlike the positive-energy share it has no trivial minimum: a map that is flat, all negative or
    tiny scores -log(area fraction), so the evidence itself must sit in the region (GAIN's aim, Li et al. 2018).
    An empty mask gives +inf; callers leave such images out."""
    flat = maps.flatten(1)
    inside = masks.bool().flatten(1)
    return torch.logsumexp(flat, 1) - torch.logsumexp(flat.masked_fill(~inside, float("-inf")), 1)


def peak_sign_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, relu(1 - max_{p in region} m_p / rms(m)), maps and masks (N, *s): 0 once the map's highest value in
    the region is positive and at least its root mean square; grows as that peak sinks below zero. The region
    attention loss cannot see the map's sign (a softmax share is blind to adding a constant), and the outside energy
    has no gradient where the map has no positive part, so without this term a map can peak in the region while
    being negative everywhere, and Grad-CAM's picture (its positive part) is then blank."""
    flat = maps.flatten(1)
    peak = flat.masked_fill(~masks.bool().flatten(1), float("-inf")).amax(1)
    rms = flat.pow(2).mean(1).add(1e-12).sqrt()
    return (1 - peak / rms).clamp_min(0)


def cam_guidance_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                      energy_weight: float = 1.0, sign_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-image guided loss of the target class's CAM, upsampled bilinearly to the input as Grad-CAM is):
    the region attention loss (the map's peak and mass in the region) plus `energy_weight` x the outside energy (its
    positive part, what Grad-CAM shows after its ReLU, in the region too) plus `sign_weight` x the peak sign loss (the
    peak in the region positive, so that the positive part exists). Images whose mask is empty get 0."""
    features, logits = features_and_logits(model, x)
    cams = class_activation_maps(features, model.fc, targets)
    up = F.interpolate(cams[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    has = masks.flatten(1).any(1)
    safe = torch.where(has[:, None, None], masks.bool(), torch.ones_like(masks, dtype=torch.bool))
    loss = region_attention_loss(up, safe) + energy_weight * outside_energy(up, safe)
    if sign_weight:
        loss = loss + sign_weight * peak_sign_loss(up, safe)
    return logits, torch.where(has, loss, torch.zeros((), dtype=up.dtype))


def input_gradient_penalty(grads: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Ross et al.'s penalty per image: the sum of squared input gradients outside the region,
    sum((~mask * grad) ** 2), channels summed; grads (N, C, *s), masks (N, *s). Zero when every gradient is inside."""
    outside = (~masks.bool())[:, None].to(grads)
    return ((grads * outside) ** 2).flatten(1).sum(1)


def rrr_loss(model: nn.Module, x: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-image input-gradient penalty): the gradient of the summed log-probabilities with respect to
    the input, kept differentiable (double backpropagation), penalised outside the region (Ross et al. 2017).
    Images whose mask is empty get 0."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    grads, = torch.autograd.grad(F.log_softmax(logits, 1).sum(), x, create_graph=True)
    has = masks.flatten(1).any(1)
    return logits, torch.where(has, input_gradient_penalty(grads, masks), torch.zeros((), dtype=grads.dtype))


def gradient_input_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                        alphas: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, gradient x input of each image's target logit, channels summed, (N, *s)), kept differentiable (double
    backpropagation). On a ReLU network this is LRP-0 (LRP-epsilon with a small epsilon) and the integrand of
    integrated gradients from the zero baseline at the image itself. With `alphas` (N,) the gradient is taken at the
    path point alpha * x instead (still times x): integrated gradients' integrand there, whose mean over alpha
    uniform in [0, 1] is the integrated-gradients map; the logits are then those of the path points."""
    x = x.detach()
    point = (x if alphas is None else alphas.to(x).view(-1, *([1] * (x.dim() - 1))) * x).requires_grad_(True)
    logits = model(point)
    grads, = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), point, create_graph=True)
    return logits, (grads * x).sum(1)


def input_attention_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                         temperature: float = 1.0, alphas: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-image region attention loss of the target's gradient x input map): the map divided by its root mean
    square (so only its shape counts, not its scale), times `temperature`, then -log of its spatial softmax share in
    the region. It asks the pixel-level evidence, not only the last stage's, to peak in the region. Images whose mask
    is empty get 0. With `alphas`, the map at those points of the integrated-gradients path (see gradient_input_maps).
    """
    logits, maps = gradient_input_maps(model, x, targets, alphas)
    flat = maps.flatten(1)
    scale = flat.pow(2).mean(1).add(1e-12).sqrt().view(-1, *([1] * (maps.dim() - 1)))
    has = masks.flatten(1).any(1)
    safe = torch.where(has.view(-1, *([1] * (masks.dim() - 1))), masks.bool(), torch.ones_like(masks, dtype=torch.bool))
    loss = region_attention_loss(temperature * maps / scale, safe)
    return logits, torch.where(has, loss, torch.zeros((), dtype=maps.dtype))


def _token_pass(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], Any]:
    """One forward pass of a vision transformer with graph: (logits, the default Grad-CAM layer's output (the last
    block's first norm, as `medlens explain` picks it), every block's attention probabilities (B, H, N, N) recomputed
    in the graph from the block's own weights, the token layout). The hooks live for this call only."""
    from medlens.core.feature_layout import first_tensor, layout_of
    from medlens.core.layers import resolve_target_layer
    from medlens.core.model_state import HookSet
    from medlens.families.attention import attention_modules, install_recomputation

    layer = resolve_target_layer(model, x[:1].detach())
    modules = attention_modules(model)
    seen: dict[str, Any] = {}
    probabilities: list[torch.Tensor] = []
    hooks = HookSet()
    try:
        install_recomputation(modules, hooks, probabilities)
        hooks.forward(layer.module, lambda module, args, out: seen.update(out=out))
        logits = model(x)
    finally:
        hooks.remove()
    features = first_tensor(seen["out"])
    return logits, features, probabilities, layout_of(model, x, seen["out"], layer.name, layer.module)


def _mass_outside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """-log of the share of a non-negative map's mass inside the region, maps and masks (N, *s)."""
    flat = maps.flatten(1)
    inside = (flat * masks.flatten(1).to(flat)).sum(1)
    return -torch.log(inside.clamp_min(1e-12) / flat.sum(1).clamp_min(1e-12))


def token_maps(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits, {"gradcam", "rollout", "attribution"}: (N, *grid) maps on the patch grid), differentiable (double
    backpropagation): Grad-CAM at the default layer (gradients averaged over the patch tokens, times the tokens,
    summed over channels, before its ReLU), attention rollout (heads averaged, the residual as (A + I) / 2, rows
    renormalised, multiplied through the blocks) and transformer attribution (the positive gradient x attention,
    heads averaged, R <- R + A R from the identity), the class token's row: what `medlens explain` computes for
    gradcam, attention_rollout and transformer_attribution, kept in the graph."""
    from medlens.families.attention import rollout

    logits, features, probs, layout = _token_pass(model, x)
    picked = logits.gather(1, targets[:, None]).sum()
    grads = torch.autograd.grad(picked, [features, *probs], create_graph=True)
    fmap, gmap = layout.to_map(features), layout.to_map(grads[0])  # (N, C, *grid)
    weights = gmap.flatten(2).mean(2)
    gradcam = torch.einsum("nc,nc...->n...", weights, fmap)
    n = probs[0].shape[-1]
    relevance = torch.eye(n, dtype=x.dtype).expand(len(x), n, n)
    for p, g in zip(probs, grads[1:]):
        relevance = relevance + (g * p).clamp_min(0).mean(1) @ relevance
    rows = {"rollout": rollout(probs, "mean", 0.0), "attribution": relevance}
    out = {"gradcam": gradcam}
    for name, r in rows.items():
        source = r[:, 0] if layout.prefix else r.mean(1)
        out[name] = source[:, layout.prefix:].reshape(len(x), *layout.grid)
    return logits, out


def token_guidance_loss(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                        guidance: "Guidance") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-image guided loss of a vision transformer), every map upsampled bilinearly to the masks as
    `medlens explain` does: for "cam", Grad-CAM at the default layer divided by its root mean square (its shape, not
    its scale, counts) times `token_temperature`, under the region attention loss, plus `energy_weight` x its outside
    energy; for "attention", `attention_weight` x (-log the share of the rollout's and of the transformer attribution's
    mass inside the region), each. Images whose mask is empty get 0."""
    logits, maps = token_maps(model, x, targets)
    up = {k: F.interpolate(m[:, None], size=masks.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
          for k, m in maps.items()}
    has = masks.flatten(1).any(1)
    safe = torch.where(has[:, None, None], masks.bool(), torch.ones_like(masks, dtype=torch.bool))
    loss = torch.zeros(len(x), dtype=up["gradcam"].dtype)
    if "cam" in guidance.guide:
        cam = up["gradcam"]
        scale = cam.flatten(1).pow(2).mean(1).add(1e-12).sqrt()[:, None, None]
        loss = loss + region_attention_loss(float(guidance.token_temperature) * cam / scale, safe) \
            + float(guidance.energy_weight) * outside_energy(cam, safe)
    if "attention" in guidance.guide:
        loss = loss + float(guidance.attention_weight) * (_mass_outside(up["rollout"], safe)
                                                          + _mass_outside(up["attribution"], safe))
    return logits, torch.where(has, loss, torch.zeros((), dtype=loss.dtype))


def _mean_over_regions(per_image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A guided loss's batch value: the sum over images divided by the number of images that have a region."""
    return per_image.sum() / masks.flatten(1).any(1).sum().clamp_min(1)


def _pixel_term(name: str, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, masks: torch.Tensor,
                guidance: "Guidance") -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, per-image loss) of a pixel-level guide: "rrr" (Ross et al.'s input-gradient penalty) or "input" (the
    attention loss on gradient x input; at random points of the integrated-gradients path with input_alpha "path")."""
    if name == "rrr":
        return rrr_loss(model, xb, masks)
    alphas = torch.rand(len(xb)) if guidance.input_alpha == "path" else None
    return input_attention_loss(model, xb, yb, masks, float(guidance.input_temperature), alphas)


def guided_step(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, masks: Optional[torch.Tensor],
                guidance: "Guidance", label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One batch's (loss, logits, guided part): cross-entropy (+ guidance.weight x the mean guided loss over images
    with a region). A guide is "cam", a pixel-level term ("rrr", "input"), or "cam+" one of them (the term weighted by
    `<term>_weight`, on the first `<term>_images` images of the batch: double backpropagation costs about 3x). On a
    model without a CAM head (a vision transformer) "cam" is Grad-CAM at its default layer, and "attention" / "cam+
    attention" add its attention rollout and transformer attribution (`token_guidance_loss`). Without masks (an augmentation that loses them) or an inactive guide, the cross-entropy alone."""
    if not guidance.active or masks is None:
        logits = model(xb)
        guided = torch.zeros(())
    elif "attention" in guidance.guide or (guidance.guide == "cam" and not has_cam_head(model)):
        logits, per_image = token_guidance_loss(model, xb, yb, masks, guidance)
        guided = _mean_over_regions(per_image, masks)
    else:
        parts = guidance.guide.split("+")
        pixel = parts[-1] if parts[-1] != "cam" else None
        if parts[0] == "cam":
            logits, per_image = cam_guidance_loss(model, xb, yb, masks, float(guidance.energy_weight),
                                                  float(guidance.sign_weight))
            guided = _mean_over_regions(per_image, masks)
            if pixel is not None:
                k = int(getattr(guidance, f"{pixel}_images") or len(xb))
                _, per = _pixel_term(pixel, model, xb[:k], yb[:k], masks[:k], guidance)
                guided = guided + float(getattr(guidance, f"{pixel}_weight")) * _mean_over_regions(per, masks[:k])
        else:
            logits, per_image = _pixel_term(pixel, model, xb, yb, masks, guidance)
            guided = _mean_over_regions(per_image, masks)
            if guidance.input_alpha == "path" and pixel == "input":  # those were the path points' logits
                logits = model(xb)
    ce = F.cross_entropy(logits, yb, label_smoothing=float(label_smoothing))
    return ce + float(guidance.weight) * guided, logits, float(guided.detach())
