"""The one pipeline (plan -> read -> prepare -> explain -> write) and regions: values against explain() and the
evaluation metrics, the outline where the box is, and a clear message for every bad region file."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import medlens
from helpers import run, write_noise_png  # the CLI in this process: exit code, stdout, stderr
from medlens.errors import InputError, MethodError, OutputError, TargetError
from medlens.evaluation.localisation import energy_in_box, pointing_game
from medlens.evaluation_run.dataset import box_mask
from medlens.io.regions import boxes_to_mask, read_region, region_mask
from medlens.io.render import OUTLINE_RGB, _with_outline, outline_of
from medlens.pipeline import ExplainRequest, explain_file, explain_tensor, plan_for, write_outcome

BOX = "1 0.25 0.5 0.25 0.375\n"  # centre (0.25, 0.5), 0.25 wide, 0.375 high: pixels 8..15 x 10..21 on 32 x 32


@pytest.fixture(scope="module")
def model():
    return medlens.load_model("phantom-lesion")


@pytest.fixture()
def scan(tmp_path):
    rng = np.random.RandomState(3)
    pixels = rng.randint(0, 60, (48, 48)).astype(np.uint8)
    pixels[20:30, 8:18] = 230  # a bright lesion inside the box
    path = tmp_path / "case.png"
    Image.fromarray(pixels).save(path)
    (tmp_path / "case.txt").write_text(BOX)
    return path


def test_explain_file_gives_the_maps_of_explain_on_load_input(model, scan):
    plan = plan_for(model, ExplainRequest.build("gradcam,saliency", seed=0))
    outcome = explain_file(plan, scan, region=None)
    direct = medlens.explain(model, medlens.load_input(scan, model), methods=["gradcam", "saliency"], seed=0)
    for m in ("gradcam", "saliency"):
        assert torch.equal(outcome.result[m], direct[m])
    assert outcome.prediction() == pytest.approx(dict(zip(model.labels, direct.probabilities[0].tolist())))
    assert outcome.region is None and set(outcome.seconds) == {"read", "explain"}


def test_plan_refuses_bad_requests_before_any_file_is_read(model):
    with pytest.raises(MethodError, match="nosuch"):
        plan_for(model, ExplainRequest.build("gradcam,nosuch"))
    with pytest.raises(MethodError, match="n_steps"):
        plan_for(model, ExplainRequest.build("gradcam", options={"n_steps": 4}))
    with pytest.raises(TargetError):
        plan_for(model, ExplainRequest.build("gradcam", targets="7"))
    with pytest.raises(OutputError, match="unknown output format"):
        plan_for(model, ExplainRequest.build("gradcam", formats="png,gif"))
    assert plan_for(model, ExplainRequest.build("gradcam", targets="all")).targets == [0, 1]


def test_settings_digest_changes_with_every_setting(model):
    base = plan_for(model, ExplainRequest.build("gradcam", seed=1)).settings_digest()
    assert base == plan_for(model, ExplainRequest.build("gradcam", seed=1)).settings_digest()
    for other in (ExplainRequest.build("gradcam", seed=2), ExplainRequest.build("layercam", seed=1),
                  ExplainRequest.build("gradcam", seed=1, targets="1")):
        assert plan_for(model, other).settings_digest() != base


def test_outline_is_the_box_boundary():
    mask = boxes_to_mask([(0.25, 0.5, 0.25, 0.375)], (32, 32))
    rows, cols = np.nonzero(mask.numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 21, 4, 11)
    edge = outline_of(mask.numpy())
    assert edge[10, 4:12].all() and edge[21, 4:12].all() and edge[10:22, 4].all() and edge[10:22, 11].all()
    assert not edge[11:21, 5:11].any() and edge.sum() == 2 * 8 + 2 * 12 - 4
    rgb = _with_outline(np.zeros((32, 32, 3), np.uint8), mask.numpy())
    assert (rgb[edge] == OUTLINE_RGB).all() and (rgb[~edge] == 0).all()


def test_region_scores_equal_the_evaluation_metrics(model, scan):
    plan = plan_for(model, ExplainRequest.build("gradcam,integratedgradients", options={"n_steps": 8}))
    outcome = explain_file(plan, scan)  # the box file beside the image is picked up
    expected_mask = box_mask(scan.with_suffix(".txt"), (64, 64))
    assert torch.equal(outcome.region, expected_mask)
    for m in ("gradcam", "integratedgradients"):
        pg = float(pointing_game(outcome.result[m], expected_mask[None])[0, 0])
        energy = float(energy_in_box(outcome.result[m], expected_mask[None])[0, 0])
        got = outcome.region_scores[m][outcome.target_names()[0]]
        assert got == {"pointing_game": pg, "energy_in_region": pytest.approx(energy, abs=1e-7)}



def test_a_mini_batchs_regions_are_scored_at_once_as_each_input_alone(model, tmp_path):
    # three inputs of one mini-batch: two with box files (different boxes), one without; scored in one call
    from medlens.pipeline.run import explain_pending, read_with_shape

    rng = np.random.RandomState(5)
    boxes = {"a": BOX, "b": "0 0.7 0.3 0.2 0.2\n", "c": None}
    paths = []
    for name, box in boxes.items():
        pixels = rng.randint(0, 255, (48, 48)).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        if box:
            (tmp_path / f"{name}.txt").write_text(box)
        paths.append(tmp_path / f"{name}.png")
    plan = plan_for(model, ExplainRequest.build("gradcam,saliency", targets="all"))
    reads = [read_with_shape(plan, p) for p in paths]
    pending = explain_pending(plan, [r[0] for r in reads], sources=paths, region="auto",
                              read_shapes=[r[1] for r in reads])
    outcomes = pending.outcomes()
    assert outcomes[2].region is None and outcomes[2].region_scores is None
    for name, outcome in zip("ab", outcomes[:2]):
        expected_mask = box_mask(tmp_path / f"{name}.txt", (64, 64))
        assert torch.equal(outcome.region, expected_mask)
        for m in ("gradcam", "saliency"):
            for j, target in enumerate(outcome.target_names()):
                alone = outcome.result[m][:, j:j + 1]
                got = outcome.region_scores[m][target]
                assert got["pointing_game"] == float(pointing_game(alone, expected_mask[None])[0, 0])
                assert got["energy_in_region"] == pytest.approx(float(energy_in_box(alone, expected_mask[None])[0, 0]),
                                                                abs=1e-7)
    assert outcomes[0].region_scores != outcomes[1].region_scores  # each input its own box

def test_cli_region_outline_and_provenance(capsys, scan, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, "explain", scan, "--model", "phantom-lesion", "--methods", "gradcam", "--out", out)
    assert code == 0, err
    prov = json.loads((out / "case" / "provenance.json").read_text())
    region = prov["region"]
    assert region["file"].endswith("case.txt") and region["pixels_on_input_grid"] == int(box_mask(scan.with_suffix(".txt"), (64, 64)).sum())
    (score,) = region["metrics"]["gradcam"].values()
    assert set(score) == {"pointing_game", "energy_in_region"}
    with np.load(out / "case" / "maps.npz") as npz:
        assert npz["region"].sum() == region["pixels_on_input_grid"]
    overlay = np.asarray(Image.open(next((out / "case").glob("gradcam_*.png"))).convert("RGB"))
    green = (overlay == OUTLINE_RGB).all(axis=-1)
    assert green.sum() > 100  # the outline, enlarged to the tile size
    ys, xs = np.nonzero(green)
    width = overlay.shape[1]  # the box spans x 0.125..0.375, columns 8..23 of the 64-pixel model grid, scaled
    scale = width / 64
    assert xs.min() == pytest.approx(8 * scale, abs=scale) and xs.max() == pytest.approx(24 * scale - 1, abs=scale)
    # --no-region: nothing outlined, no region in provenance
    code, _, _ = run(capsys, "explain", scan, "--model", "phantom-lesion", "--out", tmp_path / "plain", "--no-region")
    assert code == 0 and "region" not in json.loads((tmp_path / "plain" / "case" / "provenance.json").read_text())


@pytest.mark.parametrize("content, message", [
    ("1 0.5 0.5 wide 0.2\n", "is not a box"),
    ("1 0.5 0.5 1.5 0.2\n", "outside the image"),
    ("\n\n", "holds no box"),
])
def test_bad_box_files_name_the_file(capsys, scan, tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    code, _, err = run(capsys, "explain", scan, "--model", "phantom-lesion", "--out", tmp_path / "o", "--region", bad)
    assert code == 2 and message in err and "bad.txt" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bad_masks_name_the_file(capsys, scan, tmp_path):
    small = tmp_path / "small_mask.png"
    Image.fromarray(np.ones((10, 10), np.uint8) * 255).save(small)
    code, _, err = run(capsys, "explain", scan, "--model", "phantom-lesion", "--out", tmp_path / "o", "--region", small)
    assert code == 2 and "small_mask.png" in err and "10 x 10" in err and "48 x 48" in err
    empty = tmp_path / "empty_mask.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(empty)
    code, _, err = run(capsys, "explain", scan, "--model", "phantom-lesion", "--out", tmp_path / "o", "--region", empty)
    assert code == 2 and "empty_mask.png" in err and "empty" in err


def test_mask_region_is_resized_to_the_input_grid(tmp_path):
    mask = np.zeros((48, 48), np.uint8)
    mask[12:36, 0:24] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    grid_mask = region_mask(read_region(tmp_path / "m.png"), (48, 48), (64, 64))
    rows, cols = np.nonzero(grid_mask.numpy())
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 47, 0, 31)


def test_volume_mask_with_a_2d_grid_takes_the_explained_slice():
    mask = np.zeros((5, 8, 8), bool)
    mask[2, 1:3, 1:3] = True
    from medlens.io.regions import Region

    region = Region(source=__import__("pathlib").Path("m.nii.gz"), mask=mask)
    assert region_mask(region, (5, 8, 8), (8, 8)).sum() == 4  # middle slice 2
    with pytest.raises(InputError, match="empty on the slice"):
        region_mask(region, (5, 8, 8), (8, 8), slice_index=0)


def test_explain_tensor_and_write(model, tmp_path):
    x = medlens.load_input(tmp_path if False else _phantom_png(tmp_path), model)
    plan = plan_for(model, ExplainRequest.build("gradcam"))
    outcome = explain_tensor(plan, x)
    written = write_outcome(outcome, tmp_path / "w")
    assert {p.name for p in written} >= {"panel.png", "maps.npz", "provenance.json"}
    with np.load(tmp_path / "w" / "maps.npz") as npz:
        assert np.array_equal(npz["gradcam"], outcome.result["gradcam"].numpy())


def _phantom_png(tmp_path):
    return write_noise_png(tmp_path / "p.png", (64, 64), high=255)
