"""Pictures at the scan's own resolution: the map taken back through the preparation's resize lands on the pixels of
the source it came from (a box drawn on the source), the region outlined where the box file says; a 3-D model's
picture stays on the model's grid and says so."""
from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image
from torch import nn

import medlens
from medlens.io import render
from medlens.io.render import OUTLINE_RGB
from medlens.io.scan_view import scan_view
from medlens.pipeline import ExplainRequest, explain_file, plan_for, write_outcome

H, W = 384, 512  # the source: not square, not a multiple-of-two of the model's 64 x 64
TOP, BOTTOM, LEFT, RIGHT = 100, 180, 200, 328  # the box on the source (rows [TOP, BOTTOM), columns [LEFT, RIGHT))


class SumOfPixels(nn.Module):
    """logits (sum, -sum): input x gradient of class 0 is the input itself, so the map is the prepared image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, -s], dim=1)


def _source(tmp_path):
    pixels = np.zeros((H, W), dtype=np.uint8)
    pixels[TOP:BOTTOM, LEFT:RIGHT] = 255
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    xc, yc = (LEFT + RIGHT) / 2 / W, (TOP + BOTTOM) / 2 / H
    (tmp_path / "scan.txt").write_text(f"0 {xc} {yc} {(RIGHT - LEFT) / W} {(BOTTOM - TOP) / H}\n")
    return tmp_path / "scan.png"


def test_a_box_drawn_on_the_source_lands_on_the_same_pixels_of_the_overlay(tmp_path, monkeypatch):
    path = _source(tmp_path)
    model = medlens.load_model(SumOfPixels(), input_size=(64, 64), labels="box,none")
    plan = plan_for(model, ExplainRequest.build(["inputxgradient"], targets=[0], formats="png,npz"))
    outcome = explain_file(plan, path)
    assert tuple(outcome.result["inputxgradient"].shape[-2:]) == (64, 64)  # the model's grid, raw in maps.npz
    drawn = []
    real_blend = render.blend

    def spy(image, amap, scale, *args, **kwargs):
        drawn.append((image.copy(), amap.copy()))
        return real_blend(image, amap, scale, *args, **kwargs)

    monkeypatch.setattr(render, "blend", spy)
    write_outcome(outcome, tmp_path / "out")
    image, amap = drawn[0]
    assert image.shape == amap.shape == (H, W)  # the scan's own resolution and aspect
    box = np.zeros((H, W), dtype=bool)
    box[TOP:BOTTOM, LEFT:RIGHT] = True
    np.testing.assert_array_equal(image >= 0.5, box)  # the scan itself, not a resampled copy
    hot = amap >= 0.5 * amap.max()  # the map's half-maximum edge: the box's edge, to the pixel
    assert (hot != box).sum() <= 0.2 * 2 * (BOTTOM - TOP + RIGHT - LEFT)  # at most a few pixels at the corners
    rows, cols = np.nonzero(hot)
    assert abs(rows.min() - TOP) <= 1 and abs(rows.max() - (BOTTOM - 1)) <= 1
    assert abs(cols.min() - LEFT) <= 1 and abs(cols.max() - (RIGHT - 1)) <= 1

    png = np.asarray(Image.open(tmp_path / "out" / "inputxgradient_box.png").convert("RGB"))
    assert png.shape[1] == W and png.shape[0] >= H  # the map area is the scan's size, not enlarged or shrunk
    header = png.shape[0] - H - 50  # the title above, the captioned colour bar (50 px) below
    green = np.all(png[header:header + H] == OUTLINE_RGB, axis=-1)
    rows, cols = np.nonzero(green)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (TOP, BOTTOM - 1, LEFT, RIGHT - 1)  # the region outline
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert "onto the scan's plane (384 x 512)" in prov["rendering"]["grid"]
    with np.load(tmp_path / "out" / "maps.npz") as npz:
        assert npz["inputxgradient"].shape == (1, 1, 64, 64)


def test_a_512_scan_gives_an_overlay_at_least_512_wide_and_high(tmp_path):
    pixels = (np.random.RandomState(0).rand(512, 512) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "s.png")
    model = medlens.load_model(SumOfPixels(), input_size=(64, 64), labels="a,b")
    plan = plan_for(model, ExplainRequest.build(["saliency"], formats="png"))
    write_outcome(explain_file(plan, tmp_path / "s.png", region=None), tmp_path / "o")
    with Image.open(tmp_path / "o" / "saliency_a.png") as im:
        assert im.width >= 512 and im.height >= 512 + 50


def test_a_volume_shown_on_the_model_grid_says_so_and_never_moves_the_map():
    from medlens.io.scan import ScanImage
    from pathlib import Path

    volume = ScanImage(np.random.rand(10, 40, 40).astype(np.float32), Path("v.nii.gz"), "nifti", layout="volume")
    display = np.random.rand(8, 16, 16).astype(np.float32)
    view = scan_view(volume, (8, 16, 16), display)
    assert not view.inverted and "model's grid" in view.note and view.shape == (8, 16, 16)
    maps = np.random.rand(2, 8, 16, 16).astype(np.float32)
    np.testing.assert_array_equal(view.maps(maps), maps)  # unchanged: drawn where it was computed, with the note


def test_the_hottest_drawn_colours_of_a_positive_picture_sit_on_the_maps_argmax():
    """A Grad-CAM-like map (positive display) on a 240 x 256 scan, drawn from the model's 32 x 32 grid: the pixels of
    the overlay showing the colour map's top colour (found in the PNG's RGB, composed here from matplotlib's inferno
    over the scan's gray at the overlay's 0.75 opacity) are the argmax's region taken to the source, and nowhere else."""
    from types import SimpleNamespace

    from matplotlib import colormaps

    from medlens.io.render import color_scale, render_overlay, shown

    rows, cols = np.mgrid[0:240, 0:256]
    pixels = (40 + 150 * (cols / 255.0) * (rows / 239.0)).astype(np.float32)  # a ramp: the gray differs under the map
    view = scan_view(SimpleNamespace(pixels=pixels, layout="gray", is_volume=False), (32, 32), np.zeros((32, 32)))
    gi, gj = np.mgrid[0:32, 0:32]
    raw = np.exp(-((gi - 9) ** 2 + (gj - 22) ** 2) / 8.0) + 0.6 * np.exp(-((gi - 24) ** 2 + (gj - 6) ** 2) / 8.0) - 0.2
    scale = color_scale(shown(raw, "positive"))
    png = np.asarray(Image.open(__import__("io").BytesIO(
        render_overlay(view.display, view.maps(raw), scale=scale, display="positive"))).convert("RGB")).astype(int)
    assert png.shape[1] == 256  # the scan's width: drawn on its plane, not enlarged
    area = png[png.shape[0] - 50 - 240: png.shape[0] - 50]
    gray = (pixels - pixels.min()) / (pixels.max() - pixels.min())
    top = colormaps["inferno"](1.0)[:3]
    expected = np.stack([0.25 * gray * 255 + 0.75 * 255 * c for c in top], axis=-1)
    hottest = np.all(np.abs(area - expected) <= 1, axis=-1)
    assert hottest.sum() > 0
    ys, xs = np.nonzero(hottest)
    peak = ((9 + 0.5) * 7.5 - 0.5, (22 + 0.5) * 8 - 0.5)  # the argmax's centre on the source (7.5 rows, 8 columns)
    assert np.hypot(ys.mean() - peak[0], xs.mean() - peak[1]) <= 1.0  # centred on the argmax
    assert np.hypot(ys - peak[0], xs - peak[1]).max() <= 2 * 8  # within two model pixels of it: not the second bump
