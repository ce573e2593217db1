"""Throughput plumbing of the batch runner: the serial runner's overlap (`medlens.batch.overlap`: the next mini-batch
read and the last one written while one is explained, records in order, an error while reading raised after the
records already written); workers forked with the model the forkserver loaded; default threads never above the cores."""
from __future__ import annotations

import multiprocessing.forkserver
import threading
import time
from pathlib import Path

import pytest

from batch_helpers import phantom_folder
from medlens.batch import runner
from medlens.batch.executors import ProcessExecutor
from medlens.batch.inputs import discover
from medlens.batch.overlap import overlapped
from medlens.batch.preload import preloaded
from medlens.batch.task import BatchTaskFactory
from medlens.pipeline import ExplainRequest, WorkerRecipe


def test_reading_and_writing_overlap_with_explaining_and_order_is_kept() -> None:
    log: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def stage(name: str, pause: float):
        def run(chunk, *rest):
            key = chunk[0] if name == "read" else chunk
            with lock:
                log.append((name, key, "start"))
            time.sleep(pause)
            with lock:
                log.append((name, key, "end"))
            return key if name != "write" else [{"id": key}]
        return run

    chunks = [[0], [1], [2], [3]]
    out = list(overlapped(chunks, stage("read", 0.05), stage("explain", 0.1), stage("write", 0.05)))
    assert out == [[{"id": 0}], [{"id": 1}], [{"id": 2}], [{"id": 3}]]
    # chunk 1 is read while chunk 0 is explained, and chunk 0 written while chunk 1 is explained
    assert log.index(("read", 1, "start")) < log.index(("explain", 0, "end"))
    assert log.index(("write", 0, "start")) < log.index(("explain", 1, "end"))
    # never more than one chunk read ahead: chunk 2's read starts only once chunk 0's explanation has begun
    assert log.index(("read", 2, "start")) > log.index(("explain", 0, "start"))


def test_an_interrupt_while_reading_comes_after_the_records_already_written() -> None:
    def read(chunk):
        if chunk[0] == 2:
            raise KeyboardInterrupt
        return chunk[0]

    got: list = []
    with pytest.raises(KeyboardInterrupt):
        for records in overlapped([[0], [1], [2], [3]], read, lambda c: c, lambda c, e: [{"id": c}]):
            got.append(records)
    assert got == [[{"id": 0}], [{"id": 1}]]  # chunk 1 was explained before the reader's error was seen


class ReportsPreload(BatchTaskFactory):
    """A batch task whose records say whether the worker found the model already loaded by its forkserver."""

    def __call__(self):  # type: ignore[override]
        import sys

        families = "medlens.families.cam" in sys.modules  # before this worker explained anything
        task = super().__call__()
        found = preloaded(self.preload_key()) is not None

        def run(item):
            return {**task(item), "preloaded": found, "same_model": found and task.plan.model is preloaded(
                self.preload_key()), "families": families}

        return run


def test_workers_are_forked_with_the_model_the_forkserver_loaded(tmp_path: Path) -> None:
    server = multiprocessing.forkserver._forkserver
    if hasattr(server, "_stop"):  # a forkserver of an earlier test holds another model: start a fresh one
        server._stop()
    items = discover([phantom_folder(tmp_path, 2, seed=2)]).items
    request = ExplainRequest.build("gradcam", formats="npz")
    factory = ReportsPreload(WorkerRecipe("phantom-lesion", {}, request, threads=1), str(tmp_path / "out"), "d")
    records = list(ProcessExecutor(workers=1).run(factory, items))
    assert [r["status"] for r in records] == ["done", "done"]
    assert all(r["preloaded"] and r["same_model"] and r["families"] for r in records)


def test_default_threads_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "usable_cores", lambda: 8)
    assert runner.default_threads("serial", 2) == 7  # one core left to reading and writing
    assert runner.default_threads("processes", 2) == 4 and runner.default_threads("processes", 3) == 2
    assert runner.default_threads("ray", 4) == 2 and runner.default_threads("ray", 4, "head:6379") == 1
    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    assert runner.default_threads("serial", 2) == 1 and runner.default_threads("processes", 4) == 1


def test_a_panel_from_the_overlays_cells_is_the_panel_drawn_afresh() -> None:
    import numpy as np

    from medlens.io.render import color_scale, overlay_cell, render_panel

    rng = np.random.default_rng(0)
    image = rng.random((40, 48)).astype(np.float32)
    maps = {"gradcam": rng.random((2, 40, 48)).astype(np.float32),
            "lrp": rng.standard_normal((2, 40, 48)).astype(np.float32)}
    region = np.zeros((40, 48), dtype=bool)
    region[10:20, 12:30] = True
    displays = {"gradcam": "positive", "lrp": "signed"}
    titles = ["a (p=0.70)", "b (p=0.20)"]
    scales = {"gradcam": ("inferno", 0.0, 1.0), "lrp": color_scale(maps["lrp"])}
    cells = {m: [overlay_cell(image, raw[j], title=f"{m}: {titles[j]}", region=region, display=displays[m],
                              scale=scales[m])[0] for j in range(2)] for m, raw in maps.items()}
    fresh = render_panel(image, maps, titles, scales=scales, region=region, displays=displays)
    reused = render_panel(image, maps, titles, scales=scales, region=region, displays=displays, drawn=cells)
    assert fresh == reused


def test_the_preload_key_names_cpu_models_with_plain_options_only() -> None:
    from medlens.batch.preload import preload_key

    assert preload_key("m", {"weights": Path("/w.pt")}, "cpu") == preload_key("m", {"weights": "/w.pt"}, "cpu")
    assert preload_key("m", {}, "cuda") is None  # CUDA is never set up before a fork
    assert preload_key("m", {"x": object()}, "cpu") is None


def test_a_serial_run_gives_torchs_thread_count_back(tmp_path: Path) -> None:
    import torch

    import medlens

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = medlens.load_model("phantom-lesion")
        summary = runner.run_batch([phantom_folder(tmp_path, 2, seed=3)], tmp_path / "out", model=model,
                                   model_source="phantom-lesion", request=ExplainRequest.build("gradcam", formats="npz"),
                                   threads=1, progress=False, log=lambda m: None)
        assert summary.failures == [] and torch.get_num_threads() == 2  # the run used 1, the caller keeps its 2
    finally:
        torch.set_num_threads(before)
