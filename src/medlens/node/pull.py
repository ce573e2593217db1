"""Pulling studies from a PACS for `medlens batch --from-pacs`: the studies matching every `--query KEY=VALUE` found
by C-FIND (study root), each retrieved by C-GET into `<folder>/<study>/<series>/<sop>.dcm` (files written atomically).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from medlens.io.files import atomic_write
from medlens.node.receiver import UID, NodeError, is_own_result, pynetdicom_module
from medlens.node.sender import Peer

log = logging.getLogger("medlens.node")
# The image storage classes a C-GET asks to receive (an association offers at most 128 presentation contexts).
RETRIEVED_CLASSES = (
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation", "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage", "SecondaryCaptureImageStorage", "UltrasoundImageStorage",
    "UltrasoundMultiFrameImageStorage", "RTDoseStorage", "XRayAngiographicImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage", "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "LegacyConvertedEnhancedCTImageStorage", "LegacyConvertedEnhancedMRImageStorage",
)


def parse_query(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` items (a DICOM keyword, e.g. PatientID=123, StudyDate=20240101-20240131) as one query."""
    query: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise NodeError(f"--query {item!r} must look like KEY=VALUE, e.g. --query PatientID=12345.")
        if tag_for_keyword(key) is None:
            raise NodeError(f"--query {item!r}: {key!r} is not a DICOM keyword (spelled as in the standard, e.g. "
                            f"PatientID, StudyInstanceUID, AccessionNumber, StudyDate, ModalitiesInStudy).")
        query[key] = value.strip()
    if not query:
        raise NodeError("--from-pacs needs at least one --query KEY=VALUE (e.g. --query PatientID=12345), so that a "
                        "whole archive is never pulled by mistake.")
    return query


def _association(pynetdicom: Any, peer: Peer, ae_title: str, get: bool, handlers: Any = None) -> Any:
    from pynetdicom import build_role, sop_class

    ae = pynetdicom.AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(sop_class.StudyRootQueryRetrieveInformationModelFind)
    roles = []
    if get:
        ae.add_requested_context(sop_class.StudyRootQueryRetrieveInformationModelGet)
        for name in RETRIEVED_CLASSES:
            uid = getattr(sop_class, name)
            ae.add_requested_context(uid)
            roles.append(build_role(uid, scp_role=True))
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, ext_neg=roles or None, evt_handlers=handlers)
    if not assoc.is_established:
        raise NodeError(f"{peer} did not accept an association from AE title {ae_title!r} (refused, not listening, or "
                        f"this AE title is not declared there with C-FIND/C-GET allowed).")
    return assoc


def find_studies(peer: Peer, query: Mapping[str, str], ae_title: str = "MEDLENS") -> list[str]:
    """StudyInstanceUIDs of the studies matching every key of `query` (C-FIND, study root, STUDY level)."""
    pynetdicom = pynetdicom_module()
    from pynetdicom import sop_class

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = query.get("StudyInstanceUID", "")
    for key, value in query.items():
        setattr(identifier, key, value if dictionary_VR(key) != "SQ" else [])
    assoc = _association(pynetdicom, peer, ae_title, get=False)
    found: list[str] = []
    try:
        for status, answer in assoc.send_c_find(identifier, sop_class.StudyRootQueryRetrieveInformationModelFind):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in (0xFF00, 0xFF01) and answer is not None and UID.match(str(answer.get("StudyInstanceUID", ""))):
                found.append(str(answer.StudyInstanceUID))
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise NodeError(f"{peer} answered the C-FIND with status 0x{code:04X}" if code >= 0 else
                                f"{peer} did not answer the C-FIND (connection lost or timed out)")
    finally:
        if assoc.is_established:
            assoc.release()
    return list(dict.fromkeys(found))


def retrieve_study(peer: Peer, study: str, folder: Path, ae_title: str = "MEDLENS") -> int:
    """C-GET one study into `folder/<study>/<series>/<sop>.dcm`; the number of instances stored (medlens's own
    results in the study are not retrieved into the inputs)."""
    pynetdicom = pynetdicom_module()
    from pynetdicom import evt, sop_class

    stored = 0

    def on_store(event: Any) -> int:
        nonlocal stored
        ds = event.dataset
        series, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if not (UID.match(series) and UID.match(sop)):
            return 0xC210
        if not is_own_result(ds):
            target = folder / study / series / f"{sop}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, event.encoded_dataset())
            stored += 1
        return 0x0000

    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    assoc = _association(pynetdicom, peer, ae_title, get=True, handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        for status, _ in assoc.send_c_get(identifier, sop_class.StudyRootQueryRetrieveInformationModelGet):
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in (0x0000, 0xFF00, 0xB000):
                raise NodeError(f"{peer} answered the C-GET of study {study} with status 0x{code:04X}" if code >= 0
                                else f"{peer} did not answer the C-GET of study {study} (connection lost or timed out)")
    finally:
        if assoc.is_established:
            assoc.release()
    return stored


def pull(peer: Peer, query: Mapping[str, str], folder: Path, ae_title: str = "MEDLENS") -> list[Path]:
    """Find and retrieve the matching studies; the folder of each study (inputs for the batch)."""
    folder.mkdir(parents=True, exist_ok=True)
    studies = find_studies(peer, query, ae_title)
    if not studies:
        raise NodeError(f"{peer} holds no study matching {', '.join(f'{k}={v}' for k, v in query.items())}.")
    folders = []
    for study in studies:
        count = retrieve_study(peer, study, folder, ae_title)
        log.info("study %s: %d instance(s) retrieved from %s", study, count, peer)
        if count:
            folders.append(folder / study)
    return folders
