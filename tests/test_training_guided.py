"""Tests of explanation-guided training: the guided losses, lesion-keeping crops, refusals, and a shortcut model fixed.

The losses are checked against direct formulas and axioms; the crops against an independent inverse of each affine
map; the phantom test trains a shortcut model with and without guidance and measures where Grad-CAM falls.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

import medlens
from medlens.data.figshare import CLASSES
from medlens.data.phantom import phantom_2d
from medlens.errors import InputError
from medlens.evaluation import energy_in_box, pointing_game
from medlens.models.networks import PhantomCNN, SmallResNet
from medlens.training.augment import lesion_crops, region_extent
from medlens.cli.train import train_command
from medlens.training.guided import (class_activation_maps, features_and_logits, gradient_input_maps, guided_step,
                                     input_attention_loss, input_gradient_penalty, outside_energy, region_attention_loss,
                                     rrr_loss)
from medlens.training.loop import train_phantom
from medlens.training.recipes import Guidance, phantom_data, phantom_prepare


def _square_mask(size: int = 16, lo: int = 4, hi: int = 9) -> torch.Tensor:
    m = torch.zeros(1, size, size, dtype=torch.bool)
    m[0, lo:hi, lo:hi] = True
    return m


def test_outside_energy_is_zero_inside_and_grows_as_mass_moves_out():
    mask = _square_mask()
    inside = torch.nonzero(mask[0])
    outside = torch.nonzero(~mask[0])
    values = []
    for k in range(0, 11):  # 10 unit masses; k of them moved from inside to outside
        m = torch.zeros(1, 16, 16)
        for i in range(10 - k):
            m[0, inside[i, 0], inside[i, 1]] += 1.0
        for i in range(k):
            m[0, outside[i, 0], outside[i, 1]] += 1.0
        m[0, 0, 15] -= 5.0  # negative values never count
        values.append(float(outside_energy(m, mask)[0]))
    assert values[0] == 0.0
    assert values == pytest.approx([k / 10 for k in range(11)], abs=1e-6)
    assert float(outside_energy(-torch.ones(1, 16, 16), mask)[0]) == 1.0  # pointing nowhere is no way out
    # it is exactly 1 - energy_in_box, the evaluation metric
    m = torch.rand(3, 16, 16) - 0.3
    masks = _square_mask().expand(3, -1, -1)
    assert torch.allclose(outside_energy(m, masks), 1 - energy_in_box(m[:, None], masks)[:, 0], atol=1e-6)


def test_region_attention_loss_falls_to_zero_inside_and_grows_as_mass_moves_out():
    mask = _square_mask()
    area = int(mask.sum())
    flat = torch.zeros(1, 16, 16)
    assert float(region_attention_loss(flat, mask)[0]) == pytest.approx(math.log(256 / area))  # flat: chance
    assert float(region_attention_loss(flat - 7.0, mask)[0]) == pytest.approx(math.log(256 / area))  # no shift helps
    peaked = flat.clone()
    peaked[0, 4:9, 4:9] = 40.0
    assert float(region_attention_loss(peaked, mask)[0]) < 1e-12
    outside = torch.nonzero(~mask[0])
    previous = -1.0
    for k in range(0, 40, 5):  # move part of the peak out of the region, pixel by pixel
        moved = peaked.clone()
        for i in range(k):
            moved[0, outside[i, 0], outside[i, 1]] = 40.0
        value = float(region_attention_loss(moved, mask)[0])
        assert value > previous
        assert value == pytest.approx(math.log((area + k) / area), abs=1e-5)
        previous = value


def test_input_gradient_penalty_is_zero_inside_and_grows_as_mass_moves_out():
    mask = _square_mask()
    g = torch.zeros(1, 1, 16, 16)
    g[0, 0, 5:8, 5:8] = torch.randn(3, 3)
    assert float(input_gradient_penalty(g, mask)[0]) == 0.0
    previous = 0.0
    for step in range(1, 6):  # move a growing part of the squared gradient mass out of the region
        moved = g.clone()
        moved[0, 0, 12, 12] = float(step)
        value = float(input_gradient_penalty(moved, mask)[0])
        assert value == pytest.approx(step ** 2) and value > previous
        previous = value


def test_rrr_loss_of_a_linear_model_reads_where_its_weights_are():
    mask = _square_mask(lo=3, hi=10)
    w_inside = torch.randn(2, 1, 16, 16) * mask[:, None]
    x = torch.rand(4, 1, 16, 16)
    masks = mask.expand(4, -1, -1)

    class Linear(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = nn.Parameter(w)

        def forward(self, v):
            return torch.einsum("bchw,kchw->bk", v, self.w)

    _, penalty = rrr_loss(Linear(w_inside), x, masks)
    assert torch.allclose(penalty, torch.zeros(4), atol=1e-12)
    w_out = w_inside.clone()
    w_out[0, 0, 14, 1] = 3.0  # one weight outside: class 0 minus the probability-weighted mean, squared
    logits, penalty = rrr_loss(Linear(w_out), x, masks)
    p = torch.softmax(logits.detach(), 1)
    expected = (3.0 * (1 - 2 * p[:, 0])) ** 2  # d/dx (log p0 + log p1) at that pixel = w0 - 2 (p0 w0 + p1 w1), w1 = 0
    assert torch.allclose(penalty.detach(), expected, rtol=1e-4)
    penalty.sum().backward()  # differentiable with respect to the weights (double backpropagation)


class _Linear(nn.Module):
    """logits_k = sum(w_k * x): its gradient x input map for class k is exactly w_k * x."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", v, self.w)


