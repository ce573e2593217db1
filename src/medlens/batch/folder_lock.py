"""One batch run per output folder at a time: an advisory lock on the OUT folder itself, held for the run, so that a
second run started on the same folder is refused instead of explaining the same inputs beside the first.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from medlens.errors import OutputError


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold OUT's lock for the block (`flock` on the folder: no file is added, and the lock goes with the process
    however it ends).

    Args:
        out: the run's output folder (it exists).

    Raises:
        OutputError: another process holds the lock (a batch run writing there now).

    Where `fcntl` is missing (Windows) or the file system does not lock folders (some network shares), the block
    runs without a lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # cannot be opened for a lock: run as before (the writes themselves are checked)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another medlens batch run is writing to {out} now; wait for it to finish, or choose "
                              f"another folder with --out.") from None
        except OSError:  # a file system without locks: run as before
            pass
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor
