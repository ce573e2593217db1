"""Batch executors: a worker process killed mid-input is retried; serial and processes give identical maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from batch_helpers import KillOnceFactory, comparable, manifest, maps_of, phantom_folder, run_cli
from medlens.batch.executors import ProcessExecutor, SerialExecutor, make_executor
from medlens.batch.inputs import discover
from medlens.batch.task import BatchTaskFactory
from medlens.errors import MedlensError
from medlens.pipeline import ExplainRequest, WorkerRecipe

ARGS = ("--model", "phantom-lesion", "--methods", "gradcam,lrp", "--threads", "1", "-q")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_folder(tmp_path_factory.mktemp("executors"), 6, seed=11)


def _factory(cls: type, out: Path) -> BatchTaskFactory:
    request = ExplainRequest.build("gradcam", formats="npz")
    return cls(WorkerRecipe("phantom-lesion", {}, request, threads=1), str(out), "digest")


def test_a_worker_killed_mid_input_is_retried_and_nothing_is_lost(inputs: Path, tmp_path: Path) -> None:
    items = discover([inputs]).items
    factory = _factory(KillOnceFactory, tmp_path / "out")
    factory.victim, factory.marker = "case002.png", str(tmp_path / "killed-once")
    records = list(ProcessExecutor(workers=2).run(factory, items))
    assert (tmp_path / "killed-once").exists()  # a worker really died on that input
    assert sorted(r["id"] for r in records) == sorted(i.id for i in items)  # every input once
    assert {r["status"] for r in records} == {"done"}
    serial = list(SerialExecutor().run(_factory(BatchTaskFactory, tmp_path / "serial"), items))
    want = {r["id"]: r for r in serial}
    for r in records:
        assert comparable(r)["prediction"] == want[r["id"]]["prediction"]


class AlwaysKill(KillOnceFactory):
    """Kills its worker on the victim every time (the marker is never written where it is looked for)."""

    def __call__(self):  # type: ignore[override]
        task = BatchTaskFactory.__call__(self)
        victim = self.victim

        def run(item):
            if item.relative.endswith(victim):
                import os
                os.kill(os.getpid(), 9)
            return task(item)

        return run


def test_an_input_that_kills_every_worker_fails_after_the_attempts(inputs: Path, tmp_path: Path) -> None:
    items = discover([inputs]).items[:3]
    factory = _factory(AlwaysKill, tmp_path / "out")
    factory.victim = "case002.png"
    records = {r["path"]: r for r in ProcessExecutor(workers=2, max_attempts=2).run(factory, items)}
    assert records["case002.png"]["status"] == "failed"
    assert "worker process died" in records["case002.png"]["error"]
    assert records["case000.png"]["status"] == "done" and records["case004.png"]["status"] == "done"


def test_serial_and_processes_give_identical_maps(inputs: Path, tmp_path: Path) -> None:
    serial, processes = tmp_path / "serial", tmp_path / "processes"
    assert run_cli("batch", inputs, "--out", serial, *ARGS) == 0
    assert run_cli("batch", inputs, "--out", processes, *ARGS, "--executor", "processes", "--workers", "2") == 0
    got = {r["id"]: r for r in manifest(processes)}
    for record in manifest(serial):
        other = got[record["id"]]
        assert comparable(other) == comparable(record)
        a, b = maps_of(serial, record), maps_of(processes, other)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_unknown_executor_and_bad_workers_are_usage_errors() -> None:
    with pytest.raises(MedlensError, match="unknown executor"):
        make_executor("threads")
    with pytest.raises(MedlensError, match="--workers"):
        make_executor("processes", workers=0)


def test_ray_missing_is_one_line_saying_what_to_install(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray now raises ImportError
    assert run_cli("batch", inputs, "--out", tmp_path / "out", *ARGS, "--executor", "ray") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['medlens: error: the ray executor needs Ray: pip install "medlens[ray]"']
    assert not (tmp_path / "out").exists()


def test_batch_and_evaluate_workers_share_one_recipe_that_pickles_without_its_model() -> None:
    import pickle

    from medlens.evaluation_run.parallel import EvaluateTaskFactory

    recipe = WorkerRecipe("phantom-lesion", {}, ExplainRequest.build("gradcam,lrp", seed=3), threads=1, model=object())
    batch = pickle.loads(pickle.dumps(BatchTaskFactory(recipe, "out", "digest")))
    evaluate = pickle.loads(pickle.dumps(EvaluateTaskFactory(recipe, "data", None, ["deletion"], {}, 4)))
    for sent in (batch.recipe, evaluate.recipe):
        assert sent.model is None and sent == recipe  # the loaded model stays home; everything else travels
    assert evaluate.methods == ["gradcam", "lrp"]
    plan = batch.recipe.plan()  # what a worker does: its own model, the request checked against it
    assert [s.name for s in plan.specs] == ["gradcam", "lrp"] and plan.request.seed == 3



def test_a_worker_holds_a_second_mini_batch_only_while_there_is_more_work_than_workers() -> None:
    """At the end of a run a mini-batch waiting in a busy worker's pipe would leave another worker idle."""
    from medlens.batch.executors import ITEMS_PER_WORKER, _held_at_most

    assert _held_at_most(10, 2) == ITEMS_PER_WORKER == 2
    assert _held_at_most(3, 2) == 2 and _held_at_most(2, 2) == 1 and _held_at_most(1, 2) == 1
