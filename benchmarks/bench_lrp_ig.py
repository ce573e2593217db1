"""Benchmark: medlens LRP against zennit (ResNet50, epsilon-plus-flat) and integrated gradients against captum.

Both peers run in the same process on the same inputs, interleaved (A, B, A, B, ...), after a warm-up;
we print medians, ratios (medlens / peer: below 1.0 means medlens is faster) and agreement (correlation).

    PYTHONPATH=src python benchmarks/bench_lrp_ig.py            # default: CPU, ~2-3 minutes on 2 cores
    PYTHONPATH=src python benchmarks/bench_lrp_ig.py --device cuda --repeats 20
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


def _timed(fn: Callable[[], torch.Tensor], device: str) -> tuple[float, torch.Tensor]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double().cpu(), b.flatten().double().cpu()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def interleave(cases: dict[str, Callable[[], torch.Tensor]], repeats: int, device: str) -> dict[str, tuple[float, torch.Tensor]]:
    outputs = {name: fn() for name, fn in cases.items()}  # warm-up (and medlens's cached trace)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t, _ = _timed(fn, device)
            times[name].append(t)
    return {name: (statistics.median(ts), outputs[name]) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lrp-size", type=int, default=224)
    parser.add_argument("--ig-model", default="resnet18")
    parser.add_argument("--ig-size", type=int, default=224)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--ig-batch", type=int, default=16, help="inputs per forward, the same for both libraries")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--only", choices=["lrp", "ig"], default=None, help="run one of the two comparisons")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    torch.manual_seed(0)
    rows = []
    if args.only != "ig":
        rows += _lrp_rows(args, device)
    if args.only != "lrp":
        rows += _ig_rows(args, device)
    _print(args, device, rows)


def _lrp_rows(args, device) -> list:
    """LRP: ResNet50, epsilon-plus-flat, against zennit."""
    import medlens
    from medlens.families.lrp import lrp_relevance
    from medlens.core.model_state import borrowed_model
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer

    rows = []
    model = torchvision.models.resnet50(weights=None, num_classes=1000).eval().to(device)
    x = torch.randn(1, 3, args.lrp_size, args.lrp_size, device=device)
    target = 7
    targets = torch.tensor([[target]], device=device)
    with torch.no_grad():
        logit = model(x)[:, target]
    onehot = torch.zeros(1, 1000, device=device)
    onehot[:, target] = logit

    def medlens_engine() -> torch.Tensor:
        with borrowed_model(model):
            return lrp_relevance(model, x, targets, "epsilon_plus_flat").relevance[0].sum(1)

    def medlens_explain() -> torch.Tensor:
        return medlens.explain(model, x, "lrp", targets=[target], composite="epsilon_plus_flat")["lrp"][:, 0]

    zmodel = torchvision.models.resnet50(weights=None, num_classes=1000).eval().to(device)
    zmodel.load_state_dict(model.state_dict())
    for p in zmodel.parameters():
        p.requires_grad_(False)
    attributor = Gradient(model=zmodel, composite=EpsilonPlusFlat(canonizers=[ResNetCanonizer()]))
    attributor.__enter__()  # zennit's cheapest use: hooks and canonizers registered once, outside the timing

    def zennit_call() -> torch.Tensor:
        _, relevance = attributor(x, onehot)
        return relevance.sum(1)

    try:
        lrp = interleave({"medlens lrp (engine)": medlens_engine, "medlens explain(lrp)": medlens_explain,
                          "zennit": zennit_call}, args.repeats, device)
    finally:
        attributor.__exit__(None, None, None)
    z_time, z_out = lrp["zennit"]
    for name in ("medlens lrp (engine)", "medlens explain(lrp)"):
        t, out = lrp[name]
        rows.append((f"LRP epsilon-plus-flat, ResNet50 {args.lrp_size}px, 1 image", name, t, "zennit", z_time,
                     _corr(out, z_out)))

    return rows


def _ig_rows(args, device) -> list:
    """Integrated gradients against captum, equal steps and batch."""
    import captum.attr

    import medlens
    from medlens.families.integrated import integrated_gradients
    from medlens.core.model_state import borrowed_model

    rows = []
    torch.manual_seed(0)
    ig_model = getattr(torchvision.models, args.ig_model)(weights=None, num_classes=1000).eval().to(device)
    xi = torch.randn(1, 3, args.ig_size, args.ig_size, device=device)
    ig_target = 3
    ig = captum.attr.IntegratedGradients(ig_model)

    def captum_ig() -> torch.Tensor:
        return ig.attribute(xi, target=ig_target, n_steps=args.ig_steps, internal_batch_size=args.ig_batch).sum(1)

    def medlens_ig_engine() -> torch.Tensor:
        with borrowed_model(ig_model):
            return integrated_gradients(ig_model, xi, torch.tensor([[ig_target]], device=device),
                                        {"n_steps": args.ig_steps, "batch_size": args.ig_batch})[0].sum(1)

    def medlens_ig() -> torch.Tensor:
        return medlens.explain(ig_model, xi, "integratedgradients", targets=[ig_target], n_steps=args.ig_steps,
                               batch_size=args.ig_batch)["integratedgradients"][:, 0]

    res = interleave({"medlens integrated_gradients (engine)": medlens_ig_engine,
                      "medlens explain(integratedgradients)": medlens_ig, "captum": captum_ig}, args.repeats, device)
    c_time, c_out = res["captum"]
    for name in ("medlens integrated_gradients (engine)", "medlens explain(integratedgradients)"):
        t, out = res[name]
        rows.append((f"IG {args.ig_steps} steps, batch {args.ig_batch}, {args.ig_model} {args.ig_size}px, 1 image",
                     name, t, "captum", c_time, _corr(out, c_out)))
    return rows


def _print(args, device, rows) -> None:
    import captum
    import zennit

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {cpu}; {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}; device {device}; "
          f"torch {torch.__version__}, zennit {zennit.__version__ if hasattr(zennit, '__version__') else '0.5.1'}, "
          f"captum {captum.__version__}; medians of {args.repeats} interleaved runs after one warm-up\n")
    print("| task | medlens | time (s) | peer | peer time (s) | ratio medlens/peer | correlation |")
    print("|---|---|---:|---|---:|---:|---:|")
    for task, name, t, peer, pt, corr in rows:
        print(f"| {task} | {name} | {t:.3f} | {peer} | {pt:.3f} | {t / pt:.2f}x | {corr:.4f} |")


if __name__ == "__main__":
    main()
