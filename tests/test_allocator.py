"""The allocator settings of medlens's processes (`medlens.core.allocator`): freed memory is reused instead of being
faulted in again; the user's own settings and the opt-out are respected; the command line applies them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from medlens.core.allocator import keep_freed_memory
    kept = keep_freed_memory() if sys.argv[1] == "keep" else False
    def one_round():  # a picture's temporaries: several 1-2 MB arrays alive at once, then all freed
        parts = [np.ones(1 << 18, np.float32) for _ in range(6)] + [np.ones(1 << 18, np.int64)]
        return sum(float(p[0]) for p in parts)
    for _ in range(3):  # warm up: the first rounds fault in any case
        one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        one_round()
    print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, **env: str) -> tuple[str, int]:
    """(whether the settings were made, minor page faults of 20 rounds) in a fresh process, from the default
    allocator (whatever malloc settings this shell has are left out) plus `env`."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "MEDLENS_KEEP_FREED_MEMORY")}
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=60,
                          env={**clean, **env})
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    return kept, int(faults)


def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    kept, with_setting = _faults("keep")
    _, without = _faults("default")
    assert kept == "True"
    assert without > 20 * 1024  # 8 MB a round, most of it given back and faulted in again (2,048 pages)
    assert with_setting < without / 50


def test_the_opt_out_and_the_users_own_settings_leave_the_allocator_alone() -> None:
    assert _faults("keep", MEDLENS_KEEP_FREED_MEMORY="0")[0] == "False"
    assert _faults("keep", MALLOC_TRIM_THRESHOLD_="1000000")[0] == "False"
    assert _faults("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] == "False"


def test_the_command_line_keeps_freed_memory(monkeypatch) -> None:
    from medlens.cli import group
    from medlens.core import allocator

    calls = []
    monkeypatch.setattr(group, "keep_freed_memory", lambda: calls.append(1) or True)
    assert group.main(["--version"]) == 0 and calls == [1]
    assert allocator.MMAP_THRESHOLD <= 32 << 20  # glibc refuses a larger mmap threshold
