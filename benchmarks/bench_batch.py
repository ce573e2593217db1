"""Batch runner throughput on the bundled brain model (gradcam + lrp) over N figshare slices, one torch thread per
worker: mini-batch size against throughput (pure in-process explaining and the serial runner, 1/4/8/16), the
runner's overhead against pure explaining, 2-worker scaling (processes against serial) and Ray against processes.

Run: PYTHONPATH=src python benchmarks/bench_batch.py [--n 48] [--rounds 3] [--sections sweep,startup,cli] [--json out.json]
Sections: `sweep` (in process: pure explaining and the serial runner per mini-batch size, the processes and Ray
executors with 2 workers), `startup` (`medlens batch` on one input as a fresh command: seconds to its first manifest
line and to its end, beside `python -c "import torch"` as the floor), `cli` (the whole `medlens batch` command on the
N inputs, serial against 2 processes against Ray 2 workers, each a fresh command with its own start-up). Every
configuration runs once per round, the rounds interleaved (so a load that comes and goes touches all of them),
each run into a fresh folder; figures are medians over the rounds, ratios taken within a round. `steady` is the rate from the first burst of
records to the last (start-up out: the records between the first mini-batch's and the last's, over the time
between those bursts), `wall` includes start-up (serial: the whole `run_batch` on the already loaded model: plan, discovery and
digests, the first mini-batch read before anything can be explained, the last one written after, summary and report;
2 workers: worker processes or a local Ray, each loading the model). The pure rate is `medlens.explain` on the
already prepared inputs in the same mini-batches (no reading, no writing, no manifest): the runner's overhead is pure
rate / runner rate - 1; as the wall-clock figures move with the load, the CPU time per input (all threads, and
the explaining thread alone; of this process only, so for 2 workers the driver's) is recorded too: runner CPU / pure
CPU is the work the serial runner adds. Both run in this process with one torch thread, after the same warm-up; neither includes
importing torch or loading the model; the runner's reader and writer threads may use a second core. The load
average is recorded before every run. Before every timed run the earlier runs' files are synced to disk, so no
configuration pays for another's writeback.
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


def settle() -> None:
    """Before each timed run: the files earlier runs left in the page cache written out (`os.sync`), so that the
    kernel's writeback of one configuration's files (on this VM's ext4, 3.75 s of kworker CPU during one 240-input
    processes run with pictures: about 15 ms per input) does not run on the cores while the next one is timed."""
    os.sync()


def timed_run(inputs: list[Path], out: Path, model, executor: str, formats: str, methods: str,
              batch_size: int = 1, workers: int = 2) -> dict:
    stamps: list[float] = []
    load = os.getloadavg()[0]
    cpu0, thread0 = time.process_time(), time.thread_time()
    t0 = time.perf_counter()
    summary = run_batch(inputs, out, model=model, model_source="brain-tumor-mri",
                        request=ExplainRequest.build(methods, formats=formats), executor=executor, workers=workers,
                        threads=1, progress=False, log=lambda m: None, batch_size=batch_size,
                        on_record=lambda r: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - t0
    cpu, thread = time.process_time() - cpu0, time.thread_time() - thread0
    # once running: the records after the first mini-batch's and before the last's, over the time between those
    # bursts (the serial runner yields a mini-batch's records after explaining the next one: the first burst comes
    # after two explanations, the last after the last write, so counting either would credit a mini-batch of work
    # that was done outside the interval)
    first, last = min(batch_size, len(stamps)), len(stamps) - (len(stamps) % batch_size or batch_size)
    steady = (last - first) / (stamps[last - 1] - stamps[first - 1]) if 0 < first < last else float("nan")
    return {"executor": executor, "batch_size": batch_size, "n": summary.total, "failed": len(summary.failures),
            "wall_s": wall, "images_per_s_wall": summary.total / wall, "images_per_s_steady": steady,
            "startup_s": stamps[0] - t0 if stamps else float("nan"), "load": load,
            "cpu_ms_per_input": 1000 * cpu / summary.total, "calling_thread_cpu_ms_per_input": 1000 * thread / summary.total}


def pure_rate(plan, tensors: list[torch.Tensor], batch_size: int) -> tuple[float, float]:
    """Images/s of `explain` alone on prepared inputs, `batch_size` per call, and its CPU ms per input."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        explain_batch(plan, torch.cat(tensors[start:start + batch_size]))
    return len(tensors) / (time.perf_counter() - t0), 1000 * (time.process_time() - cpu0) / len(tensors)


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
                settle()
                if kind == "pure":
                    load = os.getloadavg()[0]
                    rate, cpu = pure_rate(plan, tensors, b)
                    run = {"executor": "pure", "batch_size": b, "images_per_s_steady": rate,
                           "images_per_s_wall": rate, "load": load, "cpu_ms_per_input": cpu,
                           "calling_thread_cpu_ms_per_input": cpu}
                else:
                    run = timed_run(inputs, Path(tmp) / f"{kind}-{b}-{r}", model, kind, args.formats, args.methods,
                                    b, workers)
                runs.setdefault(key, []).append(run)
                print(json.dumps({"round": r, "config": key, **run}), flush=True)
    med = {key: {m: statistics.median(x[m] for x in v) for m in ("images_per_s_steady", "images_per_s_wall", "load")}
           for key, v in runs.items()}
    ratios = {}
    for b in sizes:
        if 1 not in sizes:  # the "vs b=1" ratios need b=1 in the sweep
            ratios[f"runner overhead b={b} (pure / serial wall - 1)"] = (
                med[f"pure b={b} w=1"]["images_per_s_steady"] / med[f"serial b={b} w=1"]["images_per_s_wall"] - 1)
            continue
        ratios[f"runner overhead b={b} (pure / serial wall - 1)"] = (med[f"pure b={b} w=1"]["images_per_s_steady"]
                                                                    / med[f"serial b={b} w=1"]["images_per_s_wall"] - 1)
        ratios[f"serial b={b} vs b=1 (wall)"] = (med[f"serial b={b} w=1"]["images_per_s_wall"]
                                                / med["serial b=1 w=1"]["images_per_s_wall"])
        ratios[f"pure b={b} vs b=1"] = med[f"pure b={b} w=1"]["images_per_s_steady"] / med["pure b=1 w=1"]["images_per_s_steady"]
    per_round = {}  # the same ratios within each round (the same moment of the machine's load)
    for b in sizes:
        per_round[f"runner overhead b={b}"] = [p["images_per_s_steady"] / s["images_per_s_wall"] - 1
                                              for p, s in zip(runs[f"pure b={b} w=1"], runs[f"serial b={b} w=1"])]
        per_round[f"runner CPU / pure CPU b={b}"] = [  # the work added, whatever the load (all threads)
            s["cpu_ms_per_input"] / p["cpu_ms_per_input"]
            for p, s in zip(runs[f"pure b={b} w=1"], runs[f"serial b={b} w=1"])]
        per_round[f"runner's explaining thread CPU / pure CPU b={b}"] = [
            s["calling_thread_cpu_ms_per_input"] / p["cpu_ms_per_input"]
            for p, s in zip(runs[f"pure b={b} w=1"], runs[f"serial b={b} w=1"])]
        per_round[f"runner overhead once running b={b}"] = [
            p["images_per_s_steady"] / s["images_per_s_steady"] - 1
            for p, s in zip(runs[f"pure b={b} w=1"], runs[f"serial b={b} w=1"])]
    for name in ("processes", "ray"):
        key, base = f"{name} b={args.parallel_batch} w=2", f"serial b={args.parallel_batch} w=1"
        if key in runs:
            per_round[f"{name} 2 workers vs serial (steady)"] = [a["images_per_s_steady"] / b["images_per_s_steady"]
                                                                  for a, b in zip(runs[key], runs[base])]
    ratios.update({f"{k} (median of rounds)": statistics.median(v) for k, v in per_round.items()})
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
    return {"medians": med, "ratios": ratios, "ratio_rounds": per_round, "runs": runs}


