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


class _Bright3d(torch.nn.Module):
    """A seeded 3-D 'segmenter': a 3x3x3 convolution (random, small) plus a lesion logit that rises with intensity."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.mul_(0.05)
            self.conv.weight[1, 0, 1, 1, 1] += 8.0
            self.conv.bias.copy_(torch.tensor([0.0, -4.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_volume_segmentation_has_one_frame_per_source_slice_in_patient_order(tmp_path):
    """A 3-D model on a 4-slice series (files named against their positions): each source slice's frame is the mask
    computed here from the model's logits resized (trilinear) to the series' grid, slice by slice in position order."""
    from medlens.core.input_spec import InputSpec
    from medlens.core.model_description import ModelDescription, attach_description
    from medlens.pipeline import ExplainRequest, plan_for
    from medlens.pipeline.run import explain_file
    from medlens.pipeline.segmentation import segmentation_plan
    from medlens.pipeline.write import write_outcome

    model = attach_description(_Bright3d().eval(), ModelDescription(
        labels=("background", "lesion"), task="segmentation", source="bright3d",
        input_spec=InputSpec(size=(8, 16, 16), channels=1, scale="minmax", mean=(0.0,), std=(1.0,))))
    gen = torch.Generator().manual_seed(1)
    volume = torch.rand(4, 20, 24, generator=gen) * 0.3
    volume[1:3, 6:14, 8:18] += 0.7  # a bright block on the middle slices
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder = tmp_path / "series"
    folder.mkdir()
    for z in range(4):  # file names run against the slice positions
        make_dicom(folder / f"s{3 - z}.dcm", (volume[z].numpy() * 1000).astype(np.uint16), Modality="MR",
                   StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame, PatientID="P3",
                   PatientName="Volume^Phantom", PatientBirthDate="", PatientSex="", StudyDate="20261206",
                   StudyTime="120000", StudyID="1", AccessionNumber="", ReferringPhysicianName="", InstanceNumber=z + 1,
                   ImagePositionPatient=[0, 0, 2.0 * z], ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1],
                   SliceThickness=2, BodyPartExamined="HEAD")
    plan = segmentation_plan(plan_for(model, ExplainRequest.build("saliency", targets=["lesion"], formats="dicom")),
                             "predicted")
    outcome = explain_file(plan, folder, region=None)
    written = write_outcome(outcome, tmp_path / "out")
    seg_path = next(p for p in written if p.name.endswith("_seg.dcm"))
    if shutil.which("dciodvfy") is not None:
        report = subprocess.run(["dciodvfy", str(seg_path)], capture_output=True, text=True, timeout=60)
        assert [l for l in (report.stdout + report.stderr).splitlines() if l.startswith("Error")] == []
    seg = highdicom.seg.segread(seg_path)
    with torch.no_grad():
        logits = F.interpolate(model(outcome.prepared.tensor), size=(4, 20, 24), mode="trilinear", align_corners=False)
    expected = (logits[0].argmax(0) == 1).numpy()
    assert expected[1:3].sum() > 50 and expected.sum() < expected.size / 2
    for path in sorted(folder.iterdir()):
        source = pydicom.dcmread(path)
        z = int(round(float(source.ImagePositionPatient[2]) / 2.0))
        if expected[z].any():
            pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])[0, :, :, 0]
            assert np.array_equal(pixels.astype(bool), expected[z]), path.name


def test_a_slice_of_a_series_is_filed_against_that_slice(tmp_path):
    """A 2-D model on a 3-slice series explains the middle slice: the Segmentation references that slice alone."""
    image = phantom_2d(4, size=64, seed=3).images[2, 0]
    pixels = F.interpolate(image[None, None], size=SOURCE_GRID, mode="bilinear", align_corners=False)[0, 0]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder = tmp_path / "in" / "series"
    folder.mkdir(parents=True)
    for z in range(3):
        make_dicom(folder / f"s{z}.dcm", (pixels.numpy() * 1000).astype(np.uint16), Modality="MR", StudyInstanceUID=study,
                   SeriesInstanceUID=series, FrameOfReferenceUID=frame, PatientID="P2", InstanceNumber=z + 1,
                   ImagePositionPatient=[0, 0, float(z)], ImageOrientationPatient=[1, 0, 0, 0, 1, 0], PixelSpacing=[1, 1],
                   SliceThickness=1)
    assert run_cli("batch", tmp_path / "in", "--model", "phantom-lesion-unet", "--methods", "gradcam", "--targets",
                   "lesion", "--formats", "npz,dicom", "--out", tmp_path / "out", "-q") == 0
    record = manifest(tmp_path / "out")[0]
    seg = pydicom.dcmread(_seg_path(tmp_path, record))
    referenced = [r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
    assert referenced == [pydicom.dcmread(folder / "s1.dcm").SOPInstanceUID]  # the middle slice, as the notes say
    assert any("the middle slice 1 was used" in note for note in record["notes"])


def test_a_mask_of_one_frame_of_a_multi_frame_source_is_not_filed_and_the_manifest_says_why():
    from pydicom.dataset import Dataset

    from medlens.io.format_dicom_seg import _source_grid
    from medlens.io.output import _skip_notes

    source = Dataset()
    source.Rows, source.Columns, source.NumberOfFrames = 80, 96, 3
    grid, why = _source_grid([source], (64, 64))
    assert grid is None and "one 2-D slice of a source with 3 frames" in why
    assert _source_grid([source], (3, 64, 64))[0] == (3, 80, 96)
    notes = _skip_notes({"dicom_segmentation": {"skipped": [f"predicted_mask_seg.dcm: {why}"]}})
    assert notes == [f"dicom: predicted_mask_seg.dcm: {why} (not written)"]
