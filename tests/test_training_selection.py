"""The integrated-gradients path term of the input-guided loss, the validation checks and the rule an epoch is kept by.

Values are checked against medlens' own integrated gradients (an independent quadrature code path) and by definition.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medlens
from medlens.errors import InputError
from medlens.evaluation import energy_in_box, pointing_game
from medlens.families.integrated import gauss_legendre
from medlens.training.guided import gradient_input_maps, input_attention_loss
from medlens.training.recipes import Selection
from medlens.training.validation import input_localisation, selection_key
from medlens.training.weights import init_weights


def _cnn() -> nn.Module:
    """A small ReLU network with biases (without them it is positively homogeneous and every path point has the same
    gradient, so integrated gradients would equal gradient x input and the path term would test nothing)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        for module in net:
            if getattr(module, "bias", None) is not None:
                module.bias.normal_(0, 0.5)
    return net.eval()


def test_path_maps_average_to_medlens_integrated_gradients():
    cnn, x, targets = _cnn(), torch.rand(3, 1, 24, 24), torch.tensor([0, 1, 1])
    alphas, weights = gauss_legendre(8, dtype=torch.float32)
    mean = sum(w * gradient_input_maps(cnn, x, targets, torch.full((3,), float(a)))[1].detach()
               for a, w in zip(alphas, weights))
    ref = medlens.explain(cnn, x, methods="integratedgradients", targets=[[0], [1], [1]],
                          n_steps=8, baseline="zero")["integratedgradients"][:, 0]
    assert torch.allclose(mean, ref, atol=1e-4 * float(ref.abs().max()))
    # at alpha = 1 the path map is gradient x input; at another alpha it is a different map of the same image
    _, at_one = gradient_input_maps(cnn, x, targets, torch.ones(3))
    plain = gradient_input_maps(cnn, x, targets)[1].detach()
    _, at_half = gradient_input_maps(cnn, x, targets, torch.full((3,), 0.5))
    scale = float(plain.abs().max())
    assert float((at_one - plain).abs().max()) <= 1e-6 * scale < 1e-2 * scale < float((at_half - plain).abs().max())


def test_path_loss_is_differentiable_and_zero_free_only_when_the_region_holds_the_evidence():
    cnn, x, targets = _cnn(), torch.rand(2, 1, 24, 24), torch.tensor([0, 1])
    masks = torch.zeros(2, 24, 24, dtype=torch.bool)
    masks[:, 6:14, 6:14] = True
    _, loss = input_attention_loss(cnn, x, targets, masks, alphas=torch.tensor([0.3, 0.9]))
    assert loss.shape == (2,) and bool((loss > 0).all())
    loss.sum().backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in cnn.parameters())
    everywhere = torch.ones_like(masks)
    _, none_outside = input_attention_loss(cnn, x, targets, everywhere, alphas=torch.tensor([0.3, 0.9]))
    assert torch.allclose(none_outside, torch.zeros(2), atol=1e-5)


def test_validation_checks_score_the_definition_maps_with_the_evaluation_metrics():
    cnn, x, targets = _cnn(), torch.rand(70, 1, 24, 24), torch.randint(0, 2, (70,))  # 70: two chunks of 64
    masks = torch.zeros(70, 24, 24, dtype=torch.bool)
    masks[:35, 2:10, 2:10] = True
    masks[35:, 12:22, 10:20] = True
    for steps in (0, 8):  # gradient x input; integrated gradients as the Gauss-Legendre mean of x * grad(alpha x)
        alphas, weights = gauss_legendre(steps, dtype=torch.float32) if steps else (torch.ones(1), torch.ones(1))
        maps = sum(w * gradient_input_maps(cnn, x, targets, torch.full((70,), float(a)))[1].detach()
                   for a, w in zip(alphas, weights))[:, None]
        checks = input_localisation(cnn, x, targets, masks, n_steps=steps)
        assert checks["pointing_game"] == pytest.approx(float(pointing_game(maps, masks).nanmean()))
        assert checks["energy_in_box"] == pytest.approx(float(energy_in_box(maps, masks).nanmean()), abs=1e-4)


