"""What a brain model looks at instead of the tumour: cheap diagnostics on the figshare test split.

For one bundled (or trained) brain model: Grad-CAM and input x gradient pointing game and energy in the box per
class and per slice orientation (labelled by eye, benchmarks/data/figshare-test-orientation.json), the accuracy when the background outside the head, a
border strip, or the tumour box is blanked, the accuracy on the box alone, and the localisation ceiling of
a perfect map on the model's last-stage grid. Writes OUT/<model>.json and a few small overlays.

    python benchmarks/diagnose_brain.py --data ../shared/data/brain-tumor-figshare --model brain-tumor-mri --out diag
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import medlens
from medlens.data.figshare import CLASSES, box_to_mask, load_arrays, minmax_scale
from medlens.evaluation import energy_in_box, pointing_game
from medlens.evaluation.faithfulness import gaussian_blur
from medlens.evaluation.localisation import center_map, prior_maps


def head_masks(x01: torch.Tensor) -> torch.Tensor:
    """(N, 1, S, S) images in [0, 1] -> bool (N, S, S): the head (blurred image above 8% of its range, holes filled
    row-wise between the first and last head pixel)."""
    smooth = gaussian_blur(x01, 2.0)[:, 0]
    fg = smooth > 0.08
    idx = torch.arange(fg.shape[-1])
    first = torch.where(fg, idx, fg.shape[-1]).amin(-1, keepdim=True)
    last = torch.where(fg, idx, -1).amax(-1, keepdim=True)
    rows = (idx >= first) & (idx <= last)
    cols_first = torch.where(fg, idx[:, None], fg.shape[-2]).amin(-2, keepdim=True)
    cols_last = torch.where(fg, idx[:, None], -1).amax(-2, keepdim=True)
    cols = (idx[:, None] >= cols_first) & (idx[:, None] <= cols_last)
    return rows & cols


ORIENTATION_FILE = Path(__file__).parent / "data" / "figshare-test-orientation.json"


def orientations(numbers: torch.Tensor) -> list[str]:
    """The labelled orientation (axial, coronal, sagittal) of each test slice by its file number; "unlabelled" when
    a slice is not in the file (another copy of the data)."""
    table = json.loads(ORIENTATION_FILE.read_text())["orientation"]
    return [table.get(str(int(n)), "unlabelled") for n in numbers]


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    pred = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, len(x), 64)])
    return float((pred == y).float().mean()), pred


def grid_ceiling(masks: torch.Tensor, cells: int) -> dict[str, float]:
    """Pointing game and energy of an oracle map: the box's area fraction per cell of a cells x cells grid,
    upsampled bilinearly like a CAM (the best a map on that grid can do)."""
    m = masks[:, None].float()
    coarse = F.adaptive_avg_pool2d(m, cells)
    up = F.interpolate(coarse, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return {"pointing_game": float(pointing_game(up, masks).nanmean()),
            "energy_in_box": float(energy_in_box(up, masks).nanmean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="brain-tumor-mri")
    p.add_argument("--weights", default=None, help="a state dict for --model's architecture (a candidate model)")
    p.add_argument("--out", default="diag")
    p.add_argument("--figures", default=None, help="folder for a few overlay PNGs (e.g. docs/case-study-brain)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    model = medlens.load_model(args.model)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    spec = model.input_spec
    size = spec.size[0]
    d = load_arrays(args.data, "test", size, cache_dir=Path(args.out) / "cache")
    x01 = minmax_scale(d["images"])
    prep = lambda v: (v - spec.mean[0]) / spec.std[0]  # noqa: E731
    y = d["labels"]
    masks = torch.stack([box_to_mask(b, size) for b in d["boxes"]])
    head = head_masks(x01)
    report: dict = {"model": args.model, "n": len(y), "size": size}

    acc, pred = accuracy(model, prep(x01), y)
    report["accuracy"] = acc
    res = medlens.explain(model, prep(x01), methods=["gradcam"], targets=[[int(v)] for v in y])
    maps = res["gradcam"]
    pg, en = pointing_game(maps, masks)[:, 0], energy_in_box(maps, masks)[:, 0]
    centre = center_map((size, size), batch=len(y))
    total = masks.float().sum(0)
    prior = prior_maps(masks, total, len(y))
    cpg, cen = pointing_game(centre, masks)[:, 0], energy_in_box(centre, masks)[:, 0]
    ppg, pen = pointing_game(prior, masks)[:, 0], energy_in_box(prior, masks)[:, 0]
    # where the Grad-CAM peak lies: inside the head or outside it
    flat = maps[:, 0].flatten(1).argmax(1)
    peak_in_head = head.flatten(1)[torch.arange(len(y)), flat].float()
    energy_outside_head = (maps[:, 0].clamp_min(0) * (~head)).flatten(1).sum(1) / maps[:, 0].clamp_min(0).flatten(1).sum(1).clamp_min(1e-12)

    ixg = medlens.explain(model, prep(x01), methods=["inputxgradient"], targets=[[int(v)] for v in y])["inputxgradient"]
    ipg, ien = pointing_game(ixg, masks)[:, 0], energy_in_box(ixg, masks)[:, 0]
    orient = orientations(d["numbers"])
    bins = {o: torch.tensor([v == o for v in orient]) for o in ("axial", "coronal", "sagittal", "unlabelled")}
    groups = {"all": torch.ones_like(y, dtype=torch.bool)}
    groups.update({f"class {c}": y == i for i, c in enumerate(CLASSES)})
    groups.update({k: v for k, v in bins.items()})
    groups.update({f"{o} {c}": bins[o] & (y == i) for o in ("axial", "coronal", "sagittal") for i, c in enumerate(CLASSES)})
    table = {}
    for name, g in groups.items():
        if g.sum() == 0:
            continue
        table[name] = {"n": int(g.sum()), "accuracy": float((pred[g] == y[g]).float().mean()),
                       "gradcam_pointing": float(pg[g].mean()), "gradcam_energy": float(en[g].mean()),
                       "ixg_pointing": float(ipg[g].mean()), "ixg_energy": float(ien[g].mean()),
                       "center_pointing": float(cpg[g].mean()), "center_energy": float(cen[g].mean()),
                       "prior_pointing": float(ppg[g].mean()), "prior_energy": float(pen[g].mean()),
                       "peak_in_head": float(peak_in_head[g].mean()), "energy_outside_head": float(energy_outside_head[g].mean()),
                       "box_area": float(masks[g].float().mean())}
    report["groups"] = table
    report["class_by_orientation"] = {k: torch.bincount(y[v], minlength=3).tolist() for k, v in bins.items()}

    # occlusions: what the prediction needs
    fill = lambda keep: x01 * keep[:, None]  # noqa: E731
    border = torch.zeros(size, size, dtype=torch.bool)
    k = size // 10
    border[k:-k, k:-k] = True
    dil = F.max_pool2d(masks[:, None].float(), 2 * (size // 16) + 1, 1, size // 16)[:, 0].bool()
    ring = (dil & ~masks)[:, None]
    ring_mean = (x01 * ring).sum((2, 3), keepdim=True) / ring.sum((2, 3), keepdim=True).clamp_min(1)
    tests = {
        "original": x01,
        "background outside the head blanked": fill(head),
        "outer 10% border strip blanked": fill(border.expand_as(head)),
        "tumour box filled with the mean of a ring around it": torch.where(masks[:, None], ring_mean, x01),
        "only the tumour box (+1/16 margin) kept": fill(dil),
        "head kept, everything else blanked, box blanked": fill(head & ~dil),
    }
    report["occlusion"] = {}
    for name, xs in tests.items():
        a, pr = accuracy(model, prep(xs), y)
        report["occlusion"][name] = {"accuracy": a, "changed": float((pr != pred).float().mean()),
                                     "per_class": [float((pr[y == i] == i).float().mean()) for i in range(3)]}
    with torch.no_grad():
        feats = {}
        h = model.layer4.register_forward_hook(lambda m, i, o: feats.update(s=o.shape[-1]))
        model(prep(x01[:1]))
        h.remove()
    cells = feats["s"]
    report["last_stage_grid"] = cells
    report["grid_ceiling"] = {f"{c}x{c}": grid_ceiling(masks, c) for c in (5, 10, 20)}
    report["box_smaller_than_a_cell"] = {f"{c}x{c}": float(((masks.float().sum((1, 2))) < (size / c) ** 2).float().mean()) for c in (5, 10)}
    report["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "groups"}, indent=1))
    for g, v in table.items():
        print(f"{g:28s} n {v['n']:3d} acc {v['accuracy']:.3f} gradcam pg {v['gradcam_pointing']:.3f} en {v['gradcam_energy']:.3f} | "
              f"ixg pg {v['ixg_pointing']:.3f} en {v['ixg_energy']:.3f} | "
              f"centre {v['center_pointing']:.3f}/{v['center_energy']:.3f} prior {v['prior_pointing']:.3f}/{v['prior_energy']:.3f} | "
              f"peak in head {v['peak_in_head']:.2f} energy outside head {v['energy_outside_head']:.2f}")
    if args.figures:
        overlays(x01, maps[:, 0], masks, y, pred, Path(args.figures) / f"{args.model}-gradcam.png")
        overlays(x01, ixg[:, 0], masks, y, pred, Path(args.figures) / f"{args.model}-inputxgradient.png", spread=3)


def overlays(x01, maps, masks, y, pred, path: Path, per_class: int = 3, spread: int = 1) -> None:
    """A small grid: a row per class of `per_class` test slices (every 7th), a map (positive part, red to yellow; a
    pixel map max-pooled over `spread` pixels so that its speckle shows) over the slice, the tumour box outlined in
    green, the map's maximum (what the pointing game reads) marked with a cyan cross."""
    from PIL import Image

    rows = []
    for c in range(3):
        idx = (y == c).nonzero()[:, 0][:per_class * 7:7][:per_class]
        tiles = []
        for i in idx:
            g = x01[i, 0]
            m = maps[i].clamp_min(0)
            py, px = divmod(int(maps[i].flatten().argmax()), maps[i].shape[-1])
            if spread > 1:
                m = F.max_pool2d(m[None, None], spread, 1, spread // 2)[0, 0, :g.shape[0], :g.shape[1]]
            m = m / m.max().clamp_min(1e-12)
            edge = masks[i] & F.max_pool2d((~masks[i])[None, None].float(), 3, 1, 1)[0, 0].bool()
            heat = torch.stack([torch.ones_like(m), m * 0.8, torch.zeros_like(m)])  # dark red -> yellow
            a = 0.55 * m
            rgb = (g * (1 - a) + heat * a).clamp(0, 1)
            rgb[:, edge] = torch.tensor([0.0, 1.0, 0.0])[:, None]
            for d in range(-4, 5):  # the peak
                rgb[:, min(max(py + d, 0), g.shape[0] - 1), px] = torch.tensor([0.0, 1.0, 1.0])
                rgb[:, py, min(max(px + d, 0), g.shape[1] - 1)] = torch.tensor([0.0, 1.0, 1.0])
            tiles.append(rgb)
        rows.append(torch.cat(tiles, 2))
    img = (torch.cat(rows, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).quantize(96).save(path, optimize=True)  # a palette keeps the figure small


if __name__ == "__main__":
    main()
