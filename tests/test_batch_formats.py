"""The nifti and dicom output formats: maps carry the input's affine; DICOM results read back, reference the source
instance, keep its study and patient, and pass highdicom's own checks. Also the affine bookkeeping of the readers."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from batch_helpers import manifest, maps_of, phantom_folder, run_cli
from helpers import TinyCNN3d
from medlens.io import read_image
from medlens.io.readers import take_slice


def _linear(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear resampling over the same extent (half-pixel centres, edges held): the textbook version of
    bilinear/trilinear interpolation with align_corners=False, one axis at a time."""
    out = np.asarray(values, dtype=np.float64)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = (x - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


def _world(affine: np.ndarray, index) -> np.ndarray:
    return (np.asarray(affine) @ np.array([*index, 1.0]))[:3]


@pytest.mark.parametrize("shape, affine", [
    ((6, 5, 4), np.array([[2.0, 0, 0, -10], [0, 1.5, 0, 20], [0, 0, 3, 5], [0, 0, 0, 1]])),  # RAS already
    ((6, 5, 4), np.array([[0, 0, -2.0, 40], [1.0, 0, 0, -3], [0, -1.5, 0, 9], [0, 0, 0, 1]])),  # permuted, flipped
    ((7, 1, 5), np.array([[-0.8, 0, 0, 30], [0, 4.0, 0, 2], [0, 0, 0.7, -6], [0, 0, 0, 1]])),  # one coronal slice
])
def test_read_nifti_keeps_where_every_pixel_is(tmp_path: Path, shape, affine) -> None:
    """Every pixel medlens reads sits, by scan.affine, where the file's affine puts the voxel holding that value."""
    values = np.random.default_rng(0).permutation(int(np.prod(shape))).reshape(shape).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(values, affine), path)
    scan = read_image(path)
    assert scan.affine is not None
    for pixel in np.ndindex(*scan.spatial_shape):
        voxel = tuple(int(v) for v in np.argwhere(values == scan.pixels[pixel])[0])
        index = pixel if len(pixel) == 3 else (*pixel, 0)
        np.testing.assert_allclose(_world(scan.affine, index), _world(affine, voxel), atol=1e-5)
    if scan.is_volume:  # one slice keeps its place too
        sliced = take_slice(scan, 2)
        for pixel in [(0, 0), (1, 2), (scan.spatial_shape[1] - 1, scan.spatial_shape[2] - 1)]:
            np.testing.assert_allclose(_world(sliced.affine, (*pixel, 0)), _world(scan.affine, (2, *pixel)), atol=1e-6)


@pytest.fixture(scope="module")
def model3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model3d")
    path = folder / "tiny3d.pt"
    torch.jit.save(torch.jit.script(TinyCNN3d().eval()), str(path))
    (folder / "tiny3d.pt.json").write_text(json.dumps({"labels": ["a", "b", "c"], "size": [16, 16, 16]}))
    return path


