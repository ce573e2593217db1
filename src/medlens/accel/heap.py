"""Keeps the C heap's freed pages in the process while a call runs its model in chunks (glibc on Linux only).

PyTorch's CPU tensors come from malloc, with no cache of its own. glibc gives freed memory at the top of its
heap back to the kernel once it exceeds a trim threshold. A method that runs the model on chunk after chunk
of inputs (Score-CAM, occlusion, RISE, LIME, KernelSHAP) then frees and re-faults the same tens of MB in every
chunk: Score-CAM on resnet18 at 224 px took 370-470k page faults and 0.7-0.8 s of system time for that
(benchmarks/bench_cam.py, docs/benchmarks.md).

`steady_heap()` sets two thresholds for the block: no trimming, and allocations under 32 MiB from the heap.
On the way out it sets the trim threshold to 64 MiB. glibc itself moves to that value once it has freed a
32 MiB block, but here medlens imposes it. glibc then hands memory back lazily, at the next large free, as
usual; an eager `malloc_trim` would make the next call fault everything in again. The maps are the same
either way: only where the memory comes from changes.

The effect outlasts the block in one way: glibc stops adapting its thresholds once a program sets them, so
they stay at 32/64 MiB. A program that set its own with `mallopt()` cannot be detected and gets these.

It does nothing:
- when `ENABLED` is False;
- off glibc;
- when the user tuned malloc (`MALLOC_*_` variables, `glibc.malloc` tunables, or a preloaded allocator).

`explain()` uses it only when a requested method runs chunked passes (one with a `batch_size` option).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from typing import Iterator, Optional

ENABLED = True

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc's own adaptive threshold reaches on 64-bit systems
TRIM_DURING_CALL = 2**31 - 1  # mallopt takes an int: about 2 GiB, i.e. never during the call
TRIM_AFTER_CALL = 2 * MMAP_THRESHOLD

_lock = threading.Lock()
_depth = 0
_USER_ENV_KEYS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "MALLOC_ARENA_MAX")


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (musl's mallopt does nothing)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def user_tuned_malloc() -> bool:
    """Whether the environment already chooses malloc's behaviour (then medlens leaves it alone)."""
    if any(key in os.environ for key in _USER_ENV_KEYS):
        return True
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    preload = os.environ.get("LD_PRELOAD", "").lower()
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def active() -> bool:
    """Whether `steady_heap()` changes anything in this process."""
    return ENABLED and _glibc() is not None and not user_tuned_malloc()


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """For the block: freed heap memory stays with the process; after it, glibc trims as usual (module docstring).

    Re-entrant and thread-safe: the thresholds are set by the first block to enter and reset by the last to leave.
    """
    global _depth
    libc = _glibc() if active() else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_DURING_CALL)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER_CALL)
