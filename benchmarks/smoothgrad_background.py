"""SmoothGrad's peak on the brain model: in the head or on the background? medlens's smoothgrad at noise 0.15 and
0.05, saliency, and SmoothGrad computed here by its definition without medlens (mean of the gradients, and of their
absolute values, over 25 noisy copies). 12 slices of the figshare test split (seed 0), one thread.

    python benchmarks/smoothgrad_background.py DATA   # DATA: the figshare brain-tumour folder

The figures in docs/evaluation.md were taken on `brain-tumor-mri-v4` (the default until 7 Dec 2026):
`--model brain-tumor-mri-v4` reruns them; the default is the bundled `brain-tumor-mri`.
"""
import argparse

import torch, numpy as np, medlens, random
from background_share import head_mask
from medlens.data.figshare import scan_folder, box_to_mask
from medlens.evaluation.localisation import pointing_game
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("data", help="the figshare brain-tumour folder")
parser.add_argument("--model", default="brain-tumor-mri", help="a bundled brain model (default: brain-tumor-mri)")
args = parser.parse_args()
torch.set_num_threads(1)
m = medlens.load_model(args.model)
sl = scan_folder(args.data, splits=["test"])
chosen = sorted(random.Random(0).sample(range(len(sl)), 30))[:12]
rows = {k: [] for k in ["saliency", "sg_0.15", "sg_0.05", "sg_0.15_abs", "sg_0.15_own_mean"]}
for i in chosen:
    it = sl[i]; x = medlens.load_input(it.image_path, m); head = torch.from_numpy(head_mask(it.image_path, (160, 160)))
    box = box_to_mask(it.box, (160, 160))[None]
    def rec(k, a):
        rows[k].append((float(a[0, 0].abs()[~head].sum() / a[0, 0].abs().sum()), bool(~head.flatten()[int(a.flatten().argmax())]), float(pointing_game(a, box)[0, 0])))
    r = medlens.explain(m, x, methods=["saliency"], targets=[it.label]); rec("saliency", r["saliency"])
    for noise in (0.15, 0.05):
        r = medlens.explain(m, x, methods=["smoothgrad"], targets=[it.label], seed=0, noise=noise); rec(f"sg_{noise}", r["smoothgrad"])
    # SmoothGrad by definition, computed here: mean of |saliency| (Smilkov et al.) over the same kind of noise
    g = torch.Generator().manual_seed(1); sigma = 0.15 * float(x.max() - x.min()); acc = torch.zeros_like(x); acc2 = torch.zeros_like(x)
    for _ in range(25):
        xn = (x + sigma * torch.randn(x.shape, generator=g)).requires_grad_(True)
        m(xn)[0, it.label].backward(); acc += xn.grad.abs(); acc2 += xn.grad
    rec("sg_0.15_abs", (acc / 25)[:, :1]); rec("sg_0.15_own_mean", (acc2 / 25)[:, :1])
for k, v in rows.items():
    a = np.array(v); print(f"{k:18s} outside {a[:,0].mean():.3f} peak_outside {a[:,1].mean():.2f} pointing {a[:,2].mean():.2f}  n={len(v)}")