def test_nifti_maps_of_a_volume_carry_its_affine(model3d: Path, tmp_path: Path) -> None:
    affine = np.array([[2.0, 0, 0, -30], [0, 1.5, 0, 20], [0, 0, 3, 5], [0, 0, 0, 1]])
    volume = np.random.default_rng(1).random((32, 32, 16), dtype=np.float32)  # (x, y, z), model takes 16^3
    folder = tmp_path / "in"
    folder.mkdir()
    nib.save(nib.Nifti1Image(volume, affine), folder / "vol.nii.gz")
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, "--model", model3d, "--methods", "saliency", "--formats",
                   "npz,nifti", "-q") == 0
    record = manifest(out)[0]
    target = record["targets"][0]
    written = nib.load(out / next(o for o in record["outputs"] if o.endswith(f"saliency_{target}.nii.gz")))
    # x and y were halved (32 -> 16): map voxel i covers input voxels 2i and 2i+1, its centre at 2i + 0.5
    expected = affine @ np.array([[2.0, 0, 0, 0.5], [0, 2.0, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(written.affine, expected, atol=1e-5)
    assert written.header.get_sform(coded=True)[1] == 1
    maps = maps_of(out, record)["saliency"][0, 0]  # (z, y, x), anterior at the top of each slice
    data = np.asarray(written.dataobj)
    assert data.shape == (16, 16, 16)
    np.testing.assert_array_equal(data, maps.transpose(2, 1, 0)[:, ::-1, :])


def test_nifti_map_of_a_2d_slice_has_the_slice_affine(tmp_path: Path) -> None:
    pixels = (phantom_folder(tmp_path, 1) / "case000.png")
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(pixels), dtype=np.float32)
    affine = np.array([[0.8, 0, 0, -25], [0, 0.8, 0, -30], [0, 0, 5, 12], [0, 0, 0, 1]])
    folder = tmp_path / "nifti"
    folder.mkdir()
    nib.save(nib.Nifti1Image(image.T[:, ::-1, None].copy(), affine), folder / "slice.nii")
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, "--model", "phantom-lesion", "--methods", "gradcam", "--formats",
                   "npz,nifti", "-q") == 0
    record = manifest(out)[0]
    written = nib.load(out / next(o for o in record["outputs"] if o.endswith(".nii.gz")))
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)  # 64 px slice, 64 px model: the same grid
    maps = maps_of(out, record)["gradcam"][0, 0]
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, 0], maps.T[:, ::-1])


def test_dicom_results_read_back_reference_the_source_and_pass_highdicom(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
    folder = tmp_path / "in"
    folder.mkdir()
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # 128 x 128, into a 64 x 64 model
    source.save_as(folder / "ct.dcm")
    phantom_folder(tmp_path, 1)
    (folder / "plain.png").write_bytes((tmp_path / "inputs" / "case000.png").read_bytes())
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, "--model", "phantom-lesion", "--methods", "gradcam,lrp",
                   "--formats", "png,npz,dicom", "-q") == 0
    by_path = {r["path"]: r for r in manifest(out)}
    record = by_path["ct.dcm"]
    pms = [o for o in record["outputs"] if o.endswith("_pm.dcm")]
    scs = [o for o in record["outputs"] if o.endswith("_sc.dcm")]
    assert len(pms) == 2 and len(scs) == 2
    maps = maps_of(out, record)
    row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
    for name in pms:
        ds = pydicom.dcmread(out / name)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
        pm = hd.pm.ParametricMap.from_dataset(ds)
        for key in ("StudyInstanceUID", "PatientID", "PatientName", "FrameOfReferenceUID"):
            assert str(ds.get(key)) == str(source.get(key))
        refs = [r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence]
        assert refs == [source.SOPInstanceUID]
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
        method = Path(name).name.split("_")[0]
        # on the source's own 128 x 128 grid, so a viewer overlays it: the 64 x 64 map resampled over the same extent
        np.testing.assert_allclose(pm.pixel_array.reshape(128, 128), _linear(maps[method][0, 0], (128, 128)),
                                   atol=1e-5 * float(np.abs(maps[method]).max()))
        shared = ds.SharedFunctionalGroupsSequence[0]
        spacing = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
        np.testing.assert_allclose(spacing, [row_spacing, column_spacing])
        position = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in source.ImagePositionPatient], atol=1e-4)
        orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
        np.testing.assert_allclose(orientation, [float(v) for v in source.ImageOrientationPatient], atol=1e-6)
    for name in scs:
        ds = pydicom.dcmread(out / name)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
        assert ds.pixel_array.ndim == 3 and ds.pixel_array.shape[2] == 3
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    plain = by_path["plain.png"]
    assert not [o for o in plain["outputs"] if o.endswith(".dcm")]
    provenance = json.loads((out / next(o for o in plain["outputs"] if o.endswith("provenance.json"))).read_text())
    assert provenance["dicom"]["written"] is False


