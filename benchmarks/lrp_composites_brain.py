"""LRP composites compared on a brain model's test split: localisation, deletion and the randomisation check.

For each preset of `medlens.families.lrp.composites.PRESETS`: pointing game, energy in the box and AUPRC against
the tumour box, deletion AUC, and the Spearman similarity after the whole model is re-drawn (Adebayo et al.),
on a seeded subset of the figshare test split; the centre and prior baselines beside them.

    python benchmarks/lrp_composites_brain.py --data ../shared/data/brain-tumor-figshare --model brain-tumor-mri --limit 100
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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
    rows = {}
    for name, maps in (("baseline:center", center_map((size, size), batch=len(y))),
                       ("baseline:prior", prior_maps(masks, masks.float().sum(0), len(y)))):
        rows[name] = {"pointing_game": float(pointing_game(maps, masks).nanmean()),
                      "energy_in_box": float(energy_in_box(maps, masks).nanmean()),
                      "auprc": float(auprc(maps, masks).nanmean())}
    slow = slice(0, args.limit_slow)
    for composite in PRESETS:
        t0 = time.time()
        maps = medlens.explain(model, x, methods="lrp", targets=[[int(v)] for v in y], composite=composite)["lrp"]
        seconds = (time.time() - t0) / len(y)
        row = {"pointing_game": float(pointing_game(maps, masks).nanmean()),
               "energy_in_box": float(energy_in_box(maps, masks).nanmean()),
               "auprc": float(auprc(maps, masks).nanmean()), "s_per_image": seconds}
        row["deletion"] = float(deletion(model, x[slow], maps[slow], targets[slow]).values.mean())
        rnd = randomization(model, x[slow], targets[slow], "lrp", options={"composite": composite}, original=maps[slow])
        row["randomization"] = float(rnd.values.mean())
        rows[f"lrp:{composite}"] = row
        print(composite, json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps({"model": args.model, "n": len(y), "n_slow": len(y[slow]),
                                                         "rows": rows}, indent=2) + "\n")
    keys = ["pointing_game", "energy_in_box", "auprc", "deletion", "randomization"]
    print("| composite | " + " | ".join(keys) + " |\n|---" + "|---:" * len(keys) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys) + " |")


if __name__ == "__main__":
    main()
