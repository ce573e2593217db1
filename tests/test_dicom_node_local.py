"""The DICOM node's bad inputs, with pynetdicom on both ends (no PACS needed): C-ECHO; a calling AE title not allowed
is rejected; a dataset without UIDs is refused and the node keeps serving; a study the model cannot take is recorded as
failed and nothing is sent; a peer that is not there is retried, then recorded; a full queue answers 0xA700; the
ledger survives a torn last line."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

import medlens
from medlens.node import Ledger, Limits, Node, NodeConfig, NodeError, Peer
from medlens.pipeline import ExplainRequest
from orthanc_helpers import free_port

pynetdicom = pytest.importorskip("pynetdicom", reason="medlens serve needs pynetdicom (pip install 'medlens[dicom-node]')")
pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
from pynetdicom.sop_class import CTImageStorage, RTDoseStorage, Verification  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return medlens.load_model("phantom-lesion")


def _node(tmp_path: Path, model, **config) -> Node:
    request = ExplainRequest.build("gradcam", formats="dicom")
    defaults = dict(port=free_port(), study_timeout=0.0, retries=1, backoff=0.01,
                    send_to=Peer("NOBODY", "127.0.0.1", free_port()))  # nothing listens there
    defaults.update(config)
    node = Node(NodeConfig(tmp_path / "state", model, "phantom-lesion", request, **defaults))
    node.start()
    return node


def _send(port: int, datasets, calling: str = "ORTHANC", contexts=(CTImageStorage, RTDoseStorage)) -> list[int]:
    ae = pynetdicom.AE(ae_title=calling)
    for context in (*contexts, Verification):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDLENS")
    if not assoc.is_established:
        return []
    try:
        return [int(assoc.send_c_store(ds).Status) if ds is not None else int(assoc.send_c_echo().Status)
                for ds in datasets]
    finally:
        assoc.release()


def test_echo_store_and_the_allowed_callers(tmp_path: Path, model) -> None:
    node = _node(tmp_path, model, allowed_aets=("ORTHANC",))
    try:
        ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        broken = copy.deepcopy(ct)
        del broken.StudyInstanceUID
        assert _send(node.config.port, [None, broken, ct]) == [0x0000, 0xC210, 0x0000]  # refused, and still serving
        assert _send(node.config.port, [None], calling="STRANGER") == []  # association rejected
        received = [e for e in node.ledger.read() if e["event"] == "received"]
        assert [e["sop_instance_uid"] for e in received] == [ct.SOPInstanceUID]
        assert (node.state_dir / received[0]["file"]).is_file()
    finally:
        node.stop()


def test_a_study_the_model_cannot_take_is_recorded_and_nothing_is_sent(tmp_path: Path, model) -> None:
    node = _node(tmp_path, model)
    try:
        dose = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
        del dose.NumberOfFrames  # the header hides 15 frames: medlens refuses it
        assert _send(node.config.port, [dose]) == [0x0000]
        node.step()
        events = node.ledger.read()
        failed = [e for e in events if e["event"] == "failed"]
        assert failed and "NumberOfFrames" in failed[0]["error"] and failed[0]["stage"] == "explain"
        assert not [e for e in events if e["event"] == "sent"]
        assert not node.ledger.study(dose.StudyInstanceUID).waiting  # the queue goes on
    finally:
        node.stop()


def test_a_peer_that_is_not_there_is_retried_then_recorded(tmp_path: Path, model) -> None:
    node = _node(tmp_path, model)
    try:
        ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        assert _send(node.config.port, [ct]) == [0x0000]
        t0 = time.monotonic()
        node.step()
        events = node.ledger.read()
        explained = next(e for e in events if e["event"] == "explained")
        assert len(explained["results"]) == 2  # a Parametric Map and a Secondary Capture
        failed = [e for e in events if e["event"] == "failed" and e["stage"] == "send"]
        assert {e["sop_instance_uid"] for e in failed} == set(explained["results"])
        assert "no association" in failed[0]["error"]
        assert time.monotonic() - t0 < 60
    finally:
        node.stop()
    restarted = Ledger(tmp_path / "state")  # after a restart the results are still owed (no `sent` for them)
    assert set(restarted.study(ct.StudyInstanceUID).unsent) == set(explained["results"])
    restarted.close()


def test_a_full_queue_answers_out_of_resources(tmp_path: Path, model) -> None:
    node = _node(tmp_path, model, limits=Limits(max_studies=1), study_timeout=3600.0)
    try:
        first = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        second = copy.deepcopy(first)
        second.StudyInstanceUID, second.SOPInstanceUID = "1.2.826.0.1.3680043.99.1", "1.2.826.0.1.3680043.99.2"
        third = copy.deepcopy(first)
        third.SOPInstanceUID = "1.2.826.0.1.3680043.99.3"  # the waiting study takes more instances
        assert _send(node.config.port, [first, second, third]) == [0x0000, 0xA700, 0x0000]
    finally:
        node.stop()


def test_serve_refuses_a_bad_peer_before_loading_a_model(tmp_path: Path, capsys) -> None:
    from batch_helpers import run_cli

    assert run_cli("serve", "--model", "phantom-lesion", "--out", tmp_path / "state", "--send-to", "ORTHANC:4242") == 2
    assert "AET@HOST:PORT" in capsys.readouterr().err
    assert run_cli("serve", "--model", "phantom-lesion", "--out", tmp_path / "state", "--send-to", "P@h:1",
                   "--formats", "png") == 2
    assert "nothing to send" in capsys.readouterr().err
    assert run_cli("batch", "--model", "phantom-lesion", "--out", tmp_path / "out", "--from-pacs", "P@h:1",
                   "--query", "PatientName") == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_ledger_cuts_a_torn_line_and_peers_are_checked(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.append("received", "1.2.3", sop_instance_uid="1.2.3.4", file="incoming/a.dcm")
    ledger.close()
    with open(tmp_path / "ledger.jsonl", "ab") as fh:
        fh.write(b'{"event": "sent", "stud')  # a kill in the middle of a line
    again = Ledger(tmp_path)
    assert [e["event"] for e in again.read()] == ["received"]
    assert again.study("1.2.3").waiting
    again.close()
    assert Peer.parse("PACS@10.0.0.1:104") == Peer("PACS", "10.0.0.1", 104)
    for bad in ("PACS", "PACS@host", "A_TITLE_LONGER_THAN_16@h:1", "P@h:70000"):
        with pytest.raises(NodeError, match="AET@HOST:PORT"):
            Peer.parse(bad)
