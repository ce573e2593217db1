"""One-command device check: the reference tests, then the bundled brain model (gradcam + lrp) on the chosen device
against the CPU, mixed precision per method where it stays within tolerance of float32, and throughput at
mini-batches 1 and 8.

Run (on the accelerator machine, or anywhere): PYTHONPATH=src python benchmarks/gpu_check.py [--device cuda]
Options: --device (default cuda when available, else cpu), --n (slices, default 16), --reps (timed passes per
configuration, median; default 3), --skip-tests, --no-autocast, --cpu-autocast (bfloat16 on the CPU too: about ten
times slower than float32 on CPUs without bfloat16 units, so off by default), --threads (CPU torch threads,
default 1).

Steps:
1. pytest on the reference tests (they run on the CPU by design: tests/test_reference_maps.py against the stored
   maps, tests/test_cam.py against pytorch-grad-cam, tests/test_gradients.py against captum, tests/test_lrp.py
   against zennit);
2. the same prepared figshare slices (synthetic, seeded inputs when the data is absent) explained on the CPU in
   float32 and on the device in float32: every map's correlation with the CPU map must be >= 0.999;
3. per method, the device under torch.autocast (cuda: float16 and bfloat16; cpu: skipped unless asked) against the
   device's float32 maps: correlation and max relative error (largest |difference| over the largest |float32|).
   A precision is kept for a method only when every image's corr >= 0.999 and max relative error <= 1e-2, and
   only when it is faster than float32 at mini-batch 8 (else float32, and the table says why); a method that
   fails under autocast keeps float32 too;
4. images/s of `explain_batch` (prepared inputs, no reading or writing) per method at mini-batch 1 and 8, float32
   and the kept precision.
Prints one summary table; exits 1 when a reference test or the device-against-CPU check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import medlens
from medlens.io import spec_for
from medlens.pipeline import ExplainRequest, explain_batch, plan_for, read_input

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "brain-tumor-figshare"
METHODS = ("gradcam", "lrp")
BATCHES = (1, 8)
DEVICE_CORR = 0.999
AMP_CORR, AMP_REL = 0.999, 1e-2
#: the reference tests that compare against independent libraries or the stored pre-refactor maps
PYTEST_ARGS = ["tests/test_reference_maps.py", "tests/test_cam.py", "tests/test_gradients.py", "tests/test_lrp.py",
               "-k", "reference_maps or pytorch_grad_cam or captum or zennit"]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (1.0 when both are constant and equal)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return 1.0 if den == 0 and torch.equal(a, b) else float((a * b).sum()) / (den + 1e-300)


def max_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |a - ref| over the largest |ref|."""
    scale = float(ref.double().abs().max())
    return float((a.double() - ref.double()).abs().max()) / (scale if scale > 0 else 1.0)


