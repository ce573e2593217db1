"""The web app's logic without Streamlit: thresholds, overlays, ensemble and agreement, differences, the map cache,
uploads (limits, corrupt files, DICOM, slices, no temp files left), the model catalogue, metrics and the export ZIP."""
from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile

import numpy as np
import pytest
import torch

import medlens
from medlens.app import batch_runs, metrics as app_metrics
from medlens.app.catalogue import ModelCatalogue
from medlens.app.export import build_zip, command_lines
from medlens.app.inputs import (SAMPLES, WINDOW_PRESETS, load_sample, prepare_input, read_region_upload, read_upload,
                                slice_scan)
from medlens.app.maps import MapStore
from medlens.app.session import Current
from medlens.app.views import (THRESHOLD_RGB, ViewSettings, agreement, centred_scale, difference, ensemble, kept,
                               overlay_rgb, scale_for)
from medlens.cli.app import streamlit_command
from medlens.cli.group import main as cli_main
from medlens.errors import InputError
from medlens.evaluation.faithfulness import deletion

from app_fixtures import dicom_bytes, models_folder, nifti_bytes, phantom_png


@pytest.fixture(scope="module")
def catalogue() -> ModelCatalogue:
    return ModelCatalogue()


@pytest.fixture
def phantom_case(catalogue):
    """The phantom-lesion model, a phantom sample prepared for it (with its lesion region) and an empty store."""
    entry = catalogue.get("phantom-lesion")
    loaded = load_sample(SAMPLES[0])
    prepared, region = prepare_input(entry.model, 2, loaded)
    return entry, loaded, prepared, region, MapStore()


# ----------------------------------------------------------------------------------------------- views
def test_quantile_threshold_keeps_the_top_share_and_value_threshold_a_share_of_the_max():
    ramp = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert kept(ramp, "quantile", 0.0, None).all()
    keep = kept(ramp, "quantile", 0.9)
    assert set(ramp[keep].tolist()) == set(range(90, 100))  # numpy quantile 0.9 of 0..99 is 89.1
    signed = ramp - 50  # |value| counts: -50 and 49 are both strong
    keep = kept(signed, "value", 0.9, scale_for([signed]))
    assert set(signed[keep].tolist()) == {-50.0, -49.0, -48.0, -47.0, -46.0, -45.0, 45.0, 46.0, 47.0, 48.0, 49.0}
    with pytest.raises(InputError):
        kept(ramp, "quantile", 1.5)


def test_overlay_hides_the_map_below_the_threshold_and_outlines_what_remains():
    image = np.full((20, 20), 0.5, dtype=np.float32)
    amap = np.zeros((20, 20), dtype=np.float32)
    amap[5:10, 5:10] = 1.0
    amap[12:14, 12:14] = 0.1
    scale = scale_for([amap])
    rgb, _ = overlay_rgb(image, amap, scale, ViewSettings(threshold_mode="value", threshold=0.5))
    gray = int(0.5 * 255 + 0.5)
    assert (rgb[12:14, 12:14] == gray).all()  # below the threshold: just the image
    assert (rgb[5, 5:10] == THRESHOLD_RGB).all() and (rgb[7, 7] != THRESHOLD_RGB).any()  # outline on the border only
    plain, _ = overlay_rgb(image, amap, scale, ViewSettings(threshold=0.0))
    assert not (plain[12:14, 12:14] == gray).all()  # without a threshold the weak part is drawn


def test_ensemble_of_rescaled_copies_is_the_normalised_map_with_no_spread():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16)).astype(np.float32)
    mean, spread = ensemble([a, 3 * a])
    np.testing.assert_allclose(mean, a / np.abs(a).max(), rtol=1e-6)
    assert np.abs(spread).max() < 1e-6
    b = rng.normal(size=(16, 16)).astype(np.float32)
    only_first, _ = ensemble([a, b], [1.0, 0.0])
    np.testing.assert_allclose(only_first, a / np.abs(a).max(), rtol=1e-6)
    with pytest.raises(InputError):
        ensemble([a, b], [0.0, 0.0])
    with pytest.raises(InputError):
        ensemble([a, b], [1.0, -1.0])


