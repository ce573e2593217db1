"""How much of a pixel-level map falls on the black background outside the head, before and after references that
respect the input spec (issue 27 item 3): LRP, input x gradient, integrated gradients (and SmoothGrad, saliency).

The head mask is computed independently of medlens, from the JPEG as read by Pillow: Otsu's threshold
(scikit-image), a closing with a 7 px disk, holes filled, parts under 1% of the image dropped (SciPy), then brought to the model's grid by
Pillow's box filter (a model pixel is head when at least half of it is). Per slice and method: the share of |map|
outside the head, the pointing game on the tumour box (medlens.evaluation, TorchRay's tolerance), and the deletion
AUC (medlens.evaluation, probability of the explained class, 20 steps, the same metric before and after) with the
removed pixels replaced by 0 in the model's input space (a grey: `deletion`, as `medlens evaluate`) and by the scan's
black (`deletion_black`). The explained class is the slice's own label.

    python benchmarks/background_share.py --data $DATA --limit 60 \
        --reference spec-zero --out docs/background-share/before.json
    python benchmarks/background_share.py --data $DATA --limit 60 \
        --reference zero --out docs/background-share/after.json

`--reference spec-zero` gives every method the reference it had before (0 after the model's normalisation);
`zero` the scan's black (the defaults now). One torch thread.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

import medlens
from medlens.data.figshare import box_to_mask, scan_folder
from medlens.evaluation.faithfulness import deletion
from medlens.evaluation.localisation import pointing_game

METHODS = ("lrp", "inputxgradient", "integratedgradients", "smoothgrad", "saliency")


def head_mask(path: Path, grid: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) head mask on the model's grid, from the image file alone (not through medlens)."""
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    binary = pixels > threshold_otsu(pixels)
    disk = np.hypot(*np.mgrid[-7:8, -7:8]) <= 7  # closing bridges the dark skull between scalp and brain
    binary = ndimage.binary_closing(np.pad(binary, 8), structure=disk)[8:-8, 8:-8]
    binary = ndimage.binary_fill_holes(binary)
    labels, n = ndimage.label(binary)
    if n > 1:  # every part of at least 1% of the image (head, neck, face), not specks of noise
        sizes = ndimage.sum(binary, labels, range(1, n + 1))
        binary = np.isin(labels, 1 + np.nonzero(sizes >= 0.01 * binary.size)[0])
    small = Image.fromarray((binary * 255).astype(np.uint8)).resize((grid[1], grid[0]), Image.BOX)
    return np.asarray(small) >= 128


def options_for(methods: list[str], reference: str) -> dict:
    opts: dict = {}
    if "integratedgradients" in methods:
        opts["baseline"] = reference
    if {"lrp", "inputxgradient"} & set(methods):
        opts["reference"] = reference
    return opts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="brain-tumor-mri")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--reference", choices=("zero", "spec-zero"), default="zero")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = [m for m in args.methods.split(",") if m]
    model = medlens.load_model(args.model)
    slices = scan_folder(args.data, splits=["test"])
    chosen = sorted(random.Random(args.seed).sample(range(len(slices)), min(args.limit, len(slices))))
    rows: dict[str, list[dict]] = {m: [] for m in methods}
    t0 = time.perf_counter()
    for n, i in enumerate(chosen):
        item = slices[i]
        x = medlens.load_input(item.image_path, model)
        grid = tuple(x.shape[2:])
        head = torch.from_numpy(head_mask(item.image_path, grid))
        box = box_to_mask(item.box, grid)[None]
        targets = torch.tensor([[item.label]])
        black = torch.full_like(x, float(x.min()))  # the scan's black as prepared (its darkest pixel)
        result = medlens.explain(model, x, methods=methods, targets=[item.label], seed=args.seed,
                                 **options_for(methods, args.reference))
        for m in methods:
            amap = result[m]  # (1, 1, H, W)
            magnitude = amap[0, 0].abs()
            total = float(magnitude.sum())
            rows[m].append({
                "slice": item.number,
                "outside_head": float(magnitude[~head].sum()) / total if total > 0 else float("nan"),
                "pointing": float(pointing_game(amap, box)[0, 0]),
                "pointing_abs": float(pointing_game(amap.abs(), box)[0, 0]),
                "peak_outside_head": bool(~head.flatten()[int(amap.flatten().argmax())]),
                "deletion": float(deletion(model, x, amap, targets).values[0, 0]),
                "deletion_black": float(deletion(model, x, amap, targets, baseline=black).values[0, 0]),
            })
        if (n + 1) % 10 == 0 or n + 1 == len(chosen):
            print(f"{n + 1}/{len(chosen)} slices, {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
            summary = write(args, rows, n + 1, t0)
    for m, s in summary.items():
        print(f"{m:22s} " + "  ".join(f"{k} {v:.3f}" for k, v in s.items()))


def write(args: argparse.Namespace, rows: dict[str, list[dict]], done: int, t0: float) -> dict:
    """Writes the figures so far (a long run interrupted keeps its slices); returns the summary."""
    summary = {m: {k: float(np.nanmean([r[k] for r in rs])) for k in
                   ("outside_head", "pointing", "pointing_abs", "peak_outside_head", "deletion", "deletion_black")}
               for m, rs in rows.items()}
    out = {"model": args.model, "reference": args.reference, "n": done, "seed": args.seed,
           "seconds": round(time.perf_counter() - t0, 1), "torch_threads": 1, "load": os.getloadavg()[0],
           "summary": summary, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return summary


if __name__ == "__main__":
    main()
