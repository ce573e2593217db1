"""Benchmark: the perturbation methods' forward passes through the folded trace against the model as given.

Same call, same inputs, interleaved (ABBA), medians and ratios; "as given" is forced by emptying
`medlens.inference.LIBRARY_PACKAGES` (nothing is traced), which is what a user-defined model class gets.
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
    from medlens import inference

    library = inference.LIBRARY_PACKAGES
    cases = [
        ("resnet18", "occlusion", {"window": 32, "stride": 16}),
        ("resnet18", "rise", {"n_masks": 256}),
        ("densenet121", "occlusion", {"window": 32, "stride": 16}),
    ]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, {args.threads} thread(s), input 1x3x224x224, random weights, 14 classes; "
          f"{args.reps} interleaved repetitions, medians.\n")
    print("| model | method | as given (s) | folded trace (s) | speed-up | max abs diff / max abs |")
    print("|---|---|---:|---:|---:|---:|")
    for arch, method, options in cases:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(weights=None, num_classes=14).eval()
        times = {"given": [], "trace": []}
        maps = {}

        def run(kind: str) -> None:
            inference.LIBRARY_PACKAGES = library if kind == "trace" else ()
            t0 = time.perf_counter()
            maps[kind] = medlens.explain(model, x, method, targets=3, seed=0, **options)[method]
            times[kind].append(time.perf_counter() - t0)

        run("trace")  # warm-up (automatic layer, allocator)
        times["trace"].clear()
        for r in range(args.reps):
            for kind in (("given", "trace") if r % 2 == 0 else ("trace", "given")):
                run(kind)
        inference.LIBRARY_PACKAGES = library
        given, trace = statistics.median(times["given"]), statistics.median(times["trace"])
        diff = float((maps["trace"] - maps["given"]).abs().max() / maps["given"].abs().max())
        print(f"| {arch} | {method} | {given:.2f} | {trace:.2f} | {given / trace:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
