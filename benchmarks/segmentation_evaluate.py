"""`medlens evaluate` on the bundled segmentation model: phantoms written as an evaluation folder, then scored.

Writes `--n` test-seed phantoms (seed 3, the model card's test seed; about half with a lesion) as 8-bit PNGs into
`DATA/lesion/` and `DATA/normal/`, each lesion case with its exact lesion mask `N_mask.png` beside it, then runs

    medlens evaluate --model phantom-lesion-unet --data DATA --methods METHODS --out OUT --seed 0

with the metrics that apply to a region score (the default for a segmentation model). One torch thread; prints the
command, the load average and `OUT/metrics.md` (docs/evaluation.md, "Segmentation: medlens evaluate").

    python benchmarks/segmentation_evaluate.py [--n 48] [--methods gradcam,...] [--data DIR] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medlens.cli.group import main as medlens_main
from medlens.data.phantom import phantom_2d

METHODS = "gradcam,layercam,hirescam,saliency,inputxgradient,integratedgradients,lrp,occlusion"


def write_phantoms(root: Path, n: int, seed: int = 3, size: int = 64) -> tuple[int, int]:
    """n phantoms as PNGs in root/lesion and root/normal, lesion masks beside; returns (lesion, normal) counts."""
    data = phantom_2d(n, size=size, seed=seed, marker="none")
    counts = [0, 0]
    for i in range(n):
        has = bool(data.lesion_masks[i].any())
        folder = root / ("lesion" if has else "normal")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((data.images[i, 0].numpy() * 255).clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
        if has:
            Image.fromarray(data.lesion_masks[i, 0].numpy().astype(np.uint8) * 255).save(folder / f"{i}_mask.png")
        counts[0 if has else 1] += 1
    return counts[0], counts[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=48, help="phantoms written (about half with a lesion)")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--data", default="phantom-eval-data")
    parser.add_argument("--out", default="phantom-eval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lesion, normal = write_phantoms(Path(args.data), args.n)
    command = ["evaluate", "--model", "phantom-lesion-unet", "--data", args.data, "--methods", args.methods,
               "--out", args.out, "--seed", "0"]
    print(f"{lesion} lesion and {normal} normal phantoms in {args.data}; load before {os.getloadavg()}")
    print("medlens " + " ".join(command))
    t0 = time.time()
    code = medlens_main(command)
    print(f"exit {code}, {time.time() - t0:.0f} s, load after {os.getloadavg()}")
    print((Path(args.out) / "metrics.md").read_text())


if __name__ == "__main__":
    main()
