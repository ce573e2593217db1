"""How often Grad-CAM's picture (its positive part) points into the tumour box, against its raw argmax, per bundled
brain model on a split of the figshare set (each slice explained for its true class at the last stage, as in training).

Per model: accuracy; the raw class activation map's pointing game (TorchRay's tolerance, as `medlens evaluate`) and
its argmax strictly inside the box; the picture pointing game (the map's maximum positive and strictly inside the box:
a blank picture misses); blank pictures (map <= 0 everywhere); energy in the box.

    python benchmarks/brain_picture_pointing.py --data PATH/brain-tumor-figshare --split test \
        --models brain-tumor-mri-v4,brain-tumor-mri

One torch thread; prints the load with the figures.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

import medlens
from medlens.data.figshare import minmax_scale
from medlens.evaluation.localisation import energy_in_box, pointing_game
from medlens.training.recipes import BRAIN_RECIPES
from medlens.training.splits import load_data
from medlens.training.validation import cam_maps, picture_pointing


def rows_for(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """The figures of one model on prepared slices `x` with their labels and box masks."""
    m, z = cam_maps(model, x, labels, tuple(masks.shape[-2:]))
    flat = m.flatten(1)
    strict = masks.flatten(1).gather(1, flat.argmax(1, keepdim=True))[:, 0]
    return {"accuracy": float((z.argmax(1) == labels).float().mean()),
            "pointing game (tolerance)": float(pointing_game(m, masks).nanmean()),
            "argmax inside the box": float(strict.float().mean()),
            "picture pointing": float(picture_pointing(m[:, 0], masks).nanmean()),
            "blank pictures": float((flat.amax(1) <= 0).float().mean()),
            "energy in the box": float(energy_in_box(m, masks).nanmean()),
            "median logit of the true class": float(z.gather(1, labels[:, None]).median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--models", default="brain-tumor-mri-v4,brain-tumor-mri")
    parser.add_argument("--cache", default=None, help="where decoded slices are kept between runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = BRAIN_RECIPES["brain-tumor-mri"]
    data = load_data(recipe, args.data, args.cache)
    split = data.reports()["test"] if args.split == "test" else getattr(data, args.split)
    x = (minmax_scale(split.images) - recipe.data.mean) / recipe.data.std
    t0 = time.perf_counter()
    names = args.models.split(",")
    table = {name: rows_for(medlens.load_model(name), x, split.labels, split.masks) for name in names}
    print(f"{args.split} split, {len(x)} slices, true class; load {os.getloadavg()[0]:.1f}, "
          f"{time.perf_counter() - t0:.0f} s")
    print("| | " + " | ".join(f"`{n}`" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for key in table[names[0]]:
        print(f"| {key} | " + " | ".join(f"{table[n][key]:.3f}" for n in names) + " |")


if __name__ == "__main__":
    main()
