"""`medlens evaluate` on a segmentation model: the predicted region explained, deletion on the region score (the sum
of the class's logits over the region, not a softmax) and energy in the true mask equal a hand computation; metrics
that do not apply are refused with the reason (exit 2 on the command line); a folder with masks beside the images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import medlens
from medlens.cli.group import main
from medlens.data.phantom import phantom_2d
from medlens.errors import InputError
from medlens.evaluation_run import evaluate
from medlens.training.recipes import phantom_prepare


@pytest.fixture(scope="module")
def model():
    return medlens.load_model("phantom-lesion-unet")


@pytest.fixture(scope="module")
def phantoms():
    data = phantom_2d(6, size=64, seed=3, marker="none")
    return phantom_prepare(data.images), data.lesion_masks[:, 0].bool()


def _row(rows, method, metric, target="all"):
    return next(r for r in rows if r["method"] == method and r["metric"] == metric and r["target"] == target)


def _deletion_by_hand(model, x, saliency, region, steps):
    """Pixels set to zero most-salient first (stable order), the region score sum(logit_lesion * region) at each step,
    integrated by the trapezoid rule over the fraction removed."""
    order = torch.argsort(saliency.flatten(), descending=True, stable=True)
    fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    scores = []
    for f in fractions:
        removed = torch.zeros(saliency.numel(), dtype=torch.bool)
        removed[order[: int(torch.round(f * saliency.numel()))]] = True
        xp = torch.where(removed.view(saliency.shape), torch.zeros_like(x), x)
        with torch.no_grad():
            scores.append(float((model(xp)[0, 1] * region).sum()))
    f = fractions.tolist()
    return sum((scores[i] + scores[i + 1]) / 2 * (f[i + 1] - f[i]) for i in range(steps))


def test_deletion_and_energy_of_region_scores_equal_a_hand_computation(model, phantoms):
    x, truth = phantoms
    samples = [{"image": x[i], "mask": truth[i], "label": "lesion"} for i in range(len(x))]
    rows = evaluate(model, samples, "saliency", "deletion,energy_in_box", seed=0, batch_size=4,
                    metric_options={"deletion": {"steps": 4, "baseline": "zero"}})
    deletions, energies = [], []
    for i in range(len(x)):
        xi = x[i:i + 1]
        with torch.no_grad():
            region = model(xi).argmax(1)[0] == 1
        if not region.any():  # nothing predicted: not explained, not scored
            continue
        sal = medlens.explain(model, xi, methods="saliency",
                              targets=[medlens.SegmentationTarget("lesion", region=region)])["saliency"][0, 0]
        deletions.append(_deletion_by_hand(model, xi, sal, region, steps=4))
        if truth[i].any():  # energy in the true mask: only where there is one
            positive = sal.clamp(min=0)
            energies.append(float(positive[truth[i]].sum() / positive.sum()))
    assert len(deletions) >= 3 and len(energies) >= 2
    deletion, energy = _row(rows, "saliency", "deletion"), _row(rows, "saliency", "energy_in_box")
    assert deletion["n"] == len(deletions) and energy["n"] == len(energies)
    assert deletion["value"] == pytest.approx(np.mean(deletions), rel=1e-3)
    assert energy["value"] == pytest.approx(np.mean(energies), rel=1e-4)


def test_metrics_that_do_not_apply_are_refused_with_the_reason(model, phantoms, tmp_path, capsys):
    x, truth = phantoms
    samples = [{"image": x[i], "mask": truth[i], "label": "lesion"} for i in range(2)]
    with pytest.raises(InputError, match="average_drop.*sum of logits"):
        evaluate(model, samples, "gradcam", "deletion,average_drop")
    data = tmp_path / "data" / "lesion"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "0.png")
    code = main(["evaluate", "--model", "phantom-lesion-unet", "--data", str(tmp_path / "data"), "--methods", "gradcam",
                 "--metrics", "road_morf", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "road_morf" in err and "Traceback" not in err and "Choose from deletion" in err


def test_evaluate_a_folder_with_masks_beside_the_images(tmp_path, capsys):
    data = phantom_2d(6, size=64, seed=3, marker="none")
    for i in range(6):
        has = bool(data.lesion_masks[i].any())
        folder = tmp_path / "data" / ("lesion" if has else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.images[i, 0].numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
        if has:
            Image.fromarray(data.lesion_masks[i, 0].numpy().astype(np.uint8) * 255).save(folder / f"{i}_mask.png")
    out = tmp_path / "out"
    code = main(["evaluate", "--model", "phantom-lesion-unet", "--data", str(tmp_path / "data"), "--methods", "gradcam",
                 "--metrics", "pointing_game,insertion", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["n_images"] == 6  # the masks are not images of their own
    notes = run["metric_notes"]["segmentation"]
    explained = run["targets"]["predicted region"]
    assert explained + notes["images_with_empty_predicted_region"]["lesion"] == 6
    lines = (out / "metrics.csv").read_text().splitlines()
    pointing = next(line for line in lines if line.startswith("gradcam,pointing_game,all,"))
    lesions = int(data.lesion_masks.flatten(1).any(1).sum())
    assert 1 <= int(pointing.split(",")[3]) <= lesions  # scored only where a true mask is given
    assert any(line.startswith("baseline:center,pointing_game,all,") for line in lines)


def test_completeness_of_region_scores_equals_a_hand_computation(model, phantoms):
    """Completeness on the region score: |sum(map) - (score(x) - score(black))| / |score(x) - score(black)|, with the
    score the lesion logits summed over the predicted region; integrated gradients (50 steps, the default) come
    closer to the axiom than saliency, which claims nothing of the kind."""
    x, truth = phantoms
    samples = [{"image": x[i], "mask": truth[i], "label": "lesion"} for i in range(len(x))]
    rows = evaluate(model, samples, "integratedgradients,saliency", "completeness", seed=0)
    gaps = {"integratedgradients": [], "saliency": []}
    for i in range(len(x)):
        xi = x[i:i + 1]
        with torch.no_grad():
            region = model(xi).argmax(1)[0] == 1
            delta = float((model(xi)[0, 1] * region).sum() - (model(torch.zeros_like(xi))[0, 1] * region).sum())
        if not region.any():
            continue
        result = medlens.explain(model, xi, methods=list(gaps), seed=0,
                                 targets=[medlens.SegmentationTarget("lesion", region=region)])
        for method in gaps:
            gaps[method].append(abs(float(result[method].double().sum()) - delta) / abs(delta))
    for method, values in gaps.items():
        assert _row(rows, method, "completeness")["value"] == pytest.approx(np.mean(values), rel=1e-3), method
    assert np.mean(gaps["integratedgradients"]) < 0.5 * np.mean(gaps["saliency"])
