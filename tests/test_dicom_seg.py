"""The predicted mask of a segmentation model as a DICOM Segmentation (`--formats dicom`): it passes dciodvfy, reads
back with highdicom, references its source, names medlens and the model, and its pixels are the model's predicted mask
taken back onto the source's own grid (computed here from the model's logits); an empty predicted mask gives no object
and says why; a non-DICOM input gets none, as for the other DICOM objects."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from pydicom.uid import generate_uid

from batch_helpers import manifest, run_cli
from helpers import make_dicom
from medlens.data.phantom import phantom_2d

highdicom = pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
SOURCE_GRID = (80, 96)  # rows x columns of the test scans; the model takes 64 x 64


def _scan(path: Path, image: torch.Tensor) -> Path:
    """A tiny MR slice with patient geometry, at SOURCE_GRID (the phantom resized), with the study's Type 2 fields."""
    pixels = F.interpolate(image[None, None], size=SOURCE_GRID, mode="bilinear", align_corners=False)[0, 0]
    return make_dicom(path, (pixels.numpy() * 1000).astype(np.uint16), Modality="MR", StudyInstanceUID=generate_uid(),
                      SeriesInstanceUID=generate_uid(), PatientID="P1", PatientName="Phantom^Lesion",
                      PatientBirthDate="", PatientSex="", StudyDate="20261206", StudyTime="120000", StudyID="1",
                      AccessionNumber="", ReferringPhysicianName="", InstanceNumber=1, BodyPartExamined="HEAD",
                      FrameOfReferenceUID=generate_uid(), ImagePositionPatient=[0, 0, 0],
                      ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1], SliceThickness=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One batch (Grad-CAM, --formats png,npz,dicom) over a lesion phantom as DICOM and the same phantom as PNG."""
    root = tmp_path_factory.mktemp("seg-dicom")
    data = phantom_2d(4, size=64, seed=3)  # cases 2, 3 have a lesion
    (root / "in").mkdir()
    _scan(root / "in" / "lesion.dcm", data.images[2, 0])
    from PIL import Image

    Image.fromarray((data.images[2, 0].numpy() * 255).astype(np.uint8)).save(root / "in" / "lesion.png")
    assert run_cli("batch", root / "in", "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets", "lesion",
                   "--formats", "png,npz,dicom", "--out", root / "out", "-q") == 0
    return root, {Path(r["path"]).name: r for r in manifest(root / "out")}


def _seg_path(root: Path, record: dict) -> Path:
    found = [root / "out" / o for o in record["outputs"] if o.endswith("_seg.dcm")]
    assert len(found) == 1, record["outputs"]
    return found[0]


def test_the_segmentation_is_the_predicted_mask_on_the_source_grid(run):
    import medlens

    root, records = run
    record = records["lesion.dcm"]
    assert record["status"] == "done", record["error"]
    seg = highdicom.seg.segread(_seg_path(root, record))
    source = pydicom.dcmread(root / "in" / "lesion.dcm")
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion" and segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "medlens phantom-lesion-unet" and segment.SegmentAlgorithmType == "AUTOMATIC"
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])[0, :, :, 0]
    # the reference: the model's logits on its input, resized over the same extent to the source's grid, argmax
    model = medlens.load_model("phantom-lesion-unet")
    x = medlens.load_input(root / "in" / "lesion.dcm", model)
    with torch.no_grad():
        logits = F.interpolate(model(x), size=SOURCE_GRID, mode="bilinear", align_corners=False)
    expected = (logits[0].argmax(0) == 1).numpy()
    assert pixels.shape == SOURCE_GRID and expected.sum() > 20
    assert np.array_equal(pixels.astype(bool), expected)
    provenance = json.loads(next(root / "out" / o for o in record["outputs"] if o.endswith("provenance.json")).read_text())
    assert provenance["dicom_segmentation"]["segments"][0]["pixels_on_source_grid"] == int(expected.sum())


def test_the_segmentation_passes_dciodvfy(run):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: the IOD validation cannot run")
    root, records = run
    report = subprocess.run(["dciodvfy", str(_seg_path(root, records["lesion.dcm"]))], capture_output=True, text=True,
                            timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_a_non_dicom_input_gets_no_segmentation_as_for_the_other_dicom_objects(run):
    root, records = run
    record = records["lesion.png"]
    assert record["status"] == "done" and not [o for o in record["outputs"] if o.endswith(".dcm")]
    provenance = json.loads(next(root / "out" / o for o in record["outputs"] if o.endswith("provenance.json")).read_text())
    assert provenance["dicom_segmentation"]["written"] is False
    assert provenance["dicom_segmentation"]["reason"] == provenance["dicom"]["reason"]


def test_an_empty_predicted_mask_gives_no_segmentation_and_says_so(tmp_path, capsys):
    from medlens.cli.group import main

    normal = _scan(tmp_path / "normal.dcm", phantom_2d(4, size=64, seed=3).images[0, 0])  # case 0: no lesion
    code = main(["explain", str(normal), "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets", "lesion",
                 "--region", "8,8,40,40", "--formats", "dicom", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    folder = next(p.parent for p in (tmp_path / "out").rglob("provenance.json"))
    assert not list(folder.glob("*_seg.dcm"))
    record = json.loads((folder / "provenance.json").read_text())["dicom_segmentation"]
    assert record["written"] is False and record["empty_segments"] == ["lesion"]
    assert "predicted no pixel of 'lesion'" in record["skipped"][0]
    # in a batch the predicted region is what is explained: the input fails with that reason in the manifest
    (tmp_path / "in").mkdir()
    shutil.copy(normal, tmp_path / "in" / "normal.dcm")
    assert run_cli("batch", tmp_path / "in", "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets",
                   "lesion", "--formats", "dicom", "--out", tmp_path / "batch", "-q") == 3
    failed = manifest(tmp_path / "batch")[0]
    assert failed["status"] == "failed" and "found nothing for 'lesion'" in failed["error"]
    assert not list((tmp_path / "batch").rglob("*.dcm"))
