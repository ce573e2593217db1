"""`run_batch`: a whole batch run on the driver: inputs found, settings checked against the folder, the manifest's
resume rules applied, the work sent to an executor, each record appended as it arrives, then summary and report.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm import tqdm

from medlens.batch.executors import BATCH_SIZE, make_executor  # BATCH_SIZE defined there, torch-free for the CLI
from medlens.batch.folder_lock import folder_lock
from medlens.batch.inputs import Discovery, discover
from medlens.batch.manifest import DONE, ManifestWriter, latest_records, plan_resume, read_manifest
from medlens.batch.report import write_report, write_summary
from medlens.batch.settings import MANIFEST_FILE, claim_folder, run_settings
from medlens.batch.task import BatchTaskFactory
from medlens.errors import InputError, MedlensError
from medlens.io.scan import SUPPORTED
from medlens.io.files import ensure_writable
from medlens.pipeline import ExplainRequest, WorkerRecipe, plan_for


class SomeInputsFailed(MedlensError):
    """The run finished, and some inputs could not be explained (each is listed); exit status 3."""

    exit_code = 3


@dataclass
class BatchSummary:
    """What a run did: counts, the failures (path, message), and the time it took."""

    out: Path
    total: int
    ran: int
    skipped_done: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    discovery: Optional[Discovery] = None

    @property
    def done(self) -> int:
        return self.total - len(self.failures)


def run_batch(inputs: Sequence[Path], out: Path, *, model: Any, model_source: str, request: ExplainRequest,
              model_options: Optional[dict[str, Any]] = None, executor: str = "serial", workers: int = 2,
              ray_address: Optional[str] = None, threads: Optional[int] = None, device: str = "cpu",
              include: Sequence[str] = (), exclude: Sequence[str] = (), limit: Optional[int] = None,
              retry_failed: bool = False, force: bool = False, region: Any = "auto", progress: bool = True,
              batch_size: int = BATCH_SIZE,
              log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
              on_record: Optional[Callable[[dict], None]] = None) -> BatchSummary:
    """Explain every input under `inputs` into `out`, resuming an earlier run of the same settings there.

    `model` is the loaded model (the driver uses it for the settings digest and, with the serial executor, the work);
    workers of other executors load their own from `model_source` and `model_options`. `on_record` is called with
    each record once it is in the manifest (a front end's own progress display, a benchmark's clock). Inputs of one
    prepared shape are explained `batch_size` at a time in one call (a mini-batch; the maps equal one-at-a-time's
    within float tolerance, and an input that fails, fails alone). Usage errors (missing input, unknown executor, a
    folder of other settings, a batch size below 1) raise before any work."""
    t0 = time.perf_counter()
    if batch_size < 1:
        raise InputError(f"--batch-size must be 1 or more, not {batch_size}.")
    plan = plan_for(model, request)
    # the results never searched as inputs: the whole OUT where it sits among the inputs, its maps/ where OUT is
    # itself the folder searched
    found = discover(inputs, include=include, exclude=exclude, limit=limit, leave_out=[Path(out), Path(out) / "maps"])
    if not found.items:
        passed = ", ".join(f"{n} {suffix}" for suffix, n in sorted(found.skipped.items()))
        raise InputError(f"no inputs found in {', '.join(map(str, inputs))}"
                         + (f" ({found.excluded} left out by --include/--exclude)" if found.excluded else "")
                         + (f"; passed over as not images: {passed}" if passed else "")
                         + f". medlens reads {SUPPORTED}.")
    runner = make_executor(executor, workers, ray_address)
    out = ensure_writable(out)
    with folder_lock(out):
        settings = run_settings(plan, model_source)
        claim_folder(out, settings, force)
        manifest_path = out / MANIFEST_FILE
        resume = plan_resume(found.items, read_manifest(manifest_path), settings["digest"], retry_failed, out=out)
        _say_what(log, found, resume)
        factory_threads = threads if threads is not None else default_threads(executor, workers, ray_address)
        recipe = WorkerRecipe(model_source, dict(model_options or {}), request, device, factory_threads,
                              model=model if executor == "serial" else None)
        factory = BatchTaskFactory(recipe, str(out), settings["digest"], region=region)
        if resume.todo:
            _explain_all(runner, factory, resume.todo, batch_size, manifest_path, progress, on_record)
        records = _current_records(manifest_path, found, settings["digest"])
        write_summary(out, records)
        write_report(out, records, f"medlens batch: {out.name}", settings)
    failures = [(str(r.get("path")), str(r.get("error"))) for r in records if r.get("status") != DONE]
    recorded = {r.get("id") for r in records}
    failures += [(item.relative, f"{item.relative}: no result was recorded; run the same command again")
                 for item in found.items if item.id not in recorded]
    return BatchSummary(out, len(found.items), len(resume.todo), len(resume.done), failures,
                        time.perf_counter() - t0, found)


def _explain_all(runner: Any, factory: BatchTaskFactory, todo: Sequence[Any], batch_size: int, manifest_path: Path,
                 progress: bool, on_record: Optional[Callable[[dict], None]]) -> None:
    """Send `todo` to the executor and append each record to the manifest as it arrives, under a progress bar."""
    threads_before = torch.get_num_threads()  # a serial run sets this process's torch threads: given back after
    bar = tqdm(total=len(todo), desc="explaining", unit="input", file=sys.stderr,
               disable=not progress or None, dynamic_ncols=True)
    failed_now = 0
    try:
        with ManifestWriter(manifest_path) as manifest:
            for record in runner.run(factory, todo, batch_size):
                manifest.append(record)
                if on_record is not None:
                    on_record(record)
                if record.get("status") != DONE:
                    failed_now += 1
                    bar.set_postfix_str(f"{failed_now} failed", refresh=False)
                bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads_before)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, e.g. a container's or `taskset`'s share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads(executor: str, workers: int, ray_address: Optional[str] = None) -> int:
    """torch threads per worker when `--threads` is not given: the cores shared out, never more threads than cores.

    Serial: one core less than there are (at least 1), the core left to the reader and writer threads that overlap
    with explaining (`medlens.batch.overlap`); processes and a local Ray: the cores divided among the workers (at
    least 1 each); a Ray cluster elsewhere: 1 (its machines' cores are not known here). More threads than free cores
    make OpenMP's threads wait on each other: with another busy process on a 2-core machine a 2-thread run fell to a
    tenth of its speed while 1-thread workers kept theirs (docs/batch.md)."""
    cores = usable_cores()
    if executor == "serial":
        return max(1, cores - 1)
    if executor == "ray" and ray_address:
        return 1
    return max(1, cores // max(1, workers))


def _current_records(manifest_path: Path, found: Discovery, digest: str) -> list[dict[str, Any]]:
    """The last record of each input of this run (in input order) under these settings."""
    latest = latest_records(read_manifest(manifest_path), digest)
    return [latest[item.id] for item in found.items if item.id in latest]


def _say_what(log: Callable[[str], None], found: Discovery, resume: Any) -> None:
    parts = [f"{len(found.items)} input(s)"]
    if resume.done:
        parts.append(f"{len(resume.done)} already done (skipped)")
    if resume.failed_kept:
        parts.append(f"{len(resume.failed_kept)} failed before (not retried; --retry-failed to run them again)")
    if resume.retried:
        parts.append(f"{len(resume.retried)} failed before, retried")
    if resume.changed:
        parts.append(f"{len(resume.changed)} done before but their results were written over or removed, run again")
    parts.append(f"{len(resume.todo)} to run")
    if found.excluded:
        parts.append(f"{found.excluded} left out by --include/--exclude")
    if found.beyond_limit:
        parts.append(f"{found.beyond_limit} beyond --limit")
    if found.skipped:
        parts.append("not images, passed over: " + ", ".join(f"{n} {s}" for s, n in sorted(found.skipped.items())))
    log("medlens: " + "; ".join(parts))
