"""One batch run per output folder at a time: an advisory lock on `OUT/.medlens-batch.lock`, held for the run, so
that a second run started on the same folder is refused instead of explaining the same inputs beside the first.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from medlens.errors import OutputError

LOCK_FILE = ".medlens-batch.lock"  # hidden: not one of the run's results, and not counted as someone else's file


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold OUT's lock for the block (released when the process ends, however it ends).

    Args:
        out: the run's output folder (it exists).

    Raises:
        OutputError: another process holds the lock (a batch run writing there now), named by its process id.

    Where `fcntl` is missing (Windows) or the file system does not lock (some network shares), the block runs
    without a lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise OutputError(f"another medlens batch run is writing to {out}"
                              + (f" (process {holder})" if holder.isdigit() else "")
                              + "; wait for it to finish, or choose another folder with --out.") from None
        except OSError:  # a file system without locks: run as before
            pass
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor
