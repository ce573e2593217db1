"""The app's one background-job helper: a real process started, waited for and read back (its exit status and last
line, progress bars left out), and the subclasses' own progress readers on top of it."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from medlens.app.batch_runs import BatchJob
from medlens.app.jobs import BackgroundJob, last_line, medlens_command, start_job
from medlens.app.metrics import EvaluateJob

SCRIPT = "import sys; print('run: 1/2', flush=True); print('x.png: no such file', file=sys.stderr); sys.exit(2)"


def test_a_background_run_reports_its_exit_status_and_last_line(tmp_path: Path) -> None:
    job = start_job(BackgroundJob, [sys.executable, "-c", SCRIPT], tmp_path)
    deadline = time.time() + 60
    while not job.finished and time.time() < deadline:
        time.sleep(0.05)
    assert job.finished and job.process.returncode == 2
    assert job.message() == "x.png: no such file"  # stderr too; the progress line is not a message
    assert list(tmp_path.iterdir()) == []  # the log is anonymous: nothing left in the output folder
    assert medlens_command(["batch", "in"], allow_pickle=True) == [sys.executable, "-m", "medlens", "batch", "in",
                                                                   "--allow-pickle"]


def test_subclasses_add_only_their_progress(tmp_path: Path) -> None:
    log = tempfile.TemporaryFile()
    log.write(b"run:  20%|## | 2/10 [00:01<00:04]\rrun:  50%|##### | 5/10\nwrote 5 rows\n")
    log.flush()
    assert last_line(log) == "wrote 5 rows"
    evaluate = EvaluateJob(None, tmp_path, log, ["evaluate"])  # type: ignore[arg-type]
    assert evaluate.progress() == (5, 10) and evaluate.message() == "wrote 5 rows"
    (tmp_path / "manifest.jsonl").write_text('{"id": "a", "status": "done"}\n{"id": "b", "status": "failed"}\n')
    batch = BatchJob(None, tmp_path, log, ["batch"], total=3)  # type: ignore[arg-type]
    assert batch.progress() == (1, 1, 3) and batch.message() == "wrote 5 rows"
