"""Benchmark: the transformer methods against one plain forward + backward of the target on ViT-B/16, interleaved.

torchvision `vit_b_16` (random seeded weights, a random 14-class head), 224 x 224 inputs, batch 1 and 8, 1 and 2
torch threads. Each case runs against the plain pass (the input's gradient of the target logit, parameters frozen as
in medlens's calls), the order alternating (ABBA) after one warm-up of each; medians and per-pair ratios. Cases:

    transformer_attribution   1 target
    lrp                       AttnLRP rules, 1 target
    lrp_softmax               the same with AttnLRP's own softmax rule (softmax="attnlrp"), 1 target
    six CAMs x 14 targets     gradcam, gradcam++, xgradcam, hirescam, layercam, eigengradcam in one call
    gradcam vs pytorch-grad-cam   both at the last block's ln_1 (theirs with its reshape transform), 1 target

    PYTHONPATH=src python benchmarks/bench_transformers.py --reps 5 --batches 1,8 --threads 1,2
    PYTHONPATH=src python benchmarks/bench_transformers.py --short     # batch 1, 1 thread, 1 pair per case

Each row ends with the machine's 1-minute load average when it finished (os.getloadavg).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torchvision

SIX = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"]


def _interleaved(a: Callable[[], object], b: Callable[[], object], reps: int) -> tuple[list[float], list[float]]:
    a(), b()
    times: dict[str, list[float]] = {"a": [], "b": []}
    for r in range(reps):
        for side in (("a", "b") if r % 2 == 0 else ("b", "a")):
            wall = time.perf_counter()
            (a if side == "a" else b)()
            times[side].append(time.perf_counter() - wall)
    return times["a"], times["b"]


def _row(batch: int, threads: int, name: str, ours: list[float], base: list[float], peer: str) -> str:
    pairs = sorted(o / t for o, t in zip(ours, base))
    return (f"| {batch} | {threads} | {name} | {statistics.median(ours):.3f} | {peer} | {statistics.median(base):.3f} | "
            f"{statistics.median(ours) / statistics.median(base):.2f} | {statistics.median(pairs):.2f} "
            f"({pairs[0]:.2f}-{pairs[-1]:.2f}) | {os.getloadavg()[0]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--only", default="", help="comma list of: attribution, lrp, lrp_softmax, cams, peer")
    parser.add_argument("--short", action="store_true", help="batch 1, 1 thread, 1 pair per case (a quick check)")
    args = parser.parse_args()
    if args.short:
        args.reps, args.batches, args.threads = 1, "1", "1"
    import medlens
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, num_classes=14).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.02)
    layer = model.encoder.layers[-1].ln_1

    def reshape(t):
        return t[:, 1:, :].reshape(t.size(0), 14, 14, t.size(2)).permute(0, 3, 1, 2)

    only = set(filter(None, args.only.split(",")))
    print(f"load before: {os.getloadavg()}")
    print("| batch | threads | case | medlens (s) | against | that (s) | ratio of medians | median pair ratio (range) "
          "| load |")
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in map(int, args.batches.split(",")):
            x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            target = 3

            def plain():
                for p in model.parameters():
                    p.requires_grad_(False)
                try:
                    with torch.enable_grad():
                        leaf = x.detach().requires_grad_(True)
                        model(leaf)[:, target].sum().backward()
                finally:
                    for p in model.parameters():
                        p.requires_grad_(True)

            cases = {
                "attribution": ("transformer_attribution", lambda: medlens.explain(model, x, "transformer_attribution", targets=[target])),
                "lrp": ("lrp (AttnLRP)", lambda: medlens.explain(model, x, "lrp", targets=[target])),
                "lrp_softmax": ("lrp (AttnLRP, softmax='attnlrp')",
                                lambda: medlens.explain(model, x, "lrp", targets=[target], softmax="attnlrp")),
                "cams": ("six CAMs x 14 targets", lambda: medlens.explain(model, x, SIX, targets=list(range(14)))),
            }
            for key, (name, run) in cases.items():
                if only and key not in only:
                    continue
                ours, base = _interleaved(run, plain, args.reps)
                print(_row(batch, threads, name, ours, base, "forward + backward"), flush=True)
            if not only or "peer" in only:
                def theirs():
                    with GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
                        cam(input_tensor=x, targets=[ClassifierOutputTarget(target)] * batch)

                ours, base = _interleaved(
                    lambda: medlens.explain(model, x, "gradcam", targets=[target], layer="encoder.layers.encoder_layer_11.ln_1"),
                    theirs, args.reps)
                print(_row(batch, threads, "gradcam", ours, base, "pytorch-grad-cam GradCAM"), flush=True)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
