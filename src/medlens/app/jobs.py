"""Background runs for the app: a `medlens` command (batch, evaluate) in its own process, its output in an anonymous
log, whether it has finished and the last line it printed. A view adds only how it reads its own progress.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

from medlens.errors import InputError
from medlens.io.files import ensure_writable

#: "3/10": a progress bar's count, in the log of a background run
PROGRESS = re.compile(r"(\d+)/(\d+)")

Job = TypeVar("Job", bound="BackgroundJob")


@dataclass
class BackgroundJob:
    """A command running in a background process; its output (and log) in the folder the person chose."""

    process: subprocess.Popen
    out: Path
    log: Any  # an anonymous temporary file (removed by the OS when closed): nothing is left in the output folder
    command: list[str]

    @property
    def finished(self) -> bool:
        """Whether the process has ended (its exit status is then `process.returncode`)."""
        return self.process.poll() is not None

    def message(self) -> str:
        """The last line the run printed that is not a progress bar (where the files went, or what failed)."""
        return last_line(self.log)


def medlens_command(arguments: Sequence[str], allow_pickle: bool = False) -> list[str]:
    """`python -m medlens ARGUMENTS [--allow-pickle]` with this interpreter (`--allow-pickle`: the person allowed
    pickled models in the app)."""
    return [sys.executable, "-m", "medlens", *arguments] + (["--allow-pickle"] if allow_pickle else [])


def start_job(job_type: type[Job], command: Sequence[str], out: Path, **fields: Any) -> Job:
    """`command` started in the background, its output into an anonymous temporary file (nothing left behind).

    Args:
        job_type: `BackgroundJob` or a subclass that reads its own progress.
        command: the program and its arguments (`medlens_command(...)`).
        out: the run's output folder (already checked writable).
        fields: the subclass's own fields.

    Returns:
        The running job.
    """
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return job_type(process, out, log, list(command), **fields)


def server_folders(source: str, out_dir: str, what: str) -> tuple[Path, Path]:
    """The server-side input folder (must exist) and the output folder (created, writable) a background run uses.

    Raises:
        InputError: a folder is not given, the input does not exist, or the output folder cannot be written.
    """
    if not str(source).strip() or not str(out_dir).strip():
        raise InputError(f"give both the {what} folder and an output folder (full paths on the server).")
    folder = Path(source).expanduser()
    if not folder.exists():
        raise InputError(f"{folder}: no such file or folder on the server.")
    return folder, ensure_writable(Path(out_dir).expanduser())


def last_line(log: Any) -> str:
    """The last line of a background run's log that is not a progress bar (the error, or where the files went)."""
    lines = [ln.strip() for ln in log_text(log).replace("\r", "\n").splitlines()]
    text = [ln for ln in lines if ln and not PROGRESS.search(ln)]
    return text[-1] if text else ""


def log_text(log: Any) -> str:
    """What a background process wrote so far to its anonymous log file."""
    try:
        size = os.fstat(log.fileno()).st_size
        return os.pread(log.fileno(), size, 0).decode(errors="replace")
    except (OSError, ValueError):
        return ""
