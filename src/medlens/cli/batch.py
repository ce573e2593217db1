"""`medlens batch`: many inputs explained into one folder (manifest, summary.csv, report.html), resumable, on the
serial, processes or Ray executor. Gathers the request and hands it to `medlens.batch.run_batch`.

Importing this module does not import torch: with `--executor processes` the workers' forkserver is started first, so
that it imports torch and loads the model while this process does the same (docs/batch.md, "Start-up").
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import click

from medlens.batch.executors import BATCH_SIZE, EXECUTORS, ExecutorError, start_forkserver, stop_forkserver
from medlens.batch.preload import preload_key
from medlens.errors import InputError, MethodError

MAX_LISTED_FAILURES = 50


@click.command("batch")
@click.argument("inputs", nargs=-1, required=False, type=click.Path(path_type=Path))
@click.option("--model", "-m", "model_source", required=True, help="A bundled name, a model file, a local HuggingFace folder, torchvision:ARCH, timm:ARCH or monai:NAME (with --weights) or xrv:NAME.")
@click.option("--methods", default="gradcam", show_default=True, help="Comma-separated method names (see `medlens methods`).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder: manifest.jsonl, summary.csv, report.html, maps/.")
@click.option("--targets", default=None, help="Comma-separated class indices or names, or 'all'; default: top-1 (multi-label: p >= 0.5).")
@click.option("--formats", default="png,npz", show_default=True, help="Comma-separated: png, npz, nifti, dicom (provenance.json always).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="serial", show_default=True, help="Where the work runs.")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Worker processes or Ray actors.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads per worker (default: the cores shared among the workers; serial: one core less, left to reading and writing).")
@click.option("--batch-size", type=click.IntRange(1), default=BATCH_SIZE, show_default=True,
              help="Inputs of one prepared shape explained together in one pass (a mini-batch); also per Ray task.")
@click.option("--ray-address", default=None, help="Join this Ray cluster (e.g. ray://head:10001); default: a local Ray for the run.")
@click.option("--include", multiple=True, help="Only inputs matching this glob on their relative path or name (repeatable).")
@click.option("--exclude", multiple=True, help="Leave out inputs matching this glob (repeatable).")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most N inputs (the first N in sorted order).")
@click.option("--retry-failed", is_flag=True, default=False, help="Run inputs that failed in an earlier run again.")
@click.option("--force", is_flag=True, default=False, help="Use an output folder that holds another run or other files.")
@click.option("--layer", default=None, help="Target layer by dotted name (default: chosen automatically).")
@click.option("--seed", type=int, default=None, help="Seed for stochastic methods.")
@click.option("--option", "option_items", multiple=True, help="A method option key=value (repeatable).")
@click.option("--slice", "slice_index", type=int, default=None, help="For a 2-D model and a volume: the axial slice (default: middle).")
@click.option("--labels", default=None, help="Comma-separated class names, when the model carries none.")
@click.option("--input-size", default=None, help="Model input size: 224, 224,224 or 64,64,64 (3-D).")
@click.option("--channels", type=click.IntRange(1, 3), default=None, help="Input channels the model takes (1 or 3).")
@click.option("--multi-label/--single-label", "multi_label", default=None, help="Sigmoid (multi-label) or softmax outputs.")
@click.option("--weights", type=click.Path(path_type=Path), default=None, help="Local weights file for an architecture name.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--no-region", is_flag=True, default=False, help="Do not pick up a box or mask file beside each input.")
@click.option("--allow-pickle", is_flag=True, default=False, help="Load a pickled model file (runs the code it holds; only files you trust).")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No progress bar.")
@click.option("--signed", is_flag=True, default=False,
              help="Draw every map's raw signed values (default: each method as defined, e.g. Grad-CAM's positive part).")
@click.option("--explain-output", default=None,
              help="The score every method explains: logit (default), log-probability or contrast (the logit minus the "
                   "mean of the other classes' logits).")
@click.option("--from-pacs", default=None, help="Pull the inputs from a PACS first: AET@HOST:PORT (C-FIND, then C-GET).")
@click.option("--query", "query_items", multiple=True, help="With --from-pacs: KEY=VALUE a study must match (repeatable, all together).")
@click.option("--ae-title", default="MEDLENS", show_default=True, help="With --from-pacs: this program's AE title.")
@click.option("--pacs-folder", type=click.Path(path_type=Path), default=None, help="With --from-pacs: where pulled studies go (default: OUT-pacs beside OUT).")
def batch_command(inputs: Sequence[Path], model_source: str, methods: str, out_dir: Path, targets: Optional[str],
                  formats: str, executor: str, workers: int, threads: Optional[int], batch_size: int,
                  ray_address: Optional[str],
                  include: Sequence[str], exclude: Sequence[str], limit: Optional[int], retry_failed: bool, force: bool,
                  layer: Optional[str], seed: Optional[int], option_items: Sequence[str], slice_index: Optional[int],
                  labels: Optional[str], input_size: Optional[str], channels: Optional[int], multi_label: Optional[bool],
                  weights: Optional[Path], device: str, no_region: bool, allow_pickle: bool, quiet: bool,
                  signed: bool, from_pacs: Optional[str], query_items: Sequence[str], ae_title: str,
                  pacs_folder: Optional[Path], explain_output: Optional[str]) -> None:
    """Explain every input under INPUT... (files; folders searched recursively, a DICOM series folder as one input).

    Writes OUT/maps/<input>/ per input, OUT/manifest.jsonl (one line per finished input), OUT/summary.csv and
    OUT/report.html. Running the same command again resumes: inputs done with the same settings are skipped.
    With --from-pacs AET@HOST:PORT and --query KEY=VALUE, the matching studies are pulled from the PACS first (into
    --pacs-folder) and explained as inputs. Exit status 0 when every input is done, 3 when some failed (listed), 2 for
    a usage error."""
    if not inputs and not from_pacs:
        raise InputError("give the inputs to explain (files or folders), or --from-pacs AET@HOST:PORT with --query.")
    if query_items and not from_pacs:
        raise InputError("--query is for --from-pacs; give --from-pacs AET@HOST:PORT too.")
    if ray_address and executor != "ray":
        raise ExecutorError("--ray-address is for --executor ray.")
    pacs = _pacs_request(from_pacs, query_items) if from_pacs else None  # checked before a model is loaded
    for p in inputs:  # cheap checks first: no model is loaded for a typo
        if not p.exists():
            raise InputError(f"{p}: no such file or folder. Check the path (relative paths start from {Path.cwd()}).")
    model_options: dict[str, Any] = {k: v for k, v in dict(labels=labels, input_size=input_size, channels=channels,
                                                           multi_label=multi_label, weights=weights,
                                                           allow_pickle=allow_pickle or None).items() if v is not None}
    with _workers_started_early(executor, preload_key(model_source, model_options, device)):
        # torch is imported from here on (in this process; the forkserver imports its own meanwhile)
        from medlens.batch.runner import SomeInputsFailed, run_batch
        from medlens.batch.work import load_ray
        from medlens.cli.commands import _model_on_device, parse_options
        from medlens.core.explain import check_methods
        from medlens.io.formats import check_formats
        from medlens.pipeline import ExplainRequest

        request = ExplainRequest.build(methods, targets=targets, layer=layer, seed=seed, formats=formats,
                                       options=parse_options(option_items, explain_output), slice_index=slice_index,
                                       signed=signed)
        if not request.methods:
            raise MethodError("--methods is empty; give one or more names, e.g. --methods gradcam,lrp.")
        check_methods(list(request.methods), dict(request.options))
        check_formats(request.formats)
        if executor == "ray":
            load_ray()
        model = _model_on_device(model_source, device, **model_options)
    if pacs is not None:
        inputs = (*inputs, *_pull(*pacs, ae_title, pacs_folder or out_dir.with_name(f"{out_dir.name}-pacs")))
    summary = run_batch(inputs, out_dir, model=model, model_source=model_source, request=request,
                        model_options=model_options, executor=executor, workers=workers, ray_address=ray_address,
                        threads=threads, device=device, include=include, exclude=exclude, limit=limit,
                        retry_failed=retry_failed, force=force, region=None if no_region else "auto",
                        progress=not quiet, batch_size=batch_size, log=lambda m: click.echo(m, err=True))
    click.echo(f"{summary.done} of {summary.total} input(s) done ({summary.ran} run now, {summary.skipped_done} "
               f"skipped as done) in {summary.seconds:.1f} s; results in {summary.out} (report.html, summary.csv)")
    if summary.failures:
        listed = [f"  {message if path in message else f'{path}: {message}'}" for path, message in summary.failures[:MAX_LISTED_FAILURES]]
        if len(summary.failures) > MAX_LISTED_FAILURES:
            listed.append(f"  ... and {len(summary.failures) - MAX_LISTED_FAILURES} more (see manifest.jsonl)")
        raise SomeInputsFailed(f"{len(summary.failures)} of {summary.total} input(s) failed:\n" + "\n".join(listed))


@contextlib.contextmanager
def _workers_started_early(executor: str, key: Optional[str]) -> Iterator[None]:
    """With `--executor processes`, the workers' forkserver started before the block (which imports torch and loads
    the model), so that it imports torch and loads the model named by `key` meanwhile; stopped again if the block
    raises (a usage error found after it was started: a misspelt method, a model that cannot be loaded)."""
    started = executor == "processes" and start_forkserver(key)
    try:
        yield
    except BaseException:
        if started:
            stop_forkserver()
        raise


def _pacs_request(source: str, query_items: Sequence[str]) -> tuple[Any, dict[str, str]]:
    from medlens.node.pull import parse_query
    from medlens.node.receiver import pynetdicom_module
    from medlens.node.sender import Peer

    pynetdicom_module()
    return Peer.parse(source, "--from-pacs"), parse_query(query_items)


def _pull(peer: Any, query: dict[str, str], ae_title: str, folder: Path) -> tuple[Path, ...]:
    """The folders of the studies pulled from the PACS (medlens.node.pull), said on stderr."""
    from medlens.node.pull import pull

    folders = pull(peer, query, folder, ae_title)
    click.echo(f"medlens: {len(folders)} study(ies) pulled from {peer} into {folder}", err=True)
    return tuple(folders)


COMMANDS = [batch_command]
