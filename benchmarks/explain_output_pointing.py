"""Pointing game of Grad-CAM, input x gradient and LRP per explained output (logit, log-probability, contrast) on
slices of the figshare test split spread evenly over it, each explained for its true class:

    python benchmarks/explain_output_pointing.py --data PATH/brain-tumor-figshare --n 20

The figures and the command are in docs/methods.md; the default output stays "logit" until a larger measurement says
otherwise.
"""
from __future__ import annotations

import argparse
import time

import torch

import medlens
from medlens.data.figshare import box_to_mask, load_arrays
from medlens.evaluation.localisation import pointing_game
from medlens.training.recipes import brain_prepare

OUTPUTS = ("logit", "log-probability", "contrast")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="brain-tumor-mri")
    p.add_argument("--methods", default="gradcam,inputxgradient,lrp")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--cache", default=None, help="folder for the decoded arrays")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = load_arrays(args.data, "test", 160, cache_dir=args.cache)
    pick = torch.linspace(0, len(d["labels"]) - 1, args.n).round().long()
    x, y = brain_prepare(d["images"][pick]), d["labels"][pick]
    masks = torch.stack([box_to_mask(d["boxes"][i], 160) for i in pick.tolist()])
    model = medlens.load_model(args.model)
    methods = args.methods.split(",")
    print(f"{args.model}, {len(x)} test slices (classes {torch.bincount(y).tolist()}), true class explained")
    print("| output | " + " | ".join(methods) + " |")
    print("| --- |" + " --- |" * len(methods))
    for output in OUTPUTS:
        started = time.perf_counter()
        result = medlens.explain(model, x, methods=methods, targets=y[:, None].tolist(), output=output)
        hits = [float(pointing_game(result[m], masks)[:, 0].mean()) for m in methods]
        print(f"| {output} | " + " | ".join(f"{h:.2f}" for h in hits) + f" |  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
