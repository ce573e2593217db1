"""`medlens report`: one page per explained scan, as HTML and a PDF whose pages render back to PNG (pdftoppm)."""
from __future__ import annotations

import json
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TinyCNN2d, randomise_bn
from medlens.cli.group import main


def run(capsys, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    torch.save(randomise_bn(TinyCNN2d(), 0), root / "tiny.pt")
    (root / "tiny.pt.json").write_text(json.dumps({"labels": ["normal", "effusion", "mass"], "size": [32, 32]}))
    rng = np.random.RandomState(0)
    for name in ("a", "b"):
        Image.fromarray(rng.randint(0, 256, (64, 48)).astype(np.uint8)).save(root / f"{name}.png")
    (root / "a.txt").write_text("0 0.5 0.5 0.4 0.3\n")  # a region for the first scan
    code = main(["explain", str(root / "a.png"), str(root / "b.png"), "--model", str(root / "tiny.pt"),
                 "--allow-pickle", "--methods", "gradcam,inputxgradient", "--out", str(root / "out")])
    assert code == 0
    return root / "out"


def test_report_writes_html_and_a_pdf_page_per_scan_that_renders(capsys, results, tmp_path):
    code, out, err = run(capsys, "report", results, "--pdf")
    assert code == 0, err
    page = (results / "report.html").read_text()
    assert "For research use only" in page and "pointing game" in page and "gradcam_" in page
    assert "mass: " in page or "normal: " in page  # the prediction with probabilities
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (poppler-utils) is not installed: the PDF's pages were not rendered back")
    subprocess.run(["pdftoppm", "-r", "50", "-png", str(results / "report.pdf"), str(tmp_path / "page")], check=True)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == 2  # one per scan
    for png in pages:
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
        h = rgb.shape[0]
        banner = rgb[: h // 25]
        assert ((banner[..., 0] > 100) & (banner[..., 1] < 60)).any()  # the dark red research-use banner
        middle = rgb[h // 8: h // 2]
        assert (np.abs(middle - 255).sum(-1) > 60).mean() > 0.05  # the overlays are drawn


def test_report_of_a_folder_without_results_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "report", tmp_path)
    assert code == 2 and "provenance.json" in err and "Traceback" not in err
