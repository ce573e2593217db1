"""Benchmark: medlens' CAM family against pytorch-grad-cam, in one run, on the CPU.

Interleaved repetitions, medians and ratios; Score-CAM's time and peak memory in a fresh process per run.
Usage: PYTHONPATH=src python benchmarks/bench_cam.py [--reps 5] [--reps-many 2] [--reps-score 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIX = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam"]


def _their_classes():
    import pytorch_grad_cam as g

    return {"gradcam": g.GradCAM, "gradcam++": g.GradCAMPlusPlus, "xgradcam": g.XGradCAM, "hirescam": g.HiResCAM,
            "layercam": g.LayerCAM, "eigengradcam": g.EigenGradCAM, "scorecam": g.ScoreCAM}


def _model(name: str, num_classes: int) -> torch.nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes).eval()


def _theirs(model, layer, x, methods, targets, batch_size=None):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = _their_classes()
    out = []
    for method in methods:
        with classes[method](model=model, target_layers=[layer]) as cam:
            if batch_size:
                cam.batch_size = batch_size
            for t in targets:
                out.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(t)] * x.shape[0]))
    return out


def _ours(model, x, methods, targets, **options):
    import medlens

    return medlens.explain(model, x, methods, targets=targets, **options)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(fns: dict, reps: int) -> dict:
    """Run each function once per repetition, alternating the order (ABBA), and return all timings."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(_timed(fns[n]))
    return times


def _rss_mib() -> float:
    """The process's current resident set size, from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakSampler:
    """Samples the current RSS every millisecond in a thread; `peak` is the highest seen.

    ru_maxrss is a high-water mark for the whole process life (imports, warm-up), so it cannot show what
    one call adds; sampling the current RSS during the call can.
    """

    def __init__(self) -> None:
        import threading

        self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            self._stop.wait(0.001)

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def scorecam_child(tool: str, threads: int, size: int, batch: int | None = None) -> None:
    """In a fresh process: set up, warm up, then run Score-CAM once; print time, CPU time, minor page faults
    and RSS figures as JSON. `batch`: medlens's chunk (masked inputs per pass); None is its default."""
    import resource

    torch.set_num_threads(threads)
    model = _model("resnet18", 14)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)  # warm-up: allocator, kernels
    import medlens  # noqa: F401  (imports counted in the baseline for both tools)
    import pytorch_grad_cam  # noqa: F401

    if tool == "medlens":
        _ours(model, x, "gradcam", [3])  # warms the automatic-layer cache (one forward)
    options = {} if batch is None else {"batch_size": batch}
    start = _rss_mib()
    with _PeakSampler() as sampler:
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        if tool == "medlens":
            _ours(model, x, "scorecam", [3], **options)
        else:
            _theirs(model, model.layer4[-1], x, ["scorecam"], [3])
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
    maxrss = after.ru_maxrss / 1024
    print(json.dumps({"tool": tool, "seconds": seconds, "start_rss_mib": start, "peak_rss_mib": sampler.peak,
                      "maxrss_mib": maxrss, "user_s": after.ru_utime - before.ru_utime,
                      "system_s": after.ru_stime - before.ru_stime, "minor_faults": after.ru_minflt - before.ru_minflt}))


