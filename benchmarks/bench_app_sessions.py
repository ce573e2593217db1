"""Four browser sessions explaining at once: one headless Chromium, four contexts (four Streamlit sessions), each
pressing Explain on its own new scan at the same moment; the time from each press to that page's overlays, against
one session alone. Two servers side by side, interleaved round by round: the app as it is (each explain call on its
own copy of the model) and `MEDLENS_APP_REPLICAS=1` (one call at a time per model: how the app worked before).
Medians over rounds; the machine's load average is printed with the figures.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_app_sessions.py [--rounds 3]
        [--method integratedgradients] [--short]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import app_browser as ab  # noqa: E402

SESSIONS = 4
SERVERS = {"copies (the app)": "4", "one call at a time (before)": "1"}


def _scan(folder: Path, seed: int) -> Path:
    from medlens.app.inputs import SAMPLES, phantom_sample

    path = folder / f"scan-{seed}.png"
    path.write_bytes(phantom_sample(SAMPLES[0], seed=seed + 100)[1])
    return path


def _press_all(pages: list[Any], expected: int, timeout: float = 600.0) -> list[float]:
    """Press Explain on every page (as close together as one driver can), then the seconds from each page's press to
    its `expected` overlays."""
    started = []
    for page in pages:
        started.append(time.perf_counter())
        ab.press_explain(page)
    done: dict[int, float] = {}
    deadline = time.perf_counter() + timeout
    while len(done) < len(pages) and time.perf_counter() < deadline:
        for i, page in enumerate(pages):
            if i not in done and ab.overlays_shown(page) >= expected:
                done[i] = time.perf_counter() - started[i]
        time.sleep(0.02)
    if len(done) < len(pages):
        raise TimeoutError("a session's overlays did not appear")
    return [done[i] for i in range(len(pages))]


def _new_scans(pages: list[Any], folder: Path, seed: int) -> int:
    for page in pages:
        ab.upload(page, _scan(folder, seed))
        page.get_by_text("Choose models and methods in the sidebar").first.wait_for(timeout=120_000)
        seed += 1
    return seed


def measure(rounds: int, method: str) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {name: {"alone": [], "four": []} for name in SERVERS}
    with tempfile.TemporaryDirectory() as temp, contextlib.ExitStack() as stack:
        folder = Path(temp)
        urls = {name: stack.enter_context(ab.served_app(env={"MEDLENS_APP_REPLICAS": n})) for name, n in SERVERS.items()}
        chromium = stack.enter_context(ab.browser())
        pages = {name: [ab.open_page(chromium, url, 1300, 900) for _ in range(SESSIONS)] for name, url in urls.items()}
        seed = 0
        for name in SERVERS:  # warm-up: the model loaded, the method's first call, on every page
            seed = _new_scans(pages[name], folder, seed)
            for page in pages[name]:
                ab.choose(page, "Methods", method)
            _press_all(pages[name], 2)
        for _ in range(rounds):
            for name in SERVERS:
                seed = _new_scans(pages[name][:1], folder, seed)
                times[name]["alone"] += _press_all(pages[name][:1], 2)
                seed = _new_scans(pages[name], folder, seed)
                times[name]["four"] += _press_all(pages[name], 2)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="integratedgradients", help="added to the default gradcam")
    parser.add_argument("--short", action="store_true", help="one round")
    args = parser.parse_args()
    missing = ab.browser_missing()
    if missing:
        sys.exit(f"cannot measure: {missing}")
    load_before = os.getloadavg()
    times = measure(1 if args.short else args.rounds, args.method)
    load_after = os.getloadavg()
    print(f"brain-tumor-mri, gradcam + {args.method}, {SESSIONS} sessions; {os.cpu_count()} CPUs; "
          f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min)")
    for name, t in times.items():
        alone, four = statistics.median(t["alone"]), statistics.median(t["four"])
        slowest = statistics.median(max(t["four"][i:i + SESSIONS]) for i in range(0, len(t["four"]), SESSIONS))
        fastest = statistics.median(min(t["four"][i:i + SESSIONS]) for i in range(0, len(t["four"]), SESSIONS))
        print(f"{name}: alone {alone:.2f} s; four at once: median {four:.2f} s ({four / alone:.2f}x), first "
              f"{fastest:.2f} s ({fastest / alone:.2f}x), last {slowest:.2f} s ({slowest / alone:.2f}x)")
        print(f"    all alone: {[round(v, 2) for v in t['alone']]}; all four: {[round(v, 2) for v in t['four']]}")


if __name__ == "__main__":
    main()