def test_gradient_input_map_is_medlens_input_x_gradient_and_differentiable():
    torch.manual_seed(1)
    w, x, targets = torch.randn(3, 2, 16, 16), torch.rand(4, 2, 16, 16), torch.tensor([0, 2, 1, 2])
    model = _Linear(w)
    logits, maps = gradient_input_maps(model, x, targets)
    assert torch.allclose(maps, (w[targets] * x).sum(1), atol=1e-6)  # the definition
    maps.sum().backward()  # differentiable with respect to the weights (double backpropagation)
    assert model.w.grad is not None and float(model.w.grad.abs().sum()) > 0
    cnn = PhantomCNN(widths=(4, 8)).eval()
    x = torch.rand(3, 1, 24, 24)
    _, maps = gradient_input_maps(cnn, x, targets[:3].clamp_max(1))
    ref = medlens.explain(cnn, x, methods="inputxgradient", targets=[[0], [1], [1]])["inputxgradient"][:, 0]
    assert torch.allclose(maps.detach(), ref, atol=1e-5 * float(ref.abs().max()))  # what medlens shows


def test_input_attention_loss_is_small_inside_grows_as_weight_moves_out_and_ignores_scale():
    mask = _square_mask(lo=3, hi=10)
    x = torch.tensor([0.7, 1.3]).view(2, 1, 1, 1).expand(2, 1, 16, 16)  # per-image constant: the map is w times it
    masks = mask.expand(2, -1, -1)
    targets = torch.tensor([0, 0])
    inside = torch.zeros(1, 1, 16, 16)
    inside[0, 0, 4:9, 4:9] = 1.0
    outside = torch.nonzero(~mask[0])
    previous = -1.0
    for k in range(0, 30, 6):  # weight moved pixel by pixel from inside the region to outside
        w = inside.clone()
        for i in range(k):
            w[0, 0, outside[i, 0], outside[i, 1]] = 1.0
        _, loss = input_attention_loss(_Linear(w), x, targets, masks, temperature=8.0)
        maps = w[0, 0] * x[:, 0]
        z = 8.0 * maps / maps.pow(2).flatten(1).mean(1).sqrt()[:, None, None]
        assert torch.allclose(loss.detach(), region_attention_loss(z, masks), atol=1e-5)  # the formula
        assert float(loss.detach().min()) > previous  # grows as the evidence leaves the region
        previous = float(loss.detach().max())
        if k == 0:
            assert float(loss.detach().max()) < 0.05  # all evidence inside: near zero
            _, scaled = input_attention_loss(_Linear(w * 1000), x, targets, masks, temperature=8.0)
            assert torch.allclose(scaled, loss, atol=1e-5)  # only the map's shape counts
    _, none = input_attention_loss(_Linear(inside), x, targets, torch.zeros_like(masks))
    assert torch.equal(none.detach(), torch.zeros(2))  # no region: no loss


