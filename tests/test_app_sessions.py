"""The app's shared models and interactive overlays without a browser: explain calls borrow private copies of a model
(two at once never wait on each other, the loaded model is never hooked, the number of copies is bounded), a
segmentation model's panel outlines its own predicted mask, and the overlay figure's read-out holds the map's values
on the model's grid, once per model pixel."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import medlens
from medlens.app import catalogue as app_catalogue
from medlens.app.catalogue import ModelCatalogue
from medlens.app.figures import hover_grid, readout_bytes
from medlens.app.inputs import SAMPLES, load_sample, prepare_input
from medlens.app.maps import MapStore
from medlens.app.session import Current
from medlens.app.views import ViewSettings


@pytest.fixture(scope="module")
def catalogue() -> ModelCatalogue:
    return ModelCatalogue()


def test_two_calls_borrow_two_copies_at_once_and_the_loaded_model_stays_clean(catalogue, monkeypatch):
    entry = catalogue.get("phantom-lesion")
    reference = {k: v.clone() for k, v in entry.model.state_dict().items()}
    second = {}

    def other() -> None:
        with entry.borrow() as model:  # must not wait for the first borrower
            second["model"] = model

    with entry.borrow() as first:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive() and second["model"] is not first
    assert first is not entry.model and second["model"] is not entry.model
    assert all(torch.equal(reference[k], v) for k, v in entry.model.state_dict().items())
    x = torch.rand(1, 1, 64, 64)
    with entry.borrow() as copy:
        np.testing.assert_allclose(copy(x).detach().numpy(), entry.model(x).detach().numpy(), rtol=1e-6)
    monkeypatch.setattr(app_catalogue, "MAX_REPLICAS", 2)
    with entry.borrow(), entry.borrow():  # two copies held: a third call waits until one comes back
        waiter = threading.Thread(target=_borrow_once, args=(entry,))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()
    waiter.join(timeout=30)
    assert not waiter.is_alive()


def _borrow_once(entry) -> None:
    with entry.borrow():
        pass


def test_a_segmentation_panel_outlines_the_models_predicted_mask(catalogue):
    loaded = load_sample(SAMPLES[0])
    request = {"input": loaded.digest, "models": ["phantom-lesion-unet"], "methods": ["gradcam"], "options": {},
               "seed": None, "axis": "axial", "index": None, "targets": {}}
    current = Current(catalogue, MapStore(), loaded, request, ViewSettings())
    current.compute_all()
    assert not current.errors and len(current.panels) == 1
    panel = current.panels[0]
    model = medlens.load_model("phantom-lesion-unet")
    prepared, _ = prepare_input(model, 2, loaded)
    with torch.no_grad():
        predicted = (model(prepared.tensor).argmax(1)[0] == 1).numpy()
    assert panel.target_name == "lesion" and panel.predicted_region
    np.testing.assert_array_equal(panel.region, predicted)  # the predicted mask, not the sample's own lesion mask
    reference = medlens.explain(model, prepared.tensor, methods=["gradcam"],
                                targets=[medlens.SegmentationTarget("lesion")])["gradcam"][0, 0].numpy()
    np.testing.assert_allclose(panel.raw, reference, rtol=1e-5, atol=1e-7)
    run = current.store.run_of("phantom-lesion-unet", panel_input(current))
    assert list(run.scores) == ["lesion@predicted"] and run.default_targets == [1]
    page = current.page(panel)
    assert '<canvas id="picture"' in page and "__" not in page  # every part filled


def panel_input(current: Current) -> str:
    return current.input_id("phantom-lesion-unet")


def test_the_read_out_holds_each_model_pixel_once_as_float32_bytes():
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    grid = hover_grid(values, values / 11)
    assert grid["values"].tolist() == values.tolist() and grid["step"] == 1
    assert grid["grey"].tolist() == np.rint(values / 11 * 255).astype(int).tolist()  # grey levels 0-255
    value_bytes, grey_bytes, shape = readout_bytes(values, values / 11)
    assert np.frombuffer(value_bytes, "<f4").reshape(3, 4).tolist() == values.tolist() and shape == (3, 4)
    assert len(grey_bytes) == 12
    big = hover_grid(np.zeros((600, 300), np.float32), np.zeros((600, 300), np.float32))
    assert big["values"].shape == (200, 100) and big["step"] == 3
