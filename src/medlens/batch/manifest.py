"""`OUT/manifest.jsonl`: one JSON object per finished input, appended and flushed as it arrives (only the driver
writes it); read back tolerating a line torn by a kill, and the resume rules (what is left to do).

Durability: a flushed line survives a killed process (it is in the OS's cache). Against a power cut the file is also
fsynced, at most every `FSYNC_SECONDS` and on close: a cut can then lose the last lines, and those inputs are simply
run again on resume (their outputs are written atomically, so nothing half-written is ever taken as done).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from medlens.batch.inputs import WorkItem
from medlens.errors import OutputError

DONE, FAILED = "done", "failed"
FSYNC_SECONDS = 1.0


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The records of a manifest in order; a last line cut off by a kill (no newline, or not JSON) is left out."""
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # torn: the run was killed while writing it; that input is simply not done
                continue
            raise OutputError(f"{path}: line {n + 1} is not JSON; the manifest was edited or damaged. Move it aside to "
                              f"start over, or fix the line.") from None
        if isinstance(record, dict):
            records.append(record)
    return records


class ManifestWriter:
    """Appends records to the manifest, each flushed (and fsynced, see above) before the next input counts as finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _cut_torn_tail(path)
        try:
            self._fh = open(path, "ab")
        except OSError as exc:
            raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the output folder.") from None
        self._synced = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self._fh.flush()
        if time.monotonic() - self._synced >= FSYNC_SECONDS:
            os.fsync(self._fh.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a record torn by a kill), so the next record starts on its own line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        fh.truncate(data.rfind(b"\n") + 1)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class ResumePlan:
    """Which inputs to run now, and why the others are not run."""

    todo: list[WorkItem]
    done: list[WorkItem] = field(default_factory=list)  # already done with these settings
    failed_kept: list[WorkItem] = field(default_factory=list)  # failed before, not retried (no --retry-failed)
    retried: list[WorkItem] = field(default_factory=list)  # failed before, run again


def latest_records(records: Iterable[dict[str, Any]], digest: str) -> dict[str, dict[str, Any]]:
    """id -> the last record written under the settings `digest`."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("settings") == digest and isinstance(record.get("id"), str):
            latest[record["id"]] = record
    return latest


def plan_resume(items: Sequence[WorkItem], records: Sequence[dict[str, Any]], digest: str,
                retry_failed: bool = False) -> ResumePlan:
    """Skip inputs done under the same settings; inputs with no record (never run, or cut off) run; `failed` ones run
    again only with `retry_failed`."""
    latest = latest_records(records, digest)
    plan = ResumePlan([])
    for item in items:
        record: Optional[dict[str, Any]] = latest.get(item.id)
        status = record.get("status") if record else None
        if status == DONE:
            plan.done.append(item)
        elif status == FAILED and not retry_failed:
            plan.failed_kept.append(item)
        else:
            if status == FAILED:
                plan.retried.append(item)
            plan.todo.append(item)
    return plan
