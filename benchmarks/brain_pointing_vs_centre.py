"""Pointing game of pixel-level maps against the centre baseline on the figshare test split, paired per slice.

For each method: the share of slices whose map peak is in the tumour box, the centre bump's, their paired difference with
a 95% bootstrap interval, and the slices where only one of them hits. Maps from the cached 160 px arrays (as
diagnose_brain.py), through `medlens.explain`:

    python benchmarks/brain_pointing_vs_centre.py --data ../shared/data/brain-tumor-figshare --model brain-tumor-mri
"""
from __future__ import annotations

import argparse

import torch

import medlens
from medlens.data.figshare import box_to_mask, load_arrays
from medlens.evaluation.localisation import center_map, pointing_game
from medlens.training.recipes import brain_prepare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="brain-tumor-mri")
    p.add_argument("--methods", default="lrp,integratedgradients")
    p.add_argument("--cache", default=None, help="folder for the decoded arrays")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--boot", type=int, default=10000)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    d = load_arrays(args.data, "test", 160, cache_dir=args.cache, require_boxes=False)
    x, y = brain_prepare(d["images"]), d["labels"]
    masks = torch.stack([box_to_mask(b, 160) for b in d["boxes"]])
    centre = pointing_game(center_map((160, 160), batch=len(x)), masks)[:, 0]
    model = medlens.load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    for method in args.methods.split(","):
        maps = torch.cat([medlens.explain(model, x[i:i + 25], methods=method, targets=y[i:i + 25, None].tolist())[method]
                          for i in range(0, len(x), 25)])
        hit = pointing_game(maps, masks)[:, 0]
        diff = hit - centre
        boots = torch.stack([diff[torch.randint(len(diff), (len(diff),), generator=gen)].mean() for _ in range(args.boot)])
        print(f"{args.model} {method}: pointing {hit.mean():.3f}, centre {centre.mean():.3f}, paired difference "
              f"{diff.mean():+.3f} [{boots.quantile(0.025):+.3f}, {boots.quantile(0.975):+.3f}] (95% bootstrap); "
              f"only the map hits {int(((hit == 1) & (centre == 0)).sum())}, only the centre {int(((hit == 0) & (centre == 1)).sum())}")


if __name__ == "__main__":
    main()