def cli_run(inputs: list[Path], out: Path, args: argparse.Namespace, *extra: str) -> dict:
    """`medlens batch` as a fresh command: seconds from launch to its first manifest line and to its end."""
    command = [sys.executable, "-m", "medlens", "batch", *map(str, inputs), "--model", "brain-tumor-mri", "--methods",
               args.methods, "--formats", args.formats, "--out", str(out), "-q", *extra]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = float("nan")
    manifest = out / "manifest.jsonl"
    while proc.poll() is None:
        if first != first and manifest.is_file() and manifest.stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    if first != first and manifest.is_file() and manifest.stat().st_size:
        first = wall
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, err[-800:]
    return {"first_result_s": first, "wall_s": wall, "images_per_s_wall": len(inputs) / wall, "load": load}


def startup(args: argparse.Namespace, one: Path) -> dict:
    """Seconds from launch to the first result of `medlens batch` on one input (serial and 2 processes), beside
    the time `python -c "import torch"` takes at the same moment (the floor no medlens change can go under)."""
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        for r in range(args.rounds):
            t0 = time.perf_counter()
            load = os.getloadavg()[0]
            subprocess.run([sys.executable, "-c", "import torch"], check=True)
            runs.setdefault("import torch", []).append({"wall_s": time.perf_counter() - t0, "load": load})
            for name, extra in (("serial", ()), ("processes", ("--executor", "processes", "--workers", "2"))):
                run = cli_run([one], Path(tmp) / f"{name}-{r}", args, *extra)
                runs.setdefault(f"batch one input {name}", []).append(run)
            print(json.dumps({"round": r, "startup": {k: v[-1] for k, v in runs.items()}}), flush=True)
    return {key: {m: statistics.median(x[m] for x in v) for m in v[0]} for key, v in runs.items()} | {"runs": runs}


