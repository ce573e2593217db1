"""`medlens serve` against a real PACS (Orthanc on 127.0.0.1, started here): a study sent from Orthanc comes back into
the same study as a Parametric Map and a Secondary Capture per method; killed with SIGKILL mid-study and restarted,
every result arrives exactly once; an identical rerun adds nothing, other settings add new instances."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from orthanc_helpers import (ORTHANC, free_port, ledger_events, node_in_process, running_orthanc, start_node, stop_process,
                             wait_for)

pytest.importorskip("pynetdicom", reason="medlens serve needs pynetdicom (pip install 'medlens[dicom-node]')")
pytest.importorskip("highdicom", reason="the dicom output format needs highdicom")
pytestmark = pytest.mark.skipif(ORTHANC is None, reason="Orthanc (Debian package orthanc) is not installed: the "
                                                       "DICOM node tests need a real PACS to talk to")
PARAMETRIC_MAP, SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.7"


def _study(folder: Path) -> list[Path]:
    """One study of two series: pydicom's CT_small and MR_small, the MR moved into the CT's study."""
    folder.mkdir(parents=True, exist_ok=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for key in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if key in ct:
            setattr(mr, key, ct.get(key))
    ct.save_as(folder / "ct.dcm")
    mr.save_as(folder / "mr.dcm")
    return [folder / "ct.dcm", folder / "mr.dcm"]


def _results(orthanc, study_id: str) -> list[dict]:
    return [i for i in orthanc.instances(study_id) if i.get("Manufacturer") == "medlens"]


def _sop_classes(orthanc, study_id: str) -> list[str]:
    found = []
    for i in _results(orthanc, study_id):
        value = orthanc.get(f"/instances/{i['ID']}/metadata/SopClassUid")
        found.append(value.decode() if isinstance(value, bytes) else str(value))
    return found


def _upload_study(orthanc, folder: Path) -> str:
    """The test study's files uploaded to Orthanc; returns its Orthanc study id."""
    study_id = None
    for path in _study(folder):
        study_id = orthanc.upload(path)["ParentStudy"]
    return study_id


def test_a_study_from_orthanc_comes_back_as_results_exactly_once(tmp_path: Path) -> None:
    node_port = free_port()
    with running_orthanc(tmp_path / "orthanc", "MEDLENS", node_port) as orthanc:
        study_id = _upload_study(orthanc, tmp_path / "study")
        state = tmp_path / "state"
        with node_in_process(state, node_port, orthanc):
            orthanc.store_to("medlens", [study_id])
            # two series x two methods x (Parametric Map + Secondary Capture), into the same study
            wait_for("8 results in the study", lambda: len(_results(orthanc, study_id)) == 8, timeout=90, every=0.5)
            classes = _sop_classes(orthanc, study_id)
            assert sorted(classes) == sorted([PARAMETRIC_MAP] * 4 + [SECONDARY_CAPTURE] * 4)
            descriptions = {i["SeriesDescription"] for i in _results(orthanc, study_id)}
            assert any(d.startswith("medlens gradcam relevance map") for d in descriptions)
            assert any(d.startswith("medlens saliency overlay") for d in descriptions)
            if shutil.which("dciodvfy"):
                pm = next(i for i in _results(orthanc, study_id) if "relevance map" in i["SeriesDescription"])
                (tmp_path / "pm.dcm").write_bytes(orthanc.request("GET", f"/instances/{pm['ID']}/file"))
                report = subprocess.run(["dciodvfy", str(tmp_path / "pm.dcm")], capture_output=True, text=True, timeout=60)
                assert not [line for line in report.stderr.splitlines() if line.startswith("Error")]
            # an identical rerun: explained again (resumed), nothing new sent
            explained = sum(e["event"] == "explained" for e in ledger_events(state))
            orthanc.store_to("medlens", [study_id])
            wait_for("the rerun to be explained",
                     lambda: sum(e["event"] == "explained" for e in ledger_events(state)) > explained, timeout=60)
            time.sleep(1.0)
            assert len(_results(orthanc, study_id)) == 8
        events = ledger_events(state)
        sent = [e["sop_instance_uid"] for e in events if e["event"] == "sent"]
        assert len(sent) == len(set(sent)) == 8
        assert {e["event"] for e in events} <= {"received", "explained", "sent"}
        # other settings (another Grad-CAM option): Grad-CAM's results are new instances, saliency's are not
        with node_in_process(state, node_port, orthanc, eigen_smooth=True):
            orthanc.store_to("medlens", [study_id])
            wait_for("4 new Grad-CAM results", lambda: len(_results(orthanc, study_id)) == 12, timeout=90, every=0.5)
            time.sleep(1.0)
            assert len(_results(orthanc, study_id)) == 12


def test_killed_mid_study_and_restarted_every_result_arrives_once(tmp_path: Path) -> None:
    node_port = free_port()
    with running_orthanc(tmp_path / "orthanc", "MEDLENS", node_port) as orthanc:
        study_id = _upload_study(orthanc, tmp_path / "study")
        state = tmp_path / "state"
        node = start_node(state, node_port, orthanc)
        orthanc.store_to("medlens", [study_id])
        # SIGKILL at the first sign of work after the study arrived: mid-explaining or mid-sending
        wait_for("the node to start on the study",
                 lambda: any(e["event"] in ("explained", "sent") for e in ledger_events(state))
                 or (state / "results").is_dir(), timeout=60, every=0.005)
        stop_process(node, signal.SIGKILL)
        before = len(_results(orthanc, study_id))
        assert before < 8, "the node finished before it was killed; the test did not kill it mid-study"
        with node_in_process(state, node_port, orthanc):  # a new process would only add its start-up time
            wait_for("all 8 results", lambda: len(_results(orthanc, study_id)) == 8, timeout=90, every=0.5)
            time.sleep(1.5)
            assert len(_results(orthanc, study_id)) == 8
        sent = [e["sop_instance_uid"] for e in ledger_events(state) if e["event"] == "sent"]
        assert len(sent) == len(set(sent)) == 8


def test_batch_from_pacs_pulls_the_matching_study_and_explains_it(tmp_path: Path) -> None:
    from batch_helpers import manifest, run_cli

    node_port = free_port()  # the AE title and address Orthanc knows medlens by (C-GET needs no listening port)
    with running_orthanc(tmp_path / "orthanc", "MEDLENS", node_port) as orthanc:
        for path in _study(tmp_path / "study"):
            orthanc.upload(path)
        other = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        other.PatientID, other.StudyInstanceUID = "someone-else", "1.2.826.0.1.3680043.99.7"
        other.SeriesInstanceUID, other.SOPInstanceUID = "1.2.826.0.1.3680043.99.8", "1.2.826.0.1.3680043.99.9"
        other.save_as(tmp_path / "other.dcm")
        orthanc.upload(tmp_path / "other.dcm")
        patient = str(pydicom.dcmread(get_testdata_file("CT_small.dcm")).PatientID)
        out = tmp_path / "out"
        code = run_cli("batch", "--from-pacs", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--query",
                       f"PatientID={patient}", "--model", "phantom-lesion", "--methods", "gradcam", "--formats", "npz",
                       "--out", out, "-q")
        assert code == 0
        records = manifest(out)
        assert len(records) == 2 and all(r["status"] == "done" for r in records)  # CT and MR of that study only
        pulled = sorted(p.name for p in (tmp_path / "out-pacs").rglob("*.dcm"))
        assert len(pulled) == 2
        assert run_cli("batch", "--from-pacs", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--query", "NoSuchKey=1",
                       "--model", "phantom-lesion", "--out", tmp_path / "out2", "-q") == 2