def test_agreement_is_one_for_equal_rankings_and_minus_one_for_reversed():
    a = np.arange(64, dtype=np.float32).reshape(8, 8)
    same = agreement([a, 2 * a + 1])
    assert same["spearman"] == pytest.approx(1.0) and same["top_k_overlap"] == pytest.approx(1.0)
    reverse = agreement([a, -a])
    assert reverse["spearman"] == pytest.approx(-1.0) and reverse["top_k_overlap"] == 0.0
    assert np.isnan(agreement([a])["spearman"])


def test_difference_of_a_map_and_its_rescaled_copy_is_zero_and_the_scale_is_centred():
    a = np.random.default_rng(1).normal(size=(12, 12)).astype(np.float32)
    assert np.abs(difference(a, 5 * a)).max() < 1e-6
    d = difference(np.abs(a), np.zeros_like(a))
    cmap, lo, hi = centred_scale(d)
    assert lo == -hi and hi == pytest.approx(1.0) and cmap == "RdBu_r"


# ----------------------------------------------------------------------------------------------- map cache
def test_map_store_computes_each_map_once_and_equals_medlens_explain(phantom_case):
    entry, loaded, prepared, region, store = phantom_case
    maps = store.ensure(entry, loaded.digest, prepared, region, ["gradcam"], {}, None, None)
    assert store.computed == 1
    store.ensure(entry, loaded.digest, prepared, region, ["gradcam"], {}, None, None)
    assert store.computed == 1  # cached
    both = store.ensure(entry, loaded.digest, prepared, region, ["gradcam", "lrp"], {"composite": "epsilon"}, None, None)
    assert store.computed == 2
    store.ensure(entry, loaded.digest, prepared, region, ["gradcam"], {"composite": "epsilon_plus_flat"}, None, None)
    assert store.computed == 2  # an LRP option does not change Grad-CAM's map
    reference = medlens.explain(entry.model, prepared.tensor, methods=["gradcam", "lrp"], composite="epsilon")
    target = int(reference.targets[0, 0])
    np.testing.assert_allclose(both[("gradcam", target)], reference["gradcam"][0, 0].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(both[("lrp", target)], reference["lrp"][0, 0].numpy(), rtol=1e-5, atol=1e-7)
    assert list(maps) == [("gradcam", target)]
    other = 1 - target
    store.ensure(entry, loaded.digest, prepared, region, ["gradcam"], {}, [target, other], None)
    assert store.computed == 3  # the new class only


# ----------------------------------------------------------------------------------------------- inputs
def _temp_entries() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("medlens-app-")}


def test_uploads_are_read_and_leave_no_file_behind():
    before = _temp_entries()
    loaded = read_upload("scan.png", phantom_png())
    assert loaded.scan.spatial_shape == (128, 128) and loaded.name == "scan.png"
    assert _temp_entries() == before


def test_corrupt_empty_and_too_large_uploads_are_messages_naming_the_upload():
    for data in (b"\x89PNG\r\n\x1a\nnot really", b"garbage"):
        with pytest.raises(InputError) as info:
            read_upload("scan.png", data)
        assert "scan.png" in str(info.value) and "medlens-app-" not in str(info.value)
    with pytest.raises(InputError, match="empty"):
        read_upload("scan.png", b"")
    with pytest.raises(InputError, match="upload limit"):
        read_upload("scan.png", phantom_png(), limit_mb=0.001)


