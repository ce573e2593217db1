"""The C allocator's settings for medlens's own processes (the command line, batch workers): memory freed by one
explanation is kept for the next one instead of being handed back to the system and faulted in again page by page.

Why: glibc's malloc returns freed blocks above its thresholds to the system (munmap, heap trimming), so every
mini-batch's tensors and every picture's arrays were faulted in afresh: in a `medlens batch` run (gradcam + lrp,
160 x 160, png + npz) the explaining thread took 860-1,070 page faults per input and the run 6-7 ms of system time
per input (issue 28; docs/batch.md). With the thresholds below: 0-40 faults, 4-4.6 ms. Freed memory stays with the
process (at most TRIM_THRESHOLD at the top of each heap), as PyTorch's own caching allocators do on GPUs.
"""
from __future__ import annotations

import ctypes
import os
import sys

#: allocations above this are still mapped and unmapped on their own (glibc's largest allowed threshold)
MMAP_THRESHOLD = 32 << 20
#: freed memory at the top of a heap kept for reuse, up to this much, before it is given back
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
OPT_OUT = "MEDLENS_KEEP_FREED_MEMORY"  # "0": leave the allocator as it is
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_done = False


def keep_freed_memory() -> bool:
    """Keep freed memory for reuse in this process (and in the processes it forks): glibc's mmap threshold fixed at
    `MMAP_THRESHOLD` and its trim threshold at `TRIM_THRESHOLD`. Called once by the command line and by each batch
    worker; a library caller may call it before a long run.

    Returns:
        True when the settings are in force (glibc), False when nothing was changed: another C library (macOS,
        Windows, musl), `MEDLENS_KEEP_FREED_MEMORY=0`, or the user's own malloc settings in the environment
        (`MALLOC_*_` variables or `GLIBC_TUNABLES` naming malloc), which are left as they are.
    """
    global _done
    if _done:
        return True
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if any(name in os.environ for name in _USER_SETTINGS) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
