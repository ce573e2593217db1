"""The long fuzz run: many hypothesis inputs per format through the checks of tests/fuzz_targets.py; every input that
ends in anything but a result or a one-line medlens error is recorded (first example kept) instead of stopping the run.

    OMP_NUM_THREADS=1 python benchmarks/fuzz_readers.py --examples 2000 --out fuzz-report.json

Prints, per format: inputs tried, results, refusals, seconds, and the distinct failures (exception and where it was
raised); the inputs of the failures are written beside the report. Figures go to docs/reliability.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from PIL import Image  # noqa: E402

import fuzz_targets as F  # noqa: E402
from conftest import TinyCNN2d  # noqa: E402

FAILURES: dict[tuple[str, str, str], dict[str, Any]] = {}


def where(exc: BaseException) -> str:
    """file:line of the innermost frame in medlens (else the innermost frame), for telling failures apart."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/medlens/" in f.filename] or frames
    frame = ours[-1]
    return f"{frame.filename.split('/src/')[-1].split('site-packages/')[-1]}:{frame.lineno}"


def recorded(fmt: str, check: Callable[[], Any], example: Any, out: Path) -> None:
    """Run one check; a failure is recorded under (format, exception type, where) with its first input saved."""
    try:
        check()
    except BaseException as exc:  # noqa: BLE001 - that is what the run is looking for (Rust decoders panic as BaseException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        key = (fmt, type(exc).__name__, where(exc))
        if key not in FAILURES:
            dump = out / f"failure-{len(FAILURES)}-{fmt}.bin"
            payload = example if isinstance(example, bytes) else repr(example).encode()
            dump.write_bytes(payload)
            FAILURES[key] = {"format": fmt, "exception": type(exc).__name__, "where": key[2],
                             "message": " ".join(str(exc).split())[:300], "input": dump.name, "count": 0}
        FAILURES[key]["count"] += 1


def run(examples: int, out: Path, only: set[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="medlens-fuzz-"))
    many = settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    seeds = F.dicom_seed_bytes()
    model_file = work / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        torch.jit.save(torch.jit.script(TinyCNN2d(num_classes=3).eval()), str(model_file))
    image = work / "scan.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 40)).astype(np.uint8)).save(image)

    @many
    @given(data=F.dicom_inputs(seeds))
    def dicom(data: bytes) -> None:
        recorded("dicom", lambda: F.check_dicom(data, work), data, out)

    @many
    @given(item=F.raster_inputs())
    def raster(item: tuple[str, bytes]) -> None:
        recorded(item[0].lower(), lambda: F.check_raster(item, work), item[1], out)

    @many
    @given(item=F.nifti_inputs())
    def nifti(item: tuple[bool, bytes]) -> None:
        recorded("nifti", lambda: F.check_nifti(item, work), item[1], out)

    @many
    @given(data=F.BOX_FILE)
    def yolo(data: bytes) -> None:
        recorded("yolo", lambda: F.check_boxes(data, work), data, out)

    @settings(many, max_examples=max(1, examples // 4))
    @given(data=F.SIDECAR)
    def sidecar(data: bytes) -> None:
        recorded("sidecar", lambda: F.check_sidecar(data, model_file), data, out)

    @settings(many, max_examples=max(1, examples // 10))
    @given(args=F.cli_arguments())
    def cli(args: list[str]) -> None:
        recorded("cli", lambda: F.check_cli(args, image, Path(tempfile.mkdtemp(dir=work))), args, out)

    seconds: dict[str, float] = {}
    for name, target in (("dicom", dicom), ("raster", raster), ("nifti", nifti), ("yolo", yolo), ("sidecar", sidecar),
                         ("cli", cli)):
        if only and name not in only:
            continue
        start = time.perf_counter()
        target()
        seconds[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
    formats = sorted({fmt for fmt, _ in F.COUNTS})
    table = {fmt: {k: F.COUNTS[(fmt, k)] for k in ("tried", "result", "refused")} for fmt in formats}
    return {"examples_per_target": examples, "seconds": seconds, "counts": table, "failures": list(FAILURES.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="hypothesis examples per reader (sidecar: 1/4, cli: 1/10)")
    parser.add_argument("--out", type=Path, default=Path("fuzz-report.json"))
    parser.add_argument("--only", default="", help="comma-separated targets: dicom,raster,nifti,yolo,sidecar,cli")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run(args.examples, args.out.parent, {t for t in args.only.split(",") if t})
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
