"""The node's ledger: `STATE_DIR/ledger.jsonl`, one JSON object per event (`received`, `explained`, `sent`,
`failed`), appended and fsynced before the event counts, and the state of every study read back from it.

A line torn by a kill is cut on open; everything the node knows after a restart comes from this file.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medlens.errors import OutputError

LEDGER_FILE = "ledger.jsonl"
EVENTS = ("received", "explained", "sent", "failed")


@dataclass
class StudyState:
    """What the ledger says about one study."""

    study: str
    received: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID -> stored file (relative to the state)
    last_received: float = 0.0  # time of the latest `received` event
    explained_at: float = 0.0  # time of the latest `explained` or `failed` (explaining) event
    results: dict[str, str] = field(default_factory=dict)  # result SOPInstanceUID -> file (relative), from `explained`
    sent: set[str] = field(default_factory=set)  # result SOPInstanceUIDs delivered
    failures: list[str] = field(default_factory=list)

    @property
    def unsent(self) -> dict[str, str]:
        """Results explained but not yet delivered."""
        return {uid: path for uid, path in self.results.items() if uid not in self.sent}

    @property
    def waiting(self) -> bool:
        """Received since it was last explained (or never explained)."""
        return bool(self.received) and self.last_received > self.explained_at


class Ledger:
    """Append-only, fsynced event log of one node; safe to call from the SCP's threads."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LEDGER_FILE
        self._lock = threading.Lock()
        self._cut_torn_tail()
        try:
            self._fh = open(self.path, "ab")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path} ({exc.strerror or exc}); check the state folder.") from None
        self.studies: dict[str, StudyState] = {}
        for event in self.read():
            self._apply(event)

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every event in the file, in order."""
        if not self.path.is_file():
            return []
        events = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                raise OutputError(f"{self.path}: line {n + 1} is not JSON; the ledger was edited or damaged. Move the "
                                  f"state folder aside to start over, or fix the line.") from None
        return events

    def append(self, event: str, study: str, **fields: Any) -> dict[str, Any]:
        """Write one event (flushed and fsynced before this returns) and apply it to the study's state."""
        if event not in EVENTS:
            raise ValueError(f"unknown ledger event {event!r}")
        record = {"time": time.time(), "event": event, "study": study, **fields}
        line = json.dumps(record, sort_keys=True).encode() + b"\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._apply(record)
        return record

    def _apply(self, record: dict[str, Any]) -> None:
        state = self.studies.setdefault(str(record.get("study")), StudyState(str(record.get("study"))))
        event, when = record.get("event"), float(record.get("time", 0.0))
        if event == "received":
            state.received[str(record["sop_instance_uid"])] = str(record.get("file", ""))
            state.last_received = max(state.last_received, when)
        elif event == "explained":  # as of the batch's start: what arrived while it ran waits for the next one
            state.explained_at = max(state.explained_at, float(record.get("as_of", when)))
            state.results.update({str(k): str(v) for k, v in (record.get("results") or {}).items()})
        elif event == "sent":
            state.sent.add(str(record["sop_instance_uid"]))
        elif event == "failed":
            state.failures.append(str(record.get("error", "")))
            if record.get("stage") == "explain":
                state.explained_at = max(state.explained_at, float(record.get("as_of", when)))

    def snapshot(self) -> list[StudyState]:
        """The studies as they stand (a list taken under the lock: the SCP's threads may add one meanwhile)."""
        with self._lock:
            return list(self.studies.values())

    def study(self, uid: str) -> Optional[StudyState]:
        return self.studies.get(uid)

    def close(self) -> None:
        with self._lock:
            self._fh.close()
