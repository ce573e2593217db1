"""`medlens batch` keeps each input's results its own: nothing written outside OUT for `..` in the arguments, one
folder per input even when names collide, a resume that re-checks what a `done` record points at, OUT never read
back as inputs, linked folders followed once, a kill between two moves marked and cleaned up, a whole last manifest
record kept, a worker that ends quietly on Ctrl-C, and one run at a time on a folder."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch_helpers import SRC, manifest, phantom_folder, run_cli
from medlens.batch.executors import _worker_main
from medlens.batch.folder_lock import folder_lock
from medlens.batch.inputs import LINKED_FOLDER, discover
from medlens.batch.manifest import read_manifest
from medlens.io.output import STAGING

ARGS = ("--model", "phantom-lesion", "--methods", "gradcam", "--formats", "png,npz", "--threads", "1", "-q")


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four phantom slices: 0 and 1 differ in content (and, for this model, in their predicted class)."""
    folder = phantom_folder(tmp_path_factory.mktemp("slices"), 4)
    return sorted(folder.rglob("case*.png"))


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _provenance(out: Path, record: dict) -> dict:
    folder = Path(next(o for o in record["outputs"] if o.endswith("provenance.json"))).parent
    return json.loads((out / folder / "provenance.json").read_text())


def test_inputs_given_with_dot_dot_write_nothing_outside_out(slices: list[Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "work" / "a" / "b").mkdir(parents=True)
    (tmp_path / "work" / "data").mkdir()
    shutil.copy(slices[0], tmp_path / "work" / "data" / "x.png")
    shutil.copy(slices[1], tmp_path / "work" / "a" / "b" / "y.png")
    monkeypatch.chdir(tmp_path / "work" / "a" / "b")
    before = _files_under(tmp_path)
    assert run_cli("batch", "../../data/x.png", "y.png", "--out", "res", *ARGS) == 0
    out = tmp_path / "work" / "a" / "b" / "res"
    new = _files_under(tmp_path) - before
    assert new and all(out in p.parents for p in new), sorted(map(str, new - _files_under(out)))
    records = manifest(out)
    assert sorted(r["path"] for r in records) == ["a/b/y.png", "data/x.png"]  # below their true common folder
    assert all(".." not in o for r in records for o in r["outputs"])


def test_inputs_whose_folder_names_collide_each_get_their_own(slices: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slices[0], folder / "a.1.png")
    shutil.copy(slices[1], folder / "a_1.png")  # "a_1_png" for both, before
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, *ARGS) == 0
    records = manifest(out)
    folders = {Path(r["outputs"][0]).parent for r in records}
    assert len(records) == 2 and len(folders) == 2
    for record in records:  # each folder's files are its own input's, all of them there
        assert all((out / o).is_file() for o in record["outputs"])
        assert _provenance(out, record)["batch"]["id"] == record["id"]
    found = discover([folder])  # the same folders on every run: from each input's own relative path
    assert {item.folder for item in found.items} == {f.as_posix() for f in folders}


