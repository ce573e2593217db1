"""Throughput of the DICOM node against `medlens batch` on the same files (docs/dicom.md): N one-image studies (copies
of pydicom's CT_small.dcm with their own UIDs), Grad-CAM and saliency with phantom-lesion, `--formats dicom`.

- node: the studies sent by C-STORE (pynetdicom) to a node in this process (study timeout 0), which explains them and
  sends every result by C-STORE to a pynetdicom sink on 127.0.0.1; timed from the first C-STORE to the last result
  recorded as sent.
- batch: `run_batch` on the same files (serial executor), timed from the call to its return.

    python benchmarks/dicom_node_throughput.py [N_STUDIES]
"""
from __future__ import annotations

import copy
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import torch
from pydicom.data import get_testdata_file
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage

import medlens
from medlens.batch import run_batch
from medlens.node import Node, NodeConfig, Peer
from medlens.pipeline import ExplainRequest


def _studies(folder: Path, n: int) -> list[Path]:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    for k in range(n):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID = f"1.2.826.0.1.3680043.77.{k}.1"
        ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.77.{k}.2"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.77.{k}.3"
        (folder / f"s{k:03d}").mkdir(parents=True)
        ds.save_as(folder / f"s{k:03d}" / "ct.dcm")
        paths.append(folder / f"s{k:03d}" / "ct.dcm")
    return paths


def _sink(port: int) -> tuple[object, list[int]]:
    received: list[int] = []
    ae = AE(ae_title="SINK")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)

    def store(event: object) -> int:
        received.append(1)
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    return server, received


def measure(n: int, folder: Path) -> dict[str, float]:
    torch.set_num_threads(1)
    files = _studies(folder / "in", n)
    model = medlens.load_model("phantom-lesion")
    request = ExplainRequest.build("gradcam,saliency", formats="dicom")
    t0 = time.perf_counter()
    run_batch([folder / "in"], folder / "batch", model=model, model_source="phantom-lesion", request=request,
              progress=False, log=lambda m: None)
    batch_s = time.perf_counter() - t0
    server, received = _sink(11190)
    node = Node(NodeConfig(folder / "state", model, "phantom-lesion", request, Peer("SINK", "127.0.0.1", 11190),
                           port=11191, study_timeout=0.0))
    node.start()
    stop = threading.Event()
    thread = threading.Thread(target=node.run_until, args=(stop, 0.05), daemon=True)
    thread.start()
    t0 = time.perf_counter()
    ae = AE(ae_title="SCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", 11191, ae_title="MEDLENS")
    for path in files:
        assoc.send_c_store(path)
    assoc.release()
    while len(received) < 4 * n and time.perf_counter() - t0 < 600:
        time.sleep(0.05)
    node_s = time.perf_counter() - t0
    stop.set()
    thread.join(timeout=60)
    node.stop()
    server.shutdown()
    return {"studies": n, "results": len(received), "batch_s": batch_s, "node_s": node_s,
            "batch_per_min": 60 * n / batch_s, "node_per_min": 60 * n / node_s}


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print(measure(count, Path(tempfile.mkdtemp(prefix="medlens-node-bench-"))))
