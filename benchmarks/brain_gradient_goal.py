"""Do LRP or integrated gradients beat the centre baseline on a brain model's test split? (issue 16, item 3)

On the seeded 100-slice subset of the figshare test split used by `lrp_composites_brain.py` (same seed, same
selection): the pointing game (its own default tolerance) and the energy in the box of LRP (given composites)
and integrated gradients (given baselines x n_steps), beside `baseline:center`, `baseline:prior` and Grad-CAM,
with the model's accuracy on those slices (`--limit 300` takes the whole test split). Each row
is printed as it finishes (runs are long on one thread) and all rows go to OUT/<model>.json.

    python benchmarks/brain_gradient_goal.py --data ../shared/data/brain-tumor-figshare --model brain-tumor-mri \
        --composites epsilon --ig zero:16 blur:16 black:16 zero:64
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import medlens
from medlens.data.figshare import box_to_mask, load_arrays, minmax_scale
from medlens.evaluation import energy_in_box, pointing_game
from medlens.evaluation.localisation import center_map, prior_maps


def scores(maps: torch.Tensor, masks: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pg = pointing_game(maps, masks)[:, 0]
    row = {"pointing_game": float(pg.nanmean()), "energy_in_box": float(energy_in_box(maps, masks).nanmean())}
    for c in range(3):
        row[f"pointing_class{c}"] = float(pg[y == c].nanmean())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="brain-tumor-mri")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--composites", nargs="*", default=["epsilon"])
    p.add_argument("--ig", nargs="*", default=["zero:16", "blur:16"],
                   help="BASELINE:N_STEPS; BASELINE is zero (the dataset mean), blur, or black (a black image)")
    p.add_argument("--weights", default=None, help="a state dict for --model's architecture (a candidate model)")
    p.add_argument("--out", default="gradient-goal")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = medlens.load_model(args.model)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    spec = model.input_spec
    size = spec.size[0]
    d = load_arrays(args.data, args.split, size)
    pick = sorted(torch.randperm(len(d["labels"]), generator=torch.Generator().manual_seed(0))[: args.limit].tolist())
    x = (minmax_scale(d["images"][pick]) - spec.mean[0]) / spec.std[0]
    y = d["labels"][pick]
    masks = torch.stack([box_to_mask(b, size) for b in d["boxes"][pick]])
    targets = [[int(v)] for v in y]
    rows = {"baseline:center": scores(center_map((size, size), batch=len(y)), masks, y),
            "baseline:prior": scores(prior_maps(masks, masks.float().sum(0), len(y)), masks, y)}
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, len(x), 64)])
    rows["accuracy"] = {"all": float((pred == y).float().mean())} | {
        f"class{c}": float((pred == y)[y == c].float().mean()) for c in range(3)}
    for name, row in rows.items():
        print(name, json.dumps(row), flush=True)
    runs = [("gradcam", "gradcam", {})] + [(f"lrp:{c}", "lrp", {"composite": c}) for c in args.composites]
    black = -spec.mean[0] / spec.std[0]
    for item in args.ig:
        base, steps = item.split(":")
        baseline = black if base == "black" else base
        runs.append((f"integratedgradients:{base}:{steps}", "integratedgradients",
                     {"baseline": baseline, "n_steps": int(steps)}))
    for label, method, options in runs:
        t0 = time.time()
        maps = medlens.explain(model, x, methods=method, targets=targets, **options)[method]
        rows[label] = scores(maps, masks, y) | {"s_per_image": (time.time() - t0) / len(y)}
        print(label, json.dumps(rows[label]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{Path(args.weights).stem if args.weights else args.model}-{args.split}.json").write_text(
        json.dumps({"model": args.model, "split": args.split, "n": len(y), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
