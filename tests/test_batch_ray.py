"""The Ray executor (a warm pool of Ray actors, a mini-batch per call) gives the same records and maps as the serial one.

Ray is started once for the module with 2 CPUs, no dashboard and no usage statistics, and shut down after."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from batch_helpers import comparable, manifest, maps_of, phantom_folder, run_cli

ARGS = ("--model", "phantom-lesion", "--methods", "gradcam,lrp", "--threads", "1", "-q")


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        pytest.skip('ray is not installed (pip install "medlens[ray]"); the Ray executor is not tested here.')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_gives_identical_maps_to_serial(ray_local: object, tmp_path: Path) -> None:
    inputs = phantom_folder(tmp_path, 6, seed=13)
    (inputs / "broken.png").write_bytes(b"not an image")
    serial, on_ray = tmp_path / "serial", tmp_path / "ray"
    assert run_cli("batch", inputs, "--out", serial, *ARGS) == 3
    assert run_cli("batch", inputs, "--out", on_ray, *ARGS, "--executor", "ray", "--workers", "2") == 3
    got = {r["id"]: r for r in manifest(on_ray)}
    assert len(got) == len(manifest(on_ray)) == 7
    for record in manifest(serial):
        other = got[record["id"]]
        assert comparable(other) == comparable(record)
        if record["status"] == "done":
            a, b = maps_of(serial, record), maps_of(on_ray, other)
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert got[next(k for k in got if k.startswith("broken.png@"))]["status"] == "failed"
    assert run_cli("batch", inputs, "--out", on_ray, *ARGS, "--executor", "ray", "--workers", "2") == 3  # resumed
    assert len(manifest(on_ray)) == 7