def test_a_resume_takes_no_record_whose_outputs_are_in_another_inputs_folder(slices: list[Path],
                                                                          tmp_path: Path) -> None:
    """Colliding names get their suffix only while both are in the run: records of runs that held one of them point
    into the plain folder, which the other then wrote over; a run of both must not take those records as its own."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slices[0], folder / "a.1.png")
    shutil.copy(slices[0], folder / "a_1.png")  # the same content: the same predicted class, the same file names
    out = tmp_path / "out"
    for extra in ((), ("--exclude", "a_1.png"), ("--exclude", "a.1.png"), ()):
        assert run_cli("batch", folder, "--out", out, *ARGS, *extra) == 0
    latest = {r["id"]: r for r in manifest(out)}
    assert len(latest) == 2
    for record in latest.values():  # each input's last record points into its own folder, which names it
        assert _provenance(out, record)["batch"]["id"] == record["id"]
        assert all((out / o).is_file() for o in record["outputs"])


def test_a_resume_runs_again_an_input_whose_results_were_written_over(slices: list[Path], tmp_path: Path) -> None:
    for name, source in (("A", slices[0]), ("B", slices[1])):
        (tmp_path / name).mkdir()
        shutil.copy(source, tmp_path / name / "x.png")  # one relative path, two contents: two ids, one folder
    out = tmp_path / "out"
    for name in ("A", "B"):
        assert run_cli("batch", tmp_path / name, "--out", out, *ARGS) == 0
    assert run_cli("batch", tmp_path / "A", "--out", out, *ARGS) == 0  # A's record says done; B wrote over it
    records = manifest(out)
    assert len(records) == 3, "A's input was skipped although its folder held B's results"
    assert _provenance(out, records[-1])["batch"]["id"] == records[0]["id"]
    assert all((out / o).is_file() for o in records[-1]["outputs"])
    assert run_cli("batch", tmp_path / "A", "--out", out, *ARGS) == 0  # intact now: skipped
    assert len(manifest(out)) == 3


def test_the_output_folder_searched_itself_is_not_read_back(slices: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "same"
    folder.mkdir()
    for s in slices[:2]:
        shutil.copy(s, folder / s.name)
    for extra in (("--force",), ()):  # --force: the folder holds the scans (the second run finds its own run there)
        assert run_cli("batch", folder, "--out", folder, *ARGS, *extra) == 0
    records = manifest(folder)
    assert sorted(r["path"] for r in records) == sorted(s.name for s in slices[:2])  # no overlay taken as a scan


def test_linked_folders_are_counted_not_followed_and_searched_when_named(slices: list[Path], tmp_path: Path) -> None:
    """A linked folder inside an input folder is passed over and counted (following it made an input's id depend on
    which path reached its folder first); named as an input it is searched."""
    real = tmp_path / "real" / "p1"
    real.mkdir(parents=True)
    shutil.copy(slices[0], real / "s.png")
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copy(slices[1], archive / "t.png")
    (archive / "p1").symlink_to(real, target_is_directory=True)
    (archive / "again").symlink_to(archive, target_is_directory=True)  # a link back up the tree
    found = discover([archive])
    assert [item.relative for item in found.items] == ["t.png"]
    assert found.skipped[LINKED_FOLDER] == 2
    assert [item.relative for item in discover([archive / "p1"]).items] == ["s.png"]


def test_dot_dot_keeps_a_linked_files_own_name(slices: list[Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`../ds/sub-02.png`, a link into an annex store (datalad, git-annex, DVC), stays `sub-02.png`."""
    (tmp_path / "store").mkdir()
    (tmp_path / "ds").mkdir()
    (tmp_path / "work").mkdir()
    shutil.copy(slices[0], tmp_path / "store" / "blob")
    (tmp_path / "ds" / "sub-02.png").symlink_to(tmp_path / "store" / "blob")
    monkeypatch.chdir(tmp_path / "work")
    found = discover([Path("../ds/sub-02.png")])
    assert [item.relative for item in found.items] == ["sub-02.png"]


def _kill_between_moves(folder: Path, result_script: str) -> None:
    """A child process writes a result into `folder` and is killed (os._exit) right after its second move."""
    script = f"""
import os, sys
sys.path.insert(0, {SRC!r})
import medlens.io.output as output
moves, real = [0], os.replace
def replace(a, b):
    real(a, b)
    if str(b).startswith({str(folder)!r}) and not str(b).startswith({str(folder / STAGING)!r}):
        moves[0] += 1
        if moves[0] == 2:
            os._exit(9)
output.os.replace = replace
{result_script}
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 9, done.stderr[-2000:]


RESULT = """
import torch
from medlens.core.result import ExplanationResult
from medlens.io.output import write_explanation
maps = torch.full((1, 1, 8, 8), {value})
result = ExplanationResult({{"{method}": maps}}, torch.zeros(1, 2), torch.tensor([[1]]), {{"methods": {{}}}},
                           labels=["a", "b"])
write_explanation(result, {folder!r}, formats=("png", "npz"))
"""


def test_a_kill_between_moves_leaves_no_provenance_and_the_next_write_cleans_up(tmp_path: Path) -> None:
    folder = tmp_path / "result"
    exec(RESULT.format(value=1.0, method="gradcam", folder=str(folder)))  # noqa: S102 - the earlier, whole set
    earlier = set(json.loads((folder / "provenance.json").read_text())["files"])
    _kill_between_moves(folder, RESULT.format(value=2.0, method="lrp", folder=str(folder)))
    assert not (folder / "provenance.json").exists()  # the mixed set says it is incomplete
    assert any(p.name.startswith(STAGING) for p in folder.iterdir())  # what the killed process left
    exec(RESULT.format(value=3.0, method="lrp", folder=str(folder)))  # noqa: S102 - the next write there
    files = set(json.loads((folder / "provenance.json").read_text())["files"])
    assert {p.name for p in folder.iterdir()} == files != earlier  # the new set alone: no staging, nothing stale
    with np.load(folder / "maps.npz") as data:
        assert set(data.files) >= {"lrp"} and "gradcam" not in data.files and float(data["lrp"].max()) == 3.0


def test_what_a_killed_write_left_is_removed_even_after_another_write_failed(tmp_path: Path) -> None:
    folder = tmp_path / "result"
    exec(RESULT.format(value=1.0, method="gradcam", folder=str(folder)))  # noqa: S102 - the earlier, whole set
    _kill_between_moves(folder, RESULT.format(value=2.0, method="lrp", folder=str(folder)))
    failing = RESULT.format(value=3.0, method="lrp", folder=str(folder)).replace(
        'formats=("png", "npz"))', 'formats=("png", "npz"), model_source=object())')  # fails while staging
    with pytest.raises(TypeError):
        exec(failing)  # noqa: S102
    exec(RESULT.format(value=4.0, method="lrp", folder=str(folder)))  # noqa: S102
    files = set(json.loads((folder / "provenance.json").read_text())["files"])
    assert {p.name for p in folder.iterdir()} == files and "gradcam_b.png" not in files


def test_a_worker_ends_as_soon_as_its_driver_is_killed(tmp_path: Path) -> None:
    """A processes worker does not finish its mini-batch beside a run resumed at once: it ends with its driver."""
    beat = tmp_path / "beat.txt"
    driver = f"""
