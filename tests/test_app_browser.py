"""`medlens app` end to end in a real headless Chromium (Playwright with Debian's /usr/bin/chromium): upload a phantom
PNG and a DICOM, press Explain, see the overlays, move the threshold, open the ensemble and difference views, download
the ZIP and check its files, and upload a corrupt file and see the message. Skips only when no browser is present."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import app_browser as ab  # noqa: E402

from app_fixtures import dicom_bytes, phantom_png  # noqa: E402

pytestmark = pytest.mark.skipif(ab.browser_missing() is not None, reason=f"no browser: {ab.browser_missing()}")


def _alert_text(page) -> str:
    return " ".join(page.locator('[data-testid="stAlert"]').all_inner_texts())


def test_the_app_in_a_browser(tmp_path):
    png = tmp_path / "phantom.png"
    png.write_bytes(phantom_png())
    dcm = tmp_path / "scan.dcm"
    dcm.write_bytes(dicom_bytes(tmp_path))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with ab.served_app(log=tmp_path / "server.log") as url, ab.browser_page(url) as page:
        page.get_by_text("not for diagnosis").first.wait_for(timeout=60_000)  # the research banner
        assert "not for diagnosis" in page.locator('[data-testid="stMain"]').inner_text()
        ab.upload(page, png)
        ab.press_explain(page)
        ab.wait_images(page, 1)  # defaults: the bundled brain model, gradcam
        ab.wait_idle(page)
        assert "brain-tumor-mri · gradcam" in page.locator('[data-testid="stMain"]').inner_text()

        ab.choose(page, "Methods", "saliency")
        ab.press_explain(page)
        ab.wait_images(page, 2)
        ab.wait_idle(page)
        before = ab.image_sources(page)
        # Grad-CAM is drawn as defined (its positive part); on this phantom the default brain model's Grad-CAM has a
        # positive part (v4's had none, a blank overlay), so the threshold redraws both overlays
        ab.set_slider(page, "Threshold", "End")
        ab.wait_images(page, 2, changed_from=before)  # both redrawn with the threshold

        ab.show_view(page, "Ensemble", "Rank correlation")
        main = page.locator('[data-testid="stMain"]')
        assert "Rank correlation" in main.inner_text() and page.locator(ab.IMAGE).count() == 2
        ab.show_view(page, "Difference", "difference: red")
        ab.wait_images(page, 3)
        assert "difference" in main.inner_text()

        ab.show_view(page, "Export", "Download ZIP")
        with page.expect_download() as info:
            page.get_by_role("button", name="Download ZIP").click()
        zipped = tmp_path / "export.zip"
        info.value.save_as(zipped)
        with zipfile.ZipFile(zipped) as zf:
            names = set(zf.namelist())
        assert {"provenance.json", "command.txt", "maps/brain-tumor-mri.npz"} <= names
        assert sum(n.startswith("overlays/brain-tumor-mri/") for n in names) == 2

        ab.show_view(page, "Overlays", "brain-tumor-mri · saliency")
        ab.upload(page, dcm)
        page.get_by_text("Choose models and methods in the sidebar").first.wait_for(timeout=60_000)  # a new input
        assert page.locator(ab.IMAGE).count() == 0
        ab.press_explain(page)
        ab.wait_images(page, 2)
        ab.wait_idle(page)
        assert "SECRET-123" not in page.content() and "Doe^Jane" not in page.content()

        ab.upload(page, corrupt)
        page.get_by_text("cannot be used").first.wait_for(timeout=60_000)
        assert "cannot be used" in _alert_text(page) and "corrupt.png" in _alert_text(page)
        assert "Traceback" not in page.content()
        page.screenshot(path=str(tmp_path / "error.png"))
