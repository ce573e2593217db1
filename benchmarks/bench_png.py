"""PNG encoding of medlens's overlays: Pillow (level 1, its filter search per row) against medlens.io.png_encode
(Up filter, level 1) with zlib and with ISA-L (the `isal` package), interleaved, medians of thread CPU time; sizes too.

Run: PYTHONPATH=src python benchmarks/bench_png.py [--image SLICE.jpg] [--repeats 30]
The picture is a real overlay: the slice (or a synthetic one) with a smooth map blended by `medlens.io.render.blend`,
512 x 512 RGB, and the same with a title and colour bar (`render_overlay`'s tile). Figures go to docs/batch.md.
"""
from __future__ import annotations

import argparse
import io
import statistics
import time
import zlib

import numpy as np
from PIL import Image

from medlens.io import png_encode
from medlens.io.render import blend


def _picture(path: str | None) -> np.ndarray:
    if path:
        gray = np.asarray(Image.open(path).convert("L").resize((512, 512)), np.float32) / 255
    else:
        y, x = np.mgrid[0:512, 0:512] / 512
        gray = (0.5 + 0.3 * np.sin(12 * x) * np.cos(9 * y)).astype(np.float32)
    y, x = np.mgrid[0:512, 0:512] / 512
    amap = np.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) / 0.02).astype(np.float32)
    return blend(gray, amap, ("inferno", 0.0, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=None)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rgb = _picture(args.image)
    pil = Image.fromarray(rgb)

    def pillow() -> bytes:
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()

    def with_zlib() -> bytes:
        saved = png_encode._zlib
        png_encode._zlib = zlib
        try:
            return png_encode.encode_png(rgb)
        finally:
            png_encode._zlib = saved

    def medlens_default() -> bytes:
        return png_encode.encode_png(rgb)

    cases = {"Pillow, level 1": pillow, "medlens, zlib level 1": with_zlib,
             f"medlens, default deflate ({png_encode._zlib.__name__})": medlens_default}
    times: dict[str, list[float]] = {k: [] for k in cases}
    sizes = {k: len(f()) for k, f in cases.items()}
    for _ in range(args.repeats):  # interleaved
        for name, f in cases.items():
            t0 = time.thread_time()
            f()
            times[name].append(time.thread_time() - t0)
    base = statistics.median(times["Pillow, level 1"])
    print(f"512 x 512 RGB overlay, {args.repeats} interleaved repeats, median thread CPU time")
    for name in cases:
        med = statistics.median(times[name])
        print(f"| {name} | {1000 * med:.2f} ms | {sizes[name]:,} bytes | {base / med:.2f}x Pillow |")


if __name__ == "__main__":
    main()
