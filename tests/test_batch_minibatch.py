"""Mini-batches in the batch runner: inputs of one prepared shape explained in one call give the maps of one at a
time (float tolerance); an input that cannot be read, explained, or that kills its worker fails alone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import medlens.pipeline.run as pipeline_run
from batch_helpers import close_maps, manifest, maps_of, phantom_folder, run_cli, same_within_float
from medlens.batch.executors import ProcessExecutor, SerialExecutor
from medlens.batch.inputs import discover
from medlens.batch.task import BatchTaskFactory
from medlens.pipeline import ExplainRequest, WorkerRecipe, explain_prepared, explain_prepared_many, read_input

ARGS = ("--model", "phantom-lesion", "--methods", "gradcam,lrp", "--threads", "1", "--formats", "npz", "-q")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_folder(tmp_path_factory.mktemp("minibatch"), 6, seed=5)


def _factory(out: Path, cls: type = BatchTaskFactory) -> BatchTaskFactory:
    request = ExplainRequest.build("gradcam,lrp", formats="npz")
    return cls(WorkerRecipe("phantom-lesion", {}, request, threads=1), str(out), "digest")


def test_a_mini_batch_gives_the_maps_of_one_at_a_time(inputs: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    plan = _factory(tmp_path).recipe.plan()
    files = sorted(inputs.rglob("*.png"))[:4]
    prepared = [read_input(plan, f) for f in files]
    together = explain_prepared_many(plan, prepared, sources=files)
    for f, p, outcome in zip(files, prepared, together):
        alone = explain_prepared(plan, p, source=f)
        assert outcome.result.target_names() == alone.result.target_names()
        assert torch.allclose(outcome.result.logits, alone.result.logits, rtol=1e-5, atol=1e-6)
        for method in alone.result:
            assert outcome.result[method].shape == alone.result[method].shape == (1, 1, 64, 64)
            assert close_maps(outcome.result[method].numpy(), alone.result[method].numpy()), method
        assert outcome.result.provenance["input"]["sha256"] == alone.result.provenance["input"]["sha256"]
    # and through the command: --batch-size 4 against --batch-size 1, written maps and records
    one, four = tmp_path / "one", tmp_path / "four"
    assert run_cli("batch", inputs, "--out", one, *ARGS, "--batch-size", "1") == 0
    assert run_cli("batch", inputs, "--out", four, *ARGS, "--batch-size", "4") == 0
    want = {r["id"]: r for r in manifest(one)}
    for record in manifest(four):
        other = want[record["id"]]
        assert record["targets"] == other["targets"] and same_within_float(record["maps"], other["maps"])
        a, b = maps_of(four, record), maps_of(one, other)
        assert all(close_maps(a[k], b[k]) for k in ("gradcam", "lrp"))
        provenance = json.loads((four / record["outputs"][0].rsplit("/", 1)[0] / "provenance.json").read_text())
        assert provenance["mini_batch"]["size"] in (4, 2)  # 6 inputs: a mini-batch of 4, then one of 2


def test_a_corrupt_file_in_a_mini_batch_fails_alone(inputs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(inputs.rglob("case00[0-2].png")):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "case001b.png").write_bytes(b"\x89PNG\r\n\x1a\n not the rest of a PNG")
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, *ARGS, "--batch-size", "4") == 3
    by_path = {r["path"]: r for r in manifest(out)}
    assert {p for p, r in by_path.items() if r["status"] == "failed"} == {"case001b.png"}
    assert "case001b.png" in by_path["case001b.png"]["error"]
    assert {p for p, r in by_path.items() if r["status"] == "done"} == {"case000.png", "case001.png", "case002.png"}


def test_an_input_the_model_cannot_explain_fails_alone_in_its_mini_batch(inputs: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    items = discover([inputs]).items[:4]
    factory = _factory(tmp_path / "out")
    victim = read_input(factory.recipe.plan(), items[2].path).tensor
    real = pipeline_run.explain_batch

    def fails_on_victim(plan, x, *args, **kwargs):
        if any(torch.equal(x[i:i + 1], victim) for i in range(x.shape[0])):
            raise RuntimeError("the victim's forward failed")
        return real(plan, x, *args, **kwargs)

    monkeypatch.setattr(pipeline_run, "explain_batch", fails_on_victim)
    records = {r["path"]: r for r in SerialExecutor().run(factory, items, batch_size=4)}
    assert records[items[2].relative]["status"] == "failed"
    assert "victim's forward failed" in records[items[2].relative]["error"]
    assert [records[i.relative]["status"] for i in items if i is not items[2]] == ["done"] * 3


class KillOnMiniBatch(BatchTaskFactory):
    """A batch task whose worker process kills itself (SIGKILL) whenever its work holds the input `victim`."""

    victim: str = ""

    def __call__(self):  # type: ignore[override]
        task = BatchTaskFactory.__call__(self)
        victim = self.victim

        class Killing:
            def _check(self, items):
                if any(item.relative.endswith(victim) for item in items):
                    import os
                    os.kill(os.getpid(), 9)

            def __call__(self, item):
                self._check([item])
                return task(item)

            def run_many(self, items):
                self._check(items)
                return task.run_many(items)

        return Killing()


def test_a_worker_killed_on_a_mini_batch_loses_only_the_input_at_fault(inputs: Path, tmp_path: Path) -> None:
    items = discover([inputs]).items[:4]
    factory = _factory(tmp_path / "out", KillOnMiniBatch)
    factory.victim = items[1].relative
    records = {r["path"]: r for r in ProcessExecutor(workers=1, max_attempts=1).run(factory, items, batch_size=4)}
    assert len(records) == 4
    assert records[items[1].relative]["status"] == "failed"
    assert "worker process died" in records[items[1].relative]["error"]
    assert [records[i.relative]["status"] for i in items if i is not items[1]] == ["done"] * 3
