"""Pointing game of Grad-CAM, input x gradient and LRP per explained output (logit, log-probability, contrast) on
slices of the figshare test split spread evenly over it, each explained for its true class:

    python benchmarks/explain_output_pointing.py --data PATH/brain-tumor-figshare --n 20

and on the phantoms' test set (seed 3, generated, no data folder): `--model phantom-lesion` (the lesion cases, class
"lesion", the exact lesion mask) and `--model phantom-shortcut` (the cases with the corner marker, their own class,
the marker's mask: what that model learned; and the lesion cases against the lesion mask):

    python benchmarks/explain_output_pointing.py --model phantom-lesion --n 200
    python benchmarks/explain_output_pointing.py --model phantom-shortcut --n 200

The figures and the command are in docs/methods.md; the default output stays "logit" until a larger measurement says
otherwise.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import medlens
from medlens.data.figshare import box_to_mask, load_arrays
from medlens.evaluation.localisation import pointing_game
from medlens.training.recipes import brain_prepare, phantom_data, phantom_prepare

OUTPUTS = ("logit", "log-probability", "contrast")


def brain(args: argparse.Namespace) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One case set: the figshare test slices spread evenly, their true classes, their tumour boxes."""
    d = load_arrays(args.data, "test", 160, cache_dir=args.cache)
    pick = torch.linspace(0, len(d["labels"]) - 1, args.n).round().long()
    x, y = brain_prepare(d["images"][pick]), d["labels"][pick]
    masks = torch.stack([box_to_mask(d["boxes"][i], 160) for i in pick.tolist()])
    return [(f"{len(x)} test slices (classes {torch.bincount(y).tolist()}), true class, tumour box", x, y, masks)]


def phantoms(args: argparse.Namespace) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The phantom test cases drawn first (`--n` of them) with a lesion (and, for the shortcut model, a marker)."""
    cases = phantom_data(args.model, "test", n=3 * args.n)
    x = phantom_prepare(cases.images)
    lesion = (cases.labels == 1).nonzero()[:, 0][: args.n]
    sets = [(f"{len(lesion)} lesion phantoms, class lesion, lesion mask", x[lesion], cases.labels[lesion],
             cases.lesion_masks[lesion, 0])]
    if args.model == "phantom-shortcut":
        marked = cases.has_marker.nonzero()[:, 0][: args.n]
        sets.insert(0, (f"{len(marked)} phantoms with the marker, own class, marker mask", x[marked],
                        cases.labels[marked], cases.marker_masks[marked, 0]))
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="the figshare folder (brain models)")
    p.add_argument("--model", default="brain-tumor-mri")
    p.add_argument("--methods", default="gradcam,inputxgradient,lrp")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--cache", default=None, help="folder for the decoded arrays")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = medlens.load_model(args.model)
    methods = args.methods.split(",")
    for what, x, y, masks in (phantoms(args) if args.model.startswith("phantom") else brain(args)):
        print(f"{args.model}, {what}; load {os.getloadavg()[0]:.1f}")
        print("| output | " + " | ".join(methods) + " |")
        print("| --- |" + " --- |" * len(methods))
        for output in OUTPUTS:
            started = time.perf_counter()
            result = medlens.explain(model, x, methods=methods, targets=y[:, None].tolist(), output=output)
            hits = [float(pointing_game(result[m], masks)[:, 0].mean()) for m in methods]
            print(f"| {output} | " + " | ".join(f"{h:.2f}" for h in hits) + f" |  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
