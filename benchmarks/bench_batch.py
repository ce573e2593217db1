"""Batch runner throughput on the bundled brain model (gradcam + lrp) over N figshare slices, one torch thread per
worker: mini-batch size against throughput (pure in-process explaining and the serial runner, 1/4/8/16), the
runner's overhead against pure explaining, 2-worker scaling (processes against serial) and Ray against processes.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_batch.py [--n 48] [--rounds 3] [--json out.json]
Every configuration runs once per round, the rounds interleaved (so a load that comes and goes touches all of them),
each run into a fresh folder; figures are medians over the rounds. `steady` is the rate from the first burst of
records to the last (start-up out; for the 2-worker runs), `wall` includes start-up (serial: the whole `run_batch`,
discovery, summary and report included) (worker processes or a local Ray, each loading the model). The pure
rate is `medlens.explain` on the already prepared inputs in the same mini-batches (no reading, no writing, no
manifest): the runner's overhead is pure rate / runner rate - 1. The load average is recorded before every run.
--legacy runs the earlier single-pass comparison (serial, processes, ray with --n0 for the marginal rate).
Figures go to docs/batch.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

import medlens  # noqa: E402
from medlens.batch import run_batch  # noqa: E402
from medlens.pipeline import ExplainRequest, explain_batch, plan_for, read_input  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-tumor-figshare"


def pick_inputs(n: int) -> list[Path]:
    """n slices spread over the three classes: every k-th file of the sorted list."""
    files = sorted(DATA.rglob("*.jpg"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def timed_run(inputs: list[Path], out: Path, model, executor: str, formats: str, methods: str,
              batch_size: int = 1, workers: int = 2) -> dict:
    stamps: list[float] = []
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    summary = run_batch(inputs, out, model=model, model_source="brain-tumor-mri",
                        request=ExplainRequest.build(methods, formats=formats), executor=executor, workers=workers,
                        threads=1, progress=False, log=lambda m: None, batch_size=batch_size,
                        on_record=lambda r: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    first = next((i for i, t in enumerate(stamps) if t > stamps[0]), 0) if stamps else 0  # after the first burst
    steady = ((len(stamps) - first) / (stamps[-1] - stamps[first - 1]) if 0 < first < len(stamps) - 1
              else float("nan"))
    return {"executor": executor, "batch_size": batch_size, "n": summary.total, "failed": len(summary.failures),
            "wall_s": wall, "images_per_s_wall": summary.total / wall, "images_per_s_steady": steady,
            "startup_s": stamps[0] - t0 if stamps else float("nan"), "load": load}


def pure_rate(plan, tensors: list[torch.Tensor], batch_size: int) -> float:
    """Images/s of `explain` alone on prepared inputs, `batch_size` per call."""
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        explain_batch(plan, torch.cat(tensors[start:start + batch_size]))
    return len(tensors) / (time.perf_counter() - t0)


def sweep(args: argparse.Namespace, inputs: list[Path], model) -> dict:
    """The interleaved rounds: every configuration once per round; medians over rounds."""
    torch.set_num_threads(1)
    request = ExplainRequest.build(args.methods, formats=args.formats)
    plan = plan_for(model, request)
    tensors = [read_input(plan, p).tensor for p in inputs]
    sizes = [int(b) for b in args.sizes.split(",")]
    configs = ([("pure", b, 1) for b in sizes] + [("serial", b, 1) for b in sizes]
               + [(e, args.parallel_batch, 2) for e in args.executors.split(",") if e != "serial"])
    runs: dict[str, list[dict]] = {}
    for b in sizes:  # warm-up: first calls of each shape pay allocations and lazy set-up
        explain_batch(plan, torch.cat(tensors[:b]))
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        for r in range(args.rounds):
            for kind, b, workers in configs:
                key = f"{kind} b={b} w={workers}"
                if kind == "pure":
                    load = os.getloadavg()[0]
                    rate = pure_rate(plan, tensors, b)
                    run = {"executor": "pure", "batch_size": b, "images_per_s_steady": rate,
                           "images_per_s_wall": rate, "load": load}
                else:
                    run = timed_run(inputs, Path(tmp) / f"{kind}-{b}-{r}", model, kind, args.formats, args.methods,
                                    b, workers)
                runs.setdefault(key, []).append(run)
                print(json.dumps({"round": r, "config": key, **run}), flush=True)
    med = {key: {m: statistics.median(x[m] for x in v) for m in ("images_per_s_steady", "images_per_s_wall", "load")}
           for key, v in runs.items()}
    ratios = {}
    for b in sizes:
        ratios[f"runner overhead b={b} (pure / serial wall - 1)"] = (med[f"pure b={b} w=1"]["images_per_s_steady"]
                                                                    / med[f"serial b={b} w=1"]["images_per_s_wall"] - 1)
        ratios[f"serial b={b} vs b=1 (wall)"] = (med[f"serial b={b} w=1"]["images_per_s_wall"]
                                                / med["serial b=1 w=1"]["images_per_s_wall"])
        ratios[f"pure b={b} vs b=1"] = med[f"pure b={b} w=1"]["images_per_s_steady"] / med["pure b=1 w=1"]["images_per_s_steady"]
    pb = args.parallel_batch
    serial = med.get(f"serial b={pb} w=1")
    for name in ("processes", "ray"):
        key = f"{name} b={pb} w=2"
        if key in med and serial:
            for rate in ("images_per_s_steady", "images_per_s_wall"):
                ratios[f"{name} 2 workers vs serial b={pb} ({rate})"] = med[key][rate] / serial[rate]
    if "ray b=%d w=2" % pb in med and "processes b=%d w=2" % pb in med:
        for rate in ("images_per_s_steady", "images_per_s_wall"):
            ratios[f"ray vs processes ({rate})"] = (med[f"ray b={pb} w=2"][rate] / med[f"processes b={pb} w=2"][rate])
    return {"medians": med, "ratios": ratios, "runs": runs}


def overhead(out: Path, wall: float) -> dict:
    """Per-input shares from the manifest: read (+prepare), explain, write, and the rest (region scores, map summary,
    manifest and driver), against the explanation time."""
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    seconds = [r["seconds"] for r in records if r["status"] == "done"]
    total = {k: sum(s.get(k, 0.0) for s in seconds) for k in ("read", "explain", "write", "total")}
    other_in_task = total["total"] - total["read"] - total["explain"] - total["write"]
    driver = wall - total["total"]  # discovery, digests, manifest appends, summary and report (serial: same process)
    explain = total["explain"] or 1.0
    return {"per_input_ms": {k: 1000 * v / len(seconds) for k, v in total.items()},
            "share_of_explain": {"read": total["read"] / explain, "write": total["write"] / explain,
                                 "region_and_summary": other_in_task / explain, "driver_and_manifest": driver / explain,
                                 "all_overhead": (wall - explain) / explain},
            "median_explain_ms": 1000 * statistics.median(s["explain"] for s in seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="1,4,8,16", help="mini-batch sizes for the sweep")
    parser.add_argument("--parallel-batch", type=int, default=8, help="mini-batch size of the 2-worker runs")
    parser.add_argument("--legacy", action="store_true", help="the earlier single-pass comparison (with --n0)")
    parser.add_argument("--n0", type=int, default=20)
    parser.add_argument("--methods", default="gradcam,lrp")
    parser.add_argument("--formats", default="npz")
    parser.add_argument("--executors", default="serial,processes,ray")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"needs {DATA} (the shared brain-tumor-figshare data)")
    inputs = pick_inputs(args.n)
    model = medlens.load_model("brain-tumor-mri")
    if not args.legacy:
        results = {"n": len(inputs), "methods": args.methods, "formats": args.formats, "cpu_count": os.cpu_count(),
                   "load_before": os.getloadavg(), **sweep(args, inputs, model), "load_after": os.getloadavg()}
        print(json.dumps({k: results[k] for k in ("medians", "ratios", "load_before", "load_after")}, indent=2))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    results: dict = {"n": len(inputs), "methods": args.methods, "formats": args.formats, "cpu_count": os.cpu_count(),
                     "load_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        for executor in args.executors.split(","):
            small = timed_run(inputs[: args.n0], Path(tmp) / f"{executor}-small", model, executor, args.formats,
                              args.methods)
            out = Path(tmp) / executor
            run = timed_run(inputs, out, model, executor, args.formats, args.methods)
            run["load_after"] = os.getloadavg()
            run["wall_n0_s"] = small["wall_s"]
            run["images_per_s_marginal"] = (run["n"] - small["n"]) / (run["wall_s"] - small["wall_s"])
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            if executor == "serial":
                results["overhead"] = overhead(out, run["wall_s"])
                print(json.dumps(results["overhead"]), flush=True)
                t0 = time.perf_counter()
                again = run_batch(inputs, out, model=model, model_source="brain-tumor-mri",
                                  request=ExplainRequest.build(args.methods, formats=args.formats), threads=1,
                                  progress=False, log=lambda m: None)
                results["resume_finished_s"] = time.perf_counter() - t0
                assert again.ran == 0
                t0 = time.perf_counter()  # the same from the command line: Python, torch and the model load too
                done = subprocess.run([sys.executable, "-m", "medlens", "batch", *map(str, inputs), "--model",
                                       "brain-tumor-mri", "--methods", args.methods, "--formats", args.formats, "--out",
                                       str(out), "-q"], capture_output=True, text=True)
                results["resume_finished_cli_s"] = time.perf_counter() - t0
                assert done.returncode == 0 and "0 to run" in done.stderr, done.stderr[-500:]
                print(json.dumps({k: results[k] for k in ("resume_finished_s", "resume_finished_cli_s")}), flush=True)
    serial = next((r for r in results["runs"] if r["executor"] == "serial"), None)
    for run in results["runs"]:
        if serial:
            run["speedup_wall"] = run["images_per_s_wall"] / serial["images_per_s_wall"]
            run["speedup_marginal"] = run["images_per_s_marginal"] / serial["images_per_s_marginal"]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":  # the processes executor spawns workers that import this file
    main()