BASE = {"centre pointing_game": 0.5, "prior energy_in_box": 0.1}
GOOD = {"pointing_game": 0.7, "energy_in_box": 0.3, "input_pointing_game": 0.6}


def test_selection_key_orders_epochs_by_the_stated_rule():
    unguided = Selection()
    assert selection_key(unguided, {}, {}, 0.93, 0.2) > selection_key(unguided, {}, {}, 0.92, 0.1)
    guided = Selection()  # the checks of a guided run, kept by accuracy
    fails_cam = dict(GOOD, pointing_game=0.55)
    fails_pixel = dict(GOOD, input_pointing_game=0.5)  # a tie with the centre does not beat it
    assert selection_key(guided, GOOD, BASE, 0.90, 0.3) > selection_key(guided, fails_cam, BASE, 0.95, 0.1)
    assert selection_key(guided, GOOD, BASE, 0.90, 0.3) > selection_key(guided, fails_pixel, BASE, 0.95, 0.1)
    assert selection_key(guided, GOOD, BASE, 0.93, 0.3) > selection_key(guided, GOOD, BASE, 0.92, 0.1)
    pixel = Selection("pixel", val_accuracy_floor=0.92)
    sharper = dict(GOOD, input_pointing_game=0.65)
    by_ig = dict(GOOD, integrated_pointing_game=0.8)
    assert selection_key(pixel, sharper, BASE, 0.92, 0.3) > selection_key(pixel, GOOD, BASE, 0.95, 0.1)
    assert selection_key(pixel, GOOD, BASE, 0.92, 0.3) > selection_key(pixel, sharper, BASE, 0.91, 0.1)  # the floor
    assert selection_key(pixel, by_ig, BASE, 0.92, 0.3) > selection_key(pixel, sharper, BASE, 0.92, 0.3)
    assert selection_key(pixel, GOOD, BASE, 0.93, 0.3) > selection_key(pixel, GOOD, BASE, 0.92, 0.1)


def test_a_two_stage_recipe_needs_its_first_stage_in_the_out_folder(tmp_path):
    from medlens.models.networks import SmallResNet
    from medlens.training.recipes import BRAIN_RECIPES
    from medlens.training.weights import save_state

    first = next(name for name in BRAIN_RECIPES if name == "brain-tumor-mri-v3")
    model = SmallResNet(num_classes=3, in_channels=1, widths=(4, 8, 8, 8), last_stride=1)
    with pytest.raises(InputError, match=f"medlens train {first}"):
        init_weights(model, first, tmp_path)
    torch.manual_seed(5)
    trained = SmallResNet(num_classes=3, in_channels=1, widths=(4, 8, 8, 8), last_stride=1)
    save_state(trained, tmp_path / f"{first}.pt")
    init_weights(model, first, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))


def test_input_alpha_is_refused_without_an_input_guide_before_training(tmp_path):
    from click.testing import CliRunner

    from medlens.cli.train import train_command

    out = tmp_path / "out"
    result = CliRunner().invoke(train_command, ["phantom-lesion", "--out", str(out), "--guide", "cam", "--input-alpha", "path",
                                                "--epochs", "1", "--threads", "1"])
    assert isinstance(result.exception, InputError) and "--input-alpha" in str(result.exception), result.output
    assert not out.exists() or not any(out.iterdir())


def test_the_second_stage_without_the_first_is_refused_before_anything_is_written(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from medlens.data.figshare import CLASSES
    from medlens.cli.train import train_command

    data = tmp_path / "data"
    for k, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for n in (1 + k, 31 + k, 151 + k):  # one slice per split
            Image.fromarray(torch.full((16, 16), 40 + n, dtype=torch.uint8).numpy()).save(data / name / f"{n}.jpg")
    out = tmp_path / "out"
    result = CliRunner().invoke(train_command, ["brain-tumor-mri-v4", "--data", str(data), "--out", str(out), "--guide", "none",
                                                "--augment", "affine", "--size", "16", "--threads", "1"])
    assert isinstance(result.exception, InputError), result.output
    assert "medlens train brain-tumor-mri-v3" in str(result.exception)
    assert not out.exists()
