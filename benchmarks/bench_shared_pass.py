"""Benchmark: what explain() costs over the work it cannot avoid, interleaved, medians and per-pair ratios.

(cams) six gradient CAMs (gradcam, gradcam++, xgradcam, hirescam, layercam, eigengradcam) for 14 findings in one
       explain() call on a torchvision DenseNet121 (random seeded weights, 14 classes, 1x3x224x224), against a
       plain inference-mode forward of the same model. Goal: at most 1.2x.
(ig)   integrated gradients, ResNet50 (random seeded weights), 16 steps, 16 path points per forward, one image,
       one target: medlens.explain() against captum's IntegratedGradients.attribute. Goal: at most 1.0x.

    PYTHONPATH=src python benchmarks/bench_shared_pass.py --threads 1 --reps 9
    PYTHONPATH=src python benchmarks/bench_shared_pass.py --threads 2 --only ig --reps 5

Each repetition runs both sides once, the order alternating (ABBA), after one warm-up call of each. The goal is
judged on the median of the per-pair wall-time ratios; the per-pair CPU-time (process time) ratio is printed too,
since on a shared machine it moves less with other jobs' load, which is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch
import torchvision

SIX = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"]


def _interleaved(a: Callable[[], object], b: Callable[[], object], reps: int) -> dict[str, list[float]]:
    """Wall and CPU (process) time of each side per repetition, ABBA order, after one warm-up call of each."""
    a(), b()  # warm-up (kernels, medlens's automatic-layer cache)
    times: dict[str, list[float]] = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    for r in range(reps):
        for side in (("a", "b") if r % 2 == 0 else ("b", "a")):
            cpu, wall = time.process_time(), time.perf_counter()
            (a if side == "a" else b)()
            times[side].append(time.perf_counter() - wall)
            times[side + "_cpu"].append(time.process_time() - cpu)
    return times


def _summary(name: str, times: dict[str, list[float]], peer: str, goal: float) -> str:
    ours, theirs = times["a"], times["b"]
    pairs = sorted(o / t for o, t in zip(ours, theirs))
    cpu_pairs = sorted(o / t for o, t in zip(times["a_cpu"], times["b_cpu"]))
    ratio = statistics.median(pairs)
    return (f"| {name} | {statistics.median(ours):.4f} | {peer} | {statistics.median(theirs):.4f} | "
            f"{statistics.median(ours) / statistics.median(theirs):.3f} | {ratio:.3f} ({pairs[0]:.3f}-{pairs[-1]:.3f}) | "
            f"{statistics.median(cpu_pairs):.3f} | <= {goal} | {'yes' if ratio <= goal else 'no'} |")


def bench_cams(reps: int) -> str:
    import medlens

    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=14).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    targets = list(range(14))

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    times = _interleaved(lambda: medlens.explain(model, x, SIX, targets=targets), forward, reps)
    return _summary("6 gradient CAMs x 14 findings, DenseNet121 224 px", times, "plain forward", 1.2)


def bench_ig(reps: int) -> str:
    import captum.attr

    import medlens

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ig = captum.attr.IntegratedGradients(model)

    def ours() -> torch.Tensor:
        return medlens.explain(model, x, "integratedgradients", targets=[3], n_steps=16, batch_size=16)["integratedgradients"]

    def theirs() -> torch.Tensor:
        return ig.attribute(x, target=3, n_steps=16, internal_batch_size=16, method="gausslegendre")

    a, b = ours()[:, 0], theirs().sum(1)
    corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])
    times = _interleaved(ours, theirs, reps)
    return _summary(f"IG 16 steps, batch 16, ResNet50 224 px (correlation {corr:.5f})", times, "captum", 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", choices=["cams", "ig"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    if args.only != "ig":
        rows.append(bench_cams(args.reps))
    if args.only != "cams":
        rows.append(bench_ig(args.reps))
    load_after = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs ({platform.machine()}), "
          f"{args.reps} interleaved pairs; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print("| case | medlens (s) | peer | peer (s) | ratio of medians | median pair ratio (range) | CPU-time pair ratio | goal | met |")
    print("|---|---:|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
