"""LRP composites compared on a brain model's test split: localisation, deletion and the randomisation check.

For each preset of `medlens.families.lrp.composites.PRESETS`: pointing game, energy in the box and AUPRC against
the tumour box, deletion AUC, and the Spearman similarity after the whole model is re-drawn (Adebayo et al.),
on a seeded subset of the figshare test split; the centre and prior baselines beside them.

    python benchmarks/lrp_composites_brain.py --data ../shared/data/brain-tumor-figshare --model brain-tumor-mri --limit 100 \
        --figure docs/lrp-composites/brain-tumor-mri-v2.png

`composite_rows`, `write_rows` and `composite_figure` are shared with `lrp_composites_phantom.py`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import medlens
from medlens.data.figshare import box_to_mask, load_arrays, minmax_scale
from medlens.evaluation import auprc, deletion, energy_in_box, pointing_game, randomization
from medlens.evaluation.localisation import center_map, prior_maps
from medlens.families.lrp.composites import PRESETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="brain-tumor-mri")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--limit-slow", type=int, default=24, help="slices for deletion and randomisation")
    p.add_argument("--out", default="lrp-composites")
    p.add_argument("--figure", default=None, help="a PNG of every preset on a few test slices (e.g. docs/...png)")
    p.add_argument("--figure-only", action="store_true", help="only the figure, no metrics")
    p.add_argument("--figure-cases", type=int, nargs="*", default=[0, 7, 14], help="indices into the subset")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = medlens.load_model(args.model)
    spec = model.input_spec
    size = spec.size[0]
    d = load_arrays(args.data, "test", size)
    pick = sorted(torch.randperm(len(d["labels"]), generator=torch.Generator().manual_seed(0))[: args.limit].tolist())
    x = (minmax_scale(d["images"][pick]) - spec.mean[0]) / spec.std[0]
    y = d["labels"][pick]
    masks = torch.stack([box_to_mask(b, size) for b in d["boxes"][pick]])
    targets = y[:, None]
    if args.figure:
        composite_figure(model, minmax_scale(d["images"][pick]), x, targets, masks, args.figure_cases, Path(args.figure))
    if args.figure_only:
        return
    rows = composite_rows(model, x, targets, masks, args.limit_slow)
    write_rows(rows, Path(args.out) / f"{args.model}.json", {"model": args.model, "n": len(y),
                                                              "n_slow": min(len(y), args.limit_slow)})


def composite_rows(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, masks: torch.Tensor,
                   limit_slow: int) -> dict[str, dict[str, float]]:
    """{row name: metrics} for the centre and prior baselines and every LRP preset; deletion and randomisation
    on the first `limit_slow` images. targets: (N, 1) long; masks: bool (N, H, W)."""
    size = tuple(masks.shape[-2:])
    rows = {}
    for name, maps in (("baseline:center", center_map(size, batch=len(x))),
                       ("baseline:prior", prior_maps(masks, masks.float().sum(0), len(x)))):
        rows[name] = {"pointing_game": float(pointing_game(maps, masks).nanmean()),
                      "energy_in_box": float(energy_in_box(maps, masks).nanmean()),
                      "auprc": float(auprc(maps, masks).nanmean())}
    slow = slice(0, limit_slow)
    for composite in PRESETS:
        t0 = time.time()
        maps = medlens.explain(model, x, methods="lrp", targets=targets.tolist(), composite=composite)["lrp"]
        seconds = (time.time() - t0) / len(x)
        row = {"pointing_game": float(pointing_game(maps, masks).nanmean()),
               "energy_in_box": float(energy_in_box(maps, masks).nanmean()),
               "auprc": float(auprc(maps, masks).nanmean()), "s_per_image": seconds}
        row["deletion"] = float(deletion(model, x[slow], maps[slow], targets[slow]).values.mean())
        rnd = randomization(model, x[slow], targets[slow], "lrp", options={"composite": composite}, original=maps[slow])
        row["randomization"] = float(rnd.values.mean())
        rows[f"lrp:{composite}"] = row
        print(composite, json.dumps(row), flush=True)
    return rows


def write_rows(rows: dict[str, dict[str, float]], path: Path, about: dict) -> None:
    """The rows as JSON at `path`, and as a Markdown table on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(about | {"rows": rows}, indent=2) + "\n")
    keys = ["pointing_game", "energy_in_box", "auprc", "deletion", "randomization"]
    print("| composite | " + " | ".join(keys) + " |\n|---" + "|---:" * len(keys) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys) + " |")


def composite_figure(model: torch.nn.Module, x01: torch.Tensor, x: torch.Tensor, targets: torch.Tensor,
                     masks: torch.Tensor, cases: list[int], path: Path, percentile: float = 99.0) -> None:
    """A PNG grid, two rows per case: the image then each preset's map, the region outlined in green; the first row
    as `medlens explain` overlays it (symmetric scale at the largest magnitude), the second the map alone
    (red positive, blue negative, white zero) with the scale at the `percentile` of |map|, so that weak structure
    (noise, grids, mass outside the head) shows; a header names the columns."""
    from PIL import Image, ImageDraw

    from medlens.io.render import DIVERGING_CMAP, OUTLINE_RGB, blend, color_scale, outline_of

    zoom = max(1, 192 // x.shape[-1])
    columns = {name: medlens.explain(model, x[cases], methods="lrp", targets=targets[cases].tolist(),
                                     composite=name)["lrp"][:, 0].numpy() for name in PRESETS}
    rows = []
    for r, i in enumerate(cases):
        image = x01[i, 0].numpy()
        edge = outline_of(masks[i].numpy())
        gray = (image[..., None].repeat(3, -1) * 255).astype("uint8")
        white = np.ones_like(image)
        overlays, alone = [gray.copy()], [gray.copy()]
        for m in columns.values():
            overlays.append(blend(image, m[r], color_scale(m[r])))
            a = float(np.percentile(np.abs(m[r]), percentile)) or 1.0
            alone.append(blend(white, m[r], (DIVERGING_CMAP, -a, a), alpha=1.0))
        for tiles in (overlays, alone):
            for t in tiles:
                t[edge] = OUTLINE_RGB
            rows.append(np.concatenate([np.pad(t, ((1, 1), (1, 1), (0, 0)), constant_values=255) for t in tiles], 1))
        rows.append(np.full((3, rows[-1].shape[1], 3), 255, dtype=np.uint8))
    grid = np.concatenate(rows, 0).repeat(zoom, 0).repeat(zoom, 1)
    head = Image.new("RGB", (grid.shape[1], 18), "white")
    draw = ImageDraw.Draw(head)
    width = grid.shape[1] // (len(PRESETS) + 1)
    for k, name in enumerate(["image"] + list(PRESETS)):
        draw.text((k * width + 4, 3), name, fill="black")
    img = Image.new("RGB", (grid.shape[1], grid.shape[0] + 18), "white")
    img.paste(head, (0, 0))
    img.paste(Image.fromarray(grid), (0, 18))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.quantize(128).save(path, optimize=True)  # a palette keeps the figure small

if __name__ == "__main__":
    main()
