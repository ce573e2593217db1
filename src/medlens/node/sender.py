"""Delivery of results by C-STORE to a peer (`AET@HOST:PORT`): one association per batch of files, a try per file,
retries with back-off for what the peer refused or could not take, each success reported at once (to the ledger).
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import pydicom

from medlens.node.receiver import NodeError, pynetdicom_module

PEER = re.compile(r"^(?P<aet>[^@\s\\]{1,16})@(?P<host>[^:\s]+):(?P<port>[0-9]{1,5})$")
SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
log = logging.getLogger("medlens.node")


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity on the network."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, option: str = "--send-to") -> "Peer":
        """`AET@HOST:PORT`, e.g. `ORTHANC@127.0.0.1:4242`."""
        match = PEER.match(str(text).strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise NodeError(f"{option} {text!r} must look like AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242): an AE title "
                            f"of at most 16 characters, a host name or address, and a port 1..65535.")
        return cls(match["aet"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _contexts(files: Mapping[str, Path]) -> list[tuple[str, str]]:
    found = []
    for path in files.values():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        pair = (str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if pair not in found:
            found.append(pair)
    return found


def store(peer: Peer, own_ae_title: str, files: Mapping[str, Path], on_sent: Callable[[str], None], *,
          retries: int = 4, backoff: float = 1.0, timeout: float = 30.0) -> dict[str, str]:
    """C-STORE every file (SOPInstanceUID -> path) to `peer`; `on_sent(uid)` after each accepted one. Tries
    `retries + 1` times with back-off doubling from `backoff` seconds. Returns uid -> reason for what was not taken."""
    pynetdicom = pynetdicom_module()
    left = dict(files)
    errors: dict[str, str] = {}
    for attempt in range(retries + 1):
        if not left:
            break
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        errors = _one_association(pynetdicom, peer, own_ae_title, left, on_sent, timeout)
        left = {uid: path for uid, path in left.items() if uid in errors}
        if left:
            log.warning("%d result(s) not taken by %s (try %d of %d): %s", len(left), peer, attempt + 1, retries + 1,
                        next(iter(errors.values())))
    return errors


def _one_association(pynetdicom: Any, peer: Peer, own_ae_title: str, files: Mapping[str, Path],
                     on_sent: Callable[[str], None], timeout: float) -> dict[str, str]:
    ae = pynetdicom.AE(ae_title=own_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in _contexts(files):
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        return {uid: f"no association with {peer} (refused, aborted or not listening)" for uid in files}
    errors: dict[str, str] = {}
    taken: set[str] = set()
    try:
        for uid, path in files.items():
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError, OSError) as exc:
                errors[uid] = f"{type(exc).__name__}: {exc}"
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in SUCCESS_OR_WARNING:
                on_sent(uid)
                taken.add(uid)
            else:
                errors[uid] = f"C-STORE status 0x{code:04X}" if code >= 0 else "no C-STORE response (connection lost)"
            if not assoc.is_established:
                errors.update({u: "the association ended" for u in files if u not in errors and u not in taken})
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return errors