def run_reference_tests() -> tuple[bool, str]:
    """pytest on the reference tests; (passed, its last line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PYTEST_ARGS]
    print("$", shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    return proc.returncode == 0, lines[-1] if lines else proc.stderr.strip()[-200:]


def inputs(plan, n: int) -> tuple[list[torch.Tensor], str]:
    """n prepared figshare slices spread over the classes, or seeded noise of the model's shape without the data."""
    files = sorted(DATA.rglob("*.jpg")) if DATA.is_dir() else []
    if files:
        step = max(1, len(files) // n)
        return [read_input(plan, p).tensor for p in files[::step][:n]], f"{n} figshare slices"
    spec = spec_for(plan.model)
    shape = (1, spec.channels, *(spec.size or (224, 224)))
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)], f"{n} seeded noise inputs (figshare absent)"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype` on the device's type, or nothing for float32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def maps(plan, tensors: list[torch.Tensor], method: str, device: torch.device, dtype=None) -> torch.Tensor:
    """The method's float32 maps of every input (explained 8 at a time), on the CPU."""
    out = []
    for start in range(0, len(tensors), 8):
        with autocast(device, dtype):
            result = explain_batch(plan, torch.cat(tensors[start:start + 8]).to(device), methods=[method])
        out.append(result[method].float().cpu())
    return torch.cat(out)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(plan, tensors: list[torch.Tensor], method: str, device: torch.device, batch: int, dtype, reps: int) -> float:
    """Median images/s of explain_batch at this mini-batch size over `reps` passes (after one warm-up call)."""
    xs = [torch.cat(tensors[s:s + batch]).to(device) for s in range(0, len(tensors) - batch + 1, batch)]
    with autocast(device, dtype):
        explain_batch(plan, xs[0], methods=[method])
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            for x in xs:
                explain_batch(plan, x, methods=[method])
        sync(device)
        times.append(time.perf_counter() - t0)
    return len(xs) * batch / statistics.median(times)


def check_method(cpu_plan, dev_plan, tensors, method: str, device: torch.device, args) -> dict:
    """Device against CPU, each autocast precision against float32, throughput; one row of the summary."""
    reference = maps(cpu_plan, tensors, method, torch.device("cpu"))
    dev32 = maps(dev_plan, tensors, method, device)
    per_image = [corr(dev32[i], reference[i]) for i in range(len(tensors))]
    row = {"method": method, "device_corr": min(per_image), "device_rel": max_rel(dev32, reference),
           "amp": [], "kept": "float32"}
    dtypes = ([] if args.no_autocast else [torch.float16, torch.bfloat16] if device.type == "cuda"
              else [torch.bfloat16] if args.cpu_autocast else [])
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        try:
            low = maps(dev_plan, tensors, method, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a method that cannot run under autocast keeps float32
            row["amp"].append({"dtype": name, "error": f"{type(exc).__name__}: {str(exc)[:80]}"})
            continue
        c = min(corr(low[i], dev32[i]) for i in range(len(tensors)))
        r = max(max_rel(low[i], dev32[i]) for i in range(len(tensors)))
        ok = c >= AMP_CORR and r <= AMP_REL
        row["amp"].append({"dtype": name, "corr": c, "rel": r, "ok": ok})
        if ok and row["kept"] == "float32":
            row["kept"] = name
    kept = None if row["kept"] == "float32" else getattr(torch, row["kept"])
    for b in BATCHES:
        row[f"f32 b={b}"] = rate(dev_plan, tensors, method, device, b, None, args.reps)
        row[f"kept b={b}"] = row[f"f32 b={b}"] if kept is None else rate(dev_plan, tensors, method, device, b, kept,
                                                                          args.reps)
    if kept is not None and row[f"kept b={BATCHES[-1]}"] < row[f"f32 b={BATCHES[-1]}"]:
        row["kept"] = f"float32 ({row['kept']} slower)"
        for b in BATCHES:
            row[f"kept b={b}"] = row[f"f32 b={b}"]
    return row


def table(rows: list[dict]) -> str:
    head = ("| method | device vs CPU: min corr | max rel err | autocast vs float32 (corr / max rel err) | kept "
            + "".join(f"| f32 b={b} (img/s) | kept b={b} (img/s) " for b in BATCHES) + "|")
    lines = [head, "|" + "---|" * (5 + 2 * len(BATCHES))]
    for r in rows:
        amp = "; ".join(f"{a['dtype']}: {a['error']}" if "error" in a else
                        f"{a['dtype']}: {a['corr']:.6f} / {a['rel']:.2e}{'' if a['ok'] else ' (over)'}"
                        for a in r["amp"]) or "skipped"
        rates = "".join(f"| {r[f'f32 b={b}']:.1f} | {r[f'kept b={b}']:.1f} " for b in BATCHES)
        lines.append(f"| {r['method']} | {r['device_corr']:.6f} | {r['device_rel']:.2e} | {amp} | {r['kept']} {rates}|")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--no-autocast", action="store_true")
    parser.add_argument("--cpu-autocast", action="store_true", help="also try bfloat16 autocast on the CPU (slow)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", {args.threads} CPU thread(s), load {os.getloadavg()[0]:.2f}", flush=True)
    tests_ok, tests_line = (True, "skipped") if args.skip_tests else run_reference_tests()
    print("reference tests:", tests_line, flush=True)
    cpu_model = medlens.load_model("brain-tumor-mri")
    cpu_plan = plan_for(cpu_model, ExplainRequest.build(",".join(METHODS)))
    dev_plan = plan_for(copy.deepcopy(cpu_model).to(device), ExplainRequest.build(",".join(METHODS)))
    tensors, what = inputs(cpu_plan, args.n)
    rows = [check_method(cpu_plan, dev_plan, tensors, m, device, args) for m in METHODS]
    device_ok = all(r["device_corr"] >= DEVICE_CORR for r in rows)
    print(f"\nbrain-tumor-mri, {what}, device {device}; reference tests: {tests_line}")
    print(table(rows))
    print(f"device against CPU (corr >= {DEVICE_CORR}): {'pass' if device_ok else 'FAIL'}; "
          f"reference tests: {'pass' if tests_ok else 'FAIL'}")
    return 0 if tests_ok and device_ok else 1


if __name__ == "__main__":
    sys.exit(main())
