"""Memory and time of explaining a 3-D segmentation model's region on a volume larger than its window: medlens'
sliding window (`explain(sliding_window=...)`) against the whole volume at once, and against MONAI's differentiable
`sliding_window_inference` in one graph.

Run: PYTHONPATH=src python benchmarks/bench_sliding_window.py [--short] [--rounds 1] [--json out.json]
The model is a seeded MONAI 3-D UNet (channels 16-32-64-128, 2 residual units; --short: 8-16-32-64), one class
region (a box in the middle) explained by saliency (one forward and one backward through the blended logits). Every
configuration runs in its own subprocess with one torch thread: the peak resident memory (resource.getrusage
ru_maxrss) minus the same process's peak after loading the model and making the input, and the wall time of the
explain call. The rounds are interleaved; figures are medians. The load average is printed with each run.
The whole volume (256x256x128) at once does not fit comfortably here; it is measured on smaller volumes and its peak
extrapolated linearly in the number of voxels (the activations are). Figures go to docs/segmentation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

FULL = (128, 256, 256)  # D, H, W: a 256 x 256 x 128 volume
WINDOW = (96, 96, 96)


def child(config: dict) -> dict:
    """One configuration, in this process: load, measure the baseline, explain, measure the peak."""
    import torch

    torch.set_num_threads(1)
    import medlens
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    channels = (8, 16, 32, 64) if config["short"] else (16, 32, 64, 128)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels, strides=(2, 2, 2),
               num_res_units=2).eval()
    d, h, w = config["volume"]
    x = torch.randn(1, 1, d, h, w, generator=torch.Generator().manual_seed(1))
    box = (w // 4, h // 4, d // 4, 3 * w // 4, 3 * h // 4, 3 * d // 4)  # x0, y0, z0, x1, y1, z1
    target = medlens.SegmentationTarget(1, region=box)
    model = net
    options = {}
    if config["mode"] == "windowed":
        options = {"sliding_window": tuple(config["window"]), "sliding_window_overlap": 0.25}
    elif config["mode"] == "monai-one-graph":
        from monai.inferers import sliding_window_inference

        class OneGraph(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net

            def forward(self, v: torch.Tensor) -> torch.Tensor:
                return sliding_window_inference(v, tuple(config["window"]), 1, self.net, overlap=0.25)

        model = OneGraph().eval()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    result = medlens.explain(model, x, "saliency", targets=[target], **options)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {**config, "peak_mib": (peak - baseline) / 1024, "baseline_mib": baseline / 1024, "seconds": seconds,
            "score": float(result.logits[0, 0]), "load": load}


def run(config: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    if out.returncode != 0:
        return {**config, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else str(out.returncode)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="a smaller UNet (8-16-32-64 channels)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    configs = [
        {"mode": "windowed", "volume": FULL, "window": WINDOW},
        {"mode": "windowed", "volume": (64, 128, 128), "window": WINDOW},
        {"mode": "whole", "volume": (64, 128, 128)},
        {"mode": "whole", "volume": (48, 96, 96)},
        {"mode": "monai-one-graph", "volume": (64, 128, 128), "window": WINDOW},
    ]
    rows: dict[int, list] = {i: [] for i in range(len(configs))}
    for r in range(args.rounds):
        for i, config in enumerate(configs):
            row = run({**config, "short": args.short})
            rows[i].append(row)
            print(f"round {r}: {row}", flush=True)
    print(f"\nmedians over {args.rounds} round(s); load average now {os.getloadavg()[0]:.1f}")
    summary = []
    for i, config in enumerate(configs):
        good = [row for row in rows[i] if "error" not in row]
        if not good:
            print(f"{config['mode']:16s} {'x'.join(map(str, config['volume'][::-1])):12s} failed: {rows[i][0]['error']}")
            continue
        peak = statistics.median(row["peak_mib"] for row in good)
        seconds = statistics.median(row["seconds"] for row in good)
        summary.append({**config, "peak_mib": peak, "seconds": seconds})
        print(f"{config['mode']:16s} {'x'.join(map(str, config['volume'][::-1])):12s} peak {peak:8.0f} MiB  "
              f"{seconds:7.1f} s")
    whole = [s for s in summary if s["mode"] == "whole"]
    if len(whole) == 2:
        (a, b) = sorted(whole, key=lambda s: s["volume"][0] * s["volume"][1] * s["volume"][2])
        va, vb = (s["volume"][0] * s["volume"][1] * s["volume"][2] for s in (a, b))
        slope = (b["peak_mib"] - a["peak_mib"]) / (vb - va)
        full = b["peak_mib"] + slope * (FULL[0] * FULL[1] * FULL[2] - vb)
        print(f"whole volume 256x256x128 at once, extrapolated linearly in voxels: peak ~ {full:.0f} MiB")
        summary.append({"mode": "whole (extrapolated)", "volume": FULL, "peak_mib": full})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