def _run_child(tool: str, threads: int, size: int) -> dict:
    """`tool`: "pytorch-grad-cam", "medlens", or "medlens:N" for medlens with a chunk of N masked inputs."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    name, _, batch = tool.partition(":")
    out = subprocess.run(
        [sys.executable, __file__, "--child-scorecam", name, "--threads", str(threads), "--size", str(size)]
        + (["--child-batch", batch] if batch else []),
        check=True, capture_output=True, text=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=5, help="repetitions for (a) and the plain forward")
    parser.add_argument("--reps-many", type=int, default=2, help="repetitions for (b), 6 CAMs x 14 targets")
    parser.add_argument("--reps-score", type=int, default=2, help="repetitions for (c), Score-CAM (fresh process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--skip-scorecam", action="store_true")
    parser.add_argument("--only-scorecam", action="store_true", help="run (c) only")
    parser.add_argument("--score-batches", default="",
                        help="(c) also runs medlens with these chunks, e.g. 12,16 (interleaved with the default)")
    parser.add_argument("--child-scorecam", choices=["medlens", "pytorch-grad-cam"], help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_scorecam:
        scorecam_child(args.child_scorecam, args.threads, args.size, args.child_batch)
        return

    import medlens
    import pytorch_grad_cam  # noqa: F401

    torch.set_num_threads(args.threads)
    rows = []
    if args.only_scorecam:
        _report(args, rows, None, None, _scorecam_runs(args))
        return
    ours_model = _model("densenet121", 14)
    their_model = copy.deepcopy(ours_model)  # theirs leaves .grad and hooks' side effects on its copy only
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    layer = their_model.features[-1]

    # warm-up (kernels, medlens' automatic-layer cache for this model and input shape)
    _ours(ours_model, x, "gradcam", [0])
    _theirs(their_model, layer, x, ["gradcam"], [0])

    def forward():
        with torch.inference_mode():
            ours_model(x)

    # (a) one method, one target
    t = _interleaved({
        "medlens": lambda: _ours(ours_model, x, "gradcam", [3]),
        "theirs": lambda: _theirs(their_model, layer, x, ["gradcam"], [3]),
        "forward": forward,
    }, args.reps)
    med = {k: statistics.median(v) for k, v in t.items()}
    rows.append(("(a) gradcam, 1 target, densenet121", med["medlens"], med["theirs"], med["forward"], "theirs >= 1.5x ours"))

    # (b) six gradient CAMs x 14 targets: medlens in one call. Theirs is slow (84 passes), so it gets
    # `--reps-many` repetitions; medlens and the plain forward alternate `--reps` times around each of them.
    ours_b, fwd_b, theirs_b = [], [], []
    for r in range(args.reps_many):
        t = _interleaved({"medlens": lambda: _ours(ours_model, x, SIX, list(range(14))), "forward": forward},
                         max(1, args.reps // 2))
        ours_b += t["medlens"]
        fwd_b += t["forward"]
        theirs_b.append(_timed(lambda: _theirs(their_model, layer, x, SIX, list(range(14)))))
    t = _interleaved({"medlens": lambda: _ours(ours_model, x, SIX, list(range(14))), "forward": forward},
                     max(1, args.reps - args.reps // 2))
    ours_b += t["medlens"]
    fwd_b += t["forward"]
    med_b = {"medlens": statistics.median(ours_b), "theirs": statistics.median(theirs_b), "forward": statistics.median(fwd_b)}
    rows.append(("(b) 6 gradient CAMs x 14 targets, densenet121", med_b["medlens"], med_b["theirs"], med_b["forward"],
                 "theirs >= 20x ours; ours <= 1.5x forward"))

    _report(args, rows, ours_b, fwd_b, None if args.skip_scorecam else _scorecam_runs(args))


def _scorecam_runs(args) -> dict:
    tools = ["medlens", "pytorch-grad-cam"] + [f"medlens:{b}" for b in args.score_batches.split(",") if b.strip()]
    runs = {tool: [] for tool in tools}
    for r in range(args.reps_score):
        for tool in (tools if r % 2 == 0 else tools[::-1]):
            runs[tool].append(_run_child(tool, args.threads, args.size))
    summary = {tool: {"seconds": statistics.median(r["seconds"] for r in v),
                      "all_seconds": [r["seconds"] for r in v],
                      "cpu_s": statistics.median(r["user_s"] + r["system_s"] for r in v),
                      "system_s": statistics.median(r["system_s"] for r in v),
                      "minor_faults": statistics.median(r["minor_faults"] for r in v),
                      "peak_rss_mib": max(r["maxrss_mib"] for r in v),
                      "extra_mib": max(r["peak_rss_mib"] - r["start_rss_mib"] for r in v)}
               for tool, v in runs.items()}
    summary["pair_ratios"] = [g["seconds"] / m["seconds"] for m, g in zip(runs["medlens"], runs["pytorch-grad-cam"])]
    return summary


def _report(args, rows, ours_b, fwd_b, score) -> None:
    import medlens

    print(f"\nMachine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with "
          f"{args.threads} threads, Python {platform.python_version()}; medlens {medlens.__version__}, "
          f"pytorch-grad-cam {_grad_cam_version()}; input 1x3x{args.size}x{args.size}, random weights, 14 classes.")
    print(f"Repetitions: (a) {args.reps}; (b) medlens and forward {args.reps}, pytorch-grad-cam {args.reps_many}; "
          f"(c) {args.reps_score} per tool, each in a fresh process (interleaved; medians).\n")
    if rows:
        print("| case | medlens (s) | pytorch-grad-cam (s) | speed-up | plain forward (s) | medlens / forward | goal |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for name, ours, theirs, fwd, goal in rows:
            print(f"| {name} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.1f}x | {fwd:.3f} | {ours / fwd:.2f} | {goal} |")
        print(f"\nmedlens (b) over a plain forward, per interleaved pair: median "
              f"{statistics.median(o / f for o, f in zip(ours_b, fwd_b)):.2f} over {len(ours_b)} pairs.")
    if score:
        m, g = score["medlens"], score["pytorch-grad-cam"]
        print("\n| (c) Score-CAM, resnet18, 1 target | time (s) | process peak RSS (MiB) | RSS added by the call (MiB) |")
        print("|---|---:|---:|---:|")
        print(f"| medlens | {m['seconds']:.2f} | {m['peak_rss_mib']:.0f} | {m['extra_mib']:.0f} |")
        print(f"| pytorch-grad-cam | {g['seconds']:.2f} | {g['peak_rss_mib']:.0f} | {g['extra_mib']:.0f} |")
        print(f"| ratio (theirs / ours) | {g['seconds'] / m['seconds']:.2f}x | {g['peak_rss_mib'] / m['peak_rss_mib']:.2f}x | "
              f"{g['extra_mib'] / max(m['extra_mib'], 1.0):.2f}x |")
        ratios = score["pair_ratios"]
        print(f"\n(c) per run: medlens {', '.join(f'{t:.2f}' for t in m['all_seconds'])} s; pytorch-grad-cam "
              f"{', '.join(f'{t:.2f}' for t in g['all_seconds'])} s; ratio per interleaved pair: median "
              f"{statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x.")
        print("\n| (c) run | time (s) | CPU time (s) | of which system (s) | minor page faults | RSS added (MiB) | runs (s) |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for tool, v in score.items():
            if isinstance(v, dict):
                print(f"| {tool} | {v['seconds']:.2f} | {v['cpu_s']:.2f} | {v['system_s']:.2f} | {v['minor_faults']:.0f} | "
                      f"{v['extra_mib']:.0f} | {', '.join(f'{t:.2f}' for t in v['all_seconds'])} |")


def _grad_cam_version() -> str:
    try:
        from importlib.metadata import version

        return version("grad-cam")
    except Exception:  # pragma: no cover
        return "?"


if __name__ == "__main__":
    main()