def whole_commands(args: argparse.Namespace, inputs: list[Path]) -> dict:
    """The whole `medlens batch` command on the inputs: serial, processes (2) and Ray (2), fresh commands, interleaved;
    ratios of wall times within each round, their medians."""
    names = [e for e in args.executors.split(",")]
    runs: dict[str, list[dict]] = {}
    ratios: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        for r in range(args.rounds):
            for name in names:
                settle()
                extra = () if name == "serial" else ("--executor", name, "--workers", "2")
                runs.setdefault(name, []).append(cli_run(inputs, Path(tmp) / f"{name}-{r}", args, *extra))
                print(json.dumps({"round": r, "cli": name, **runs[name][-1]}), flush=True)
            wall = {name: runs[name][-1]["wall_s"] for name in names}
            for a, b in (("processes", "serial"), ("ray", "processes"), ("ray", "serial")):
                if a in wall and b in wall:
                    ratios.setdefault(f"{a} vs {b} (speed, whole command)", []).append(wall[b] / wall[a])
    return {"medians": {name: {m: statistics.median(x[m] for x in v) for m in v[0]} for name, v in runs.items()},
            "ratios": {k: statistics.median(v) for k, v in ratios.items()}, "ratio_rounds": ratios, "runs": runs}


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
    parser.add_argument("--sections", default="sweep,startup,cli", help="which of sweep, startup, cli to run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"needs {DATA} (the shared brain-tumor-figshare data)")
    from medlens.core.allocator import keep_freed_memory

    kept = keep_freed_memory()  # as `medlens batch` and its workers do (the in-process runs measure what the CLI does)
    inputs = pick_inputs(args.n)
    model = medlens.load_model("brain-tumor-mri")
    if not args.legacy:
        sections = args.sections.split(",")
        results = {"n": len(inputs), "methods": args.methods, "formats": args.formats, "cpu_count": os.cpu_count(),
                   "load_before": os.getloadavg(), "allocator_keeps_freed_memory": kept}
        if "startup" in sections:
            results["startup"] = startup(args, inputs[0])
        if "cli" in sections:
            results["cli"] = whole_commands(args, inputs)
        if "sweep" in sections:
            results.update(sweep(args, inputs, model))
        results["load_after"] = os.getloadavg()
        print(json.dumps({k: results[k] for k in ("startup", "cli", "medians", "ratios", "load_before", "load_after")
                          if k in results}, indent=2))
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
