"""`medlens explain` on the bundled segmentation model: --targets with --region predicted | BOX | MASK, the explained
region outlined and scored in provenance.json, and bad regions refused with exit status 2 and no traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medlens.cli.group import main
from medlens.data.phantom import phantom_2d


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-cli")
    data = phantom_2d(4, size=64, seed=3)  # cases 0, 1 normal; 2, 3 with a lesion
    for i in range(4):
        Image.fromarray((data.images[i, 0].numpy() * 255).astype(np.uint8)).save(root / f"ph{i}.png")
        Image.fromarray((data.lesion_masks[i, 0].numpy() * 255).astype(np.uint8)).save(root / f"ph{i}_mask.png")
    return root, data


def _explain(capsys, root, image, *args):
    code = main(["explain", str(root / image), "--model", "phantom-lesion-unet", "--methods", "gradcam",
                 "--out", str(root / "out"), *map(str, args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("region, name, pixels", [("predicted", "lesion_predicted", None),
                                                  ("8,10,40,30", "lesion_box_8_10_40_30_", 32 * 20),
                                                  ("MASK", "lesion_mask", "mask")])
def test_explain_a_region_of_a_segmentation_model(capsys, scans, region, name, pixels):
    root, data = scans
    if region == "MASK":
        region, pixels = root / "ph2_mask.png", int(data.lesion_masks[2].sum())
    code, err = _explain(capsys, root, "ph2.png", "--targets", "lesion", "--region", region)
    assert code == 0, err
    folder = root / "out" / "ph2"
    provenance = json.loads((folder / "provenance.json").read_text())
    record = provenance["region_targets"]["targets"][0]
    assert record["class"] == 1
    if pixels is not None:
        assert record["pixels"] == [pixels] and provenance["region"]["pixels_on_input_grid"] == pixels
    else:  # the predicted mask is what the overlays outline
        assert provenance["region"]["pixels_on_input_grid"] == record["pixels"][0] > 0
    assert any(p.name.startswith("gradcam_" + name.split("_box")[0]) for p in folder.glob("gradcam_*.png"))


def test_bad_regions_exit_2_with_a_message(capsys, scans):
    root, _ = scans
    code, err = _explain(capsys, root, "ph0.png", "--targets", "lesion")
    assert code == 2 and "found nothing for 'lesion'" in err and "Traceback" not in err
    code, err = _explain(capsys, root, "ph2.png", "--targets", "lesion", "--region", "10,10,90,40")
    assert code == 2 and "not inside the image" in err
    code, err = _explain(capsys, root, "ph2.png", "--targets", "lesion", "--region", "1,2,3")
    assert code == 2 and "a box is 4 numbers" in err
    code, err = _explain(capsys, root, "ph2.png", "--targets", "tumour")
    assert code == 2 and "unknown class name 'tumour'" in err


def test_batch_keeps_each_predicted_mask_beside_its_maps(capsys, scans):
    root, data = scans
    inputs = root / "inputs"
    inputs.mkdir(exist_ok=True)
    for i in (0, 2):
        (inputs / f"ph{i}.png").write_bytes((root / f"ph{i}.png").read_bytes())
    code = main(["batch", str(inputs), "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets", "lesion",
                 "--out", str(root / "batch")])
    err = capsys.readouterr().err
    assert code != 0 and "ph0.png: the model found nothing for 'lesion'" in err  # the normal slice fails alone
    saved = np.load(root / "batch" / "maps" / "ph2_png" / "maps.npz")
    truth = data.lesion_masks[2, 0].numpy()
    overlap = 2 * (saved["region"] & truth).sum() / (saved["region"].sum() + truth.sum())
    assert overlap > 0.8  # the predicted mask kept in maps.npz is the lesion (Dice with the truth)
