"""`medlens serve`: a DICOM node that receives studies (C-STORE), explains each once it has been idle, and sends the
results back (C-STORE). Gathers the settings and hands them to `medlens.node`.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from medlens.cli.commands import _model_on_device, _parse_options
from medlens.core.explain import check_methods
from medlens.errors import MethodError
from medlens.io.formats import check_formats
from medlens.pipeline import ExplainRequest


@click.command("serve")
@click.option("--model", "-m", "model_source", required=True, help="A bundled name, a model file, torchvision:ARCH (with --weights) or xrv:NAME.")
@click.option("--methods", default="gradcam", show_default=True, help="Comma-separated method names (see `medlens methods`).")
@click.option("--out", "state_dir", required=True, type=click.Path(path_type=Path), help="State folder: ledger.jsonl, incoming/, results/.")
@click.option("--ae-title", default="MEDLENS", show_default=True, help="This node's AE title.")
@click.option("--port", type=click.IntRange(1, 65535), default=11112, show_default=True, help="DICOM port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--allow-aet", "allowed_aets", multiple=True, help="Accept associations only from this calling AE title (repeatable; default: any).")
@click.option("--send-to", default=None, help="Where results go: AET@HOST:PORT (default: kept in the state folder only).")
@click.option("--study-timeout", type=click.FloatRange(0), default=30.0, show_default=True, help="Seconds a study must be idle before it is explained.")
@click.option("--targets", default=None, help="Comma-separated class indices or names, or 'all'; default: top-1.")
@click.option("--formats", default="dicom", show_default=True, help="Comma-separated output formats; dicom is what is sent.")
@click.option("--layer", default=None, help="Target layer by dotted name (default: chosen automatically).")
@click.option("--seed", type=int, default=None, help="Seed for stochastic methods.")
@click.option("--option", "option_items", multiple=True, help="A method option key=value (repeatable).")
@click.option("--max-queue", type=click.IntRange(1), default=100, show_default=True, help="Studies that may wait; more are refused (0xA700) until there is room.")
@click.option("--max-storage-mb", type=click.IntRange(1), default=10240, show_default=True, help="Megabytes of received instances kept; more are refused (0xA700).")
@click.option("--send-retries", type=click.IntRange(0), default=4, show_default=True, help="Tries after the first for results the peer did not take (back-off 1, 2, 4... s).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--allow-pickle", is_flag=True, default=False, help="Load a pickled model file (runs the code it holds; only files you trust).")
def serve_command(model_source: str, methods: str, state_dir: Path, ae_title: str, port: int, host: str,
                  allowed_aets: Sequence[str], send_to: Optional[str], study_timeout: float, targets: Optional[str],
                  formats: str, layer: Optional[str], seed: Optional[int], option_items: Sequence[str], max_queue: int,
                  max_storage_mb: int, send_retries: int, device: str, allow_pickle: bool) -> None:
    """Run a DICOM node: receive studies, explain each once idle, send the results back (until stopped).

    Every event (received, explained, sent, failed) is appended to STATE/ledger.jsonl before it counts, so a node
    killed at any moment and started again with the same --out loses nothing and sends nothing twice."""
    # the node (pydicom, pynetdicom) is imported when it is used, not when the command line starts
    from medlens.node import Limits, Node, NodeConfig, Peer
    from medlens.node.receiver import pynetdicom_module

    pynetdicom_module()  # a clear message before a model is loaded
    peer = Peer.parse(send_to) if send_to else None
    request = ExplainRequest.build(methods, targets=targets, layer=layer, seed=seed, formats=formats,
                                   options=_parse_options(option_items))
    if not request.methods:
        raise MethodError("--methods is empty; give one or more names, e.g. --methods gradcam,lrp.")
    check_methods(list(request.methods), dict(request.options))
    check_formats(request.formats)
    if peer is not None and "dicom" not in request.formats:
        raise MethodError(f"--formats {formats} has no dicom, so there would be nothing to send to {peer}; add dicom "
                          f"(e.g. --formats dicom,png).")
    model_options: dict[str, Any] = {"allow_pickle": True} if allow_pickle else {}
    model = _model_on_device(model_source, device, **model_options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s medlens serve: %(message)s")
    for chatty in ("pynetdicom", "highdicom"):  # one line per association and per copied module otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    node = Node(NodeConfig(state_dir, model, model_source, request, peer, model_options, ae_title, host, port,
                           tuple(allowed_aets), study_timeout, Limits(max_queue, max_storage_mb * 1024**2), send_retries))
    node.start()
    stop = threading.Event()
    try:
        node.run_until(stop)
    finally:
        stop.set()
        node.stop()


COMMANDS = [serve_command]
