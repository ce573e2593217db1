"""The bundled `phantom-lesion-unet`: offline loading as a segmentation model, its Dice on fresh test phantoms against
the exact lesion masks, its card, explanations of its predicted lesion, and its recipe through the training loop."""
from __future__ import annotations

import json

import pytest
import torch

import medlens
from medlens.core.model_description import describe
from medlens.data.phantom import phantom_2d
from medlens.errors import MethodError
from medlens.models import zoo
from medlens.training.recipes import SEGMENTATION_RECIPES, phantom_prepare, with_overrides
from medlens.training.segmentation import dice_scores

NAME = "phantom-lesion-unet"


@pytest.fixture(scope="module")
def unet():
    return medlens.load_model(NAME)


@pytest.fixture(scope="module")
def phantoms():
    return phantom_2d(24, size=64, seed=3, marker="none")  # the card's test seed, its first 24 cases


def test_loads_offline_as_a_small_segmentation_model(unet):
    info = zoo.bundled_models()[NAME]
    assert describe(unet).task == "segmentation" and info["task"] == "segmentation"
    assert unet.labels == ["background", "lesion"]
    assert info["weights"].stat().st_size < 1_000_000
    card = info["card"].read_text()
    assert "not for diagnosis" in card.lower() and "research and teaching" in card
    dice = json.loads(zoo.SPEC_FILE.read_text())[NAME]["test_dice"]
    assert f"{dice:.3f}" in card


def test_dice_on_test_phantoms_is_near_the_card(phantoms, unet):
    scores = dice_scores(unet, phantoms.images, phantoms.lesion_masks)
    assert scores["n_lesion"] >= 8
    assert scores["dice_mean"] >= 0.8  # the card: 0.908 on 200 lesion phantoms
    assert scores["normal_false_positive_rate"] <= 0.25  # the card: 3.0% of 200; here a dozen normal slices


def test_explains_its_predicted_lesion_and_refuses_a_normal_slice(phantoms, unet):
    lesion = int(torch.nonzero(phantoms.labels == 1)[0])
    x = phantom_prepare(phantoms.images[lesion:lesion + 1])
    result = medlens.explain(unet, x, methods=["gradcam", "integratedgradients"], targets="lesion", n_steps=128)
    assert result.target_names() == [["lesion@predicted"]]
    mask = phantoms.lesion_masks[lesion, 0]
    assert bool(mask.flatten()[result["gradcam"][0, 0].flatten().argmax()])  # Grad-CAM's peak in the true lesion
    gap = result.provenance["methods"]["integratedgradients"]["completeness"]["relative_gap"][0][0]
    assert gap < 0.05
    normal = next(i for i in range(len(phantoms)) if phantoms.labels[i] == 0
                  and not bool(unet(phantom_prepare(phantoms.images[i:i + 1])).argmax(1).any()))
    with pytest.raises(MethodError, match="found nothing for 'lesion'"):
        medlens.explain(unet, phantom_prepare(phantoms.images[normal:normal + 1]), targets="lesion")


def test_its_recipe_runs_through_the_training_loop(tmp_path):
    from medlens.training.loop import train

    recipe = with_overrides(SEGMENTATION_RECIPES[NAME], epochs=1, n_train=64, n_val=16, n_test=16)
    summary = train(recipe, tmp_path, threads=1, log=lambda line: None)
    assert (tmp_path / f"{NAME}.pt").is_file() and (tmp_path / f"{NAME}.metrics.json").is_file()
    assert 0.0 <= summary["test"]["dice_mean"] <= 1.0 and summary["task"] == "segmentation"
