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


def test_region_results_give_scores_not_probabilities(capsys, scans):
    """A softmax over region scores means nothing: the manifest's `prediction` is null and `scores` holds the region
    score (the sum of the lesion logits over the predicted region, recomputed here), summary.csv has it under
    `score` with `probability` empty, maps.npz has no probabilities, and the overlay title says score=."""
    import csv

    import medlens
    from medlens.io.format_dicom import _title_name as title_name
    from medlens.pipeline import ExplainRequest, plan_for, read_input

    root, _ = scans
    inputs, out = root / "scored", root / "batch-scored"
    inputs.mkdir(exist_ok=True)
    (inputs / "ph2.png").write_bytes((root / "ph2.png").read_bytes())
    code = main(["batch", str(inputs), "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets", "lesion",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[-1])
    assert record["prediction"] is None and set(record["scores"]) == {"lesion@predicted"}
    saved = np.load(out / "maps" / "ph2_png" / "maps.npz")
    assert "probabilities" not in saved.files
    model = medlens.load_model("phantom-lesion-unet")
    x = read_input(plan_for(model, ExplainRequest.build("gradcam", targets=["lesion"])), root / "ph2.png").tensor
    import torch

    with torch.no_grad():
        expected = float(model(x)[0, 1][torch.from_numpy(saved["region"])].sum())
    assert record["scores"]["lesion@predicted"] == pytest.approx(expected, rel=1e-4)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    done = [r for r in rows if r["status"] == "done"]
    assert done and all(r["probability"] == "" and float(r["score"]) == pytest.approx(expected, rel=1e-4) for r in done)
    assert "score " in (out / "report.html").read_text()
    assert main(["report", str(out / "maps")]) == 0
    page = (out / "maps" / "report.html").read_text()
    assert f"lesion@predicted: score {expected:.3g}" in page
    assert title_name("lesion (score=41.2)") == "lesion" and title_name("Effusion (p=0.93)") == "Effusion"
    assert title_name("a (b)") == "a (b)"


def test_dicom_results_of_a_region_name_the_target_without_its_score(capsys, scans, tmp_path):
    import pydicom
    from helpers import make_dicom

    root, data = scans
    from pydicom.uid import generate_uid

    source = make_dicom(tmp_path / "ph2.dcm", (data.images[2, 0].numpy() * 1000).astype(np.uint16), Modality="MR",
                        StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(), PatientID="P1",
                        PatientName="Phantom^Lesion", FrameOfReferenceUID=generate_uid(), ImagePositionPatient=[0, 0, 0],
                        ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1], SliceThickness=1)
    code = main(["explain", str(source), "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets", "lesion",
                 "--formats", "dicom", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    written = sorted(p for p in (tmp_path / "out").rglob("*.dcm") if not p.name.endswith("_seg.dcm"))  # SEG: its own test
    descriptions = {pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription for p in written}
    assert written and all("lesion@predicted" in d and "score" not in d for d in descriptions), descriptions
