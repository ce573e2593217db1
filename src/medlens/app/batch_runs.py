"""The batch view: `medlens batch` on a server-side folder in a background process (resumable: the same command
skips inputs already done), its progress and gallery read from OUT/manifest.jsonl. Offered only when the batch
runner is installed (`medlens.batch`); until then the view is hidden, never imitated.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from medlens.app.jobs import BackgroundJob, medlens_command, server_folders, start_job
from medlens.batch.manifest import read_manifest as read_manifest_lines
from medlens.errors import InputError, MedlensError
from medlens.io.scan import image_suffix


def available() -> bool:
    """Whether `medlens batch` exists in this installation."""
    return importlib.util.find_spec("medlens.batch") is not None


def read_manifest(out: Path) -> list[dict[str, Any]]:
    """The manifest's records, the last one per id (a rerun's record replaces the earlier one), read by the batch
    runner's own reader: a last line cut short by the running writer is left out, a damaged line is an OutputError."""
    records: dict[str, dict[str, Any]] = {}
    for record in read_manifest_lines(Path(out) / "manifest.jsonl"):
        records[str(record.get("id", len(records)))] = record
    return list(records.values())


@dataclass
class BatchJob(BackgroundJob):
    """`medlens batch` running in the background; its progress read from OUT/manifest.jsonl."""

    total: int = 0  # inputs found when it started

    def progress(self) -> tuple[int, int, int]:
        """(done, failed, total) from the manifest."""
        records = read_manifest(self.out)
        return (sum(r.get("status") == "done" for r in records), sum(r.get("status") == "failed" for r in records),
                self.total)


def count_inputs(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file() and image_suffix(p.name) is not None)


def start_batch(inputs: str, model_source: str, methods: Sequence[str], out_dir: str,
                allow_pickle: bool = False, extra: Optional[Sequence[str]] = None) -> BatchJob:
    """Start `medlens batch INPUT --model M --methods a,b --out OUT` in the background."""
    if not methods:
        raise InputError("choose at least one method for the batch.")
    folder, out = server_folders(inputs, out_dir, "input")
    arguments = ["batch", str(folder), "--model", model_source, "--methods", ",".join(methods), "--out", str(out),
                 *(extra or [])]
    return start_job(BatchJob, medlens_command(arguments, allow_pickle), out,
                     total=count_inputs(folder) if folder.is_dir() else 1)


def render(catalogue: Any, config: Mapping[str, Any]) -> None:
    """Streamlit layout of the batch view (imported here: this module's logic is tested without Streamlit)."""
    import streamlit as st

    st.caption("Explain every scan in a server-side folder with `medlens batch` in a background process. Running it "
               "again on the same output folder resumes: inputs already done are skipped.")
    inputs = st.text_input("Input folder on the server", value=config.get("data") or "", key="batch_in")
    out = st.text_input("Output folder (created; nothing is written elsewhere)", key="batch_out")
    model = st.selectbox("Model", catalogue.keys(), key="batch_model")
    methods = st.text_input("Methods", value="gradcam", key="batch_methods")
    if st.button("Start batch", key="batch_start"):
        try:
            st.session_state["batch_job"] = start_batch(inputs, catalogue.entries[model].source,
                                                        [m.strip() for m in methods.split(",") if m.strip()], out,
                                                        catalogue.allow_pickle)
        except InputError as exc:
            st.error(str(exc))
    if "batch_job" in st.session_state:
        _progress()


def _progress() -> None:
    import streamlit as st

    job: BatchJob = st.session_state["batch_job"]
    try:
        done, failed, total = job.progress()
        records = [r for r in read_manifest(job.out) if r.get("status") == "done"][-12:]
    except MedlensError as exc:  # a manifest damaged by hand: said, the rest of the page goes on
        st.error(f"The batch's progress cannot be read: {exc}")
        return
    st.progress(min(1.0, (done + failed) / total) if total else 0.0, text=f"batch: {done} done, {failed} failed, {total} inputs")
    if job.finished:
        code = job.process.returncode
        (st.success if code == 0 else st.warning if code == 3 else st.error)(
            f"batch finished (exit status {code}): {job.message()} Report: {job.out / 'report.html'}")
    else:
        st.button("Refresh progress", key="batch_refresh")
    columns = st.columns(4)
    for n, record in enumerate(records):
        pngs = [o for o in record.get("outputs", []) if str(o).endswith(".png") and "panel" not in str(o)]
        if pngs:
            columns[n % 4].image(str(job.out / pngs[0]), caption=str(record.get("id")))
