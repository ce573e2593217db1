"""The app's interactive overlays in a real headless Chromium (Playwright, Debian's /usr/bin/chromium): the read-out
under the cursor equals the map at that pixel (computed here with `medlens.explain`), a threshold move redraws the
canvas in the browser (no reload) as the server draws the exported picture, and a segmentation model's predicted mask
(computed here from the model's output) is what its overlay outlines. One server and one page for the module; skips only when no browser is present."""
from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import app_browser as ab  # noqa: E402

import medlens  # noqa: E402
from medlens.app.catalogue import ModelCatalogue  # noqa: E402
from medlens.app.inputs import SAMPLES, load_sample, prepare_input  # noqa: E402
from medlens.app.maps import MapStore  # noqa: E402
from medlens.app.session import Current  # noqa: E402
from medlens.app.views import ViewSettings, overlay_rgb  # noqa: E402

pytestmark = pytest.mark.skipif(ab.browser_missing() is not None, reason=f"no browser: {ab.browser_missing()}")

PICTURE = (128, 128)  # the phantom sample's own size: the overlays are drawn on it
GREEN = np.array([0, 255, 120])  # the region outline's colour (medlens.io.render.OUTLINE_RGB)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The phantom sample explained with gradcam by phantom-lesion and phantom-lesion-unet (overlays 0 and 1)."""
    log = tmp_path_factory.mktemp("app") / "server.log"
    with ab.served_app(log=log) as url, ab.browser_page(url) as page:
        page.locator('[data-testid="stSidebar"]').get_by_text("Sample scan").click()
        ab.wait_idle(page)
        ab.choose(page, "Models", "phantom-lesion-unet")
        ab.press_explain(page)
        ab.wait_images(page, 2)
        ab.wait_idle(page)
        yield page


def _prepared(model_name: str):
    model = medlens.load_model(model_name)
    prepared, _ = prepare_input(model, 2, load_sample(SAMPLES[0]))
    return model, prepared


def _number(label: str, text: str) -> float:
    found = re.search(label + r"\s*(-?[0-9.]+(?:e[-+]?[0-9]+)?)", text.replace("\u2212", "-"))
    assert found, f"no {label!r} in the read-out {text!r}"
    return float(found.group(1))


def test_the_cursor_reads_the_maps_value_and_a_threshold_redraws(page):
    model, prepared = _prepared("phantom-lesion")
    reference = medlens.explain(model, prepared.tensor, methods=["gradcam"])["gradcam"][0, 0].numpy()
    grey = prepared.display
    h, w = reference.shape  # the model's grid (64 x 64): each model pixel covers 2 x 2 picture pixels
    for i, j in [np.unravel_index(int(np.argmax(reference)), reference.shape), (h // 4, w // 2)]:
        centre = ((i + 0.5) * PICTURE[0] / h - 0.5, (j + 0.5) * PICTURE[1] / w - 0.5)
        text = ab.hover_picture(page, 0, *centre, PICTURE)
        shown = max(float(reference[i, j]), 0.0)  # Grad-CAM is drawn (and read out) as its positive part
        assert _number("map", text) == pytest.approx(shown, rel=1e-3, abs=1e-6), text
        assert _number("scan grey", text) == round(float(grey[i, j]) * 255), text
    page.mouse.move(0, 0)
    before = ab.image_sources(page)
    frames = ab.mark_overlays(page)
    ab.click_slider(page, "Threshold", 0.6)
    ab.wait_images(page, 2, changed_from=before)  # both overlays redrawn in the browser with the threshold
    ab.wait_idle(page)
    assert ab.overlays_kept(page, frames), "a threshold move reloaded an overlay (it must redraw in place)"
    level = ab.slider_value(page, "Threshold")
    assert 0.3 < level < 0.9
    drawn = ab.canvas_pixels(page, 0)  # the canvas as drawn in the browser, against the server's render (exports)
    server = _server_render(prepared, ViewSettings(threshold=level))
    assert drawn.shape == server.shape
    off = np.abs(drawn.astype(int) - server.astype(int)).max(axis=2)
    assert (off > 3).mean() <= 0.002 and np.median(off) <= 1, f"{(off > 3).sum()} pixels differ by more than 3"
    assert (np.abs(server.astype(int) - [0, 220, 255]).max(axis=2) == 0).sum() > 0  # the threshold outline is there
    ab.set_slider(page, "Threshold", "Home")
    ab.wait_idle(page)


def _server_render(prepared, settings: ViewSettings) -> np.ndarray:
    """phantom-lesion's gradcam overlay as the server draws it (the exported PNG's picture) with `settings`."""
    catalogue = ModelCatalogue()
    loaded = load_sample(SAMPLES[0])
    request = {"input": loaded.digest, "models": ["phantom-lesion"], "methods": ["gradcam"], "options": {},
               "seed": None, "axis": "axial", "index": None, "targets": {}}
    current = Current(catalogue, MapStore(), loaded, request, settings)
    current.compute_all()
    panel = current.panels[0]
    _, _, picture = current.drawn(panel)
    return overlay_rgb(panel.view.display, picture, current.scale(panel), settings, panel.view.region)[0]


def test_a_segmentation_models_predicted_mask_is_outlined_on_its_explanation(page, tmp_path):
    model, prepared = _prepared("phantom-lesion-unet")
    with torch.no_grad():
        mask = (model(prepared.tensor).argmax(1)[0] == 1).numpy()
    assert 0 < mask.sum() < mask.size
    up = np.kron(mask, np.ones((PICTURE[0] // mask.shape[0], PICTURE[1] // mask.shape[1]), dtype=bool))  # nearest
    padded = np.pad(up, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    boundary = up & ~inner
    shot = tmp_path / "segmentation-overlay.png"
    ab.overlay_picture(page, 1).screenshot(path=str(shot))
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"), dtype=np.int32)
    green = np.abs(pixels - GREEN).max(axis=2) <= 40
    assert green.sum() > 0, "no outline in the segmentation model's overlay"
    rows, cols = np.nonzero(green)
    at = (rows * PICTURE[0] // pixels.shape[0], cols * PICTURE[1] // pixels.shape[1])
    near = _grown(boundary)  # the screenshot's box is rounded to whole screen pixels: within one picture pixel
    assert near[at].mean() >= 0.95, f"{(~near[at]).sum()} outline pixels off the predicted mask's boundary"
    drawn = np.zeros(PICTURE, dtype=bool)
    drawn[at] = True
    assert _grown(drawn)[boundary].mean() >= 0.95, "the outline misses part of the predicted mask's boundary"
    assert not green[: pixels.shape[0] // 3].any(), "an outline far from the lesion"  # the lesion is below the middle


def _grown(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (8 neighbours)."""
    padded = np.pad(mask, 1)
    return np.any([padded[1 + dy: padded.shape[0] - 1 + dy, 1 + dx: padded.shape[1] - 1 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)
