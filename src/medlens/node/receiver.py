"""The node's Storage SCP on pynetdicom: C-ECHO and C-STORE under one AE title, from the allowed calling AE titles,
each instance stored atomically under `STATE_DIR/incoming/<study>/<series>/` and recorded before success is answered.

Bounds: a number of studies waiting and a number of bytes stored; past them an instance is refused with "out of
resources" (0xA700) so the sender keeps it and retries. The node's own results are acknowledged and not kept.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from medlens.errors import MedlensError
from medlens.io.files import atomic_write
from medlens.node.ledger import Ledger

INCOMING = "incoming"
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, SUCCESS = 0xA700, 0xC210, 0x0000
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
OWN_MANUFACTURER = "medlens"
log = logging.getLogger("medlens.node")


class NodeError(MedlensError):
    """The DICOM node cannot start or run as asked (a port in use, a bad peer address, pynetdicom missing)."""


def pynetdicom_module() -> Any:
    """pynetdicom, or a NodeError that says how to install it."""
    try:
        import pynetdicom
    except ImportError:
        raise NodeError("the DICOM node needs pynetdicom: pip install 'medlens[dicom-node]' (or pip install pynetdicom)") from None
    return pynetdicom


def is_own_result(ds: Any) -> bool:
    """Whether an instance is one of medlens's own results (never explained again)."""
    return str(ds.get("Manufacturer", "") or "").strip() == OWN_MANUFACTURER or \
        str(ds.get("SeriesDescription", "") or "").startswith("medlens ")


@dataclass
class Limits:
    """Bounds of what the node holds: studies waiting to be explained, and bytes stored under incoming/."""

    max_studies: int = 100
    max_bytes: int = 10 * 1024**3


@dataclass
class Receiver:
    """The Storage SCP. `start()` listens in background threads; `stop()` closes the port."""

    state_dir: Path
    ledger: Ledger
    ae_title: str = "MEDLENS"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_aets: Sequence[str] = ()
    limits: Limits = field(default_factory=Limits)
    on_received: Optional[Callable[[str], None]] = None
    _server: Any = None
    _stored_bytes: int = 0

    def start(self) -> None:
        pynetdicom = pynetdicom_module()
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, pynetdicom.ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        if self.allowed_aets:
            ae.require_calling_aet = list(self.allowed_aets)
        ae.maximum_pdu_size = 0
        self._stored_bytes = sum(p.stat().st_size for p in (self.state_dir / INCOMING).rglob("*.dcm")) \
            if (self.state_dir / INCOMING).is_dir() else 0
        try:
            self._server = ae.start_server((self.host, int(self.port)), block=False, evt_handlers=[
                (evt.EVT_C_STORE, self.handle_store), (evt.EVT_C_ECHO, lambda event: SUCCESS)])
        except OSError as exc:
            raise NodeError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc}); choose another --port "
                            f"or stop the program that holds it.") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def handle_store(self, event: Any) -> int:
        """One C-STORE: checked, stored atomically, recorded in the ledger; the status says what happened."""
        try:
            ds = event.dataset
            study, series, sop = (str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot decode: refused, the node keeps serving
            log.warning("refused an instance that cannot be decoded (%s: %s)", type(exc).__name__, exc)
            return CANNOT_UNDERSTAND
        if not all(UID.match(u) and len(u) <= 64 for u in (study, series, sop)):
            log.warning("refused an instance without valid Study/Series/SOP Instance UIDs (%r, %r, %r)", study, series, sop)
            return CANNOT_UNDERSTAND
        if is_own_result(ds):
            log.info("study %s: instance %s is one of medlens's own results; acknowledged, not explained", study, sop)
            return SUCCESS
        state = self.ledger.study(study)
        waiting = sum(1 for s in self.ledger.snapshot() if s.waiting)
        if (state is None or not state.waiting) and waiting >= self.limits.max_studies:
            log.warning("study %s refused for now: %d studies already wait (--max-queue)", study, waiting)
            return OUT_OF_RESOURCES
        data = event.encoded_dataset()
        if self._stored_bytes + len(data) > self.limits.max_bytes:
            log.warning("study %s: instance %s refused for now: the state folder holds its limit (--max-storage-mb)",
                        study, sop)
            return OUT_OF_RESOURCES
        relative = Path(INCOMING) / study / series / f"{sop}.dcm"
        target = self.state_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            existed = target.is_file()
            atomic_write(target, data)
        except MedlensError as exc:
            log.error("study %s: instance %s could not be stored (%s)", study, sop, exc)
            return OUT_OF_RESOURCES
        if not existed:
            self._stored_bytes += len(data)
        self.ledger.append("received", study, sop_instance_uid=sop, series=series, file=relative.as_posix(),
                           calling_ae=str(getattr(event.assoc.requestor, "ae_title", "")).strip())
        if self.on_received is not None:
            self.on_received(study)
        return SUCCESS
