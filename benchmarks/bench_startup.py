"""Start-up of `medlens batch` on one input (issue 28, "start fast"): launch to the first result, beside `import torch`.

Run: PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python benchmarks/bench_startup.py [--rounds 5] [--before OTHER/src] [--no-pyc]
     [--executor processes]   (the same with `--executor processes --workers 2`: its forkserver's start-up too)

Each round launches, in a rotating order, `python -c "import torch"` (the floor no medlens change goes under) and
`medlens batch ONE.jpg --model brain-tumor-mri --methods gradcam --threads 1` from this tree (and from `--before`'s
tree, e.g. a checkout of main, when given) as fresh processes. The first result is the earliest file written under
the run's `maps/` folder (its mtime) minus the launch time; the whole command's wall is kept too. Medians over the
rounds, per-round ratios to `import torch`, and the load average with every run. Last, one `python -X importtime` run
of the same command splits it: torch's import, every other import (medlens, click, PIL, numpy's own), and the rest
(model load, reading, explaining, writing the first files).
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

import numpy as np
from PIL import Image

HERE_SRC = Path(__file__).resolve().parents[1] / "src"


PYC: dict = {}  # set by main(): where compiled modules go (an installed package has its .pyc files)
EXECUTOR: list = []  # set by main(): `--executor processes --workers 2` for the processes executor


def _env(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "OMP_WAIT_POLICY": "PASSIVE", **PYC}
    if PYC:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _batch_argv(image: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, *extra, "-m", "medlens.cli.group", "batch", str(image), "--model", "brain-tumor-mri",
            "--methods", "gradcam", "--threads", "1", "--out", str(out), *EXECUTOR]


def _first_result(out: Path) -> float:
    return min(f.stat().st_mtime for f in (out / "maps").rglob("*") if f.is_file())


def run_one(what: str, src: Path, image: Path, work: Path) -> dict:
    """One fresh process: seconds to its first result (batch) and to its end, with the load at launch."""
    load = os.getloadavg()[0]
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    argv = [sys.executable, "-c", "import torch"] if what == "import torch" else _batch_argv(image, out)
    launch = time.time()
    t0 = time.perf_counter()
    subprocess.run(argv, env=_env(src), check=True, capture_output=True)
    wall = time.perf_counter() - t0
    first = _first_result(out) - launch if what != "import torch" else wall
    return {"what": what, "first_result_s": round(first, 3), "wall_s": round(wall, 3), "load": round(load, 2)}


def breakdown(src: Path, image: Path, work: Path) -> dict:
    """One `-X importtime` run: torch's import, the other imports, the rest up to the first result (seconds)."""
    out = work / "out-importtime"
    launch = time.time()
    done = subprocess.run(_batch_argv(image, out, "-X", "importtime"), env=_env(src), check=True, capture_output=True,
                          text=True)
    first = _first_result(out) - launch
    all_s = torch_s = 0.0
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split(":", 1)[1].split("|")
        if name.strip() == "torch":  # imported inside medlens's own import, at whatever depth
            torch_s += int(cumulative) / 1e6
        if not name.startswith("  "):  # a top-level import: its cumulative time holds everything it imported
            all_s += int(cumulative) / 1e6
    other_s = all_s - torch_s
    return {"first_result_s": round(first, 3), "torch_import_s": round(torch_s, 3),
            "other_imports_s": round(other_s, 3), "rest_s": round(first - torch_s - other_s, 3),
            "load": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", type=Path, default=None, help="another tree's src/ to time beside this one")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-pyc", action="store_true", help="compile every module from source at each launch "
                        "(as under PYTHONDONTWRITEBYTECODE=1); by default .pyc files are kept under a temporary "
                        "PYTHONPYCACHEPREFIX, as an installed package has them, and one untimed warm-up run fills it")
    parser.add_argument("--executor", choices=("serial", "processes"), default="serial",
                        help="the batch runs' executor (processes: 2 workers, forked from a forkserver)")
    args = parser.parse_args()
    if args.executor == "processes":
        EXECUTOR.extend(["--executor", "processes", "--workers", "2"])
    if not args.no_pyc:
        PYC["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "medlens-bench-pycache")
    trees = {"import torch": HERE_SRC, "batch (this tree)": HERE_SRC}
    if args.before:
        trees["batch (--before)"] = args.before.resolve()
    print(json.dumps({"load_before": os.getloadavg(), "cpus": os.cpu_count(), "executor": args.executor,
                      "pyc": "kept" if PYC else "none (compiled from source at each launch)"}), flush=True)
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        work = Path(tmp)
        image = work / "one.jpg"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(image, quality=90)
        names = list(trees)
        for what in names:  # untimed warm-up: the page cache, and the .pyc files when they are kept
            run_one("import torch" if what == "import torch" else "batch", trees[what], image, work)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for what in order:
                kind = "import torch" if what == "import torch" else "batch"
                res = run_one(kind, trees[what], image, work)
                res["what"] = what
                runs[what].append(res)
                print(json.dumps({"round": r, **res}), flush=True)
        split = (breakdown(HERE_SRC, image, work) if not EXECUTOR else  # the forkserver inherits -X importtime
                 "not split: the driver's and the forkserver's imports are in one -X importtime output")
    torch_s = [x["wall_s"] for x in runs["import torch"]]
    summary = {"medians_s": {k: statistics.median(x["first_result_s"] for x in v) for k, v in runs.items()},
               "ratio_to_import_torch (median of rounds)": {
                   k: round(statistics.median(x["first_result_s"] / t for x, t in zip(v, torch_s)), 2)
                   for k, v in runs.items() if k != "import torch"},
               "whole_command_median_s": {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()},
               "breakdown (one -X importtime run of this tree)": split, "load_after": os.getloadavg()}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
