"""Writing results: atomic files, writability check, colour scales, raw maps in .npz, provenance, 3-D slices."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import medlens
from medlens.errors import OutputError
from medlens.io import output
from medlens.io import render
from medlens.io.files import atomic_write, ensure_writable, file_sha256
from medlens.io.output import write_explanation
from medlens.io.render import best_slice, color_scale
from medlens.core.result import ExplanationResult


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, '{"v": 1}')
    assert json.loads(target.read_text()) == {"v": 1}

    def half_then_fail(fh):
        fh.write(b'{"v": 2, "half')
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"v": 1}  # the old file is intact
    assert _leftovers(tmp_path) == []  # and no temporary file is left behind
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.bin", half_then_fail)
    assert not (tmp_path / "new.bin").exists() and _leftovers(tmp_path) == []


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"file\.txt/out cannot be created.*--out"):
        ensure_writable(blocker / "out")
    with pytest.raises(OutputError, match="not a folder"):
        ensure_writable(blocker)
    assert ensure_writable(tmp_path / "new" / "deep") == tmp_path / "new" / "deep"
    assert _leftovers(tmp_path / "new" / "deep") == []


def test_color_scales():
    assert color_scale(np.array([0.0, 0.5, 2.0])) == ("inferno", 0.0, 2.0)
    assert color_scale(np.array([-3.0, 1.0])) == ("RdBu_r", -3.0, 3.0)  # centred at 0
    assert color_scale(np.zeros(4)) == ("inferno", 0.0, 1.0)
    # a pixel-level map: a few extreme pixels saturate instead of setting the scale for the whole overlay
    spiky = np.full(10_000, 0.01)
    spiky[:10] = 5.0
    name, low, high = color_scale(spiky)
    assert name == "inferno" and low == 0.0 and high == pytest.approx(0.01)
    spiky[5000] = -0.02
    name, low, high = color_scale(spiky)
    assert name == "RdBu_r" and high == pytest.approx(0.01) and low == -high
    sparse = np.zeros(10_000)
    sparse[:3] = 2.0  # zero almost everywhere: its largest value sets the scale
    assert color_scale(sparse) == ("inferno", 0.0, 2.0)


def test_best_slice_is_largest_mass():
    vol = np.zeros((5, 4, 4), dtype=np.float32)
    vol[1] = 0.2
    vol[3, 0, 0] = -10.0  # mass counts magnitude
    assert best_slice(vol) == 3


def _result(maps, logits, targets, labels=("normal", "effusion", "mass"), provenance=None):
    return ExplanationResult(maps, logits, targets, provenance or {"methods": {}}, labels=list(labels))


def test_write_explanation_files_npz_and_provenance(tmp_path, tiny2d):
    image = tmp_path / "scan.png"
    arr = np.random.RandomState(0).randint(0, 256, (24, 24)).astype(np.uint8)
    Image.fromarray(arr).save(image)
    tiny2d.labels = ["normal", "effusion", "mass"]
    x, notes = medlens.load_input(image, tiny2d, return_notes=True)
    result = medlens.explain(tiny2d, x, methods=["gradcam", "layercam"], targets=[0, "mass"])
    out = tmp_path / "out" / "scan"
    written = write_explanation(result, out, display=x[0, 0].numpy(), input_file=image, loading_notes=notes + ["a note"])
    names = sorted(p.name for p in written)
    assert names == sorted([
        "gradcam_normal.png", "gradcam_mass.png", "layercam_normal.png", "layercam_mass.png",
        "panel.png", "maps.npz", "provenance.json",
    ])
    assert _leftovers(out) == []
    with np.load(out / "maps.npz") as npz:
        for m in ("gradcam", "layercam"):
            np.testing.assert_array_equal(npz[m], result[m].numpy())  # raw, not normalised
            assert npz[m].shape == (1, 2, 24, 24)
        np.testing.assert_array_equal(npz["targets"], [[0, 2]])
        np.testing.assert_array_equal(npz["logits"], result.logits.numpy())
        assert list(npz["labels"]) == ["normal", "effusion", "mass"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["input_file"]["sha256"] == file_sha256(image)
    assert prov["loading_notes"][-1] == "a note"
    assert prov["medlens_version"] == medlens.__version__
    assert prov["targets"] == [[0, 2]] and set(prov["methods"]) == {"gradcam", "layercam"}
    assert set(prov["files"]) == set(names)
    with Image.open(out / "panel.png") as panel:
        # 2 targets wide (24 px enlarged 10x, 4 px apart), 2 methods high (title, map, colour bar)
        assert panel.size == (2 * 240 + 4, 2 * (23 + 240 + 50))  # the colour bar with its caption


def test_overlay_colours_follow_the_map(tmp_path):
    """Where the map is 0 the image shows through unchanged; at its maximum the colour is inferno's top,
    blended at the full overlay opacity; a signed map goes blue (negative) to red (positive) around 0."""
    from matplotlib import colormaps

    amap = np.zeros((32, 32), dtype=np.float32)
    amap[:, 16:] = 2.0
    image = np.full((32, 32), 0.5, dtype=np.float32)
    png = render.render_overlay(image, amap, title="gradcam: mass")
    (tmp_path / "o.png").write_bytes(png)
    rgb = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(float)
    top = 6 + 17  # one header line; the 32 px map is enlarged 7x to 224 px
    assert rgb.shape[1] == 32 * 7
    cold, hot = rgb[top + 112, 60], rgb[top + 112, 180]
    np.testing.assert_allclose(cold, [127.5] * 3, atol=1)
    a = render.OVERLAY_ALPHA
    expected_hot = (1 - a) * 127.5 + a * np.array(colormaps["inferno"](1.0)[:3]) * 255
    np.testing.assert_allclose(hot, expected_hot, atol=1.5)

    signed = np.array([[-1.0, 0.0, 1.0]], dtype=np.float32)
    out = render.blend(np.full((1, 3), 0.5, dtype=np.float32), signed, color_scale(signed))
    assert out[0, 0, 2] > out[0, 0, 0] + 40  # negative: blue
    assert out[0, 2, 0] > out[0, 2, 2] + 40  # positive: red
    np.testing.assert_allclose(out[0, 1], [128, 128, 128], atol=1)  # zero: the image itself


def test_signed_maps_use_diverging_scale_and_panel_shares_scale_per_method(tmp_path):
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    maps = {"inputxgradient": torch.tensor([[[[-1.0, 2.0], [0.5, 0.0]], [[0.1, 0.1], [0.1, 0.2]]]])}
    result = _result(maps, logits, torch.tensor([[0, 2]]))
    write_explanation(result, tmp_path, display=np.zeros((2, 2), dtype=np.float32))
    prov = json.loads((tmp_path / "provenance.json").read_text())
    scale = prov["rendering"]["colour_maps"]["inputxgradient"]
    assert scale == {"cmap": "RdBu_r", "vmin": -2.0, "vmax": 2.0, "display": "signed"}  # one scale for both targets


def _rgb(png: bytes) -> np.ndarray:
    import io as _io

    return np.asarray(Image.open(_io.BytesIO(png)).convert("RGB")).astype(float)


def test_each_method_is_drawn_as_defined_and_signed_on_request(tmp_path):
    """Grad-CAM's picture is its positive part (the ReLU of its definition): where the raw map is negative the scan
    shows through unchanged and the colour bar says so; saliency is drawn as |gradient| (Simonyan et al.); `signed`
    draws the raw signed map on a diverging scale; maps.npz keeps the raw values either way."""
    from medlens.core.registry import get_spec

    assert get_spec("gradcam").display == "positive" and get_spec("saliency").display == "magnitude"
    assert get_spec("lrp").display == "signed" and get_spec("integratedgradients").display == "signed"
    raw = torch.zeros(1, 1, 16, 16)
    raw[..., :8] = -2.0  # evidence against on the left half
    raw[..., 12:] = 1.0
    maps = {"gradcam": raw.clone(), "saliency": raw.clone()}
    result = _result(maps, torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0]]))
    image = np.full((16, 16), 0.5, dtype=np.float32)
    write_explanation(result, tmp_path / "a", display=image)
    prov = json.loads((tmp_path / "a" / "provenance.json").read_text())["rendering"]["colour_maps"]
    assert prov["gradcam"] == {"cmap": "inferno", "vmin": 0.0, "vmax": 1.0, "display": "positive"}
    assert prov["saliency"] == {"cmap": "inferno", "vmin": 0.0, "vmax": 2.0, "display": "magnitude"}
    rgb = _rgb((tmp_path / "a" / "gradcam_normal.png").read_bytes())
    top = 6 + 17  # one title line; the 16 px map enlarged 14x
    np.testing.assert_allclose(rgb[top + 100, 40], [127.5] * 3, atol=1)  # negative: the scan unchanged
    assert abs(rgb[top + 100, 200] - 127.5).max() > 40  # positive: coloured
    with np.load(tmp_path / "a" / "maps.npz") as npz:
        np.testing.assert_array_equal(npz["gradcam"], raw.numpy())  # raw, signed
    write_explanation(result, tmp_path / "b", display=image, signed=True)
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())["rendering"]["colour_maps"]
    assert prov["gradcam"] == {"cmap": "RdBu_r", "vmin": -2.0, "vmax": 2.0, "display": "signed"}
    rgb = _rgb((tmp_path / "b" / "gradcam_normal.png").read_bytes())
    assert rgb[top + 100, 40, 2] > rgb[top + 100, 40, 0] + 40  # negative: blue


def test_colour_bar_says_what_it_shows_and_a_blank_positive_part_is_named(tmp_path):
    calls = []
    real = render._colour_bar
    real_tile = render._tile

    def spy(width, scale, label=""):
        calls.append(label)
        return real(width, scale, label)

    titles = []

    def spy_tile(rgb, lines, *args):
        titles.append(list(lines))
        return real_tile(rgb, lines, *args)

    import unittest.mock as mock

    with mock.patch.object(render, "_colour_bar", spy), mock.patch.object(render, "_tile", spy_tile):
        render.render_overlay(np.zeros((8, 8)), -np.ones((8, 8), dtype=np.float32), title="gradcam", display="positive")
        render.render_overlay(np.zeros((8, 8)), np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), display="signed")
        render.render_overlay(np.zeros((8, 8)), np.ones((8, 8), dtype=np.float32), display="magnitude")
    assert calls == ["positive part, as defined", "signed: red for, blue against", "|map|, as defined"]
    assert any("no positive part" in line for line in titles[0]) and not any("no positive" in l for l in titles[1])
    with pytest.raises(OutputError, match="unknown display"):
        render.shown(np.zeros(3), "absolute")


def test_volume_result_draws_slice_with_largest_mass(tmp_path, monkeypatch):
    vol_map = torch.zeros(1, 1, 6, 8, 8)
    vol_map[0, 0, 4, 2:5, 2:5] = 1.0
    result = _result({"gradcam": vol_map}, torch.tensor([[0.1, 0.2, 3.0]]), torch.tensor([[2]]))
    drawn, titles = [], []
    real_blend, real_tile = render.blend, render._tile

    def spy_blend(image, amap, scale, *args):
        drawn.append((image.shape, amap.shape, float(amap.sum())))
        return real_blend(image, amap, scale, *args)

    def spy_tile(rgb, lines, *args):
        titles.append(" / ".join(lines))
        return real_tile(rgb, lines, *args)

    monkeypatch.setattr(render, "blend", spy_blend)
    monkeypatch.setattr(render, "_tile", spy_tile)
    write_explanation(result, tmp_path / "v", display=np.random.rand(6, 8, 8).astype(np.float32))
    assert drawn == [((8, 8), (8, 8), 9.0)]  # blended once, on slice 4: the panel reuses the overlay's cell
    assert len(titles) == 2 and all("slice 4" in t and "mass" in t for t in titles)
    with np.load(tmp_path / "v" / "maps.npz") as npz:
        assert npz["gradcam"].shape == (1, 1, 6, 8, 8)


def test_failure_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    result = _result({"gradcam": torch.rand(1, 1, 4, 4)}, torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1]]))

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OutputError, match="maps.npz"):
        write_explanation(result, tmp_path / "f")
    assert not (tmp_path / "f").exists()  # the folder made for this result goes with it: no file, no empty shell
    (tmp_path / "g").mkdir()  # a folder that was there stays, and holds nothing of the failed write
    with pytest.raises(OutputError, match="maps.npz"):
        write_explanation(result, tmp_path / "g")
    assert os.listdir(tmp_path / "g") == []
