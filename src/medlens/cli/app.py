"""The `medlens app` command: starts the Streamlit web app (medlens.app.page) on localhost, headless and offline
(no usage statistics), passing --models, --data and --allow-pickle to the page through MEDLENS_APP_* variables.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import click

from medlens.errors import InputError

INSTALL_HINT = 'the web app needs Streamlit: pip install "medlens[app]"'


def streamlit_command(port: int, address: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line for the page: localhost, headless, no telemetry, no file watcher."""
    page = Path(importlib.util.find_spec("medlens.app.page").origin)  # type: ignore[union-attr]
    from medlens.app.inputs import MAX_UPLOAD_MB

    return [sys.executable, "-m", "streamlit", "run", str(page),
            "--server.port", str(port), "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--server.maxUploadSize", str(MAX_UPLOAD_MB), "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal", "--theme.base", "light"]


@click.command("app")
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True, help="Port on localhost.")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="A folder of model files to offer besides the bundled ones (TorchScript, .pt2, weights with a "
                   "sidecar JSON naming the architecture, or a HuggingFace save_pretrained folder).")
@click.option("--data", "data_dir", type=click.Path(path_type=Path), default=None,
              help="The figshare brain tumour folder: a few of its slices are offered as samples.")
@click.option("--allow-pickle", is_flag=True, default=False,
              help="Also load pickled model files from --models (loading them runs the code they hold).")
def app_command(port: int, models_dir: Optional[Path], data_dir: Optional[Path], allow_pickle: bool) -> None:
    """Serve the web app on http://localhost:PORT (research and teaching only, not for diagnosis)."""
    if importlib.util.find_spec("streamlit") is None:
        raise click.ClickException(INSTALL_HINT)
    for what, folder in (("--models", models_dir), ("--data", data_dir)):
        if folder is not None and not folder.is_dir():
            raise InputError(f"{what} {folder}: no such folder.")
    env = dict(os.environ, MEDLENS_APP_MODELS=str(models_dir.resolve()) if models_dir else "",
               MEDLENS_APP_DATA=str(data_dir.resolve()) if data_dir else "",
               MEDLENS_APP_ALLOW_PICKLE="1" if allow_pickle else "0",
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    click.echo(f"medlens app on http://localhost:{port} (stop with Ctrl+C). For research and teaching, not diagnosis.",
               err=True)
    try:
        code = subprocess.call(streamlit_command(port), env=env)
    except KeyboardInterrupt:
        code = 0
    if code not in (0, -2, 130):
        raise click.ClickException(f"Streamlit stopped with exit status {code}; is port {port} already in use?")


COMMANDS = [app_command]
