"""The node's loop: a study idle for `study_timeout` seconds is explained through the batch runner (one batch folder
per settings under `STATE_DIR/results/`), its results recorded, then delivered; one log line per study.

Restart-safe: files stored but not yet recorded are recorded on start, a batch resumes from its manifest, and only
results not yet recorded as sent are sent (their UIDs follow the settings, so a resend can never make a duplicate).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pydicom

from medlens.batch import read_manifest, run_batch
from medlens.core.digests import model_digest
from medlens.errors import MedlensError
from medlens.node.ledger import Ledger
from medlens.node.receiver import INCOMING, Limits, Receiver
from medlens.node.sender import Peer, store
from medlens.pipeline import ExplainRequest, plan_for

RESULTS = "results"
log = logging.getLogger("medlens.node")


@dataclass
class NodeConfig:
    """How the node listens, explains and delivers."""

    state_dir: Path
    model: Any
    model_source: str
    request: ExplainRequest
    send_to: Optional[Peer] = None
    model_options: dict[str, Any] = field(default_factory=dict)
    ae_title: str = "MEDLENS"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_aets: tuple[str, ...] = ()
    study_timeout: float = 30.0
    limits: Limits = field(default_factory=Limits)
    retries: int = 4
    backoff: float = 1.0


class Node:
    """A running DICOM node: `start()`, then `run_until(stop_event)` (or `step()` from a test), then `stop()`."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(self.state_dir)
        self.settings = plan_for(config.model, config.request).settings_digest(model_digest(config.model))
        self.receiver = Receiver(self.state_dir, self.ledger, config.ae_title, config.host, config.port,
                                 config.allowed_aets, config.limits)
        self._wake = threading.Event()
        self.receiver.on_received = lambda study: self._wake.set()

    def start(self) -> None:
        self._recover_unrecorded()
        self.receiver.start()
        log.info("medlens node %s listening on %s:%d; results to %s; settings %s; state in %s", self.config.ae_title,
                 self.config.host, self.config.port, self.config.send_to or "nowhere (kept in the state folder)",
                 self.settings[:12], self.state_dir)

    def stop(self) -> None:
        self.receiver.stop()
        self.ledger.close()

    def run_until(self, stop: threading.Event, poll: float = 0.5) -> None:
        """Serve until `stop` is set: studies are explained and delivered here, on this thread."""
        while not stop.is_set():
            self.step()
            self._wake.wait(poll)
            self._wake.clear()

    def _recover_unrecorded(self) -> None:
        """Instances stored before a kill but not yet in the ledger (the sender got no success for them)."""
        known = {f for s in self.ledger.snapshot() for f in s.received.values()}
        for path in sorted((self.state_dir / INCOMING).rglob("*.dcm")) if (self.state_dir / INCOMING).is_dir() else []:
            relative = path.relative_to(self.state_dir).as_posix()
            if relative not in known:
                study, series = path.parent.parent.name, path.parent.name
                self.ledger.append("received", study, sop_instance_uid=path.stem, series=series, file=relative,
                                   recovered=True)

    def step(self) -> None:
        """Explain every study idle long enough, then deliver what is not yet delivered."""
        now = time.time()
        for state in self.ledger.snapshot():
            if state.waiting and now - state.last_received >= self.config.study_timeout:
                self._explain(state.study)
            if state.unsent and self.config.send_to is not None and not state.waiting:
                self._deliver(state.study)

    def _explain(self, study: str) -> None:
        t0, as_of = time.perf_counter(), time.time()
        state = self.ledger.studies[study]
        out = self.state_dir / RESULTS / self.settings[:16] / study
        try:
            summary = run_batch([self.state_dir / INCOMING / study], out, model=self.config.model,
                                model_source=self.config.model_source, request=self.config.request,
                                model_options=self.config.model_options, progress=False,
                                log=lambda m: log.debug("study %s: %s", study, m))
        except MedlensError as exc:
            self.ledger.append("failed", study, stage="explain", as_of=as_of, error=" ".join(str(exc).split()))
            log.error("study %s: failed: %s", study, " ".join(str(exc).split()))
            return
        results: dict[str, str] = {}
        for record in read_manifest(out / "manifest.jsonl"):
            if record.get("status") == "done" and record.get("settings") == self.settings:
                for name in record.get("outputs", []):
                    if name.endswith(".dcm"):
                        path = out / name
                        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                        results[uid] = path.relative_to(self.state_dir).as_posix()
        for path, message in summary.failures:
            self.ledger.append("failed", study, stage="explain", as_of=as_of, input=path, error=message)
            log.warning("study %s: %s", study, message)
        self.ledger.append("explained", study, settings=self.settings, as_of=as_of, results=results,
                           inputs=summary.total, failed_inputs=len(summary.failures))
        log.info("study %s: %d instance(s) received, %d input(s) explained (%d failed), %d result(s) in %.1f s",
                 study, len(state.received), summary.total - len(summary.failures), len(summary.failures),
                 len(results), time.perf_counter() - t0)

    def _deliver(self, study: str) -> None:
        state = self.ledger.studies[study]
        unsent = {uid: self.state_dir / rel for uid, rel in state.unsent.items()}
        peer = self.config.send_to
        assert peer is not None
        t0 = time.perf_counter()
        errors = store(peer, self.config.ae_title, unsent,
                       lambda uid: self.ledger.append("sent", study, sop_instance_uid=uid, to=str(peer)),
                       retries=self.config.retries, backoff=self.config.backoff)
        for uid, reason in errors.items():
            self.ledger.append("failed", study, stage="send", sop_instance_uid=uid, to=str(peer), error=reason)
        log.info("study %s: %d result(s) sent to %s, %d not taken, in %.1f s", study, len(unsent) - len(errors), peer,
                 len(errors), time.perf_counter() - t0)
        if errors:  # recorded as failed; tried again after a restart (the ledger has no `sent` for them)
            for uid in errors:
                state.sent.add(uid)  # in memory only: not retried in a loop until then
