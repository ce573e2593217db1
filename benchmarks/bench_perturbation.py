"""Benchmark of the perturbation family against its peers, in one run, interleaved: medians and ratios.

LIME vs lime_image (1,000 samples), occlusion vs captum's Occlusion (same windows), KernelSHAP vs shap's
Partition explainer (equal model evaluations, time and deletion AUC). Prints a Markdown table.

    PYTHONPATH=src python benchmarks/bench_perturbation.py            # default, a few minutes on 2 cores
    PYTHONPATH=src python benchmarks/bench_perturbation.py --repeats 5 --model resnet18

The model is a small CNN (or a torchvision ResNet-18 with a 1-channel stem), seeded, briefly trained on
synthetic 224x224 grayscale "scans" (an ellipse of tissue with texture; class 1 has a bright nodule,
class 2 a dark cavity), so that a deletion curve means something. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

import medlens
from medlens.families.surrogate import slic_segments

SIZE = 224


# ------------------------------------------------------------------------------------------ the model
class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, global max pool, linear. `tiny`: a 4x4 stride-4 stem and narrow blocks (about
    3 M multiply-adds per image); `small`: four stride-2 3x3 blocks, 16 to 64 channels (about 38 M)."""

    def __init__(self, num_classes: int = 3, tiny: bool = False) -> None:
        super().__init__()
        widths = (8, 16, 32, 32) if tiny else (16, 32, 64, 64)
        layers, c_in = [], 1
        for k, c_out in enumerate(widths):
            conv = (nn.Conv2d(c_in, c_out, 4, stride=4) if tiny and k == 0
                    else nn.Conv2d(c_in, c_out, 3, stride=2 if (k > 0 or not tiny) and not (tiny and k == 1) else 1,
                                   padding=1))
            layers += [conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ("tiny", "small"):
        return SmallCNN(tiny=name == "tiny")
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3)
    model.conv1 = nn.Conv2d(1, 64, 7, stride=2, padding=3, bias=False)
    return model


def phantoms(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic grayscale scans (n, 1, 224, 224), normalised, and labels 0 (none), 1 (nodule), 2 (cavity)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.9) ** 2 < 1).float() * 0.5
    texture = torch.nn.functional.avg_pool2d(torch.randn(n, 1, SIZE, SIZE, generator=gen), 9, 1, 4) * 0.6
    images = body + texture + 0.03 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    for i in range(n):
        if labels[i] == 0:
            continue
        cx, cy = (torch.rand(2, generator=gen) * 1.0 - 0.5).tolist()
        r = 0.08 + 0.07 * float(torch.rand(1, generator=gen))
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
        images[i, 0] += (0.8 if labels[i] == 1 else -0.8) * blob
    return (images - 0.25) / 0.35, labels


