"""Tests of the third brain stage's parts: the peak sign loss, the picture pointing check, the "picture" selection rule,
and training only the head's shared component (the predictions must stay exactly what they were).

The sign loss is checked against its formula and for a gradient where the outside energy has none; the shared-head
run against the softmax's invariance to one shift of every logit, on a tiny seeded network.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from medlens.errors import InputError
from medlens.models.networks import SmallResNet
from medlens.training.guided import class_activation_maps, features_and_logits, guided_step, outside_energy, \
    peak_sign_loss
from medlens.training.recipes import BRAIN_RECIPES, Guidance, Selection
from medlens.training.validation import picture_pointing, selection_key
from medlens.training.weights import share_head_gradient, shared_head_parameters


def _box(size: int = 8) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, 2:5, 2:5] = True
    return mask


def test_peak_sign_loss_is_zero_for_a_positive_peak_in_the_region_and_pushes_a_negative_map_up():
    mask = _box()
    up = torch.full((1, 8, 8), -1.0)
    up[0, 3, 3] = 10.0  # peak in the region, well above the map's root mean square
    assert float(peak_sign_loss(up, mask)) == 0.0
    down = torch.full((1, 8, 8), -2.0, requires_grad=True)  # no positive part: the outside energy is flat here
    rms = 2.0
    assert float(peak_sign_loss(down.detach(), mask)) == pytest.approx(1 + 2.0 / rms)
    (grad,) = torch.autograd.grad(peak_sign_loss(down, mask).sum(), down)
    assert grad.abs().sum() > 0
    flat = torch.full((1, 8, 8), -2.0, requires_grad=True)
    (none,) = torch.autograd.grad(outside_energy(flat, mask).sum(), flat)
    assert none.abs().sum() == 0  # what the sign term adds: a gradient where the picture is blank
    outside_peak = torch.zeros(1, 8, 8)
    outside_peak[0, 7, 7] = 5.0  # positive only outside the region: the peak in the region is 0
    assert float(peak_sign_loss(outside_peak, mask)) == pytest.approx(1.0)


def test_picture_pointing_misses_a_blank_picture_that_the_argmax_would_hit():
    mask = _box().expand(3, 8, 8)
    maps = torch.full((3, 8, 8), -3.0)
    maps[0, 3, 3] = -0.5  # argmax in the region, but no positive part: a blank picture
    maps[1, 3, 3] = 0.5
    maps[2, 7, 7] = 0.5
    assert picture_pointing(maps, mask).tolist() == [0.0, 1.0, 0.0]
    assert torch.isnan(picture_pointing(maps[:1], torch.zeros(1, 8, 8, dtype=torch.bool))).all()


def test_the_picture_rule_ranks_the_picture_pointing_before_the_pixel_maps():
    base = {"centre pointing_game": 0.5, "prior energy_in_box": 0.1}
    checks = {"pointing_game": 0.9, "energy_in_box": 0.5, "input_pointing_game": 0.7, "integrated_pointing_game": 0.5}
    rule = Selection("picture", val_accuracy_floor=0.92)
    sharper_picture = dict(checks, picture_pointing_game=0.7, input_pointing_game=0.65)
    blurrier_picture = dict(checks, picture_pointing_game=0.6)
    assert selection_key(rule, sharper_picture, base, 0.92, 0.3) > selection_key(rule, blurrier_picture, base, 0.92, 0.3)
    assert selection_key(rule, blurrier_picture, base, 0.92, 0.3) > selection_key(rule, sharper_picture, base, 0.91, 0.3)


def test_training_the_shared_head_changes_the_maps_and_keeps_every_probability():
    torch.manual_seed(0)
    model = SmallResNet(num_classes=3, in_channels=1, widths=(4, 8, 8, 8), last_stride=1).eval()
    x = torch.randn(6, 1, 32, 32)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    masks = torch.zeros(6, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 8:20] = True
    with torch.no_grad():
        before = torch.softmax(model(x), 1)
        cams_before = class_activation_maps(features_and_logits(model, x)[0], model.fc, y)
    start = model.fc.weight.detach().clone()
    params = shared_head_parameters(model)
    assert [p.requires_grad for p in model.parameters()].count(True) == 1
    opt = torch.optim.Adam(params, lr=0.05)
    guidance = Guidance("cam", weight=1.0, energy_weight=2.0, sign_weight=4.0)
    for _ in range(5):
        loss, _, _ = guided_step(model, x, y, masks, guidance)
        opt.zero_grad()
        loss.backward()
        share_head_gradient(model)
        opt.step()
    moved = model.fc.weight.detach() - start
    assert moved.abs().max() > 1e-3 and torch.allclose(moved, moved[:1].expand_as(moved), atol=1e-7)
    with torch.no_grad():
        after = torch.softmax(model(x), 1)
        cams_after = class_activation_maps(features_and_logits(model, x)[0], model.fc, y)
    assert torch.allclose(after, before, atol=1e-6)
    assert (cams_after - cams_before).abs().max() > 1e-3


def test_a_shared_head_recipe_with_weight_decay_or_moving_batchnorm_is_refused():
    recipe = BRAIN_RECIPES["brain-tumor-mri"]
    assert recipe.tune == "shared-head" and recipe.optimiser.weight_decay == 0
    with pytest.raises(InputError, match="weight_decay 0"):
        dataclasses.replace(recipe, optimiser=dataclasses.replace(recipe.optimiser, weight_decay=0.05))
    with pytest.raises(InputError, match="freeze_batchnorm"):
        dataclasses.replace(recipe, optimiser=dataclasses.replace(recipe.optimiser, freeze_batchnorm=False))
    with pytest.raises(InputError, match="linear `fc`"):
        shared_head_parameters(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))


def test_the_weight_average_keeps_a_frozen_tensor_exactly_and_averages_a_moved_one():
    from medlens.training.weights import WeightAverage

    torch.manual_seed(1)
    model = torch.nn.Linear(7, 3)
    frozen = model.bias.detach().clone()
    average = WeightAverage(model, decay=0.99)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(50):
        average.update(model)
    assert torch.equal(average.state["bias"], frozen)  # 0.99 * b + 0.01 * b would round it
    expected = model.weight.detach() - 0.99 ** 50 * (model.weight.detach() - start)
    assert torch.allclose(average.state["weight"], expected, atol=1e-5)
