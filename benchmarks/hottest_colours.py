"""Where the default Grad-CAM picture shows its hottest colours, against where the raw map's maximum is (issue 27):
on seeded slices of the figshare test split, how often each lies inside the tumour box.

Each slice is explained as a user gets it (`medlens explain`'s pipeline: the default target, the top prediction; the
registry's display, Grad-CAM's positive part; the overlay PNG on the scan's own 512 x 512 plane). The picture is read
back as RGB and each pixel's colour-scale level (0-255) recovered through the colour map named in provenance.json
(matplotlib's LUT, composed over the scan's own grayscale, read here from the JPEG with Pillow, as the overlay's
convention says: opacity 0.75 * sqrt(level / 255)). The hottest colours are the pixels within 12 levels (5% of the
scale) of the highest level the picture shows (`top_level_inside`: those at that level alone); a slice counts for the
picture when at least half of them lie inside the box (on the source's pixels); a blank picture (Grad-CAM with no
positive part, drawn without colour as defined) counts as not inside. The raw map's
argmax (maps.npz, the model's 160 x 160 grid) is taken to the source through the resize (the centre of model pixel i
is at source coordinate (i + 0.5) * 512 / 160) and counts when it lies inside the box.

    python benchmarks/hottest_colours.py --data PATH/brain-tumor-figshare --limit 100

One torch thread; prints the load with the figures; --out writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

import medlens
from medlens.data.figshare import scan_folder
from medlens.pipeline import ExplainRequest, explain_file, plan_for, write_outcome

ALPHA = 0.75  # the overlay's opacity at the top of the scale (medlens.io.render.OVERLAY_ALPHA)
BAR = 50  # the captioned colour bar under the map area, in pixels
BAND = 12  # the hottest colours: the top 5% of the 256 colour levels, below the highest level the picture shows


def _weights_sha(model: str) -> str:
    """The SHA-256 of a bundled model's weights file (models.json), so a record says which weights it measured."""
    import hashlib

    from medlens.models import zoo

    info = zoo.bundled_models().get(model)
    return hashlib.sha256(info["weights"].read_bytes()).hexdigest() if info else "not bundled"


def levels_of(rgb: np.ndarray, gray: np.ndarray, cmap: str) -> np.ndarray:
    """Per pixel the colour-scale level 0-255 whose colour, composed over `gray` (in [0, 1]), is nearest `rgb`."""
    lut = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0  # (256, 3)
    weight = ALPHA * np.sqrt(np.arange(256) / 255.0)  # (256,)
    out = np.empty(gray.shape, dtype=np.int64)
    for r in range(0, gray.shape[0], 32):
        g = gray[r:r + 32, :, None, None] * 255.0  # (h, W, 1, 1)
        drawn = (1.0 - weight[:, None]) * g + weight[:, None] * lut  # (h, W, 256, 3)
        err = ((drawn - rgb[r:r + 32, :, None, :].astype(np.float64)) ** 2).sum(-1)
        out[r:r + 32] = err.argmin(-1)
    return out


