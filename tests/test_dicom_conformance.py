"""DICOM results are what a hospital's systems accept: the standard's IOD validator (dicom3tools `dciodvfy`) finds no
error in any result made from pydicom's CT, MR, enhanced MR, oblique MR, NM and CR files; UIDs follow the settings
(same settings, same UIDs; another option of one method, new UIDs for that method only); one series per model and
method with unique instance numbers; laterality, body part and the CID 217 concept are there."""
from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from batch_helpers import manifest, run_cli
from helpers import with_functional_groups
from medlens.errors import InputError
from medlens.io import read_image

pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
DCIODVFY = shutil.which("dciodvfy")


def _testdata(name: str) -> Path | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            found = get_testdata_file(name)
        except Exception:  # noqa: BLE001 - pydicom-data absent or not downloadable: the case is skipped
            return None
    return Path(found) if found else None


def _enhanced_mr_with_geometry(path: Path) -> None:
    """pydicom-data's emri_small.dcm with the functional groups an Enhanced MR carries (see helpers)."""
    with_functional_groups(_testdata("emri_small.dcm"), path)


CASES = {  # name -> (file, what it tests)
    "ct": "CT_small.dcm", "mr": "MR_small.dcm", "enhanced-mr": "emri_small.dcm", "enhanced-mr-geometry": None,
    "enhanced-ct": "eCT_Supplemental.dcm", "oblique-mr": "MR2_UNCR.dcm", "nm": "JPEG2000_UNC.dcm",
    "cr-zero-spacing": "RG1_UNCR.dcm", "cr-laterality": "RG3_UNCR.dcm",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """One batch over every case that is available: png, npz, nifti and dicom, Grad-CAM and saliency."""
    folder = tmp_path_factory.mktemp("conformance")
    inputs = folder / "in"
    for case, name in CASES.items():
        (inputs / case).mkdir(parents=True)
        if case == "enhanced-mr-geometry":
            if _testdata("emri_small.dcm") is not None:
                _enhanced_mr_with_geometry(inputs / case / "emri_geometry.dcm")
            continue
        found = _testdata(name)
        if found is not None:
            shutil.copy(found, inputs / case / name)
    out = folder / "out"
    assert run_cli("batch", inputs, "--out", out, "--model", "phantom-lesion", "--methods", "gradcam,saliency",
                   "--formats", "png,npz,nifti,dicom", "-q") == 0
    return out, {r["path"].split("/")[0]: r for r in manifest(out)}


@pytest.mark.parametrize("case", list(CASES))
def test_every_dicom_result_passes_dciodvfy_without_errors(results, case: str) -> None:
    if DCIODVFY is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: the IOD validation cannot run")
    out, records = results
    if case not in records:
        pytest.skip(f"the test file for {case} ({CASES[case]}) is not available (pydicom-data not installed)")
    record = records[case]
    assert record["status"] == "done", record["error"]
    assert any(o.endswith(".png") for o in record["outputs"]) and any(o.endswith("maps.npz") for o in record["outputs"])
    results_dcm = [out / o for o in record["outputs"] if o.endswith(".dcm")]
    assert results_dcm, f"{case}: no DICOM result written"
    for path in results_dcm:
        report = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{case} {path.name}: {errors}"


def test_what_each_case_writes(results) -> None:
    out, records = results
    if "ct" not in records:
        pytest.skip("CT_small.dcm missing")

    def names(case: str) -> set[str]:
        return {Path(o).name.split("_", 2)[-1] for o in records[case]["outputs"] if o.endswith(".dcm")}

    assert names("ct") == {"pm.dcm", "sc.dcm"}
    for case in ("enhanced-mr-geometry", "enhanced-ct", "oblique-mr"):  # geometry read, the map lies on the source
        if case in records:
            assert names(case) == {"pm.dcm", "sc.dcm"}, case
    for case in ("enhanced-mr", "nm", "cr-zero-spacing"):  # no position: no Parametric Map, the reason recorded
        if case in records:
            assert names(case) == {"sc.dcm"}, case
            provenance = next(o for o in records[case]["outputs"] if o.endswith("provenance.json"))
            text = (out / provenance).read_text()
            assert "no patient position" in text
            assert any("_pm.dcm" in note and "not written" in note for note in records[case]["notes"])  # manifest
    if "oblique-mr" in records:
        sc = pydicom.dcmread(out / next(o for o in records["oblique-mr"]["outputs"] if o.endswith("_sc.dcm")))
        assert len(sc.PatientOrientation) == 2 and any(len(v) > 1 for v in sc.PatientOrientation)  # oblique letters
    if "cr-laterality" in records:
        sc = pydicom.dcmread(out / next(o for o in records["cr-laterality"]["outputs"] if o.endswith("_sc.dcm")))
        assert sc.Laterality == "R" and sc.BodyPartExamined == "EXTREMITY"


def test_the_secondary_capture_is_the_png_overlay_on_the_scans_own_plane(results) -> None:
    """The Secondary Capture shows the picture the PNG overlay shows, pixel for pixel: the map taken back onto the
    scan's plane at the source's resolution (not the model's grid), under the same title and colour bar."""
    from PIL import Image

    out, records = results
    checked = 0
    for case in ("ct", "oblique-mr", "cr-laterality"):
        if case not in records:
            continue
        outputs = records[case]["outputs"]
        source = pydicom.dcmread(next((out / case).parent.parent.glob(f"in/{case}/*.dcm")), stop_before_pixels=True)
        for name in (o for o in outputs if o.endswith("_sc.dcm")):
            sc = pydicom.dcmread(out / name)
            png = np.asarray(Image.open(out / name.replace("_sc.dcm", ".png")).convert("RGB"))
            np.testing.assert_array_equal(sc.pixel_array, png)
            assert int(sc.Columns) >= min(int(source.Columns), 2048)  # the map area spans the source's columns
            checked += 1
    if not checked:
        pytest.skip("no Secondary Capture case available (pydicom-data not installed)")


def test_parametric_map_carries_its_concept_window_and_value_mapping(results) -> None:
    out, records = results
    if "ct" not in records:
        pytest.skip("CT_small.dcm missing")
    concepts = {}
    for name in (o for o in records["ct"]["outputs"] if o.endswith("_pm.dcm")):
        ds = pydicom.dcmread(out / name)
        method = Path(name).name.split("_")[0]
        mapping = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        quantity = mapping.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
        concepts[method] = (quantity.CodeValue, quantity.CodingSchemeDesignator)
        voi = ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
        assert voi.VOILUTFunction == "LINEAR_EXACT" and float(voi.WindowWidth) > 0
        values = ds.pixel_array
        assert float(mapping.DoubleFloatRealWorldValueFirstValueMapped) == pytest.approx(float(values.min()), rel=1e-5)
        assert float(mapping.DoubleFloatRealWorldValueLastValueMapped) == pytest.approx(float(values.max()), rel=1e-5)
        assert float(mapping.RealWorldValueSlope) == 1.0 and float(mapping.RealWorldValueIntercept) == 0.0
        assert ds.SeriesDescription.startswith(f"medlens {method} relevance map")
        assert "phantom-lesion" in ds.SeriesDescription
    assert concepts == {"gradcam": ("130403", "DCM"), "saliency": ("130404", "DCM")}


def _uids(out: Path) -> dict[str, tuple[str, str, int]]:
    found = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found[f"{path.parent.parent.name}/{path.name}"] = (ds.SOPInstanceUID, ds.SeriesInstanceUID, int(ds.InstanceNumber))
    return found


def test_uids_follow_the_settings(tmp_path: Path) -> None:
    """Same settings: the same UIDs. Another option of Grad-CAM: new Grad-CAM UIDs, saliency keeps its own. Slices
    of one series share one result series per method and kind, with unique instance numbers."""
    series = tmp_path / "in" / "slices"
    series.mkdir(parents=True)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(3):  # three separate 2-D inputs of one source series
        source.SOPInstanceUID, source.InstanceNumber = f"1.2.826.0.1.3680043.99.{k}", k + 1
        (series / f"s{k}").mkdir()
        source.save_as(series / f"s{k}" / f"s{k}.dcm")
    runs = {}
    for run, extra in (("a", []), ("b", []), ("c", ["--option", "eigen_smooth=true"])):
        out = tmp_path / run
        assert run_cli("batch", tmp_path / "in", "--out", out, "--model", "phantom-lesion", "--methods",
                       "gradcam,saliency", "--formats", "dicom", "-q", *extra) == 0
        runs[run] = _uids(out)
    assert runs["a"] == runs["b"] and len(runs["a"]) == 12  # 3 slices x 2 methods x (PM + SC)
    for key, (sop, series_uid, _) in runs["a"].items():
        changed = runs["c"][key][0] != sop
        assert changed == ("gradcam" in key), key  # only the method whose option changed gets new instances
        assert (runs["c"][key][1] != series_uid) == ("gradcam" in key), key
    by_series: dict[str, list[int]] = {}
    for sop, series_uid, number in runs["a"].values():
        by_series.setdefault(series_uid, []).append(number)
    assert len(by_series) == 4  # (Grad-CAM, saliency) x (Parametric Map, Secondary Capture)
    assert all(len(set(numbers)) == 3 for numbers in by_series.values())
    assert len({sop for sop, _, _ in runs["a"].values()}) == 12


def test_a_volume_whose_header_hides_its_frames_is_refused_by_medlens(tmp_path: Path) -> None:
    """pydicom's rtdose.dcm without NumberOfFrames: pydicom still decodes 15 frames; medlens refuses the mismatch
    instead of handing a volume to a 2-D model as one image."""
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    del ds.NumberOfFrames
    ds.save_as(tmp_path / "dose.dcm")
    with pytest.raises(InputError, match="NumberOfFrames"):
        read_image(tmp_path / "dose.dcm")
    out = tmp_path / "out"
    assert run_cli("batch", tmp_path / "dose.dcm", "--out", out, "--model", "phantom-lesion", "--methods", "gradcam",
                   "-q") != 0
    assert "NumberOfFrames" in manifest(out)[0]["error"]


def test_enhanced_geometry_is_read_per_frame(tmp_path: Path) -> None:
    if _testdata("emri_small.dcm") is None:
        pytest.skip("emri_small.dcm (pydicom-data) is not available")
    _enhanced_mr_with_geometry(tmp_path / "e.dcm")
    scan = read_image(tmp_path / "e.dcm")
    assert scan.is_volume and scan.spacing == pytest.approx((4.0, 0.9, 0.8))
    for k in (0, 3, 9):  # frame k, row 2, column 5: position + 5 columns along x (0.8 mm) + 2 rows along y (0.9 mm)
        lps = np.array([-30.0 + 5 * 0.8, -20.0 + 2 * 0.9, 4.0 * k])
        np.testing.assert_allclose((scan.affine @ [k, 2, 5, 1.0])[:3], lps * [-1, -1, 1], atol=1e-6)
    one = read_image(tmp_path / "e.dcm", frame=3)
    np.testing.assert_allclose((one.affine @ [2, 5, 0, 1.0])[:3], [30.0 - 4.0, 20.0 - 1.8, 12.0], atol=1e-6)


def test_a_volume_from_an_enhanced_file_is_mapped_frame_by_frame(tmp_path: Path) -> None:
    """A 3-D model on the Enhanced MR (functional groups added): one Parametric Map frame per source frame, each at
    that frame's position, and valid for dciodvfy."""
    import torch

    from conftest import TinyCNN3d

    if _testdata("emri_small.dcm") is None:
        pytest.skip("emri_small.dcm (pydicom-data) is not available")
    torch.manual_seed(0)
    model = tmp_path / "tiny3d.pt"
    torch.jit.save(torch.jit.script(TinyCNN3d().eval()), str(model))
    (tmp_path / "tiny3d.pt.json").write_text(json.dumps({"labels": ["a", "b", "c"], "size": [16, 16, 16]}))
    (tmp_path / "in").mkdir()
    _enhanced_mr_with_geometry(tmp_path / "in" / "e.dcm")
    out = tmp_path / "out"
    assert run_cli("batch", tmp_path / "in", "--out", out, "--model", model, "--methods", "saliency", "--formats",
                   "npz,dicom", "-q") == 0
    record = manifest(out)[0]
    pm_path = out / next(o for o in record["outputs"] if o.endswith("_pm.dcm"))
    pm = pydicom.dcmread(pm_path)
    assert int(pm.NumberOfFrames) == 10 and (pm.Rows, pm.Columns) == (64, 64)
    z = sorted(float(g.PlanePositionSequence[0].ImagePositionPatient[2]) for g in pm.PerFrameFunctionalGroupsSequence)
    assert z == pytest.approx([4.0 * k for k in range(10)])
    assert not [o for o in record["outputs"] if o.endswith("_sc.dcm")]  # a volume has no single picture
    if DCIODVFY:
        report = subprocess.run([DCIODVFY, str(pm_path)], capture_output=True, text=True, timeout=60)
        assert not [line for line in report.stderr.splitlines() if line.startswith("Error")]


def test_a_format_that_cannot_be_made_is_skipped_and_the_others_are_written(tmp_path: Path, monkeypatch) -> None:
    from medlens.io import formats

    def broken(job, folder):
        raise ValueError("Could not decompose affine")

    monkeypatch.setitem(formats.FORMATS, "nifti", broken)
    (tmp_path / "in").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "in" / "ct.dcm")
    out = tmp_path / "out"
    assert run_cli("batch", tmp_path / "in", "--out", out, "--model", "phantom-lesion", "--methods", "gradcam",
                   "--formats", "png,npz,nifti,dicom", "-q") == 0
    record = manifest(out)[0]
    assert record["status"] == "done"
    names = {Path(o).name for o in record["outputs"]}
    assert {"maps.npz", "panel.png", "gradcam_lesion_pm.dcm", "gradcam_lesion_sc.dcm"} <= names
    assert not [n for n in names if n.endswith(".nii.gz")]
    assert any(n.startswith("format nifti skipped: ValueError: Could not decompose affine") for n in record["notes"])
    provenance = json.loads((out / next(o for o in record["outputs"] if o.endswith("provenance.json"))).read_text())
    assert "Could not decompose affine" in provenance["skipped_formats"]["nifti"]