def test_class_activation_map_is_gradcam_at_the_last_stage():
    torch.manual_seed(0)
    model = PhantomCNN(widths=(8, 16, 32)).eval()
    x = torch.rand(3, 1, 32, 32)
    targets = torch.tensor([0, 1, 1])
    feats, logits = features_and_logits(model, x)
    cam = class_activation_maps(feats, model.fc, targets)
    # the logit is the grid average of the CAM plus the bias
    assert torch.allclose(cam.flatten(1).mean(1) + model.fc.bias[targets], logits[torch.arange(3), targets], atol=1e-5)
    ref = medlens.explain(model, x, methods="gradcam", targets=[[int(t)] for t in targets], layer="features")["gradcam"][:, 0]
    # medlens' Grad-CAM (raw, signed, upsampled bilinearly) is the CAM divided by the number of grid cells
    up = torch.nn.functional.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(up / cam[0].numel(), ref, atol=1e-3 * float(ref.abs().max()))


def test_lesion_crops_keep_every_lesion_pixel_in_view():
    cases = phantom_2d(64, size=48, seed=11, positive_rate=1.0)
    masks = cases.lesion_masks[:, 0]
    gen = torch.Generator().manual_seed(0)
    images, warped, theta = lesion_crops(cases.images, masks, gen, scale=(0.3, 0.6), rotate_deg=15)
    assert images.shape == cases.images.shape and float(images.min()) >= 0 and float(images.max()) <= 1
    h = masks.shape[-1]
    zoomed = 0
    for i in range(len(masks)):
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        # every lesion pixel's corners, mapped back to output coordinates by the inverse of this crop's affine map
        corners = torch.cat([torch.stack([(xs + dx) / h * 2 - 1, (ys + dy) / h * 2 - 1], 1) for dx in (0, 1) for dy in (0, 1)])
        a, t = theta[i, :, :2].double(), theta[i, :, 2].double()
        u = torch.linalg.solve(a, (corners.double() - t).T).T
        assert float(u.abs().max()) <= 1 + 1e-6, i
        assert bool(warped[i].any())
        zoomed += float(theta[i, 0, :2].norm()) < 0.7
    assert zoomed > 32  # these are real crops (most zoom in by more than 1.4x), not the whole image
    # the check can fail: a crop of the opposite corner loses the lesion
    far = region_extent(masks[:1])
    centre = -far[0, :2].sign() * 0.6
    bad = torch.tensor([[[0.3, 0.0, float(centre[0])], [0.0, 0.3, float(centre[1])]]])
    _, lost, _ = lesion_crops(cases.images[:1], masks[:1], gen, theta=bad)
    assert not bool(lost.any())


