"""Small inputs and helpers shared by the batch tests: phantom PNG folders, runs of `medlens batch`, manifests."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from medlens.batch.task import BatchTaskFactory
from medlens.cli.group import main
from medlens.data.phantom import phantom_2d

SRC = str(Path(__file__).resolve().parents[1] / "src")


def phantom_folder(root: Path, n: int, seed: int = 3, size: int = 64) -> Path:
    """n phantom slices as 8-bit PNGs, half of them in a sub-folder, a box file beside the first."""
    images = phantom_2d(n, size=size, seed=seed).images
    folder = root / "inputs"
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = (images[i, 0].numpy() * 255).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / ("sub" if i % 2 else "") / f"case{i:03d}.png")
    (folder / "case000.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    return folder


def run_cli(*args: Any) -> int:
    return main([str(a) for a in args])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]


def comparable(record: dict) -> dict:
    """A record without what differs between equal runs (timings)."""
    return {k: v for k, v in record.items() if k != "seconds"}


def same_within_float(a: Any, b: Any) -> bool:
    """Records (or parts) equal but for float rounding: a mini-batch's maps equal one input's within float tolerance,
    and a resumed run explains its remaining inputs in other mini-batches than an uninterrupted one."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_within_float(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_within_float(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return bool(np.isclose(a, b, rtol=1e-4, atol=1e-6))
    return a == b


def close_maps(a: np.ndarray, b: np.ndarray) -> bool:
    """Maps equal within float tolerance: 1e-4 of the map's peak (LRP's epsilon rule divides by small sums)."""
    if a.dtype.kind != "f" or b.dtype.kind != "f":
        return np.array_equal(a, b)
    return a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1e-12, float(np.abs(b).max())))


def maps_of(out: Path, record: dict) -> dict[str, np.ndarray]:
    npz = next(o for o in record["outputs"] if o.endswith("maps.npz"))
    with np.load(out / npz) as data:
        return {k: data[k] for k in data.files}


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=SRC + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0")
    return env


def batch_command(inputs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medlens", "batch", str(inputs), "--model", "phantom-lesion", "--methods",
            "gradcam,lrp", "--out", str(out), "--threads", "1", "-q", *extra]


class KillOnceFactory(BatchTaskFactory):
    """A batch task whose worker process kills itself (SIGKILL) the first time it meets an input named `victim`."""

    victim: str = ""
    marker: str = ""

    def __call__(self) -> Any:
        task = super().__call__()
        victim, marker = self.victim, Path(self.marker)

        def run(item: Any) -> dict:
            if item.relative.endswith(victim) and not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), 9)
            return task(item)

        return run


def ids(records: Sequence[dict]) -> list[str]:
    return [r["id"] for r in records]


def beat_until_the_driver_ends(path: str) -> None:
    """A worker-like process body: `_end_with_driver`, then a heartbeat line every 20 ms into `path`, for ever."""
    import time

    from medlens.batch.executors import _end_with_driver

    _end_with_driver()
    with open(path, "w") as fh:
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        while True:
            fh.write(f"{time.time()}\n")
            fh.flush()
            time.sleep(0.02)
