"""What the batch runner's overhead cuts keep exactly as before: the box filter's weights computed once per size
(the same resize), the result's provenance copied without `copy.deepcopy` (the same copy, nothing shared), the scan
view's unit scaling without a NaN mask when every value is finite (the same values), and a written set leaving no
staging folder behind."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from medlens.core.result import ExplanationResult
from medlens.io.output import write_explanation
from medlens.io.preparation import box_resize, box_weights
from medlens.io.scan_view import _unit


def _box_reference(n_in: int, n_out: int) -> torch.Tensor:
    """Pillow's BOX filter weights, one output pixel at a time (its xmin/xmax window, equal weights)."""
    s = n_in / n_out
    f = max(s, 1.0)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        c = (i + 0.5) * s
        lo, hi = max(0, int(np.floor(c - 0.5 * f + 0.5))), min(n_in, int(np.floor(c + 0.5 * f + 0.5)))
        js = [j for j in range(lo, hi) if -0.5 < (j - c + 0.5) / f <= 0.5]
        w[i, js] = 1.0 / len(js)
    return w


def test_box_weights_kept_between_calls_are_pillows_and_cannot_be_changed_from_outside() -> None:
    for n_in, n_out in ((512, 160), (160, 512), (7, 3)):
        assert torch.equal(box_weights(n_in, n_out), _box_reference(n_in, n_out))
    box_weights(512, 160).fill_(0.0)  # the caller's copy: the kept weights are untouched
    x = torch.rand(1, 1, 512, 512, generator=torch.Generator().manual_seed(0))
    first, second = box_resize(x, (160, 160)), box_resize(x, (160, 160))
    assert torch.equal(first, second)
    w = _box_reference(512, 160).float()
    assert torch.allclose(first[0, 0], w @ x[0, 0] @ w.T, atol=1e-6)


def test_the_provenance_copy_is_a_deep_copy() -> None:
    provenance = {"a": [1, 2.5, {"b": (3, "x")}], "c": None, "d": {"e": [True]}, "t": torch.ones(2),
                  "p": Path("/x")}
    result = ExplanationResult({"m": torch.zeros(1, 1, 2, 2)}, torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long),
                               provenance)
    copied = result.provenance
    reference = copy.deepcopy(provenance)
    assert copied.keys() == reference.keys() and copied["a"] == reference["a"] and copied["d"] == reference["d"]
    assert torch.equal(copied["t"], reference["t"]) and copied["p"] == reference["p"]
    copied["a"][2]["b"] = None
    copied["d"]["e"].append(False)
    copied["t"] += 1
    again = result.provenance
    assert again["a"][2]["b"] == (3, "x") and again["d"]["e"] == [True] and torch.equal(again["t"], torch.ones(2))
    assert result.has_provenance("a") and not result.has_provenance("region_targets")


def _unit_before(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.float32)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    out = (np.nan_to_num(values, nan=lo) - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def test_unit_scaling_is_unchanged_with_and_without_nan_and_infinity() -> None:
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(17, 13)).astype(np.float32) * 300
    cases = [plain, np.full((4, 4), 2.0, np.float32), np.full((3, 3), np.nan, np.float32)]
    for bad in (np.nan, np.inf, -np.inf):
        broken = plain.copy()
        broken[2, 3] = bad
        cases.append(broken)
    for values in cases:
        got, expected = _unit(values), _unit_before(values)
        assert got.dtype == expected.dtype and np.array_equal(got, expected, equal_nan=True)


def test_a_written_set_leaves_no_staging_folder_and_replaces_an_earlier_one(tmp_path: Path) -> None:
    result = ExplanationResult({"gradcam": torch.rand(1, 1, 8, 8)}, torch.zeros(1, 3),
                               torch.zeros(1, 1, dtype=torch.long), {})
    first = write_explanation(result, tmp_path, formats=("npz",))
    second = write_explanation(result, tmp_path, formats=("npz",))
    assert sorted(p.name for p in first) == sorted(p.name for p in second) == ["maps.npz", "provenance.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.npz", "provenance.json"]