def test_sixteen_bit_png_keeps_its_values():
    from PIL import Image

    arr = (np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    loaded = read_upload("deep.png", buffer.getvalue())
    np.testing.assert_array_equal(loaded.scan.pixels, arr.astype(np.float32))


def test_dicom_window_presets_and_monochrome1(tmp_path):
    plain = read_upload("scan.dcm", dicom_bytes(tmp_path))
    inverted = read_upload("mono1.dcm", dicom_bytes(tmp_path, monochrome1=True))
    np.testing.assert_allclose(inverted.scan.pixels, 1.0 - plain.scan.pixels, atol=1e-6)
    raw = read_upload("scan.dcm", dicom_bytes(tmp_path), window=WINDOW_PRESETS["modality values (no window)"])
    assert raw.scan.pixels.max() > 1.0 and raw.digest != plain.digest  # modality values, and a different cache key


def test_volume_slices_on_three_axes_and_the_sample_region_lies_on_the_lesion():
    loaded = read_upload("vol.nii", nifti_bytes())
    volume = loaded.scan.pixels
    np.testing.assert_array_equal(slice_scan(loaded.scan, "axial", 5).pixels, volume[5])
    np.testing.assert_array_equal(slice_scan(loaded.scan, "coronal", 7).pixels, np.flipud(volume[:, 7, :]))
    np.testing.assert_array_equal(slice_scan(loaded.scan, "sagittal", 9).pixels, np.flipud(volume[:, :, 9]))
    with pytest.raises(InputError):
        slice_scan(loaded.scan, "coronal", 99)
    sample = load_sample(SAMPLES[0])
    mask = sample.region.mask
    assert sample.scan.pixels[mask].mean() > sample.scan.pixels[~mask].mean() + 0.05  # the lesion is bright


def test_region_upload_box_file():
    region = read_region_upload("box.txt", b"0 0.5 0.5 0.2 0.2\n")
    assert region.boxes == ((0.5, 0.5, 0.2, 0.2),)
    with pytest.raises(InputError):
        read_region_upload("box.txt", b"not a box")


def test_a_two_d_image_for_a_three_d_model_is_refused(tmp_path):
    cat = ModelCatalogue(models_folder(tmp_path / "models"))
    entry = cat.get("file:tiny3d.pt")
    assert entry.error is None and entry.dims == 3
    with pytest.raises(InputError, match="3-D"):
        prepare_input(entry.model, entry.dims, read_upload("scan.png", phantom_png()))


# ----------------------------------------------------------------------------------------------- catalogue
def test_catalogue_loads_torchscript_refuses_pickle_and_reports_broken_files(tmp_path):
    folder = models_folder(tmp_path / "models")
    cat = ModelCatalogue(folder)
    assert {"brain-tumor-mri", "phantom-lesion", "file:tiny2d.pt", "file:pickled.pth", "file:broken.pt"} <= set(cat.keys())
    assert cat.get("file:tiny2d.pt").model is not None
    pickled = cat.get("file:pickled.pth")
    assert pickled.model is None and "allow-pickle" in pickled.error and "code" in pickled.error
    assert cat.get("file:broken.pt").model is None and cat.get("file:broken.pt").error
    trusted = ModelCatalogue(folder, allow_pickle=True)
    assert trusted.get("file:pickled.pth").model is not None
    assert cat.default_for(2) == "brain-tumor-mri"
    assert ModelCatalogue(tmp_path / "nowhere").problems


# ----------------------------------------------------------------------------------------------- metrics
def test_image_metrics_match_the_evaluation_functions(phantom_case):
    entry, loaded, prepared, region, store = phantom_case
    maps = store.ensure(entry, loaded.digest, prepared, region, ["gradcam"], {}, None, None)
    rows, curves = app_metrics.image_metrics(entry, prepared.tensor, maps, region, steps=10)
    (method, target), amap = next(iter(maps.items()))
    direct = deletion(entry.model, prepared.tensor, torch.from_numpy(amap)[None, None], torch.tensor([[target]]), steps=10)
    assert rows[0]["deletion_auc"] == pytest.approx(float(direct.values[0, 0]))
    assert len(next(iter(curves.values()))) == 11
    peak_in_region = np.where(region, 1.0, 0.0).astype(np.float32)
    rows, _ = app_metrics.image_metrics(entry, prepared.tensor, {(method, target): peak_in_region}, region, steps=4)
    assert rows[0]["pointing_game"] == 1.0 and rows[0]["energy_in_region"] == pytest.approx(1.0)


def test_evaluate_folder_and_progress_parsing(tmp_path):
    with pytest.raises(InputError):
        app_metrics.read_evaluate_folder(str(tmp_path))
    (tmp_path / "metrics.csv").write_text("method,metric,target,n,value,ci_low,ci_high\ngradcam,deletion,all,4,0.2,0.1,0.3\n")
    rows, plots, _ = app_metrics.read_evaluate_folder(str(tmp_path))
    assert rows[0]["value"] == "0.2" and plots == []
    log = tempfile.TemporaryFile()
    log.write(b"evaluate:  10%|#  | 1/10 [00:01<00:09]\revaluate:  30%|### | 3/10 [00:03<00:07]\nwrote 12 rows\n")
    log.flush()
    job = app_metrics.EvaluateJob(None, tmp_path, log, [])  # type: ignore[arg-type]
    assert job.progress() == (3, 10) and job.message() == "wrote 12 rows"


def test_manifest_reader_takes_the_last_record_per_id_and_skips_a_cut_line(tmp_path):
    lines = [{"id": "a", "status": "failed"}, {"id": "b", "status": "done"}, {"id": "a", "status": "done"}]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + '\n{"id": "c", "sta')
    records = batch_runs.read_manifest(tmp_path)
    assert sorted((r["id"], r["status"]) for r in records) == [("a", "done"), ("b", "done")]


