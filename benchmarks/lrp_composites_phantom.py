"""LRP composites compared on a phantom model: localisation against the exact lesion masks, deletion, randomisation.

The same rows as `lrp_composites_brain.py` (every preset of `medlens.families.lrp.composites.PRESETS`, beside the
centre and prior baselines), on the lesion cases of the model's own test phantoms (the model card's test seed),
explained for the lesion class; deletion and the randomisation check on the first `--limit-slow` of them.

    python benchmarks/lrp_composites_phantom.py --model phantom-lesion --limit 200 --limit-slow 48 \
        --figure docs/lrp-composites/phantom-lesion.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import medlens
from medlens.training.recipes import phantom_data, phantom_prepare

from lrp_composites_brain import composite_figure, composite_rows, write_rows  # the same script's folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="phantom-lesion", choices=["phantom-lesion", "phantom-shortcut"])
    p.add_argument("--phantoms", type=int, default=600, help="test phantoms drawn (about half have a lesion)")
    p.add_argument("--limit", type=int, default=200, help="lesion cases scored")
    p.add_argument("--limit-slow", type=int, default=48, help="lesion cases for deletion and randomisation")
    p.add_argument("--out", default="lrp-composites")
    p.add_argument("--figure", default=None, help="a PNG of every preset on a few lesion cases")
    p.add_argument("--figure-only", action="store_true", help="only the figure, no metrics")
    p.add_argument("--figure-cases", type=int, nargs="*", default=[0, 1, 4], help="indices into the lesion cases")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = medlens.load_model(args.model)
    cases = phantom_data(args.model, "test", n=args.phantoms)
    lesion = (cases.labels == 1).nonzero()[:, 0][: args.limit]
    x = phantom_prepare(cases.images[lesion])
    masks = cases.lesion_masks[lesion, 0]
    targets = torch.ones(len(lesion), 1, dtype=torch.long)
    if args.figure:
        composite_figure(model, x, x, targets, masks, args.figure_cases, Path(args.figure))
    if args.figure_only:
        return
    rows = composite_rows(model, x, targets, masks, args.limit_slow)
    write_rows(rows, Path(args.out) / f"{args.model}.json", {"model": args.model, "n": len(lesion),
                                                              "n_slow": min(len(lesion), args.limit_slow)})


if __name__ == "__main__":
    main()
