"""Finding a batch's inputs: files and folders searched recursively (a folder holding one DICOM series is one
input), `--include`/`--exclude` patterns and `--limit`, each with a stable id (relative path + content digest) and a
results folder of its own under OUT.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from medlens.errors import InputError
from medlens.io.output import input_digest
from medlens.io.readers import kind_of
from medlens.io.scan import image_suffix

DIGEST_CHARS = 16  # of the content sha256 in an input's id: enough to tell files apart, short enough to read
LINKED_FOLDER = "linked folder(s), not followed (name them as inputs to include them)"  # a `skipped` entry


@dataclass(frozen=True)
class WorkItem:
    """One input of a batch: picklable and JSON-able, so any executor can send it to a worker."""

    id: str  # "<relative path>@<digest prefix>": stable across runs while the file is unchanged
    path: str  # absolute path of the file or DICOM series folder
    relative: str  # path relative to the batch's base folder (posix separators)
    digest: str  # sha256 of the content (a series folder: of its files' names and digests)
    folder: str  # where its results go, relative to OUT
    kind: str  # "file" or "dicom-series"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Discovery:
    """What was found: the items in order, and what was passed over (for one line of notes)."""

    items: list[WorkItem]
    skipped: dict[str, int]  # file suffix -> count of files in searched folders that are not images
    excluded: int = 0
    beyond_limit: int = 0


def _is_scan_file(path: Path) -> bool:
    """A file medlens reads: by its extension, or (DICOM without one) by its header."""
    if image_suffix(path.name) is not None:
        return True
    try:
        kind_of(path)
        return True
    except InputError:
        return False


def _walk(folder: Path, skipped: dict[str, int], leave_out: Sequence[Path] = ()) -> list[Path]:
    """Scan files and series folders under `folder`, sorted, hidden entries and `leave_out` (the batch's own output
    folder, when it sits among the inputs) left out. Linked folders inside are not followed (an input's id and results
    folder would then depend on which path reached a folder first), but counted in `skipped`; linked files are read."""
    found: list[Path] = []
    left_out = {p.resolve() for p in leave_out}
    for root, dirs, files in os.walk(folder):
        kept = []
        for d in sorted(dirs):
            path = Path(root) / d
            if d.startswith(".") or path.resolve() in left_out:
                continue
            if path.is_symlink():
                skipped[LINKED_FOLDER] = skipped.get(LINKED_FOLDER, 0) + 1
                continue
            kept.append(d)
        dirs[:] = kept
        here = Path(root)
        scans = []
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = here / name
            if _is_scan_file(path):
                scans.append(path)
            else:
                suffix = path.suffix.lower() or "(no extension)"
                skipped[suffix] = skipped.get(suffix, 0) + 1
        if scans and _one_series(here, scans):
            found.append(here)  # one DICOM series (the reader's own rule): one input, a volume
        else:
            found.extend(scans)
    return found


def _base_of(paths: Sequence[Path]) -> Path:
    """The folder the relative paths start from: the common folder of the arguments."""
    anchors = [str(p if p.is_dir() else p.parent) for p in paths]
    return Path(os.path.commonpath(anchors)) if anchors else Path.cwd()


def result_folder(relative: str) -> str:
    """The results folder of an input, relative to OUT: `maps/<relative path, dots of the name as _>`."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:  # discover() makes paths below the base
        raise InputError(f"{relative}: an input's path must lie below the folder the inputs are searched from.")
    name = parts[-1]
    return str(Path("maps", *parts[:-1], name.replace(".", "_") or "input").as_posix())


def _unique_folders(items: list[WorkItem]) -> list[WorkItem]:
    """Inputs whose results folders would be one (`a.1.png` and `a_1.png`, or names that differ only in case, one
    folder on a case-insensitive file system) each get the folder with a suffix from their own relative path."""
    groups: dict[str, int] = {}
    for item in items:
        groups[item.folder.casefold()] = groups.get(item.folder.casefold(), 0) + 1
    out = []
    for item in items:
        if groups[item.folder.casefold()] > 1:
            tag = hashlib.sha256(item.relative.encode()).hexdigest()[:8]
            item = WorkItem(item.id, item.path, item.relative, item.digest, f"{item.folder}-{tag}", item.kind)
        out.append(item)
    return out


def _matches(relative: str, patterns: Sequence[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def discover(arguments: Sequence[Path], *, include: Sequence[str] = (), exclude: Sequence[str] = (),
             limit: Optional[int] = None, leave_out: Sequence[Path] = ()) -> Discovery:
    """The inputs named by `arguments` (files; folders searched recursively), filtered and limited, with ids.

    Patterns are shell globs matched against the relative path and the file name (`*.dcm`, `glioma/*`). Folders in
    `leave_out` (the run's --out) are not searched. A missing argument raises InputError before any work."""
    paths = [_plain(Path(a)) for a in arguments]
    for given, path in zip(arguments, paths):
        if not path.exists():
            raise InputError(f"{given}: no such file or folder. Check the path (relative paths start from {Path.cwd()}).")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be 1 or more, not {limit}.")
    base = _base_of(paths)
    skipped: dict[str, int] = {}
    candidates: list[Path] = []
    for path in paths:
        if path.is_dir():
            candidates.extend(_walk(path, skipped, leave_out))
        else:
            candidates.append(path)  # named explicitly: an input even if its type is not one medlens reads
    seen: set[Path] = set()
    items: list[WorkItem] = []
    excluded = beyond = 0
    for path in candidates:
        if path in seen:
            continue
        seen.add(path)
        relative = path.relative_to(base).as_posix() if path != base else path.name
        if (include and not _matches(relative, include)) or (exclude and _matches(relative, exclude)):
            excluded += 1
            continue
        if limit is not None and len(items) >= limit:
            beyond += 1
            continue
        digest = _digest(path)
        items.append(WorkItem(f"{relative}@{digest[:DIGEST_CHARS]}", str(path), relative, digest,
                              result_folder(relative), "dicom-series" if path.is_dir() else "file"))
    return Discovery(_unique_folders(items), skipped, excluded, beyond)


def _plain(argument: Path) -> Path:
    """The argument as an absolute path without "..", so that the inputs' common folder is truly common (their
    results then lie inside OUT). The folder part of a path with ".." is resolved as the system does (through links,
    not by dropping the part before it); the file's own name, and paths without "..", are kept as given."""
    path = argument.expanduser().absolute()
    if ".." not in path.parts:
        return path
    if path.name == "..":
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(path.parent)) / path.name  # a linked file keeps its own name


def _digest(path: Path) -> str:
    try:
        return input_digest(path) or "unreadable"
    except OSError:  # unreadable: its run fails with the reader's message
        return "unreadable"


def _one_series(folder: Path, scans: list[Path]) -> bool:
    """Whether the scans of `folder` form one DICOM series (the reader's own rule)."""
    # imported on first use: pydicom takes over a second to import, which a run on single files need not pay
    from medlens.io.dicom_series import SERIES_TAGS, check_series

    return check_series(folder, scans, SERIES_TAGS).problem is None
