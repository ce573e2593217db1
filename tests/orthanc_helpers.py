"""A real PACS for the DICOM node tests: Orthanc started in a temporary folder with a JSON config (free ports, the
medlens node declared as a modality), talked to over its REST API on 127.0.0.1, stopped by its PID. Every wait is
bounded. Not a test module."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll `check` until it returns something true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Orthanc:
    """One running Orthanc: its ports and a small REST client."""

    def __init__(self, folder: Path, node_aet: str, node_port: int) -> None:
        self.folder = folder
        self.dicom_port, self.http_port = free_port(), free_port()
        self.aet = "ORTHANC"
        config = {
            "Name": "medlens-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [], "StableAge": 1,
            "DicomScuTimeout": 10, "SaveJobs": False, "DicomCheckCalledAet": False,
            "DicomModalities": {"medlens": {"AET": node_aet, "Host": "127.0.0.1", "Port": node_port,
                                            "AllowGet": True, "AllowFind": True, "AllowMove": True, "AllowStore": True,
                                            "AllowEcho": True}},
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], cwd=folder, stdout=self.log,
                                        stderr=subprocess.STDOUT)
        wait_for("Orthanc's REST API", lambda: self._alive(), timeout=30)

    def _alive(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def request(self, method: str, path: str, body: Optional[bytes] = None, timeout: float = 60.0) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            data = response.read()
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data

    def get(self, path: str) -> Any:
        return self.request("GET", path, timeout=10)

    def upload(self, path: Path) -> dict:
        return self.request("POST", "/instances", path.read_bytes())

    def store_to(self, modality: str, resources: list[str]) -> Any:
        body = json.dumps({"Resources": resources, "Synchronous": True}).encode()
        return self.request("POST", f"/modalities/{modality}/store", body)

    def instances(self, study_id: str) -> list[dict]:
        return [self.get(f"/instances/{i['ID']}/simplified-tags") | {"ID": i["ID"]}
                for i in self.get(f"/studies/{study_id}/instances")]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.log.close()


@contextmanager
def running_orthanc(folder: Path, node_aet: str, node_port: int) -> Iterator[Orthanc]:
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(folder, node_aet, node_port)
    try:
        yield server
    finally:
        server.stop()


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    return env


def start_node(state: Path, port: int, orthanc: Orthanc, *extra: str, log_name: str = "node.log") -> subprocess.Popen:
    """`medlens serve` in its own process (so that it can be killed with SIGKILL), listening on 127.0.0.1:port."""
    log = open(state.parent / log_name, "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "medlens", "serve", "--model", "phantom-lesion", "--methods", "gradcam,saliency",
         "--out", str(state), "--port", str(port), "--ae-title", "MEDLENS", "--study-timeout", "1",
         "--send-to", f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}", "--send-retries", "2", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=node_env())
    log.close()

    def echo_ok() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"medlens serve exited: {(state.parent / log_name).read_text()[-3000:]}")
        try:
            return orthanc.request("POST", "/modalities/medlens/echo", b"{}", timeout=10) is not None
        except OSError:
            return False

    wait_for("medlens serve to answer C-ECHO", echo_ok, timeout=60, every=0.5)
    return process


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def ledger_events(state: Path) -> list[dict]:
    path = state / "ledger.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


@contextmanager
def node_in_process(state: Path, port: int, orthanc: Orthanc, **options: Any) -> Iterator[Any]:
    """A node in this process (its loop on a thread): no second interpreter to start, for the tests that need no kill."""
    import threading

    import medlens
    from medlens.node import Node, NodeConfig, Peer
    from medlens.pipeline import ExplainRequest

    request = ExplainRequest.build("gradcam,saliency", formats="dicom", options=options)
    node = Node(NodeConfig(state, medlens.load_model("phantom-lesion"), "phantom-lesion", request,
                           Peer(orthanc.aet, "127.0.0.1", orthanc.dicom_port), port=port, study_timeout=1.0, retries=2))
    node.start()
    stop = threading.Event()
    thread = threading.Thread(target=node.run_until, args=(stop, 0.2), daemon=True)
    thread.start()
    try:
        yield node
    finally:
        stop.set()
        thread.join(timeout=60)
        node.stop()
