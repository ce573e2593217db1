"""`OUT/manifest.jsonl`: one JSON object per finished input, appended and flushed as it arrives (only the driver
writes it); read back tolerating a line torn by a kill, and the resume rules (what is left to do).

Durability: a flushed line survives a killed process (it is in the OS's cache). Against a power cut the file is also
fsynced, at most every `FSYNC_SECONDS` and on close, each time after `os.sync()`, so the outputs of every line on disk
are on disk too (the workers write them without a per-file fsync, `io.files.deferred_fsync`): a cut can lose the last
lines, and those inputs are simply run again on resume (outputs are written atomically, never taken half-written).
The periodic syncs run on a thread of their own (a serial run's driver is its explaining thread: 5 to 15 ms a second
spent waiting for the disk there is time not spent explaining); the last one, on close, runs on the caller's.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from medlens.batch.inputs import WorkItem
from medlens.errors import OutputError

DONE, FAILED = "done", "failed"
FSYNC_SECONDS = 1.0


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """The records of a manifest in order; a last line cut off by a kill (not a whole JSON record) is left out."""
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
        self._due = threading.Event()  # a sync is asked for (or, with _closing, the syncer is to stop)
        self._closing = False
        self._syncer: Optional[threading.Thread] = None

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self._fh.flush()
        if time.monotonic() - self._synced >= FSYNC_SECONDS:
            self._synced = time.monotonic()
            if self._syncer is None:
                self._syncer = threading.Thread(target=self._sync_when_due, name="medlens-manifest-sync", daemon=True)
                self._syncer.start()
            self._due.set()

    def _sync_when_due(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._closing:
                return
            self._sync()

    def _sync(self) -> None:
        os.sync()  # the outputs these lines name first (written without a per-file fsync), then the lines
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._syncer is not None:
            self._closing = True
            self._due.set()
            self._syncer.join()
        self._fh.flush()
        self._sync()
        self._fh.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """End the manifest on a line break: a last line without one is a record torn by a kill and is dropped, unless
    it is a whole record (`read_manifest` counts it), which gets its line break; the next record starts on its own
    line either way."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            whole = isinstance(json.loads(data[start:]), dict)
        except ValueError:
            whole = False
        if whole:
            fh.write(b"\n")
        else:
            fh.truncate(start)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class ResumePlan:
    """Which inputs to run now, and why the others are not run."""

    todo: list[WorkItem]
    done: list[WorkItem] = field(default_factory=list)  # already done with these settings
    failed_kept: list[WorkItem] = field(default_factory=list)  # failed before, not retried (no --retry-failed)
    retried: list[WorkItem] = field(default_factory=list)  # failed before, run again
    changed: list[WorkItem] = field(default_factory=list)  # done before, but its results are no longer there: run again


def latest_records(records: Iterable[dict[str, Any]], digest: str) -> dict[str, dict[str, Any]]:
    """id -> the last record written under the settings `digest`."""
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("settings") == digest and isinstance(record.get("id"), str):
            latest[record["id"]] = record
    return latest


def plan_resume(items: Sequence[WorkItem], records: Sequence[dict[str, Any]], digest: str,
                retry_failed: bool = False, out: Optional[Path] = None) -> ResumePlan:
    """Skip inputs done under the same settings; inputs with no record (never run, or cut off) run; `failed` ones run
    again only with `retry_failed`. With `out`, a `done` record counts only while its results are still there: every
    output it lists, and a provenance.json in the input's folder written for this input under these settings (a
    later run of other settings with --force, or another input given the same folder, wrote over them: run again)."""
    latest = latest_records(records, digest)
    plan = ResumePlan([])
    for item in items:
        record: Optional[dict[str, Any]] = latest.get(item.id)
        status = record.get("status") if record else None
        if status == DONE and (out is None or results_intact(out, item, record, digest)):
            plan.done.append(item)
        elif status == FAILED and not retry_failed:
            plan.failed_kept.append(item)
        else:
            if status == FAILED:
                plan.retried.append(item)
            elif status == DONE:
                plan.changed.append(item)
            plan.todo.append(item)
    return plan


def results_intact(out: Path, item: WorkItem, record: dict[str, Any], digest: str) -> bool:
    """Whether OUT still holds what `record` says was written for `item`: each listed output (not empty, in the
    input's results folder), and that folder's provenance.json naming this input (its id: path and content digest)
    and these settings."""
    try:
        provenance = json.loads((out / item.folder / "provenance.json").read_text())
    except (OSError, ValueError):
        return False
    batch = provenance.get("batch") if isinstance(provenance, dict) else None
    if not isinstance(batch, dict) or batch.get("id") != item.id or batch.get("settings") != digest:
        return False
    outputs = record.get("outputs")
    inside = item.folder.rstrip("/") + "/"  # in the folder this input has now (a colliding name's can change)
    return isinstance(outputs, list) and all(isinstance(o, str) and o.startswith(inside) and _non_empty_file(out / o)
                                             for o in outputs)


def _non_empty_file(path: Path) -> bool:
    """A file with content (after a power cut, a file whose data never reached the disk can be there, empty)."""
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False
