"""Screenshots of the web app's main views, taken in headless Chromium, saved under docs/app/*.png.

    PYTHONPATH=src python benchmarks/app_screenshots.py [--data ../shared/data/brain-tumor-figshare] [--out docs/app]

With --data a figshare MRI slice is the input (CC BY 4.0, Cheng et al.); without it a phantom scan made on the fly.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_browser as ab  # noqa: E402

HERE = Path(__file__).resolve().parents[1]


def _input(data: str | None, temp: Path) -> Path:
    if data:
        image = sorted((Path(data) / "meningioma").glob("*.jpg"))[3]
        return image
    from medlens.app.inputs import SAMPLES, phantom_sample

    path = temp / "phantom-lesion.png"
    path.write_bytes(phantom_sample(SAMPLES[0])[1])
    return path


def take(out: Path, data: str | None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    with tempfile.TemporaryDirectory() as temp:
        scan = _input(data, Path(temp))
        with ab.served_app() as url, ab.browser_page(url, width=1500, height=1900) as page:
            def shot(name: str) -> None:
                path = out / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                shots.append(path)

            ab.upload(page, scan)
            ab.choose(page, "Methods", "gradcam++")
            ab.choose(page, "Methods", "lrp")
            ab.press_explain(page)
            ab.wait_images(page, 3)
            ab.wait_idle(page)
            ab.add_target(page, "glioma")
            ab.wait_images(page, 6)
            shot("grid")
            before = ab.image_sources(page)
            ab.click_slider(page, "Threshold", 0.8)
            ab.wait_images(page, 6, changed_from=before)
            ab.wait_idle(page)
            shot("threshold")
            ab.show_view(page, "Ensemble", "Rank correlation")
            shot("ensemble")
            ab.show_view(page, "Difference", "difference: red")
            shot("difference")
            ab.show_view(page, "Metrics", "randomisation check")
            page.get_by_role("button", name="Compute deletion / insertion curves (and region scores)").click()
            page.get_by_text("Deletion AUC: lower is better").first.wait_for(timeout=120_000)
            ab.wait_idle(page)
            shot("metrics")
            ab.show_view(page, "Export", "Download ZIP")
            shot("export")
            bad = Path(temp) / "corrupt.png"
            bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
            ab.upload(page, bad)
            page.get_by_text("cannot be used").first.wait_for(timeout=60_000)
            shot("error")
    return shots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="the figshare folder (a real MRI slice as the input)")
    parser.add_argument("--out", default=str(HERE / "docs" / "app"))
    args = parser.parse_args()
    missing = ab.browser_missing()
    if missing:
        sys.exit(f"cannot take screenshots: {missing}")
    for path in take(Path(args.out), args.data):
        print(path)


if __name__ == "__main__":
    main()