def train(model: nn.Module, steps: int) -> float:
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x, y = phantoms(16, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = phantoms(96, gen)
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


# ---------------------------------------------------------------------------------------- deletion AUC
def deletion_auc(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, target: int, baseline: torch.Tensor,
                 steps: int = 20) -> float:
    """Remove pixels from most to least attributed (to the baseline) in `steps` equal steps; the area under
    the target's softmax probability over the removed fraction (0..1). Lower means a more faithful ranking."""
    order = saliency.reshape(-1).argsort(descending=True)
    n = order.numel()
    batch = []
    for k in range(steps + 1):
        keep = torch.ones(n)
        keep[order[: int(round(n * k / steps))]] = 0
        keep = keep.reshape(x.shape[2:])
        batch.append(baseline + (x[0] - baseline) * keep)
    with torch.inference_mode():
        probs = torch.softmax(model(torch.stack(batch)), dim=1)[:, target].double()
    return float(torch.trapezoid(probs, dx=1.0 / steps))


# ------------------------------------------------------------------------------------------ the runs
def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "small", "resnet18"], default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lime-samples", type=int, default=1000)
    parser.add_argument("--shap-evals", type=int, default=1000)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--all-repeats", action="store_true", help="repeat the peers' slow default rows too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from captum.attr import Occlusion
    from lime import lime_image
    import shap

    model = make_model(args.model)
    t_train, accuracy = timed(lambda: train(model, args.train_steps))
    gen = torch.Generator().manual_seed(7)
    xs, ys = phantoms(16, gen)
    with torch.inference_mode():
        pred = model(xs).argmax(1)
    good = (pred == ys) & (ys == 1)  # a correctly classified nodule: deleting it should lower the probability
    pick = int(good.nonzero()[0]) if good.any() else 0
    x = xs[pick : pick + 1].contiguous()
    with torch.inference_mode():
        target = int(model(x).argmax(1))
    mean_value = float(x.mean())
    baseline = torch.full_like(x[0], mean_value)
    bs = args.batch_size
    print(f"model {args.model}: trained {args.train_steps} steps in {t_train:.1f}s, held-out accuracy {accuracy:.2f}; "
          f"image label {int(ys[pick])}, explained target {target}", file=sys.stderr)

    def torch_probs(batch: np.ndarray) -> np.ndarray:  # numpy NHWC (RGB or 1 channel) -> softmax, for the peers
        t = torch.from_numpy(np.ascontiguousarray(batch[..., :1])).float().permute(0, 3, 1, 2)
        with torch.inference_mode():
            return torch.softmax(model(t), dim=1).numpy()

    # the same SLIC superpixels for medlens and (second lime row) lime_image
    segments = torch.unique(slic_segments(x[0], 50, 0.3), return_inverse=True)[1].numpy()
    rgb = np.repeat(x[0, 0].numpy()[..., None], 3, axis=2).astype(np.float64)
    explainer = lime_image.LimeImageExplainer(random_state=0)

    def run_lime_image(batch_size: int, same_segments: bool):
        with contextlib.redirect_stderr(io.StringIO()):
            return explainer.explain_instance(
                rgb, torch_probs, labels=(target,), top_labels=None, hide_color=mean_value,
                num_samples=args.lime_samples, batch_size=batch_size, random_seed=0,
                segmentation_fn=(lambda img: slic_segments(x[0], 50, 0.3).numpy()) if same_segments else None,
            )

    def run_medlens(method: str, **opts):
        return medlens.explain(model, x, method, targets=[target], seed=0, batch_size=bs, **opts)

    peer_calls = {"n": 0}

    def shap_f(batch: np.ndarray) -> np.ndarray:
        peer_calls["n"] += batch.shape[0]
        return torch_probs(batch)

    masker = shap.maskers.Image(np.full((SIZE, SIZE, 1), mean_value, dtype=np.float32), (SIZE, SIZE, 1))
    shap_explainer = shap.Explainer(shap_f, masker, algorithm="partition")
    x_hwc = x[0].permute(1, 2, 0).numpy()[None]

    def run_shap():
        peer_calls["n"] = 0
        with contextlib.redirect_stderr(io.StringIO()):
            out = shap_explainer(x_hwc, max_evals=args.shap_evals, batch_size=bs, outputs=[target], silent=True)
        return out

    occ = Occlusion(model)
    w, s = args.window, args.stride

    def run_captum(ppe: int):
        with torch.inference_mode():
            return occ.attribute(x, sliding_window_shapes=(1, w, w), strides=(1, s, s), baselines=0.0, target=target,
                                 perturbations_per_eval=ppe)

    contestants: dict[str, Callable[[], object]] = {
        "medlens lime (slic 50, prob)": lambda: run_medlens("lime", num_samples=args.lime_samples, n_segments=50,
                                                             baseline=mean_value, output="probability"),
        "lime_image (defaults: quickshift, batch 10)": lambda: run_lime_image(10, False),
        "lime_image (same slic, batch 64)": lambda: run_lime_image(bs, True),
        "medlens occlusion": lambda: run_medlens("occlusion", window=w, stride=s, baseline="zero"),
        f"captum Occlusion (perturbations_per_eval={bs})": lambda: run_captum(bs),
        "captum Occlusion (perturbations_per_eval=1, default)": lambda: run_captum(1),
        "medlens kernelshap (slic 50, prob)": lambda: run_medlens("kernelshap", num_samples=args.shap_evals - 1,
                                                                   n_segments=50, baseline=mean_value,
                                                                   output="probability"),
        "shap Partition (Image masker, mean value)": run_shap,
    }
    times: dict[str, list[float]] = {k: [] for k in contestants}
    last: dict[str, object] = {}
    once = {"lime_image (defaults: quickshift, batch 10)", "captum Occlusion (perturbations_per_eval=1, default)"}
    for r in range(args.repeats):  # interleaved: each repeat runs every contestant once
        for name, fn in contestants.items():
            if name in once and r > 0 and not args.all_repeats:
                continue  # the peers' slow default settings: one run is enough to show the gap
            dt, last[name] = timed(fn)
            times[name].append(dt)
            print(f"  {name}: {dt:.2f}s", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}

    # ---- quality side: agreement and deletion AUC
    ours_lime = last["medlens lime (slic 50, prob)"]["lime"][0, 0]
    lime_exp = last["lime_image (same slic, batch 64)"]
    lime_weights = dict(lime_exp.local_exp[target])
    ours_seg = torch.tensor([float(ours_lime.reshape(-1)[torch.from_numpy(segments).reshape(-1) == j][0])
                             for j in range(int(segments.max()) + 1)])
    peer_seg = torch.tensor([lime_weights.get(j, 0.0) for j in range(int(segments.max()) + 1)])
    ra, rb = ours_seg.argsort().argsort().double(), peer_seg.argsort().argsort().double()
    lime_rho = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    ours_occ = last["medlens occlusion"]["occlusion"][0, 0]
    captum_occ = last[f"captum Occlusion (perturbations_per_eval={bs})"][0, 0]
    occ_diff = float((ours_occ - captum_occ).abs().max())
    ks = last["medlens kernelshap (slic 50, prob)"]
    ks_map = ks["kernelshap"][0, 0]
    ks_evals = ks.provenance["methods"]["kernelshap"]["model_evaluations"][0]
    shap_map = torch.from_numpy(np.asarray(last["shap Partition (Image masker, mean value)"].values)[0, :, :, 0, 0])
    shap_evals = peer_calls["n"]
    auc_ks = deletion_auc(model, x, ks_map, target, baseline)
    auc_shap = deletion_auc(model, x, shap_map, target, baseline)
    fine_ks = deletion_auc(model, x, ks_map, target, baseline, steps=100)
    fine_shap = deletion_auc(model, x, shap_map, target, baseline, steps=100)
    rgen = torch.Generator().manual_seed(0)
    auc_rand = statistics.mean(deletion_auc(model, x, torch.rand(SIZE, SIZE, generator=rgen), target, baseline)
                               for _ in range(3))
    auc_lime = deletion_auc(model, x, ours_lime, target, baseline)
    auc_occ = deletion_auc(model, x, ours_occ, target, baseline)

    with torch.inference_mode():
        p_full = float(torch.softmax(model(x), 1)[0, target])

    def row(name: str, ref: str | None, note: str = "") -> str:
        if len(times[name]) == 1 and args.repeats > 1:
            note = (note + "; " if note else "") + "1 run"
        ratio = f"{med[name] / med[ref]:.2f}x" if ref else ""
        return f"| {name} | {med[name]:.2f} | {ratio} | {note} |"

    lines = [
        f"Model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), input 1x{SIZE}x{SIZE}, "
        f"{args.repeats} interleaved repeats, medians; torch {torch.__version__}, {args.threads} threads.",
        "",
        "| run | median s | peer / medlens | notes |",
        "|---|---:|---:|---|",
        row("medlens lime (slic 50, prob)", None, f"{args.lime_samples} samples, batch {bs}"),
        row("lime_image (defaults: quickshift, batch 10)", "medlens lime (slic 50, prob)", "own segmentation"),
        row("lime_image (same slic, batch 64)", "medlens lime (slic 50, prob)",
            f"Spearman of superpixel weights vs medlens: {lime_rho:.2f}"),
        row("medlens occlusion", None, f"window {w}, stride {s}, batch {bs}"),
        row(f"captum Occlusion (perturbations_per_eval={bs})", "medlens occlusion", f"max abs diff vs medlens {occ_diff:.1e}"),
        row("captum Occlusion (perturbations_per_eval=1, default)", "medlens occlusion", ""),
        row("medlens kernelshap (slic 50, prob)", None, f"{ks_evals} evaluations; deletion AUC {auc_ks:.3f}"),
        row("shap Partition (Image masker, mean value)", "medlens kernelshap (slic 50, prob)",
            f"{shap_evals} evaluations; deletion AUC {auc_shap:.3f}"),
        "",
        f"Deletion AUC (target softmax probability, 20 steps, pixels to the image mean; lower is better): "
        f"kernelshap {auc_ks:.3f}, shap Partition {auc_shap:.3f}, lime {auc_lime:.3f}, occlusion {auc_occ:.3f}, "
        f"random order {auc_rand:.3f}. With 100 steps (1% of the pixels each): kernelshap {fine_ks:.3f}, "
        f"shap Partition {fine_shap:.3f}. Probability of the target on the full image "
        f"{p_full:.3f}.",
        "",
        f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
