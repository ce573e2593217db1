"""The one training loop and its typed recipes: a tiny seeded phantom run gives the numbers the two separate loops
gave before they were merged, and a recipe's flat record (log, metrics file, model card) reads back into the recipe.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from medlens.errors import InputError
from medlens.training.loop import train_phantom
from medlens.training.recipes import BRAIN_RECIPES, PHANTOM_RECIPES, Guidance, recipe_record, with_overrides

#: from the loop before the merge (`train_phantom` of commit c5ed45c), same call, 1 thread: per epoch (train loss, val
#: loss, val accuracy), then the sum, the norm and the first 50 values' sum of the kept float weights, and their count
OLD_HISTORY = [(6.055939316749573, 0.8076890707015991, 0.40625), (5.766788721084595, 0.8258930444717407, 0.40625)]
OLD_WEIGHTS = (65.18102685973281, 8.634021220382612, 3.6592653973493725, 2374)


def test_a_tiny_guided_phantom_run_matches_the_loop_before_the_merge():
    out = train_phantom("phantom-lesion", None, epochs=2, threads=1, log=lambda s: None, guide="cam", guide_weight=1.0,
                        augment="lesion-crop", n_train=64, n_val=32, batch_size=16, widths=(4, 8, 8))
    got = [(h["train_loss"], h["val_loss"], h["val_acc"]) for h in out["history"]]
    assert got == pytest.approx(OLD_HISTORY, rel=1e-5)  # identical on the machine that recorded them
    flat = torch.cat([v.double().flatten() for v in out["model"].state_dict().values() if v.is_floating_point()])
    assert (float(flat.sum()), float(flat.norm()), float(flat[:50].sum())) == pytest.approx(OLD_WEIGHTS[:3], rel=1e-5)
    assert flat.numel() == OLD_WEIGHTS[3]


def test_a_recipe_reads_back_from_its_flat_record_and_keeps_the_old_field_names():
    for recipe in (*BRAIN_RECIPES.values(), *PHANTOM_RECIPES.values()):
        record = recipe_record(recipe)
        assert with_overrides(recipe, **record) == recipe
        widths = "widths" if hasattr(recipe.network, "widths") else "stem_widths"  # a CNN's, or a hybrid ViT's stem
        changed = with_overrides(recipe, guide="cam", guide_weight=2.0, epochs=3, **{widths: [4, 8, 8]})
        assert changed.guidance == dataclasses.replace(recipe.guidance, guide="cam", weight=2.0)
        assert changed.optimiser.epochs == 3 and getattr(changed.network, widths) == (4, 8, 8)
        assert changed.data == recipe.data
    # the names the metrics files, the model cards and `export` read
    v2 = recipe_record(BRAIN_RECIPES["brain-tumor-mri-v2"])
    assert {k: v2[k] for k in ("size", "widths", "last_stride", "mean", "std", "ema_decay", "guide", "guide_weight",
                               "energy_weight", "init")} == {
        "size": 160, "widths": [32, 64, 128, 256], "last_stride": 1, "mean": 0.15, "std": 0.2, "ema_decay": 0.99,
        "guide": "cam", "guide_weight": 0.5, "energy_weight": 2.0, "init": "brain-tumor-mri-v1"}
    assert recipe_record(BRAIN_RECIPES["brain-tumor-mri-v4"])["select"] == "pixel"
    third = recipe_record(BRAIN_RECIPES["brain-tumor-mri"])
    assert (third["select"], third["tune"], third["sign_weight"], third["init"]) == (
        "picture", "shared-head", 4.0, "brain-tumor-mri-v4")


def test_the_hybrid_vit_starts_from_the_cnn_stem_and_refuses_one_that_does_not_fit():
    from medlens.errors import ModelError
    from medlens.models.networks import SmallResNet
    from medlens.training.recipes import ViTNetwork
    from medlens.training.weights import build_network

    torch.manual_seed(0)
    cnn = SmallResNet(widths=(4, 8, 8, 8)).eval()
    vit = build_network(ViTNetwork(stem_widths=(4, 8, 8), hidden_dim=8, depth=1, heads=2, mlp_dim=8), 3, size=32).eval()
    assert len(vit.load_cnn_stem(cnn.state_dict())) > 0
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # the stem up to layer3 is the CNN's, value for value
        expected = cnn.layer3(cnn.layer2(cnn.layer1(cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(x)))))))
        got = vit.conv_proj[:-1](x)
        assert torch.equal(got, expected) and vit(x).shape == (2, 3)
    with pytest.raises(ModelError, match="do not fit this network's convolutional stem"):
        vit.load_cnn_stem(SmallResNet(widths=(8, 8, 8, 8)).state_dict())
    with pytest.raises(InputError, match="multiple of the heads"):
        ViTNetwork(hidden_dim=10, heads=4)
    from medlens.training.recipes import check_guidance

    guided = with_overrides(BRAIN_RECIPES["brain-tumor-mri-v1"], guide="cam+attention", guide_weight=1.0)
    with pytest.raises(InputError, match="without attention; use --guide cam"):
        check_guidance(guided, torch.ones(4, dtype=torch.bool), "the train split")


def test_a_recipe_refuses_what_it_does_not_have():
    with pytest.raises(InputError, match="no option 'n_train'"):
        with_overrides(BRAIN_RECIPES["brain-tumor-mri-v1"], n_train=10)
    with pytest.raises(InputError, match="--guide"):
        with_overrides(PHANTOM_RECIPES["phantom-lesion"], guide="gradcam")
    with pytest.raises(InputError, match="--input-alpha"):
        Guidance("cam", weight=1.0, input_alpha="path")
    with pytest.raises(InputError, match="--augment"):
        with_overrides(PHANTOM_RECIPES["phantom-lesion"], augment="mixup")
