"""Batch runner throughput: images/s of `medlens batch` on the bundled brain model (gradcam + lrp) over N slices of
../shared/data/brain-tumor-figshare, for the serial (1 torch thread), processes (2 workers) and ray (2 workers)
executors; the runner's overhead share (read, write, manifest vs explain); the time to resume a finished batch.

Run: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_batch.py [--n 500] [--formats npz] [--json out.json]
Each executor runs the first `--n0` inputs, then all N, each into a fresh folder; `wall` includes start-up (worker
processes or a local Ray, each loading the model); the marginal rate (N - n0) / (wall_N - wall_n0) takes the same
start-up out (Ray Data hands records over in bursts, so a first-to-last-record rate would flatter it). Figures go to
docs/batch.md.
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

import medlens  # noqa: E402
from medlens.batch import RayExecutor, run_batch  # noqa: E402
from medlens.pipeline import ExplainRequest  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain-tumor-figshare"


def pick_inputs(n: int) -> list[Path]:
    """n slices spread over the three classes: every k-th file of the sorted list."""
    files = sorted(DATA.rglob("*.jpg"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def timed_run(inputs: list[Path], out: Path, model, executor: str, formats: str, methods: str) -> dict:
    stamps: list[float] = []
    t0 = time.perf_counter()
    summary = run_batch(inputs, out, model=model, model_source="brain-tumor-mri",
                        request=ExplainRequest.build(methods, formats=formats), executor=executor, workers=2,
                        threads=1, progress=False, log=lambda m: None, on_record=lambda r: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    steady = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 2 else float("nan")
    return {"executor": executor, "n": summary.total, "failed": len(summary.failures), "wall_s": wall,
            "images_per_s_wall": summary.total / wall, "images_per_s_steady": steady,
            "startup_s": stamps[0] - t0 if stamps else float("nan")}


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
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--n0", type=int, default=20)
    parser.add_argument("--methods", default="gradcam,lrp")
    parser.add_argument("--formats", default="npz")
    parser.add_argument("--executors", default="serial,processes,ray")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ray-batch-size", type=int, default=None, help="inputs per Ray task (default: the executor's)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"needs {DATA} (the shared brain-tumor-figshare data)")
    inputs = pick_inputs(args.n)
    if args.ray_batch_size:
        RayExecutor.batch_size = args.ray_batch_size
    model = medlens.load_model("brain-tumor-mri")
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
