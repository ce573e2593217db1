"""The web app's page driven by Streamlit's AppTest (no browser): upload, defaults, model and method choice, sliders
that redraw without recomputing, ensemble and difference views, the export ZIP, and every bad input as a message."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the app tests need streamlit (pip install 'medlens[app]')")
from streamlit.testing.v1 import AppTest  # noqa: E402

from app_fixtures import dicom_bytes, models_folder, nifti_bytes, phantom_png  # noqa: E402

PAGE = str(Path(__file__).resolve().parents[1] / "src" / "medlens" / "app" / "page.py")


@pytest.fixture
def app(monkeypatch) -> AppTest:
    for name in ("MEDLENS_APP_MODELS", "MEDLENS_APP_DATA", "MEDLENS_APP_ALLOW_PICKLE", "MEDLENS_APP_MAX_UPLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.run()
    assert not at.exception
    return at


def _upload(at: AppTest, name: str, data: bytes, mime: str = "application/octet-stream") -> AppTest:
    at.sidebar.file_uploader(key="upload").set_value((name, data, mime))
    return at.run()


def _explain(at: AppTest) -> AppTest:
    return at.sidebar.button(key="explain").click().run()


def _captions(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


def _overlays(at: AppTest) -> list:
    """The interactive overlays (each a page in an iframe) of the Overlays view."""
    return list(at.get("iframe"))


def _titles(at: AppTest) -> list[str]:
    return [c.value for c in at.caption if " · " in str(c.value)]


def _texts(elements) -> str:
    return " | ".join(str(e.value) for e in elements)


def test_banner_and_upload_with_defaults_gives_one_overlay(app):
    assert "not for diagnosis" in _texts(app.info)
    _upload(app, "scan.png", phantom_png(), "image/png")
    assert app.sidebar.multiselect(key="models::brain-tumor-mri").value == ["brain-tumor-mri"]
    assert app.sidebar.multiselect(key="methods").value == ["gradcam"]
    _explain(app)
    assert not app.exception and not app.error
    assert len(_overlays(app)) == 1 and _titles(app)[0].startswith("brain-tumor-mri · gradcam · ")
    assert app.session_state["store"].computed == 1


def test_models_methods_sliders_redraw_without_recomputing(app):
    app.sidebar.radio(key="source").set_value("Sample scan").run()
    app.sidebar.multiselect(key="models::phantom-lesion").set_value(["phantom-lesion", "phantom-shortcut"])
    app.sidebar.multiselect(key="methods").set_value(["gradcam", "gradcam++", "lrp"])
    _explain(app)
    assert not app.exception and not app.error
    assert len(_overlays(app)) == 6  # 2 models x 3 methods
    store = app.session_state["store"]
    computed = store.computed
    assert computed == 2  # one pipeline call per model, the methods sharing it
    app.slider(key="threshold").set_value(0.8).run()
    app.slider(key="opacity").set_value(0.4).run()
    app.selectbox(key="cmap").set_value("viridis").run()
    app.checkbox(key="shared_scale").check().run()
    assert not app.exception and len(_overlays(app)) == 6
    assert app.session_state["store"].computed == computed  # nothing recomputed
    # a second target for a model: only that map set is computed
    app.multiselect(key=f"targets::phantom-lesion::{app.session_state['request']['input']}").set_value(["normal", "lesion"]).run()
    assert len(_overlays(app)) == 9 and app.session_state["store"].computed == computed + 1


def test_ensemble_difference_and_export_views(app):
    app.sidebar.radio(key="source").set_value("Sample scan").run()
    app.sidebar.multiselect(key="models::phantom-lesion").set_value(["phantom-lesion", "phantom-shortcut"])
    app.sidebar.multiselect(key="methods").set_value(["gradcam", "saliency"])
    _explain(app)
    app.radio(key="view").set_value("Ensemble").run()
    assert not app.exception and not app.error
    assert "ensemble map" in _captions(app) and len(app.metric) == 2
    for kind in ("class vs class", "model vs model", "method vs method"):
        app.radio(key="view").set_value("Difference").run()
        app.radio(key="diff_kind").set_value(kind).run()
        assert not app.exception and not app.error, kind
        assert len(app.image) == 3 and "difference" in _captions(app)[2]
    app.radio(key="view").set_value("Export").run()
    data = app.session_state["export_zip"]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        names = set(zf.namelist())
    assert {"provenance.json", "command.txt", "maps/phantom-lesion.npz", "maps/phantom-shortcut.npz"} <= names
    assert sum(n.startswith("overlays/") for n in names) == 4


def test_dicom_upload_shows_window_presets_and_no_patient_fields(app, tmp_path):
    _upload(app, "scan.dcm", dicom_bytes(tmp_path))
    assert "brain (40/80)" in app.sidebar.selectbox(key="window").options
    app.sidebar.multiselect(key="models::brain-tumor-mri").set_value(["phantom-lesion"])
    _explain(app)
    assert not app.exception and len(_overlays(app)) == 1
    page_text = " ".join(str(e.value) for kind in (app.markdown, app.caption, app.info, app.error) for e in kind)
    assert "Doe" not in page_text and "SECRET-123" not in page_text


def test_volume_with_a_two_d_model_gets_a_slice_slider(app):
    _upload(app, "volume.nii", nifti_bytes())
    app.sidebar.multiselect(key="models::brain-tumor-mri").set_value(["phantom-lesion"])
    app.sidebar.selectbox(key="slice_axis").set_value("coronal").run()
    _explain(app)
    assert not app.exception and not app.error and len(_overlays(app)) == 1
    slider = [s for s in app.sidebar.slider if s.key.startswith("slice_index::coronal")][0]
    computed = app.session_state["store"].computed
    slider.set_value(10).run()
    assert app.session_state["store"].computed == computed + 1  # a new slice is a new input


def test_bad_inputs_are_messages_and_the_page_keeps_working(app, monkeypatch):
    _upload(app, "scan.png", b"\x89PNG\r\n\x1a\n broken")
    assert not app.exception and "cannot be used" in _texts(app.error) and "scan.png" in _texts(app.error)
    monkeypatch.setenv("MEDLENS_APP_MAX_UPLOAD_MB", "0.001")
    _upload(app, "big.png", phantom_png(), "image/png")
    assert not app.exception and "upload limit" in _texts(app.error)
    monkeypatch.delenv("MEDLENS_APP_MAX_UPLOAD_MB")
    _upload(app, "scan.png", phantom_png(), "image/png")
    _explain(app)
    assert not app.exception and not app.error and len(_overlays(app)) == 1  # the page still works


def test_model_files_a_three_d_model_a_broken_file_and_a_pickle_without_allow_pickle(monkeypatch, tmp_path):
    folder = models_folder(tmp_path / "models")
    monkeypatch.setenv("MEDLENS_APP_MODELS", str(folder))
    monkeypatch.delenv("MEDLENS_APP_ALLOW_PICKLE", raising=False)
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    _upload(at, "scan.png", phantom_png(), "image/png")
    at.sidebar.multiselect(key="models::brain-tumor-mri").set_value(
        ["phantom-lesion", "file:tiny3d.pt", "file:broken.pt", "file:pickled.pth"])
    at.sidebar.multiselect(key="methods").set_value(["saliency"])
    _explain(at)
    errors = _texts(at.error)
    assert not at.exception
    assert "file:broken.pt" in errors and "file:pickled.pth" in errors and "allow-pickle" in errors
    assert "runs" in errors or "code" in errors  # the reason: loading a pickle runs code
    assert "file:tiny3d.pt" in errors and "3-D" in errors  # the image the model cannot take
    assert len(_overlays(at)) == 1  # phantom-lesion still explained


def test_two_sessions_do_not_share_uploads_or_results(app):
    _upload(app, "scan.png", phantom_png(), "image/png")
    _explain(app)
    other = AppTest.from_file(PAGE, default_timeout=120).run()
    assert "request" not in other.session_state and len(_overlays(other)) == 0
    assert "store" in other.session_state and other.session_state["store"].computed == 0


def test_region_upload_is_outlined_scored_and_dropped_when_removed(app):
    _upload(app, "scan.png", phantom_png(), "image/png")
    app.sidebar.multiselect(key="models::brain-tumor-mri").set_value(["phantom-lesion"])
    _explain(app)
    app.sidebar.file_uploader(key="region_upload").set_value(("box.txt", b"0 0.5 0.5 0.3 0.3\n", "text/plain")).run()
    app.radio(key="view").set_value("Metrics").run()
    app.button(key="run_metrics").click().run()
    assert not app.exception and not app.error
    rows = app.session_state["metrics_result"][0]
    assert "pointing_game" in rows[0] and 0.0 <= rows[0]["energy_in_region"] <= 1.0
    assert app.session_state["store"].computed == 1  # adding a region recomputes no map
    app.sidebar.file_uploader(key="region_upload").set_value(None).run()
    app.button(key="run_metrics").click().run()
    assert "pointing_game" not in app.session_state["metrics_result"][0][0]


def test_choices_survive_a_new_upload(app):
    _upload(app, "a.png", phantom_png(), "image/png")
    app.sidebar.multiselect(key="methods").set_value(["gradcam", "lrp"]).run()
    _explain(app)
    app.slider(key="threshold").set_value(0.5).run()
    app.sidebar.file_uploader(key="upload").set_value(None).run()  # the run between two uploads draws no controls
    _upload(app, "b.png", phantom_png()[:-1] + b"\x00", "image/png")
    _upload(app, "c.png", phantom_png(), "image/png")
    _explain(app)
    assert app.sidebar.multiselect(key="methods").value == ["gradcam", "lrp"]
    assert app.slider(key="threshold").value == 0.5 and not app.warning


def test_batch_view_is_offered_once_the_batch_runner_exists(app):
    from medlens.app import batch_runs

    app.sidebar.radio(key="source").set_value("Sample scan").run()
    _explain(app)
    assert ("Batch" in app.radio(key="view").options) == batch_runs.available()
    if batch_runs.available():
        app.radio(key="view").set_value("Batch").run()
        assert not app.exception and app.text_input(key="batch_in") is not None
        app.button(key="batch_start").click().run()  # no folder given: a message, no crash
        assert "give both the input folder and an output folder" in _texts(app.error)


def test_a_segmentation_model_shows_its_region_score_and_outline_and_metrics_say_why_not(app):
    app.sidebar.radio(key="source").set_value("Sample scan").run()
    app.sidebar.multiselect(key="models::phantom-lesion").set_value(["phantom-lesion-unet"])
    _explain(app)
    assert not app.exception and not app.error and len(_overlays(app)) == 1
    assert _titles(app)[0].startswith("phantom-lesion-unet · gradcam · lesion (the predicted mask outlined)")
    assert any("predicted mask" in str(c.value) for c in app.caption)
    app.radio(key="view").set_value("Metrics").run()
    app.button(key="run_metrics").click().run()
    assert not app.exception and "no deletion / insertion curves" in _texts(app.error)