def test_dicom_radiographs_of_one_series_stay_apart_and_series_slices_are_referenced(tmp_path: Path) -> None:
    pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
    radiographs, series = tmp_path / "dx", tmp_path / "ct" / "series"
    radiographs.mkdir()
    series.mkdir(parents=True)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "FrameOfReferenceUID", "SliceLocation"):
        delattr(source, key)
    source.save_as(radiographs / "pa.dcm")  # no patient geometry, no orientation
    source.SOPInstanceUID, source.PatientOrientation = "1.2.826.0.1.99", ["L", "F"]
    source.save_as(radiographs / "lateral.dcm")  # same series, with an orientation
    slices = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(3):
        slices.SOPInstanceUID, slices.ImagePositionPatient = f"1.2.826.0.1.{k}", [0.0, 0.0, 5.0 * k]
        slices.save_as(series / f"s{k}.dcm")
    out = tmp_path / "out"
    assert run_cli("batch", radiographs, tmp_path / "ct", "--out", out, "--model", "phantom-lesion", "--methods",
                   "gradcam", "--formats", "npz,dicom", "-q") == 0
    by_path = {r["path"]: r for r in manifest(out)}
    assert set(by_path) == {"dx/lateral.dcm", "dx/pa.dcm", "ct/series"}  # two radiographs, one volume
    names = {p: sorted(Path(o).name for o in r["outputs"] if o.endswith(".dcm")) for p, r in by_path.items()}
    assert len(names["dx/pa.dcm"]) == 1 and names["dx/pa.dcm"][0].endswith("_sc.dcm")  # no Parametric Map
    assert pydicom.dcmread(out / next(o for o in by_path["dx/pa.dcm"]["outputs"] if o.endswith(".dcm"))).PatientOrientation == ""
    assert names["dx/lateral.dcm"] == ["gradcam_lesion_sc.dcm"] or names["dx/lateral.dcm"] == ["gradcam_normal_sc.dcm"]
    lateral = pydicom.dcmread(out / next(o for o in by_path["dx/lateral.dcm"]["outputs"] if o.endswith(".dcm")))
    assert list(lateral.PatientOrientation) == ["L", "F"]
    provenance = json.loads((out / "maps/dx/pa_dcm/provenance.json").read_text())["dicom"]
    assert "FrameOfReferenceUID" in provenance["parametric_map"]
    pm = pydicom.dcmread(out / next(o for o in by_path["ct/series"]["outputs"] if o.endswith("_pm.dcm")))
    refs = [r.ReferencedSOPInstanceUID for s in pm.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence]
    assert refs == ["1.2.826.0.1.1"]  # a 2-D model takes the middle slice: that slice is the source
    position = pm.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert float(position[2]) == pytest.approx(5.0)


def test_dicom_parametric_map_of_a_volume_places_every_frame(model3d: Path, tmp_path: Path) -> None:
    pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
    series = tmp_path / "in" / "series"
    series.mkdir(parents=True)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(4):  # slices 5 mm apart at z = 0, 5, 10, 15: a 4 x 128 x 128 volume into a 16^3 model
        source.SOPInstanceUID, source.ImagePositionPatient = f"1.2.826.0.2.{k}", [0.0, 0.0, 5.0 * k]
        source.save_as(series / f"s{k}.dcm")
    out = tmp_path / "out"
    assert run_cli("batch", tmp_path / "in", "--out", out, "--model", model3d, "--methods", "saliency",
                   "--formats", "npz,dicom", "-q") == 0
    record = manifest(out)[0]
    ds = pydicom.dcmread(out / next(o for o in record["outputs"] if o.endswith("_pm.dcm")))
    refs = sorted(r.ReferencedSOPInstanceUID for s in ds.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence)
    assert refs == [f"1.2.826.0.2.{k}" for k in range(4)]
    maps = maps_of(out, record)["saliency"][0, 0]
    assert int(ds.NumberOfFrames) == 4  # on the source's grid: one frame per source slice, 128 x 128
    expected = _linear(maps, (4, 128, 128))
    seen = []
    for frame, group in zip(ds.pixel_array, ds.PerFrameFunctionalGroupsSequence):  # frames in highdicom's order
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        k = int(round(z / 5.0))
        assert z == pytest.approx(5.0 * k)
        seen.append(k)
        np.testing.assert_allclose(frame, expected[k], atol=1e-5 * float(np.abs(maps).max()))
    assert sorted(seen) == [0, 1, 2, 3]