def _run(tmp_path: Path, n: int = 4):
    import medlens
    from batch_helpers import phantom_folder
    from medlens.batch import runner
    from medlens.pipeline import ExplainRequest

    model = medlens.load_model("phantom-lesion")
    return runner.run_batch([phantom_folder(tmp_path, n, seed=3)], tmp_path / "out", model=model,
                            model_source="phantom-lesion", request=ExplainRequest.build("gradcam", formats="npz"),
                            threads=1, progress=False, log=lambda m: None, batch_size=4)


def test_an_input_whose_region_cannot_be_scored_fails_alone_on_the_writer_thread(tmp_path: Path, monkeypatch) -> None:
    import threading

    from medlens.errors import InputError
    from medlens.pipeline import run

    real, threads = run.region_mask, set()

    def region_mask(found, *args, **kwargs):  # the mask on the input's grid, made for a mini-batch's regions at once
        threads.add(threading.current_thread().name)
        if "case000" in str(found.source):  # case000 has a box file beside it
            raise InputError("case000: the region cannot be scored")
        return real(found, *args, **kwargs)

    monkeypatch.setattr(run, "region_mask", region_mask)
    summary = _run(tmp_path)
    assert [Path(p).name for p, _ in summary.failures] == ["case000.png"] and summary.done == 3
    assert "region cannot be scored" in summary.failures[0][1]
    assert all(name.startswith("medlens-write") for name in threads)  # made beside the next explanation


def test_a_mini_batch_that_fails_while_written_is_rerun_one_by_one_on_the_explaining_thread(tmp_path: Path,
                                                                                            monkeypatch) -> None:
    import threading

    from medlens.batch import task as task_module

    explained_on: set[str] = set()
    real_write, real_explain = task_module.BatchTask.write, task_module.explain_pending
    calls = {"n": 0}

    def write(self, chunk, explained):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("a bug in writing")  # not an input's failure: the mini-batch runs again one at a time
        return real_write(self, chunk, explained)

    def explain_pending(*args, **kwargs):
        explained_on.add(threading.current_thread().name)
        return real_explain(*args, **kwargs)

    monkeypatch.setattr(task_module.BatchTask, "write", write)
    monkeypatch.setattr(task_module, "explain_pending", explain_pending)
    summary = _run(tmp_path)
    assert summary.failures == [] and summary.done == 4 and calls["n"] == 5  # 1 failed + 4 one by one
    assert explained_on == {threading.current_thread().name}  # never on the writer thread, beside the next one


def test_the_manifest_syncs_beside_the_caller_and_once_more_on_close(tmp_path: Path, monkeypatch) -> None:
    import json
    import threading
    import time

    from medlens.batch import manifest

    synced_on: list[str] = []
    real = manifest.ManifestWriter._sync

    def sync(self):
        synced_on.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(manifest.ManifestWriter, "_sync", sync)
    monkeypatch.setattr(manifest, "FSYNC_SECONDS", 0.0)
    path = tmp_path / "manifest.jsonl"
    with manifest.ManifestWriter(path) as writer:
        for i in range(20):
            writer.append({"id": str(i), "status": "done"})
        deadline = time.monotonic() + 10  # let the syncer thread run once before closing (a close first may beat it)
        while not synced_on and time.monotonic() < deadline:
            time.sleep(0.01)
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == [str(i) for i in range(20)]
    assert synced_on[-1] == threading.current_thread().name  # the last sync, on close, by the caller
    assert set(synced_on[:-1]) == {"medlens-manifest-sync"} and synced_on[:-1]  # the periodic ones beside it
    assert not any(t.name == "medlens-manifest-sync" for t in threading.enumerate())


def test_the_batch_records_the_digest_it_found_each_input_with_without_reading_it_again(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    import json

    from medlens.io import files, output

    read_again = []
    monkeypatch.setattr(output, "input_digest", lambda path: read_again.append(path))  # provenance's own digest
    summary = _run(tmp_path)
    assert summary.done == 4 and read_again == []
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        provenance = json.loads((tmp_path / "out" / record["outputs"][-1]).read_text())
        source = Path(provenance["input_file"]["path"])
        assert provenance["input_file"]["sha256"] == record["digest"] == files.file_sha256(source)