@pytest.mark.parametrize("second", ["rrr", "input"])
def test_cam_plus_a_pixel_term_adds_its_weighted_loss_of_the_first_images(second):
    torch.manual_seed(0)
    model = PhantomCNN(widths=(4, 8)).eval()
    x, y = torch.rand(4, 1, 16, 16), torch.tensor([0, 1, 1, 0])
    masks = _square_mask().expand(4, -1, -1)
    base = Guidance("cam", weight=0.5, energy_weight=2.0)
    cam_total, _, cam_part = guided_step(model, x, y, masks, base)
    extra = {f"{second}_weight": 3.0, f"{second}_images": 2, "input_temperature": 2.0}
    both, _, both_part = guided_step(model, x, y, masks, dataclasses.replace(base, guide=f"cam+{second}", **extra))
    if second == "rrr":
        _, term = rrr_loss(model, x[:2], masks[:2])
    else:
        _, term = input_attention_loss(model, x[:2], y[:2], masks[:2], temperature=2.0)
    assert both_part == pytest.approx(cam_part + 3.0 * float(term.mean()), rel=1e-5)
    assert float(both) == pytest.approx(float(cam_total) + 0.5 * 3.0 * float(term.mean()), rel=1e-5)
    alone, logits, alone_part = guided_step(model, x, y, masks, dataclasses.replace(base, guide=second, input_temperature=2.0))
    _, term = rrr_loss(model, x, masks) if second == "rrr" else input_attention_loss(model, x, y, masks, temperature=2.0)
    assert alone_part == pytest.approx(float(term.mean()), rel=1e-5)  # alone: the term itself, unweighted
    assert float(alone) == pytest.approx(float(F.cross_entropy(logits, y)) + 0.5 * float(term.mean()), rel=1e-5)


def _box_less_folder(root: Path) -> Path:
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for n in (1 + k, 31 + k, 151 + k):  # one slice per split
            Image.fromarray(torch.full((16, 16), 40 + n % 200, dtype=torch.uint8).numpy()).save(root / name / f"{n}.jpg")
    return root


def test_guided_training_without_boxes_is_refused_before_training(tmp_path):
    data = _box_less_folder(tmp_path / "data")
    out = tmp_path / "out"
    result = CliRunner().invoke(train_command, ["brain-tumor-mri", "--data", str(data), "--out", str(out), "--guide", "cam",
                                                "--augment", "affine", "--init", "none", "--size", "16", "--threads", "1"])
    assert isinstance(result.exception, InputError), result.output
    assert "--guide cam" in str(result.exception) and "box" in str(result.exception)
    assert not (out / "brain-tumor-mri.pt").exists() and not (out / "brain-tumor-mri.train.log").exists()
    result = CliRunner().invoke(train_command, ["brain-tumor-mri", "--data", str(data), "--out", str(out), "--guide", "none",
                                                "--augment", "lesion-crop", "--init", "none", "--size", "16"])
    assert isinstance(result.exception, InputError) and "--augment lesion-crop" in str(result.exception)
    result = CliRunner().invoke(train_command, ["brain-tumor-mri-v1", "--data", str(data), "--out", str(out),
                                                "--inpaint-region", "--init", "none", "--size", "16"])
    assert isinstance(result.exception, InputError) and "--inpaint-region" in str(result.exception), result.output
    assert not (out / "brain-tumor-mri-v1.train.log").exists()


def _gradcam_energy(model: nn.Module, region: str) -> float:
    cases = phantom_data("phantom-shortcut", "test", n=80)
    keep = cases.labels == 1
    x = phantom_prepare(cases.images[keep])
    masks = (cases.marker_masks if region == "marker" else cases.lesion_masks)[keep][:, 0]
    maps = medlens.explain(model, x, methods="gradcam", targets=1, layer="features")["gradcam"]
    return float(energy_in_box(maps, masks).mean())


def test_cam_guidance_moves_a_shortcut_models_maps_from_the_marker_to_the_lesion():
    small = {"n_train": 480, "n_val": 120, "epochs": 5, "batch_size": 32, "widths": (8, 16, 32)}
    plain = train_phantom("phantom-shortcut", None, threads=1, log=lambda s: None, **small)["model"]
    guided = train_phantom("phantom-shortcut", None, threads=1, log=lambda s: None, guide="cam", guide_weight=2.0,
                           **small)["model"]
    before = {r: _gradcam_energy(plain, r) for r in ("marker", "lesion")}
    after = {r: _gradcam_energy(guided, r) for r in ("marker", "lesion")}
    assert before["marker"] > before["lesion"], before  # the shortcut, as shown by Grad-CAM
    assert after["lesion"] > after["marker"], after  # guided: the map sits on the lesion
    assert after["lesion"] > 3 * before["lesion"] and after["marker"] < before["marker"] / 2, (before, after)