import multiprocessing, sys, time
sys.path[:0] = [{SRC!r}, {str(Path(__file__).parent)!r}]
import batch_helpers
if __name__ == "__main__":
    worker = multiprocessing.get_context("forkserver").Process(target=batch_helpers.beat_until_the_driver_ends,
                                                               args=({str(beat)!r},))
    worker.start()
    time.sleep(600)
"""
    script = tmp_path / "driver.py"
    script.write_text(driver)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(beat.read_text().splitlines() if beat.exists() else []) < 5:
            time.sleep(0.05)
        worker = int(beat.read_text().splitlines()[0])
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.05)
    alive = _alive(worker)
    if alive:
        os.kill(worker, 9)
    assert not alive, "the worker kept running after its driver was killed"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_whole_last_record_without_its_line_break_is_kept(slices: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for s in slices[:2]:
        shutil.copy(s, folder / s.name)
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, *ARGS) == 0
    path = out / "manifest.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # as an editor may save it
    shutil.copy(slices[2], folder / slices[2].name)
    assert run_cli("batch", folder, "--out", out, *ARGS) == 0
    records = read_manifest(path)
    assert sorted(r["path"] for r in records) == sorted(s.name for s in slices[:3])  # one run each, none lost
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 3


def test_a_worker_ends_quietly_when_its_driver_is_gone() -> None:
    """A killed driver closes the pipe: the worker's next send fails, and it ends without a traceback."""
    class Gone:
        def send(self, message) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    try:
        _worker_main(lambda: object(), Gone())
    except BrokenPipeError:
        pytest.fail("the worker let the broken pipe out (its process prints a traceback)")


def test_a_worker_ends_quietly_on_ctrl_c() -> None:
    class Interrupted:
        sent: list = []

        def send(self, message) -> None:
            self.sent.append(message)

        def recv(self):
            raise KeyboardInterrupt

    conn = Interrupted()
    try:
        _worker_main(lambda: object(), conn)  # returns: no traceback printed by the worker process
    except KeyboardInterrupt:
        pytest.fail("the worker let Ctrl-C out (its process prints a traceback)")
    assert conn.sent == [("ready", None, None)]


def test_images_of_other_content_under_one_name_are_told_apart(tmp_path: Path) -> None:
    """Two inputs of one relative path and different contents have different ids (the resume's first check)."""
    for name, value in (("A", 10), ("B", 200)):
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((16, 16), value, np.uint8)).save(tmp_path / name / "x.png")
    ids = {discover([tmp_path / name]).items[0].id for name in ("A", "B")}
    assert len(ids) == 2


def test_a_done_record_whose_output_is_empty_runs_again(slices: list[Path], tmp_path: Path) -> None:
    """After a power cut a file whose data never reached the disk can be there, empty: its input runs again."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slices[0], folder / slices[0].name)
    out = tmp_path / "out"
    assert run_cli("batch", folder, "--out", out, *ARGS) == 0
    npz = next(o for o in manifest(out)[0]["outputs"] if o.endswith(".npz"))
    (out / npz).write_bytes(b"")
    assert run_cli("batch", folder, "--out", out, *ARGS) == 0
    assert len(manifest(out)) == 2 and (out / npz).stat().st_size > 0


def test_a_second_run_on_a_folder_being_written_is_refused(slices: list[Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slices[0], folder / slices[0].name)
    out = tmp_path / "out"
    out.mkdir()
    with folder_lock(out):  # a run writing there now (a lock of its own open file: it conflicts in one process too)
        assert run_cli("batch", folder, "--out", out, *ARGS) == 2
        assert "another medlens batch run is writing to" in capsys.readouterr().err
        assert not (out / "manifest.jsonl").exists()
    assert run_cli("batch", folder, "--out", out, *ARGS) == 0  # released: the run goes ahead
    assert len(manifest(out)) == 1


def test_dot_dot_after_a_linked_folder_is_taken_as_the_system_takes_it(slices: list[Path], tmp_path: Path) -> None:
    """`link/../x.png` is the x.png beside the link's target (as `open` finds it), not the one beside the link."""
    (tmp_path / "far" / "sub").mkdir(parents=True)
    shutil.copy(slices[0], tmp_path / "far" / "x.png")
    shutil.copy(slices[1], tmp_path / "x.png")  # the file a lexical ".." would pick
    (tmp_path / "link").symlink_to(tmp_path / "far" / "sub", target_is_directory=True)
    found = discover([tmp_path / "link" / ".." / "x.png"])
    assert Path(found.items[0].path).read_bytes() == slices[0].read_bytes()
