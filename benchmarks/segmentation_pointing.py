"""How often each method's map of `phantom-lesion-unet`'s lesion score points into the true lesion.

For every test-seed phantom with a lesion (seed 3, as the model card's test set), the model's predicted lesion region
is explained (`SegmentationTarget("lesion", region="predicted")`) with each method; the pointing game asks whether the
map's maximum lies inside the exact lesion mask; energy is the share of the map's positive mass inside it. Cases
where the model predicts no lesion pixel are counted (medlens refuses to explain an empty region).

    python benchmarks/segmentation_pointing.py [--n 60] [--model phantom-lesion-unet | PATH.pt]

One torch thread; prints a Markdown table (docs/evaluation.md, "Segmentation: phantom-lesion-unet").
"""
from __future__ import annotations

import argparse
import time

import torch

import medlens
from medlens.data.phantom import phantom_2d
from medlens.errors import MethodError
from medlens.training.recipes import phantom_prepare
from medlens.training.segmentation import dice_scores

METHODS = ["gradcam", "layercam", "hirescam", "saliency", "inputxgradient", "integratedgradients", "lrp",
           "occlusion", "rise"]
OPTIONS = {"window": 8, "stride": 4, "n_masks": 500}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=60, help="phantoms drawn (about half have a lesion)")
    parser.add_argument("--model", default="phantom-lesion-unet")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = medlens.load_model(args.model)
    data = phantom_2d(args.n, size=64, seed=3, marker="none")
    print("Dice on these:", dice_scores(model, data.images, data.lesion_masks))
    hits = {m: [] for m in METHODS}
    energy = {m: [] for m in METHODS}
    empty, t0 = 0, time.time()
    for i in range(args.n):
        mask = data.lesion_masks[i, 0]
        if not mask.any():
            continue
        x = phantom_prepare(data.images[i:i + 1])
        try:
            result = medlens.explain(model, x, methods=METHODS, targets=[medlens.SegmentationTarget("lesion")],
                                     seed=0, **OPTIONS)
        except MethodError:
            empty += 1
            continue
        for m in METHODS:
            heat = result[m][0, 0]
            hits[m].append(bool(mask.flatten()[heat.flatten().argmax()]))
            positive = heat.clamp(min=0)
            energy[m].append(float(positive[mask].sum() / positive.sum().clamp(min=1e-12)))
    n = len(hits[METHODS[0]])
    print(f"{n} lesion phantoms explained, {empty} with an empty predicted region, {time.time() - t0:.0f} s")
    print("| method | pointing game | energy in lesion |\n| --- | --- | --- |")
    for m in METHODS:
        print(f"| {m} | {sum(hits[m]) / n:.3f} | {sum(energy[m]) / n:.3f} |")
    area = float(data.lesion_masks[data.labels == 1].float().mean())
    print(f"| (random pixel) | {area:.3f} | {area:.3f} |")


if __name__ == "__main__":
    main()
