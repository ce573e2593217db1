"""Tests of box guidance on a vision transformer (a tiny seeded HybridViT): the differentiable Grad-CAM, attention
rollout and transformer attribution the guide shapes are the maps `medlens.explain` shows, their gradient is the true
one (against central finite differences in float64), a few guided steps move the maps into the box, and the guide
refuses a model without attention."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import medlens
from medlens.errors import InputError
from medlens.training.guided import guided_step, has_cam_head, token_guidance_loss, token_maps
from medlens.training.recipes import BRAIN_RECIPES, Guidance, ViTNetwork, check_guidance, with_overrides
from medlens.training.weights import build_network

SIZE = 64  # a 4 x 4 token grid


def _vit(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = ViTNetwork(stem_widths=(4, 8, 8), hidden_dim=8, depth=2, heads=2, mlp_dim=8)
    return build_network(net, 3, size=SIZE).to(dtype).eval()


def _box_masks(n: int) -> torch.Tensor:
    masks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    masks[:, 8:30, 36:60] = True
    return masks


def _up(m: torch.Tensor) -> torch.Tensor:
    return F.interpolate(m[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def test_the_guided_maps_are_the_maps_medlens_explain_shows():
    model = _vit()
    x = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2, 1])
    assert not has_cam_head(model)
    _, maps = token_maps(model, x, targets)
    shown = medlens.explain(model, x, methods=["gradcam", "attention_rollout", "transformer_attribution"],
                            targets=targets[:, None].tolist())
    pairs = {"gradcam": _up(maps["gradcam"].clamp_min(0)), "attention_rollout": _up(maps["rollout"]),
             "transformer_attribution": _up(maps["attribution"])}
    for method, ours in pairs.items():
        theirs = shown[method]
        assert torch.allclose(ours.detach(), theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().amax())), method


def test_the_token_guidance_gradient_is_the_true_gradient():
    model = _vit(dtype=torch.float64)
    x = torch.randn(2, 1, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    targets, masks = torch.tensor([1, 2]), _box_masks(2)
    guidance = Guidance("cam+attention", weight=1.0, energy_weight=0.5, attention_weight=2.0)

    def loss() -> torch.Tensor:
        return token_guidance_loss(model, x, targets, masks, guidance)[1].sum()

    params = {"stem": model.conv_proj.layer1[0].conv1.weight, "attention": model.encoder.layers[0].self_attention.in_proj_weight,
              "last norm": model.encoder.layers[-1].ln_1.weight}
    grads = torch.autograd.grad(loss(), list(params.values()))
    for (name, p), g in zip(params.items(), grads):
        index = tuple(int(i) for i in torch.nonzero(g.abs() == g.abs().max())[0])
        h = 1e-6
        values = []
        for step in (h, -2 * h, h):  # the loss takes gradients inside, so it runs with autograd on
            with torch.no_grad():
                p[index] += step
            values.append(float(loss().detach()))
        up, down = values[:2]
        assert (up - down) / (2 * h) == pytest.approx(float(g[index]), rel=1e-4), name


@pytest.mark.usefixtures("one_thread")
def test_a_few_guided_steps_move_every_map_into_the_box():
    model = _vit().train()
    x = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    y, masks = torch.arange(4) % 3, _box_masks(4)
    guidance = Guidance("cam+attention", weight=1.0, energy_weight=1.0)

    def inside() -> dict[str, float]:  # the share of each map's positive mass in the box (0 for no positive mass)
        _, maps = token_maps(model.eval(), x, y)
        ups = {k: _up(m.clamp_min(0)).detach()[:, 0] for k, m in maps.items()}
        return {k: float(((u * masks).flatten(1).sum(1) / u.flatten(1).sum(1).clamp_min(1e-12)).mean())
                for k, u in ups.items()}

    before = inside()  # the box is 13% of the image
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(16):
        model.train()
        loss, logits, guided = guided_step(model, x, y, masks, guidance)
        assert logits.shape == (4, 3) and guided > 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = inside()
    assert after["gradcam"] > 0.3 and after["attribution"] > 0.3, (before, after)
    assert after["rollout"] > before["rollout"] + 0.04, (before, after)


def test_the_attention_guide_needs_a_transformer_and_cam_now_guides_one():
    cnn = with_overrides(BRAIN_RECIPES["brain-tumor-mri-v1"], guide="attention", guide_weight=1.0)
    with pytest.raises(InputError, match="without attention; use --guide cam"):
        check_guidance(cnn, torch.ones(4, dtype=torch.bool), "the train split")
    vit = with_overrides(BRAIN_RECIPES["brain-tumor-mri-vit-v1"], guide="cam", guide_weight=1.0)
    check_guidance(vit, torch.ones(4, dtype=torch.bool), "the train split")  # accepted: Grad-CAM at the token grid
    # with guide "cam" alone the loss is the Grad-CAM term only
    model = _vit()
    x, y, masks = torch.randn(2, 1, SIZE, SIZE), torch.tensor([0, 1]), _box_masks(2)
    cam_only = dataclasses.replace(Guidance("cam", weight=1.0), attention_weight=5.0)
    both = Guidance("cam+attention", weight=1.0, attention_weight=0.0)
    a = token_guidance_loss(model, x, y, masks, cam_only)[1]
    b = token_guidance_loss(model, x, y, masks, both)[1]
    assert torch.allclose(a, b)
