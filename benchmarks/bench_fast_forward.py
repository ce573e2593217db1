"""Benchmark: the perturbation methods' forward passes through the folded copy against the model as given.

Same call, same inputs, interleaved (ABBA), medians and ratios; "as given" is forced with
`medlens.accel.fast_forward.ENABLED = False`.
Usage: PYTHONPATH=src python benchmarks/bench_fast_forward.py [--reps 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import torchvision

    import medlens
    from medlens.accel import fast_forward as inference

    cases = [
        ("resnet18", "occlusion", {"window": 32, "stride": 16}),
        ("resnet18", "rise", {"n_masks": 256}),
        ("densenet121", "occlusion", {"window": 32, "stride": 16}),
    ]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {args.threads} thread(s), input 1x3x224x224, random weights, 14 classes; "
          f"{args.reps} interleaved repetitions, medians.\n")
    print("| model | method | as given (s) | folded copy (s) | speed-up | max abs diff / max abs |")
    print("|---|---|---:|---:|---:|---:|")
    for arch, method, options in cases:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=14).eval()
        times = {"given": [], "copy": []}
        maps = {}

        def run(kind: str) -> None:
            inference.ENABLED = kind == "copy"
            t0 = time.perf_counter()
            maps[kind] = medlens.explain(model, x, method, targets=3, seed=0, **options)[method]
            times[kind].append(time.perf_counter() - t0)

        run("copy")  # warm-up (automatic layer, allocator)
        times["copy"].clear()
        for r in range(args.reps):
            for kind in (("given", "copy") if r % 2 == 0 else ("copy", "given")):
                run(kind)
        inference.ENABLED = True
        given, folded = statistics.median(times["given"]), statistics.median(times["copy"])
        diff = float((maps["copy"] - maps["given"]).abs().max() / maps["given"].abs().max())
        print(f"| {arch} | {method} | {given:.2f} | {folded:.2f} | {given / folded:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
