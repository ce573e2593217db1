"""PNGs made of deflated parts (issue 28, sixth round): pictures stacked from their parts decode to the stack pixel
for pixel with a checksum zlib accepts, the Adler-32 of joined parts equals zlib's of the joined bytes, and a panel of
one target per method is its overlays one under the other, as the grid drawing makes it, written from their parts."""
from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from medlens.errors import OutputError
from medlens.io import png_encode
from medlens.io.png_encode import deflate_rows, encode_png, png_from_parts


def _idat(png: bytes) -> bytes:
    """The concatenated IDAT data of a PNG file (zlib stream)."""
    at, data = 8, b""
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        if kind == b"IDAT":
            data += png[at + 8:at + 8 + length]
        at += 12 + length
    return data


@pytest.mark.parametrize("channels", [None, 3, 4])
def test_parts_one_under_the_other_decode_to_the_stack_with_a_checksum_zlib_accepts(channels) -> None:
    rng = np.random.default_rng(3)
    shape = (lambda h: (h, 29) if channels is None else (h, 29, channels))
    pictures = [rng.integers(0, 256, shape(h), dtype=np.uint8) for h in (1, 7, 300)]
    pictures[2][100:200] = 17  # long runs too, not only noise
    png = png_from_parts([deflate_rows(p) for p in pictures])
    stack = np.concatenate(pictures)
    with Image.open(io.BytesIO(png)) as back:
        assert np.array_equal(np.asarray(back), stack)
    filtered = zlib.decompress(_idat(png))  # raises on a wrong Adler-32 or a broken stream
    assert len(filtered) == stack.shape[0] * (stack[0].size + 1)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(stack)))), stack)


def test_parts_of_other_widths_or_kinds_are_refused() -> None:
    narrow, wide = np.zeros((4, 5, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)
    for parts in ([], [deflate_rows(narrow), deflate_rows(wide)], [deflate_rows(narrow), deflate_rows(narrow[..., 0])]):
        with pytest.raises(OutputError, match="one width and kind"):
            png_from_parts(parts)


def test_the_adler32_of_joined_parts_equals_zlibs_of_the_joined_bytes() -> None:
    rng = random.Random(5)
    cases = [(b"", b""), (b"a", b""), (b"", b"b"), (b"\xff" * 100_000, b"\xff" * 123_457)]  # sums past the modulus
    cases += [(rng.randbytes(rng.randrange(0, 300)), rng.randbytes(rng.choice([0, 1, 65_521, 70_000, rng.randrange(500)])))
              for _ in range(300)]
    for first, second in cases:
        joined = png_encode._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
        assert joined == zlib.adler32(first + second), (len(first), len(second))


def test_a_panel_of_one_target_per_method_is_its_overlays_stacked_as_the_grid_draws_it(tmp_path, monkeypatch) -> None:
    # written from the overlays' deflated rows, the panel must still be what the grid drawing makes of the same maps
    import medlens
    from medlens.io import formats, render
    from medlens.io.output import write_explanation
    from medlens.io.scan_view import ScanView

    model = medlens.load_model("phantom-lesion")
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(8))
    region = np.zeros((64, 64), bool)
    region[20:40, 10:30] = True
    deflated = []
    real = png_encode.deflate_rows
    for module in (png_encode, formats):  # the overlays' (formats) and any picture encoded whole (encode_png)
        monkeypatch.setattr(module, "deflate_rows", lambda *a, **k: deflated.append(1) or real(*a, **k))
    one = medlens.explain(model, x, methods=["gradcam", "saliency"])
    write_explanation(one, tmp_path / "one", formats=["png"], region=region)
    assert len(deflated) == 2  # the overlays' rows only: the panel's are not deflated again
    overlays = [np.asarray(Image.open(tmp_path / "one" / name)) for name in
                sorted(p.name for p in (tmp_path / "one").glob("*.png") if p.name != "panel.png")]
    panel = np.asarray(Image.open(tmp_path / "one" / "panel.png"))
    job = formats.ImageResult.build(one, 0, None, region, None, None)
    view = job.view or ScanView(tuple(job.display.shape), job.display, job.region, False, "")
    grid = render.panel_picture(view.display, {m: view.maps(v) for m, v in job.raw.items()}, job.titles,
                                scales=job.scales, region=view.region, displays=job.displays)
    assert len(overlays) == 2 and np.array_equal(panel, np.concatenate(overlays))  # gradcam, then saliency
    assert np.array_equal(panel, grid)
    both = medlens.explain(model, x, methods=["gradcam"], targets=[0, 1])  # targets side by side: drawn as a grid
    write_explanation(both, tmp_path / "both", formats=["png"])
    with Image.open(tmp_path / "both" / "panel.png") as back:
        assert back.width > overlays[0].shape[1]
    assert len(deflated) == 2 + 2 + 1  # this result's two overlays, and its panel as a whole
