"""Writing files safely: a checked output folder, atomic file writes, file-name-safe name parts, file digests
and JSON conversion. Every writer in medlens goes through these.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Union


from medlens.core.jsonable import jsonable  # noqa: F401 - re-exported: the one JSON conversion, for the writers
from medlens.errors import OutputError

PathLike = Union[str, os.PathLike]



def ensure_writable(folder: PathLike) -> Path:
    """Create `folder` if needed and check a file can be written there; OutputError otherwise (before any work)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output path {folder} exists and is not a folder; choose another folder with --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise OutputError(f"the output folder {folder} cannot be created ({exc.strerror or exc}); choose another folder with --out.") from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".medlens-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"the output folder {folder} is not writable ({exc.strerror or exc}); choose another folder with --out.") from None
    return folder


_FSYNC_EACH_FILE = contextvars.ContextVar("medlens_fsync_each_file", default=True)


@contextlib.contextmanager
def deferred_fsync() -> Iterator[None]:
    """Inside the block, atomic writes skip their per-file fsync: still atomic (a killed process leaves the whole file
    or none), durable against a power cut only once the caller syncs (the batch runner: `os.sync()` before each
    fsync of its manifest; a line the kernel wrote out before that may name files lost by a power cut, which the
    resume's check of each record's outputs finds)."""
    token = _FSYNC_EACH_FILE.set(False)
    try:
        yield
    finally:
        _FSYNC_EACH_FILE.reset(token)


def atomic_write(path: PathLike, data: Union[bytes, str, Callable[[Any], None]]) -> Path:
    """Write bytes, text, or what `data(fileobj)` writes, to a temp file beside `path`, then os.replace it.

    Either the whole new file is there afterwards, or (on any error) the old state: never half a file.
    """
    path = Path(path)
    if _STAGING.get() == path.parent:
        return _write_staged(path, data)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the output folder.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_data(fh, data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the output folder and free space.") from None
        raise
    return path


def _write_data(fh: Any, data: Union[bytes, str, Callable[[Any], None]]) -> None:
    """Bytes, text (UTF-8) or what `data(fh)` writes, flushed, and fsynced unless the caller defers it."""
    if isinstance(data, str):
        fh.write(data.encode("utf-8"))
    elif isinstance(data, (bytes, bytearray)):
        fh.write(data)
    else:
        data(fh)
    fh.flush()
    if _FSYNC_EACH_FILE.get():
        os.fsync(fh.fileno())


_STAGING: contextvars.ContextVar = contextvars.ContextVar("medlens_staging_folder", default=None)


@contextlib.contextmanager
def staging_folder(folder: PathLike) -> Iterator[None]:
    """Inside the block, `atomic_write` writes the files of `folder` (a private, fresh staging folder whose owner moves
    its files in as a set, or removes it whole on an error: `medlens.io.output`) straight to their names: the
    folder already makes the set atomic, so each file's temporary name and rename are not needed (0.2 ms a file)."""
    token = _STAGING.set(Path(folder))
    try:
        yield
    finally:
        _STAGING.reset(token)


def _write_staged(path: Path, data: Union[bytes, str, Callable[[Any], None]]) -> Path:
    """`atomic_write` in a staging folder: the file written in place, 0644 and fsynced as atomic writes are."""
    try:
        with open(path, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)
            _write_data(fh, data)
    except OSError as exc:
        raise OutputError(f"cannot write {path} ({exc.strerror or exc}); check the output folder and free space.") from None
    return path


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def safe_name(text: str) -> str:
    """A file-name-safe version of a class or method name ("Pleural Effusion" -> "Pleural_Effusion")."""
    cleaned = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._")
    if len(cleaned) > MAX_NAME_PART:  # file systems cap names at 255 bytes; keep it readable and unique
        cleaned = cleaned[: MAX_NAME_PART - 9] + "-" + hashlib.sha256(str(text).encode()).hexdigest()[:8]
    return cleaned or "unnamed"


MAX_NAME_PART = 80  # characters of a class or method name in a file name


def save_figure(fig: Any, path: PathLike, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG written atomically (rendered to memory first, so no half-written image)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())