def box_on(box: tuple[float, ...], shape: tuple[int, int]) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) in source pixel coordinates of a YOLO (xc, yc, w, h) box."""
    xc, yc, w, h = box
    return (yc - h / 2) * shape[0], (yc + h / 2) * shape[0], (xc - w / 2) * shape[1], (xc + w / 2) * shape[1]


def inside(rows: np.ndarray, cols: np.ndarray, edges: tuple[float, float, float, float]) -> np.ndarray:
    """Pixel centres (row + 0.5, col + 0.5) inside the box."""
    top, bottom, left, right = edges
    return (rows + 0.5 >= top) & (rows + 0.5 <= bottom) & (cols + 0.5 >= left) & (cols + 0.5 <= right)


def one_slice(plan, item, folder: Path) -> dict:
    outcome = explain_file(plan, item.image_path, region=None)
    write_outcome(outcome, folder, formats=("png", "npz"))
    prov = json.loads((folder / "provenance.json").read_text())
    cmap = prov["rendering"]["colour_maps"]["gradcam"]["cmap"]
    png = next(p for p in folder.glob("gradcam_*.png"))
    pixels = np.asarray(Image.open(item.image_path).convert("L"), dtype=np.float64)
    gray = (pixels - pixels.min()) / max(pixels.max() - pixels.min(), 1e-12)
    h, w = gray.shape
    rgb = np.asarray(Image.open(png).convert("RGB"))
    assert rgb.shape[1] == w, f"the overlay is {rgb.shape[1]} wide, the scan {w}"
    area = rgb[rgb.shape[0] - BAR - h: rgb.shape[0] - BAR]
    levels = levels_of(area, gray, cmap)
    top = int(levels.max())
    edges = box_on(item.box, (h, w))
    rows, cols = np.nonzero(levels >= max(1, top - BAND))  # none when the picture shows no colour (top level 0)
    hot_inside = float(inside(rows, cols, edges).mean()) if rows.size else 0.0
    peak_rows, peak_cols = np.nonzero(levels == top) if top > 0 else (rows, cols)
    peak_inside = float(inside(peak_rows, peak_cols, edges).mean()) if peak_rows.size else 0.0
    with np.load(folder / "maps.npz") as npz:
        raw, target = npz["gradcam"][0, 0], int(npz["targets"][0, 0])
    i, j = np.unravel_index(int(raw.argmax()), raw.shape)
    r_src, c_src = (i + 0.5) * h / raw.shape[0] - 0.5, (j + 0.5) * w / raw.shape[1] - 0.5  # a pixel index on the source
    argmax_inside = bool(inside(np.array([r_src]), np.array([c_src]), edges)[0])
    near = np.hypot(rows - r_src, cols - c_src).min() if rows.size else np.inf  # the argmax among the hottest pixels?
    return {"slice": item.number, "label": item.label, "target": target, "top_level": top, "blank": top == 0,
            "hottest_pixels": int(rows.size), "hottest_inside_share": hot_inside, "picture_inside": hot_inside >= 0.5,
            "top_level_inside": peak_inside >= 0.5, "argmax_inside": argmax_inside,
            "argmax_among_hottest": bool(near <= 1.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="brain-tumor-mri")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--explain-output", default="logit", choices=["logit", "log-probability", "contrast"],
                        help="The score Grad-CAM explains (medlens explain --explain-output).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = medlens.load_model(args.model)
    plan = plan_for(model, ExplainRequest.build(["gradcam"], formats="png,npz",
                                                       options={"output": args.explain_output}))
    slices = scan_folder(args.data, splits=["test"])
    chosen = sorted(random.Random(args.seed).sample(range(len(slices)), min(args.limit, len(slices))))
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n, k in enumerate(chosen):
            rows.append(one_slice(plan, slices[k], Path(tmp) / str(n)))
            if (n + 1) % 10 == 0 or n + 1 == len(chosen):
                print(f"{n + 1}/{len(chosen)} slices, {time.perf_counter() - t0:.0f} s", flush=True)
                summary = summarise(args, rows, t0)  # written as it goes: an interrupted run keeps its slices
    n = len(rows)
    print(f"{args.model}, {n} test slices (seed {args.seed}), Grad-CAM picture of the {args.explain_output}, load {os.getloadavg()[0]:.1f}, "
          f"{time.perf_counter() - t0:.0f} s")
    for k, v in summary.items():
        print(f"  {k:28s} {v if isinstance(v, int) else f'{v:.3f}'}" + (f"  ({v / n:.2f})" if isinstance(v, int) else ""))


def summarise(args: argparse.Namespace, rows: list[dict], t0: float) -> dict:
    """The counts over the slices so far (written to --out with the rows)."""
    summary = {k: sum(r[k] for r in rows) for k in ("picture_inside", "top_level_inside", "argmax_inside",
                                                    "argmax_among_hottest", "blank")}
    summary["both"] = sum(r["picture_inside"] and r["argmax_inside"] for r in rows)
    summary["mean_hottest_inside_share"] = float(np.mean([r["hottest_inside_share"] for r in rows]))
    summary["correct_predictions"] = sum(r["target"] == r["label"] for r in rows)
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "weights_sha256": _weights_sha(args.model),
                                              "n": len(rows), "seed": args.seed, "output": args.explain_output,
                                              "load": os.getloadavg()[0],
                                              "seconds": round(time.perf_counter() - t0, 1), "summary": summary,
                                              "rows": rows}, indent=1, default=bool))
    return summary


if __name__ == "__main__":
    main()
