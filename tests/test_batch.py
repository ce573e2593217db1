"""`medlens batch`: resume exactly once, a SIGKILL mid-run, bad inputs, refused folders, reruns without model work."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import medlens.batch.task as batch_task
from batch_helpers import (batch_command, close_maps, comparable, ids, manifest, maps_of, phantom_folder, run_cli,
                           same_within_float, subprocess_env)
from medlens.batch.inputs import discover
from medlens.batch.manifest import ManifestWriter, plan_resume, read_manifest

ARGS = ("--model", "phantom-lesion", "--methods", "gradcam,lrp", "--threads", "1", "-q")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantom_folder(tmp_path_factory.mktemp("batch"), 8)


@pytest.fixture(scope="module")
def reference(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted serial run over the inputs."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_cli("batch", inputs, "--out", out, *ARGS) == 0
    return out


def test_finished_run_has_manifest_summary_and_report(inputs: Path, reference: Path) -> None:
    records = manifest(reference)
    assert len(records) == 8 and {r["status"] for r in records} == {"done"}
    assert len(set(ids(records))) == 8
    for r in records:
        assert r["settings"] == json.loads((reference / "batch.json").read_text())["digest"]
        assert abs(sum(r["prediction"].values()) - 1) < 1e-5  # softmax probabilities
        assert all((reference / o).is_file() for o in r["outputs"])
        assert r["id"].startswith(r["path"] + "@")
        peak = r["maps"]["gradcam"][r["targets"][0]]["peak"]
        maps = maps_of(reference, r)["gradcam"][0, 0]
        assert maps[tuple(peak)] == maps.max()  # 64 px input into a 64 px model: the peak's own pixel
    rows = list(csv.DictReader((reference / "summary.csv").open()))
    assert len(rows) == 8 * 2 and {row["method"] for row in rows} == {"gradcam", "lrp"}
    boxed = [row for row in rows if row["path"] == "case000.png"]
    assert all(0.0 <= float(row["energy_in_region"]) <= 1.0 for row in boxed)  # the box file beside it
    assert all(row["energy_in_region"] == "" for row in rows if row["path"] != "case000.png")
    report = (reference / "report.html").read_text()
    assert "http://" not in report and "https://" not in report
    assert report.count('class="card"') == 8 and 'src="maps/sub/case001_png/panel.png"' in report


def test_interrupted_then_resumed_runs_each_input_exactly_once(inputs: Path, reference: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real = batch_task.read_with_shape
    calls: list[str] = []

    def interrupted(plan, path, **kw):  # reading the 4th input (in the 2nd mini-batch) stops the run as Ctrl-C would
        calls.append(str(path))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(plan, path, **kw)

    monkeypatch.setattr(batch_task, "read_with_shape", interrupted)
    assert run_cli("batch", inputs, "--out", out, *ARGS, "--batch-size", "3") == 130
    assert len(manifest(out)) == 3
    monkeypatch.setattr(batch_task, "read_with_shape", real)
    assert run_cli("batch", inputs, "--out", out, *ARGS, "--batch-size", "3") == 0
    records = manifest(out)
    assert sorted(ids(records)) == sorted(ids(manifest(reference)))  # every input once, none twice
    want = {r["id"]: comparable(r) for r in manifest(reference)}
    for r in records:
        assert comparable(r) == want[r["id"]]


def test_sigkill_part_way_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    inputs = phantom_folder(tmp_path, 24, seed=5)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = subprocess_env()
    proc = subprocess.Popen(batch_command(inputs, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        path = killed / "manifest.jsonl"
        lines = path.read_bytes().count(b"\n") if path.exists() else 0
        if lines >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()[-500:]}"
    assert 3 <= len(read_manifest(killed / "manifest.jsonl")) < 24
    resumed = subprocess.run(batch_command(inputs, killed), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done (skipped)" in resumed.stderr
    assert run_cli("batch", inputs, "--out", whole, *ARGS) == 0  # the same command, uninterrupted (in this process)
    got = {r["id"]: r for r in manifest(killed)}
    want = {r["id"]: r for r in manifest(whole)}
    assert len(got) == len(manifest(killed)) == 24  # one line per input
    assert got.keys() == want.keys()
    for key, record in want.items():  # the resumed inputs may be explained in other mini-batches: float tolerance
        assert same_within_float(comparable(got[key]), comparable(record))
        a, b = maps_of(killed, got[key]), maps_of(whole, record)
        assert a.keys() == b.keys() and all(close_maps(a[k], b[k]) for k in a)
    rows = [list(csv.reader((out / "summary.csv").open())) for out in (killed, whole)]
    assert same_within_float(*[[[_number(v) for v in row] for row in table] for table in rows])


def _number(text: str) -> object:
    try:
        return float(text)
    except ValueError:
        return text


def test_bad_inputs_fail_alone_and_the_run_goes_on(inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted(inputs.rglob("case00[0-2].png")):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not the rest of a PNG")
    no_pixels = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del no_pixels.PixelData
    no_pixels.save_as(folder / "nopixels.dcm")
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16), dtype=np.float32), np.eye(4)),
             folder / "big.nii.gz")
    monkeypatch.setenv("MEDLENS_HARD_VOXELS_3D", "1000")  # the 16^3 volume is too large for this run
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, *ARGS) == 3
    err = capsys.readouterr().err
    by_path = {r["path"]: r for r in manifest(out)}
    assert {p for p, r in by_path.items() if r["status"] == "done"} == {"case000.png", "case001.png", "case002.png"}
    for name in ("corrupt.png", "nopixels.dcm", "big.nii.gz"):
        record = by_path[name]
        assert record["status"] == "failed" and record["outputs"] == [] and "\n" not in record["error"]
        assert name in record["error"] and name in err
    assert "no pixel data" in by_path["nopixels.dcm"]["error"]
    assert "HARD_VOXELS_3D" in by_path["big.nii.gz"]["error"]
    assert "3 of 6 input(s) failed" in err
    report = (out / "report.html").read_text()
    assert "Failed (3)" in report and "nopixels.dcm" in report
    # failed inputs are not retried unless asked; with --retry-failed they run again (and fail again)
    assert run_cli("batch", folder, "--out", out, *ARGS) == 3
    assert len(manifest(out)) == 6
    assert run_cli("batch", folder, "--out", out, *ARGS, "--retry-failed") == 3
    assert len(manifest(out)) == 9


def test_rerun_of_a_finished_batch_does_no_model_work(inputs: Path, reference: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    assert run_cli("batch", inputs, "--out", out, *ARGS) == 0
    before = (out / "manifest.jsonl").read_bytes()

    def no_work(*a, **k):
        raise AssertionError("explained an input that was already done")

    monkeypatch.setattr(batch_task, "read_with_shape", no_work)
    monkeypatch.setattr("medlens.pipeline.run.explain", no_work)
    assert run_cli("batch", inputs, "--out", out, *ARGS) == 0
    assert (out / "manifest.jsonl").read_bytes() == before


def test_other_settings_are_refused_naming_the_difference(inputs: Path, reference: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert run_cli("batch", inputs, "--out", out, *ARGS, "--limit", "2") == 0
    before = (out / "manifest.jsonl").read_bytes()
    assert run_cli("batch", inputs, "--out", out, "--model", "phantom-lesion", "--methods", "gradcam", "-q") == 2
    assert "methods: gradcam,lrp -> gradcam" in capsys.readouterr().err
    assert run_cli("batch", inputs, "--out", out, *ARGS, "--seed", "7") == 2
    assert "seed: (none) -> 7" in capsys.readouterr().err
    assert (out / "manifest.jsonl").read_bytes() == before
    assert run_cli("batch", inputs, "--out", out, *ARGS, "--seed", "7", "--force", "--limit", "1") == 0
    records = manifest(out)
    assert len(records) == 3 and records[-1]["settings"] != records[0]["settings"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    assert run_cli("batch", inputs, "--out", foreign, *ARGS) == 2
    assert "not a medlens batch run" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (("missing-folder", "--out", "{out}", "--model", "phantom-lesion"), "no such file or folder"),
    (("{inputs}", "--out", "{out}", "--model", "phantom-lesion", "--methods", "gradcm"), "gradcm"),
    (("{inputs}", "--out", "{out}", "--model", "no-such-model"), "no-such-model"),
])
def test_usage_errors_exit_2_before_any_work(inputs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            args: tuple, message: str) -> None:
    out = tmp_path / "out"
    assert run_cli("batch", *[a.format(out=out, inputs=inputs) for a in args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "manifest.jsonl").exists()


def test_discovery_ids_filters_limit_and_series_folders(inputs: Path, tmp_path: Path) -> None:
    found = discover([inputs])
    assert [i.relative for i in found.items] == ["case000.png", "case002.png", "case004.png", "case006.png",
                                                 "sub/case001.png", "sub/case003.png", "sub/case005.png", "sub/case007.png"]
    assert found.skipped == {".txt": 1}
    again = discover([inputs])
    assert [i.id for i in again.items] == [i.id for i in found.items]  # stable
    assert [i.relative for i in discover([inputs], include=["sub/*"], exclude=["*3.png"]).items] == [
        "sub/case001.png", "sub/case005.png", "sub/case007.png"]
    assert len(discover([inputs], limit=3).items) == 3
    assert [i.relative for i in discover([inputs], leave_out=[inputs / "sub"]).items] == [
        "case000.png", "case002.png", "case004.png", "case006.png"]  # an --out among the inputs is not searched
    series = tmp_path / "study" / "series1"
    series.mkdir(parents=True)
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for k in range(3):
        source.SOPInstanceUID = f"1.2.3.{k}"
        source.ImagePositionPatient = [0, 0, float(k)]
        source.save_as(series / f"slice{k}.dcm")
    items = discover([tmp_path / "study"]).items
    assert [(i.relative, i.kind) for i in items] == [("series1", "dicom-series")]
    (series / "slice0.dcm").write_bytes((series / "slice0.dcm").read_bytes())  # same content: same id
    assert discover([tmp_path / "study"]).items[0].id == items[0].id


def test_torn_last_line_is_ignored_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a", "status": "done", "settings": "s"}\n{"id": "b", "sta')
    assert [r["id"] for r in read_manifest(path)] == ["a"]
    with ManifestWriter(path) as writer:
        writer.append({"id": "c", "status": "failed", "settings": "s"})
    assert [r["id"] for r in read_manifest(path)] == ["a", "c"]
    items = discover([phantom_folder(tmp_path, 2)]).items
    records = [{"id": items[0].id, "status": "done", "settings": "s"}, {"id": items[1].id, "status": "failed",
                                                                        "settings": "s"}]
    assert plan_resume(items, records, "s").todo == []
    assert plan_resume(items, records, "s", retry_failed=True).todo == [items[1]]
    assert plan_resume(items, records, "other").todo == items  # other settings count for nothing


def test_a_folder_without_images_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    assert run_cli("batch", tmp_path / "notes", "--out", tmp_path / "out", *ARGS) == 2
    assert "no inputs found" in capsys.readouterr().err and not (tmp_path / "out").exists()
