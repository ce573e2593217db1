"""SHA-256 of a file, read in blocks: the one digest helper behind provenance, model sources and the zoo's checks."""
from __future__ import annotations

import hashlib
import os
from typing import Union


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """The hex SHA-256 of the file at `path`, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["file_sha256"]
