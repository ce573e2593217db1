"""Cutting a run of model evaluations into batches: the one chunk iterator the chunked methods share."""
from __future__ import annotations

from typing import Iterator


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive chunks of at most `size` out of `total` items."""
    for lo in range(0, total, size):
        yield lo, min(total, lo + size)
