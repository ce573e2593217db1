"""Where integrated gradients' mass outside the head comes from (issue 27, docs/evaluation.md): per slice of the seeded
test subset, the share of |map| outside the head (benchmarks/background_share.py's independent head mask) split into
the head mask's rim (within 3 model pixels of it) and the background farther out, for 50 and 200 path points and
for input x gradient; and how much of the background sits exactly at the scale's black.

    python benchmarks/ig_background_sources.py --data PATH/brain-tumor-figshare --limit 6

The figures in docs/evaluation.md were taken with the reference of their time (the scale's black: run it with a
checkout before the air reference, or pass --spec-black for the scale's black), on `brain-tumor-mri-v4` (the default
until 7 Dec 2026: `--model brain-tumor-mri-v4`). Input x gradient is computed here by its definition from the same
reference. One torch thread.
"""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
from scipy import ndimage

import medlens
from background_share import head_mask
from medlens.core.baselines import scan_black
from medlens.data.figshare import scan_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=6, help="the first slices of the 30-slice seeded subset")
    p.add_argument("--spec-black", action="store_true", help="the scale's black as reference (the first pass's)")
    p.add_argument("--model", default="brain-tumor-mri", help="a bundled brain model (default: brain-tumor-mri)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = medlens.load_model(args.model)
    black = float(scan_black(model).reshape(-1)[0])
    slices = scan_folder(args.data, splits=["test"])
    chosen = sorted(random.Random(0).sample(range(len(slices)), 30))[: args.limit]
    names = ("ig50", "ig200", "ixg")
    agg: dict[str, list] = {n: [] for n in names}
    for i in chosen:
        item = slices[i]
        x = medlens.load_input(item.image_path, model)
        head = torch.from_numpy(head_mask(item.image_path, tuple(x.shape[2:])))
        rim = ~head & torch.from_numpy(ndimage.binary_dilation(head.numpy(), iterations=3))
        t = [item.label]
        base = {"baseline": black} if args.spec_black else {}
        ig = medlens.explain(model, x, methods=["integratedgradients"], targets=t, **base)
        ig200 = medlens.explain(model, x, methods=["integratedgradients"], targets=t, n_steps=200, **base)
        ref = ig.provenance["methods"]["integratedgradients"].get("baseline_values", [[black]])[0][0]
        leaf = x.clone().requires_grad_(True)
        grad, = torch.autograd.grad(model(leaf)[0, item.label], leaf)
        ixg = (x - ref) * grad  # input x gradient from the same reference, by its definition
        at_black = float(((x[0, 0] - black).abs() < 1e-6)[~head].float().mean())
        line = [f"{item.number:5d} background at the scale's black {at_black:.2f}"]
        for n, m in zip(names, (ig["integratedgradients"], ig200["integratedgradients"], ixg)):
            a = m[0, 0].abs()
            row = (float(a[~head].sum() / a.sum()), float(a[rim].sum() / a.sum()), float(a[~head & ~rim].sum() / a.sum()))
            agg[n].append(row)
            line.append(f"{n} outside {row[0]:.4f} (rim {row[1]:.4f}, farther {row[2]:.4f})")
        print("; ".join(line), flush=True)
    print(f"mean over {len(chosen)} slices, load {os.getloadavg()[0]:.1f}:")
    for n, rows in agg.items():
        print(f"  {n:6s} outside, rim, farther: " + ", ".join(f"{v:.4f}" for v in np.mean(rows, axis=0)))


if __name__ == "__main__":
    main()
