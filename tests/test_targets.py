"""Targets: every accepted form of `targets=`, the multi-label defaults, and every mismatch raising.

A target list that does not fit the batch must raise a TargetError, never give blank maps.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import medlens
from medlens.errors import TargetError
from medlens.core.targets import resolve_targets

from helpers import make_tiny2d

LOGITS = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, -2.0, 0.0, 1.0], [-1.0, -2.0, -0.5, -3.0]])


def test_none_is_top1_for_a_multi_class_model():
    grid, note = resolve_targets(None, LOGITS)
    assert grid.tolist() == [[1], [0], [2]] and grid.dtype == torch.long
    assert "top-1" in note


def test_none_for_a_multi_label_model_is_every_class_at_p_half_or_top1():
    # sigmoid(x) >= 0.5 exactly when x >= 0: image 0 has classes 0, 1, 3; image 1 has 0, 2, 3; image 2 none -> top-1.
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, -2.0, 0.0, 1.0]])
    grid, _ = resolve_targets(None, logits, multi_label=True)
    assert grid.tolist() == [[0, 1, 3], [0, 2, 3]]
    grid, _ = resolve_targets(None, LOGITS[2:], multi_label=True)
    assert grid.tolist() == [[2]]  # no class at p >= 0.5: top-1 (logit -0.5)


def test_multi_label_with_different_counts_uses_the_union_for_every_image():
    grid, note = resolve_targets(None, LOGITS, multi_label=True)
    # image 0: {0, 1, 3}, image 1: {0, 2, 3}, image 2: none -> top-1 {2}; union {0, 1, 2, 3}
    assert grid.tolist() == [[0, 1, 2, 3]] * 3
    assert "union" in note


@pytest.mark.parametrize(
    "targets, expected",
    [
        (2, [[2]] * 3),
        (np.int64(3), [[3]] * 3),
        (torch.tensor(1), [[1]] * 3),
        ([0, 3], [[0, 3]] * 3),
        ((1,), [[1]] * 3),
        ([[0, 1], [2, 3], [3, 3]], [[0, 1], [2, 3], [3, 3]]),
        (torch.tensor([[0], [1], [2]]), [[0], [1], [2]]),
    ],
)
def test_explicit_targets(targets, expected):
    grid, _ = resolve_targets(targets, LOGITS)
    assert grid.tolist() == expected


def test_class_names_with_labels():
    labels = ["Atelectasis", "Cardiomegaly", "Effusion", "Edema"]
    grid, _ = resolve_targets(["effusion", "Cardiomegaly"], LOGITS, labels=labels)
    assert grid.tolist() == [[2, 1]] * 3
    grid, _ = resolve_targets([["Edema"], ["Atelectasis"], [3]], LOGITS, labels=labels)
    assert grid.tolist() == [[3], [0], [3]]


@pytest.mark.parametrize(
    "targets, labels, message",
    [
        ("Pneumonia", ["Atelectasis", "Cardiomegaly", "Effusion", "Edema"], "unknown class name 'Pneumonia'.*Effusion"),
        ("Edema", None, "carries no labels"),
        (4, None, "out of range.*4 classes"),
        (-1, None, "out of range"),
        ([0, 9], None, "out of range"),
        ([[0], [1]], None, "2 lists but the batch has 3 images"),
        ([[0], [1, 2], [3]], None, "same number of targets"),
        ([[], [], []], None, "same number of targets"),
        ([], None, "empty"),
        ([0, [1]], None, "mixes"),
        (1.0, None, "class index"),
        (True, None, "class index"),
        (torch.tensor([0.0]), None, "not floats"),
    ],
)
def test_bad_targets_raise_target_error(targets, labels, message):
    with pytest.raises(TargetError, match=message):
        resolve_targets(targets, LOGITS, labels=labels)


def _model(multi_label: bool = False, labels=None):
    model = make_tiny2d(0, num_classes=3)
    model.multi_label = multi_label
    if labels:
        model.labels = labels
    return model


def test_explain_rejects_a_short_target_list_instead_of_blank_maps():
    model = _model()
    x = torch.randn(3, 1, 16, 16)
    with pytest.raises(TargetError, match="2 lists but the batch has 3"):
        medlens.explain(model, x, "gradcam", targets=[[0], [1]])
    result = medlens.explain(model, x, "gradcam", targets=[[0], [1], [2]])
    assert result.targets.tolist() == [[0], [1], [2]]
    assert all(result["gradcam"][i].abs().sum() > 0 for i in range(3))  # no blank map


def test_explain_uses_labels_and_multi_label_defaults():
    model = _model(multi_label=True, labels=["Effusion", "Edema", "Mass"])
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    result = medlens.explain(model, x, "gradcam", targets="mass")
    assert result.targets.tolist() == [[2], [2]]
    assert result.provenance["target_names"] == [["Mass"], ["Mass"]]
    default = medlens.explain(model, x, "gradcam")
    expected, _ = resolve_targets(None, default.logits, multi_label=True)
    assert torch.equal(default.targets, expected)
    assert torch.equal(default.probabilities, torch.sigmoid(default.logits))
