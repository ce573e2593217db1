"""`write_explanation`: one image's result written in the chosen formats as one set (staged, then moved in),
with `provenance.json` last; an earlier run's files in the folder that this run does not write are removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Collection, Mapping, Optional, Sequence

import numpy as np

from medlens.errors import OutputError
from medlens.io.files import (PathLike, atomic_write, ensure_writable, file_sha256, jsonable, safe_name,
                               staging_folder)
from medlens.io.formats import DEFAULT_FORMATS, FORMATS, ImageResult, check_formats
from medlens.version import __version__


def write_explanation(
    result: Any,
    out_dir: PathLike,
    *,
    image_index: int = 0,
    display: Optional[np.ndarray] = None,
    input_file: Optional[PathLike] = None,
    loading_notes: Sequence[str] = (),
    model_source: Optional[Mapping[str, Any]] = None,
    extra_provenance: Optional[Mapping[str, Any]] = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    region: Optional[np.ndarray] = None,
    scan: Any = None,
    signed: bool = False,
    notes_out: Optional[list[str]] = None,
    scan_region: Any = None,
    segmentation_logits: Any = None,
    input_sha256: Optional[str] = None,
) -> list[Path]:
    """Write one image's results into `out_dir` in `formats` (see `medlens.io.formats.FORMATS`; by default
    `<method>_<target>.png` per method and target, `panel.png`, and `maps.npz`), and `provenance.json` last.

    The set is written as one: every file is first written to a staging folder, then the files are moved in
    (those they replace set aside until all are in, and put back on an error), so on an error the folder keeps
    what it had; a process killed while moving leaves the folder without provenance.json (incomplete), and the next
    write there removes what it left. Files of an earlier run in the folder that this run does not write are removed.
    `display` is the grayscale image in [0, 1] at the maps' size; `region` a boolean mask of that size, outlined on overlays;
    `scan` the `ScanImage` read from `input_file` (formats that reference the source use it); `signed` draws every map
    signed instead of as its method is defined (Grad-CAM's positive part). Pictures are drawn on the scan's own plane
    (the maps taken back through the preparation's resize) when `scan` holds one, with `scan_region` (the region on
    that plane, or a function that makes it when a picture is drawn) outlined. `segmentation_logits` (a segmentation model's per-pixel logits (K, *spatial)) give the
    `dicom` format its Segmentation of the predicted mask. A format or DICOM object that cannot be made for this input is skipped, with the reason in
    provenance and appended to `notes_out` (the batch manifest's notes). `input_sha256`: the input's digest
    (`input_digest`) when the caller already has it (the batch runner, from when it found the input; a DICOM series
    is not read twice), else it is computed here. Returns the paths.
    """
    names = check_formats(formats)
    created = not Path(out_dir).exists()
    folder = ensure_writable(out_dir)
    dead, left_behind = dead_staging(folder) if not created else ([], set())
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=staging_prefix()))
    try:
        job = ImageResult.build(result, image_index, display, region, input_file, scan, signed=signed,
                                scan_region=scan_region)
        job.model_source = dict(model_source) if model_source is not None else None
        job.segmentation_logits = segmentation_logits
        staged: list[Path] = []
        with staging_folder(staging):  # written straight to their names there: the folder is moved in as a set
            for name in names:
                staged += _write_format(name, job, staging)
            staged.append(_write_provenance(job, staging, staged, loading_notes, model_source, extra_provenance,
                                            input_sha256))
        written = _move_in(staging, staged, folder, left_behind)
        for path in dead:  # only now: a write that fails or is killed before this leaves them for the next one
            shutil.rmtree(path, ignore_errors=True)
        if notes_out is not None:
            notes_out.extend(_skip_notes(job.provenance))
        return written
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:  # a folder made for this result and left empty goes too: none of the result, not an empty shell
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


OPTIONAL_FORMATS = ("nifti", "dicom")  # formats that need what some inputs lack (geometry, a study)


def _write_format(name: str, job: ImageResult, staging: Path) -> list[Path]:
    """One format's files; a geometry-dependent format that cannot be made for this input is skipped with the reason
    in provenance (`skipped_formats`), and the input's other formats are still written."""
    try:
        return FORMATS[name](job, staging)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, np.linalg.LinAlgError) as exc:
        if name not in OPTIONAL_FORMATS:
            raise
        job.provenance.setdefault("skipped_formats", {})[name] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        return []


def _skip_notes(provenance: Mapping[str, Any]) -> list[str]:
    """One note per format skipped and per DICOM object not made, for the manifest."""
    notes = [f"format {name} skipped: {reason}" for name, reason in (provenance.get("skipped_formats") or {}).items()]
    notes += [f"dicom: {line} (not written)" for line in ((provenance.get("dicom") or {}).get("skipped") or [])]
    notes += [f"dicom: {line} (not written)"
              for line in ((provenance.get("dicom_segmentation") or {}).get("skipped") or [])]
    return notes


def _write_provenance(job: "ImageResult", folder: Path, staged: Sequence[Path], loading_notes: Sequence[str],
                      model_source: Optional[Mapping[str, Any]], extra: Optional[Mapping[str, Any]],
                      input_sha256: Optional[str] = None) -> Path:
    provenance = job.result.provenance
    provenance.update(job.provenance)  # what the formats recorded (colour scales, affines, references)
    provenance["medlens_version"] = __version__
    provenance["image_index"] = job.index
    if job.input_file is not None:
        path = Path(job.input_file)
        provenance["input_file"] = {"path": str(path.resolve()), "sha256": input_sha256 or input_digest(path)}
    provenance["loading_notes"] = list(loading_notes)
    if model_source is not None:
        provenance["model_source"] = dict(model_source)
    if extra:
        provenance.update(dict(extra))
    provenance["files"] = [p.name for p in staged] + ["provenance.json"]
    return atomic_write(folder / "provenance.json", json.dumps(jsonable(provenance), indent=2))


def input_digest(path: Path) -> Optional[str]:
    """sha256 of an input file; of a DICOM series folder, the digest of its files' names and digests, in order."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.iterdir() if p.is_file()):
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
        return h.hexdigest()
    return file_sha256(path) if path.is_file() else None


def _move_in(staging: Path, staged: Sequence[Path], folder: Path, left_behind: Collection[str] = ()) -> list[Path]:
    """Move the staged files in, provenance.json last. The earlier provenance.json is set aside first: a process
    killed between two moves leaves a folder without one, which says that its set is incomplete (the batch runner
    then explains that input again, and the next write here removes what the dead process left: `left_behind`, the
    files its staging folder's two provenance records list)."""
    earlier = _files_of_earlier_run(folder) | set(left_behind)
    previous = staging / ".previous"  # files this run replaces wait here until every new file is in place
    written: list[Path] = []
    set_aside: list[Path] = []

    def put_aside(target: Path) -> None:
        if not set_aside:  # made only when something is replaced (a fresh folder has nothing to set aside)
            previous.mkdir()
        os.replace(target, previous / target.name)
        set_aside.append(target)

    try:
        if (folder / "provenance.json").exists():  # first: without it, the folder says its set is incomplete
            put_aside(folder / "provenance.json")
        for path in staged:
            target = folder / path.name
            if target.exists():
                put_aside(target)
            os.replace(path, target)
            written.append(target)
    except BaseException as exc:  # a file held open by a viewer (Windows), a full disk, Ctrl-C: put the earlier set back
        for target in written:
            with contextlib.suppress(OSError):
                target.unlink()
        for target in set_aside:
            with contextlib.suppress(OSError):
                os.replace(previous / target.name, target)
        if not isinstance(exc, OSError):
            raise
        raise OutputError(f"cannot write the results into {folder} ({exc.strerror or exc}); the folder keeps what it "
                          f"had. Close any program that holds its files open, or choose another folder with --out.") from None
    finally:
        _remove_staging(staging)
    # Files of the earlier run that this one did not write. Compared without case: on a case-insensitive file
    # system "gradcam_Mass.png" and "gradcam_mass.png" are one file, which this run has just written.
    kept = {p.name.casefold() for p in written}
    for name in earlier:
        stale = folder / name
        if name.casefold() not in kept and stale.is_file() and stale.parent == folder:
            stale.unlink()
    return written


STAGING = ".medlens-staging-"  # + "<pid>@<host>-<random>": a folder's files being written, before they are moved in


def staging_prefix() -> str:
    """The name a staging folder starts with: this process's id and machine, so a later write can tell a folder left
    by a killed process from one still being written."""
    host = "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())
    return f"{STAGING}{os.getpid()}@{host}-"


def dead_staging(folder: Path) -> tuple[list[Path], set[str]]:
    """The staging folders in `folder` that processes of this machine which no longer run left behind (killed while
    writing), to be removed once the next write there is in; those of running processes, of other machines and of
    older versions' names are left alone.

    Returns:
        The folders, and the files that the dead writes' sets list (the set they were writing, in its staged
        provenance.json, and the earlier set they replaced, in the provenance.json they had set aside): the next
        write removes those it does not write itself, as it does an earlier run's.
    """
    host = staging_prefix()[:-1].split("@", 1)[1]  # sanitised: no "-", nor in mkdtemp's random part
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(STAGING) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return [], set()
    dead: list[Path] = []
    listed: set[str] = set()
    for name in entries:
        pid, _, rest = name[len(STAGING):].partition("@")
        if not pid.isdigit() or rest.rpartition("-")[0] != host or _running(int(pid)):
            continue
        dead.append(folder / name)
        listed |= _files_of_earlier_run(folder / name) | _files_of_earlier_run(folder / name / ".previous")
    return dead, listed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def _remove_staging(staging: Path) -> None:
    """Remove the staging folder: one rmdir when it is empty (every file moved in), else the whole tree."""
    try:
        os.rmdir(staging)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def _files_of_earlier_run(folder: Path) -> set[str]:
    """The files an earlier write_explanation put in `folder`, as its provenance.json lists them."""
    try:
        files = json.loads((folder / "provenance.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {f for f in files if isinstance(f, str) and f == Path(f).name}


__all__ = [
    "atomic_write",
    "ensure_writable",
    "file_sha256",
    "input_digest",
    "jsonable",
    "safe_name",
    "write_explanation",
]