# ----------------------------------------------------------------------------------------------- export
def test_export_zip_holds_overlays_raw_maps_provenance_and_a_command_that_reproduces_them(catalogue, tmp_path, monkeypatch):
    loaded = read_upload("scan.png", phantom_png())
    request = {"models": ["phantom-lesion"], "methods": ["gradcam", "saliency"], "options": {}, "seed": None}
    current = Current(catalogue, MapStore(), loaded, request, ViewSettings(threshold=0.5))
    current.compute_all()
    assert not current.errors and len(current.panels) == 2
    with zipfile.ZipFile(io.BytesIO(current.export_zip())) as zf:
        names = set(zf.namelist())
        assert {"provenance.json", "command.txt", "maps/phantom-lesion.npz"} <= names
        target = current.panels[0].target_name
        assert f"overlays/phantom-lesion/gradcam_{target}.png" in names
        raw = np.load(io.BytesIO(zf.read("maps/phantom-lesion.npz")))
        provenance = json.loads(zf.read("provenance.json"))
        command = zf.read("command.txt").decode().strip()
    assert provenance["view"]["threshold"] == 0.5 and "phantom-lesion" in provenance["models"]
    # run the exported command line: the CLI writes the same raw maps
    (tmp_path / "scan.png").write_bytes(phantom_png())
    args = command.split()[1:]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    monkeypatch.chdir(tmp_path)
    assert cli_main(args) == 0
    written = np.load(tmp_path / "out" / "scan" / "maps.npz")
    np.testing.assert_allclose(written["gradcam"][0, 0], raw[f"gradcam/{target}"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(written["saliency"][0, 0], raw[f"saliency/{target}"], rtol=1e-5, atol=1e-7)


def test_command_lines_quote_and_name_options():
    lines = command_lines("my scan.png", {"m": "brain-tumor-mri"}, ["lrp"], {"composite": "epsilon"}, {"m": ["glioma"]},
                          None)
    assert lines[0].startswith("medlens explain 'my scan.png' --model brain-tumor-mri --methods lrp --targets glioma")
    assert "--option composite=epsilon" in lines[0]


def test_build_zip_without_items_still_has_provenance():
    with zipfile.ZipFile(io.BytesIO(build_zip([], {"x": 1}, []))) as zf:
        assert json.loads(zf.read("provenance.json"))["x"] == 1


# ----------------------------------------------------------------------------------------------- command
def test_streamlit_command_is_local_headless_and_without_telemetry():
    cmd = streamlit_command(8765)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--browser.gatherUsageStats") + 1] == "false"
    assert cmd[cmd.index("--server.headless") + 1] == "true"
    assert cmd[cmd.index("--server.port") + 1] == "8765"


def test_missing_streamlit_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "streamlit" else real(name, *a))
    assert cli_main(["app"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "medlens[app]"' in err


@pytest.mark.skipif(not batch_runs.available(), reason="the batch runner (medlens.batch) is not installed")
def test_batch_runs_in_the_background_reports_progress_and_resumes(tmp_path):
    import time

    from medlens.app.inputs import phantom_sample

    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in range(2):
        (inputs / f"case{seed}.png").write_bytes(phantom_sample(SAMPLES[0], seed=seed)[1])
    out = tmp_path / "out"
    job = batch_runs.start_batch(str(inputs), "phantom-lesion", ["gradcam"], str(out))
    deadline = time.time() + 120
    while not job.finished and time.time() < deadline:
        time.sleep(0.2)
    assert job.process.returncode == 0, job.message()
    assert job.progress() == (2, 0, 2)
    records = batch_runs.read_manifest(out)
    for record in records:
        assert all((out / o).is_file() for o in record["outputs"])
    assert {p.name for p in out.iterdir() if p.is_file()} == {"batch.json", "manifest.jsonl", "report.html", "summary.csv"}
    again = batch_runs.start_batch(str(inputs), "phantom-lesion", ["gradcam"], str(out))  # resumes: nothing to redo
    again.process.wait(timeout=120)
    assert again.process.returncode == 0 and len(batch_runs.read_manifest(out)) == 2


def test_a_three_d_model_is_explained_on_the_whole_volume(tmp_path):
    cat = ModelCatalogue(models_folder(tmp_path / "models"))
    loaded = read_upload("vol.nii", nifti_bytes())
    request = {"models": ["file:tiny3d.pt"], "methods": ["saliency"], "options": {}, "seed": None}
    current = Current(cat, MapStore(), loaded, request, ViewSettings())
    current.compute_all()
    assert not current.errors and current.panels[0].raw.shape == loaded.scan.pixels.shape  # (D, H, W)
    assert current.png(current.panels[0]).startswith(b"\x89PNG")


def test_figshare_samples_come_with_their_boxes(tmp_path):
    from PIL import Image

    from medlens.app.inputs import figshare_samples, read_server_file

    for label in ("glioma", "meningioma"):
        (tmp_path / label).mkdir()
        for n in (12, 3):
            Image.fromarray(np.full((32, 32), 40 * n % 255, dtype=np.uint8)).save(tmp_path / label / f"{n}.jpg")
            (tmp_path / label / f"{n}.txt").write_text("1 0.5 0.5 0.25 0.25\n")
    found = figshare_samples(str(tmp_path), per_class=1)
    assert list(found) == ["figshare: glioma/3.jpg", "figshare: meningioma/3.jpg"]
    loaded = read_server_file(found["figshare: glioma/3.jpg"])
    assert loaded.region.boxes == ((0.5, 0.5, 0.25, 0.25),) and loaded.region_id
    assert figshare_samples(None) == {} and figshare_samples(str(tmp_path / "missing")) == {}


def test_app_draws_each_method_as_defined_or_signed_when_asked():
    from medlens.app.views import ViewSettings, drawn

    raw = np.array([[-2.0, 1.0]], dtype=np.float32)
    values, how = drawn(raw, "gradcam", ViewSettings())
    assert how == "positive" and values.tolist() == [[0.0, 1.0]]
    values, how = drawn(raw, "saliency", ViewSettings())
    assert how == "magnitude" and values.tolist() == [[2.0, 1.0]]
    values, how = drawn(raw, "gradcam", ViewSettings(signed=True))
    assert how == "signed" and values.tolist() == [[-2.0, 1.0]]
