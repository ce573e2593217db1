"""What the writer's and reader's speed-ups keep exactly (issue 28, fourth round): medlens's own PNG encoder gives
back every pixel (read with Pillow), `blend` one colour plane at a time equals the (H, W, 3) formula byte for byte, the
pointing game's axis-by-axis distances equal a brute-force search, the box resize by running sums equals the dense
weights, and the reader and writer threads start no thread team of their own."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.batch.overlap import overlapped
from medlens.errors import OutputError
from medlens.evaluation.localisation import pointing_game
from medlens.io import render
from medlens.io.png_encode import encode_png
from medlens.io.preparation import box_resize, box_weights


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (3, 1, 4), (1, 1, 3), (97, 130, 3)])
def test_the_png_encoder_gives_back_every_pixel(shape) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    with Image.open(io.BytesIO(encode_png(pixels))) as back:
        assert back.mode == {1: "L", 3: "RGB", 4: "RGBA"}[1 if len(shape) == 2 else shape[2]]
        assert np.array_equal(np.asarray(back), pixels)


def test_the_png_encoder_takes_a_pil_image_and_refuses_what_is_not_8_bit() -> None:
    image = Image.new("RGB", (9, 4), (10, 200, 30))
    with Image.open(io.BytesIO(encode_png(image))) as back:
        assert np.array_equal(np.asarray(back), np.asarray(image))
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(OutputError, match="8-bit gray, RGB or RGBA"):
            encode_png(bad)


def _blend_whole(image, amap, scale, alpha=render.OVERLAY_ALPHA):
    """The overlay formula on the whole plane at once (the definition `blend` documents)."""
    cmap, vmin, vmax = scale
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip(np.nan_to_num((amap - vmin) / span), 0.0, 1.0)
    colour = render._lut(cmap)[(t * 255.0 + 0.5).astype(np.int64)]
    magnitude = np.abs(2.0 * t - 1.0) if vmin < 0 < vmax else t
    weight = (alpha * (magnitude if vmin < 0 < vmax else np.sqrt(magnitude)))[..., None]
    gray = np.clip(image, 0.0, 1.0)[..., None] * 255.0
    return np.clip((1.0 - weight) * gray + weight * colour + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("scale", [("inferno", 0.0, 2.5), ("RdBu_r", -2.0, 2.0), ("inferno", 0.0, 0.0)])
def test_blend_plane_by_plane_equals_the_whole_formula_byte_for_byte(scale) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((300, 170), dtype=np.float32) * 1.2 - 0.1  # more rows than one block, a ragged last block
    amap = (rng.standard_normal((300, 170)) * 3).astype(np.float32)
    amap[3, 4], amap[250, 7] = np.nan, np.inf
    assert np.array_equal(render.blend(image, amap, scale), _blend_whole(image, amap, scale))
    wide = image.astype(np.float64)  # a float64 grayscale: the sums in float64, as the formula promotes them
    assert np.array_equal(render.blend(wide, amap, scale), _blend_whole(wide, amap, scale))


def _pointing_brute_force(amap: torch.Tensor, mask: torch.Tensor, tol: float) -> float:
    flat = torch.nan_to_num(amap.flatten(), nan=float("-inf"))
    peak = int((flat == flat.max()).nonzero()[0])
    point = np.unravel_index(peak, tuple(amap.shape))
    inside = mask.nonzero().numpy()
    nearest = min(float(((row - np.array(point)) ** 2).sum()) for row in inside)
    return float(nearest <= tol ** 2 + 1e-9)


@pytest.mark.parametrize("shape", [(2, 3, 20, 31), (2, 2, 6, 9, 11)])
def test_the_pointing_game_distance_axis_by_axis_equals_a_brute_force_search(shape) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(*shape, generator=g).round()  # ties for the peak: the first in raster order counts
    maps[0, 1, (0,) * (len(shape) - 2)] = float("nan")
    masks = torch.rand((shape[0],) + shape[2:], generator=g) > 0.95
    for tol in (0.0, 2.5, None):
        got = pointing_game(maps, masks, tol)
        t = 15.0 * max(shape[2:]) / 224.0 if tol is None else tol
        for b in range(shape[0]):
            for k in range(shape[1]):
                assert float(got[b, k]) == _pointing_brute_force(maps[b, k], masks[b], t)


def test_the_box_resize_by_running_sums_equals_the_dense_weights_in_2d_and_3d() -> None:
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    wy, wx = box_weights(37, 11), box_weights(53, 80)
    assert torch.allclose(box_resize(x, (11, 80)), wy @ x @ wx.T, atol=1e-12)
    v = torch.rand(1, 1, 9, 10, 12, dtype=torch.float64)
    wz, wy, wx = box_weights(9, 4), box_weights(10, 10), box_weights(12, 5)
    expected = torch.einsum("zd,yh,xw,bcdhw->bczyx", wz, wy, wx, v)
    assert torch.allclose(box_resize(v, (4, 10, 5)), expected, atol=1e-12)


@pytest.mark.parametrize("n_in, n_out", [((512, 512), (160, 160)), ((37, 53), (11, 80)), ((20, 9), (64, 9)),
                                          ((7, 300), (3, 1))])
def test_a_float32_image_resized_by_pillow_equals_the_dense_weights_to_float32_rounding(n_in, n_out) -> None:
    # the reader's path (2-D float32 on the CPU): Pillow's BOX filter, several images and channels, a strided view
    x = torch.rand(3, 2, n_in[0], n_in[1] * 2, generator=torch.Generator().manual_seed(4))[..., ::2]
    got = box_resize(x, n_out)
    assert got.dtype == torch.float32 and got.shape == (3, 2, *n_out)
    wy, wx = box_weights(n_in[0], n_out[0]), box_weights(n_in[1], n_out[1])
    expected = wy @ x.double() @ wx.T
    assert torch.allclose(got.double(), expected, rtol=0, atol=1.2e-7)  # half a float32 step near 1: the rounding


def test_a_volume_above_the_running_sums_limit_is_resized_by_the_same_weights(monkeypatch) -> None:
    from medlens.io import preparation

    v = torch.rand(1, 2, 9, 10, 12, generator=torch.Generator().manual_seed(3))
    by_sums = box_resize(v, (4, 3, 5))
    monkeypatch.setattr(preparation, "RUNNING_SUMS_UP_TO", v.numel() - 1)  # the large-volume path on a small one
    by_products = box_resize(v, (4, 3, 5))
    wz, wy, wx = box_weights(9, 4), box_weights(10, 3), box_weights(12, 5)
    expected = torch.einsum("zd,yh,xw,bcdhw->bczyx", wz, wy, wx, v.double()).float()
    assert torch.allclose(by_sums, expected, atol=1e-6) and torch.allclose(by_products, expected, atol=1e-6)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                    reason="counts the process's threads in /proc (Linux), and a 1-core machine starts no team")
def test_the_reader_and_writer_threads_start_no_thread_team_of_their_own() -> None:
    a, w = torch.rand(1, 1, 256, 256), torch.rand(96, 256)

    def work(chunk):  # a BLAS call, which on a fresh thread would start a team as large as the machine
        return (a @ w.T).sum()

    threads_before = torch.get_num_threads()
    before = len(os.listdir("/proc/self/task"))
    seen: list[int] = []
    for _ in overlapped([[1], [2], [3]], work, lambda r: r, lambda r, e: [{"n": len(os.listdir("/proc/self/task"))}]):
        seen.append(len(os.listdir("/proc/self/task")))
    assert max(seen) - before <= 2  # the reader and the writer, and no thread team beside them
    assert torch.get_num_threads() == threads_before  # the caller's own count is its own


def test_an_overlay_png_holds_the_blended_pixels_under_its_header_and_above_its_colour_bar() -> None:
    rng = np.random.default_rng(4)
    rgb = rng.integers(0, 256, (240, 230, 3), dtype=np.uint8)  # above the minimum tile side: drawn 1:1
    scale = ("RdBu_r", -1.5, 1.5)
    with Image.open(io.BytesIO(render.render_rgb(rgb, ["one line"], scale, label="signed"))) as png:
        got = np.asarray(png)
    header = 6 + 17  # one line of text
    assert got.shape == (header + 240 + 50, 230, 3)  # the colour bar with a caption is 50 px high
    assert np.array_equal(got[header:header + 240], rgb)
    assert (got[:3] == 255).all()  # the header's margin is white
    bar_row = got[header + 240 + 2 + 6, 8:222]  # the middle of the ramp: the colour map from left to right
    assert np.array_equal(bar_row[0], render._lut("RdBu_r")[0].astype(np.uint8))


def test_outputs_without_pictures_make_no_colour_scale_and_record_none(tmp_path, monkeypatch) -> None:
    # npz alone draws nothing: no colour scale is computed, and provenance says nothing of pictures; png records them
    import json

    import medlens
    from medlens.io import formats
    from medlens.io.output import write_explanation

    model = medlens.load_model("phantom-lesion")
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(6))
    result = medlens.explain(model, x, methods=["gradcam", "saliency"])
    calls = []
    real = formats.color_scale
    monkeypatch.setattr(formats, "color_scale", lambda maps: calls.append(1) or real(maps))
    write_explanation(result, tmp_path / "npz", formats=["npz"])
    assert calls == [] and "rendering" not in json.loads((tmp_path / "npz" / "provenance.json").read_text())
    write_explanation(result, tmp_path / "png", formats=["png", "npz"])
    rendering = json.loads((tmp_path / "png" / "provenance.json").read_text())["rendering"]
    assert len(calls) == 2 and set(rendering["colour_maps"]) == {"gradcam", "saliency"}


def test_the_outline_drawn_by_flat_indices_equals_the_masked_assignment_also_on_a_strided_picture() -> None:
    rng = np.random.default_rng(7)
    region = np.zeros((40, 50), bool)
    region[5:20, 10:33] = True
    region[30:38, 2:6] = True
    expected = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    contiguous, wide = expected.copy(), np.repeat(expected, 2, axis=1)
    expected[render.outline_of(region)] = render.OUTLINE_RGB
    assert np.array_equal(render._with_outline(contiguous, region), expected)
    strided = wide[:, ::2]  # a view: drawn into the caller's array, not a copy
    render._with_outline(strided, region)
    assert np.array_equal(wide[:, ::2], expected)