def _input_peak_hits(model: nn.Module, region: str, contrast: tuple[float, float]) -> float:
    cases = phantom_data("phantom-shortcut", "test", n=80, lesion_contrast=contrast)
    keep = cases.labels == 1
    x = phantom_prepare(cases.images[keep])
    masks = (cases.marker_masks if region == "marker" else cases.lesion_masks)[keep][:, 0]
    maps = medlens.explain(model, x, methods="inputxgradient", targets=1)["inputxgradient"]
    return float(pointing_game(maps, masks).mean())


def test_input_guidance_moves_a_shortcut_models_pixel_maps_from_the_marker_to_the_lesion():
    # a visible lesion beside the class-tracking corner marker: the plain model's pixel maps peak on the marker
    small = {"n_train": 480, "n_val": 120, "epochs": 5, "batch_size": 32, "widths": (8, 16, 32), "lesion_contrast": (0.18, 0.3)}
    plain = train_phantom("phantom-shortcut", None, threads=1, log=lambda s: None, **small)["model"]
    guided = train_phantom("phantom-shortcut", None, threads=1, log=lambda s: None, guide="input", guide_weight=1.0,
                           **small)["model"]
    before = {r: _input_peak_hits(plain, r, small["lesion_contrast"]) for r in ("marker", "lesion")}
    after = {r: _input_peak_hits(guided, r, small["lesion_contrast"]) for r in ("marker", "lesion")}
    assert before["marker"] > 0.8 and before["lesion"] < 0.2, before  # the shortcut, as input x gradient shows it
    assert after["marker"] < 0.2 and after["lesion"] > 0.5, (before, after)  # guided: the peak is on the lesion


def test_small_resnet_last_stride_doubles_the_grid_with_the_same_parameters():
    coarse, fine = SmallResNet(), SmallResNet(last_stride=1)
    fine.load_state_dict(coarse.state_dict())
    x = torch.zeros(1, 1, 160, 160)
    assert features_and_logits(coarse.eval(), x)[0].shape[-1] == 5
    assert features_and_logits(fine.eval(), x)[0].shape[-1] == 10


def test_inpainting_removes_what_is_inside_the_region_and_keeps_the_rest():
    from medlens.training.augment import inpaint_regions

    torch.manual_seed(0)
    cases = phantom_2d(6, size=48, seed=5, positive_rate=1.0)
    x, masks = cases.images, cases.lesion_masks[:, 0]
    filled = inpaint_regions(x, masks)
    assert torch.equal(filled[~masks[:, None].expand_as(x)], x[~masks[:, None].expand_as(x)])  # outside untouched
    other = x.clone()
    other[masks[:, None].expand_as(x)] = torch.rand(int(masks.sum()))  # whatever is inside ...
    assert torch.allclose(inpaint_regions(other, masks), filled)  # ... the fill never reads it
    for i in range(len(x)):  # a weighted mean of the pixels outside: within their range
        outside = x[i, 0][~masks[i]]
        inside = filled[i, 0][masks[i]]
        assert float(inside.min()) >= float(outside.min()) - 1e-6 and float(inside.max()) <= float(outside.max()) + 1e-6
    # a bright lesion on a smooth ramp: the fill follows the ramp (the lesion is gone)
    ramp = torch.linspace(0.1, 0.5, 40).view(1, 1, 1, 40).expand(1, 1, 40, 40).clone()
    lesion = _square_mask(40, 15, 25)
    bright = torch.where(lesion[:, None], torch.tensor(0.95), ramp)
    assert float((inpaint_regions(bright, lesion) - ramp).abs().max()) < 0.03
    flat = torch.full((1, 1, 20, 20), 0.3)
    assert torch.allclose(inpaint_regions(flat, _square_mask(20, 2, 18)), flat)  # a constant image stays constant
