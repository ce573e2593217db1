"""Soak run: many consecutive explain() calls on the bundled brain model, with failures injected, checking for leaks.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/soak.py --calls 1000 --slow-calls 50

Every call asks for every fast method (the CAMs without perturbation, the gradient methods, LRP; integrated
gradients and SmoothGrad with few steps); then `--slow-calls` calls ask for the perturbation methods (Score-CAM,
Ablation-CAM, occlusion, RISE, LIME, KernelSHAP). Every `--fail-every`-th call is made to fail inside the call:
a forward pre-hook the "user" put on the model raises from the k-th forward of that call on (k cycles over 1..4, so
the failure hits the first pass, the layer pass, the guided pass, LRP's rule pass, ...), as a RuntimeError or a
KeyboardInterrupt; that hook is part of the model as found and must still be there afterwards.

After every call, failed or not, the model's parameters and buffers must be bit-for-bit those found at the start,
and its modes, requires_grad flags, .grad tensors, hooks and instance attributes the same objects. Hooks on the
model and torch's global module hooks, Python threads, OS threads, open file descriptors and files in a private
temporary folder are counted at the start, after warm-up and at the end (and must not grow after warm-up);
resident memory is sampled every `--sample-every` calls. The figures are printed as JSON (and written to --json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import medlens
from medlens.core.model_state import hook_count
from medlens.data.phantom import phantom_2d

FAST = {
    "methods": ["cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam",
                "saliency", "inputxgradient", "guidedbackprop", "guidedgradcam", "integratedgradients", "smoothgrad",
                "lrp"],
    "options": {"n_steps": 8, "n_samples": 4},
}
SLOW = {
    "methods": ["scorecam", "ablationcam", "occlusion", "rise", "lime", "kernelshap"],
    "options": {"n_masks": 256, "num_samples": 128, "window": 32, "stride": 16},
}
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


# ----------------------------------------------------------------------------------------- model state
class ModelState:
    """What a call must leave exactly as found: tensors bit for bit, everything else by identity or value."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.tensors = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.modules = list(model.named_modules())
        self.training = [m.training for _, m in self.modules]
        self.params = list(model.named_parameters())
        self.requires_grad = [p.requires_grad for _, p in self.params]
        self.grads = [p.grad for _, p in self.params]
        self.grad_values = [None if p.grad is None else p.grad.detach().clone() for _, p in self.params]
        self.hooks = [[dict(getattr(m, d, {}) or {}) for d in _HOOK_DICTS] for _, m in self.modules]
        self.attributes = [dict(vars(m)) for _, m in self.modules]

    def differences(self) -> list[str]:
        """What differs from the state recorded; empty when the model is exactly as found."""
        model, found = self.model, []
        now = model.state_dict(keep_vars=True)
        if list(now) != list(self.tensors):
            found.append("state_dict keys")
        for k, v in self.tensors.items():
            if k in now and not (now[k].dtype == v.dtype and now[k].shape == v.shape and torch.equal(now[k].detach(), v)):
                found.append(f"tensor {k}")
        if [n for n, _ in model.named_modules()] != [n for n, _ in self.modules]:
            found.append("module tree")
        for (name, m), mode, hooks, attrs in zip(self.modules, self.training, self.hooks, self.attributes):
            if m.training != mode:
                found.append(f"mode of {name or 'model'}")
            if [dict(getattr(m, d, {}) or {}) for d in _HOOK_DICTS] != hooks:
                found.append(f"hooks of {name or 'model'}")
            if set(vars(m)) != set(attrs) or any(vars(m)[k] is not v for k, v in attrs.items() if k in vars(m)
                                                 and not isinstance(v, (bool, int, float, str))):
                found.append(f"attributes of {name or 'model'}")
        for (name, p), flag, grad, value in zip(self.params, self.requires_grad, self.grads, self.grad_values):
            if p.requires_grad != flag:
                found.append(f"requires_grad of {name}")
            if p.grad is not grad or (value is not None and not torch.equal(p.grad, value)):
                found.append(f".grad of {name}")
        return found


# ----------------------------------------------------------------------------------------- process counts
def _status(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def counts(model: nn.Module, temp_dir: str) -> dict[str, Any]:
    """Hooks on the model and global module hooks, threads (Python and OS), open descriptors, temp files, RSS."""
    global_hooks = sum(len(getattr(torch.nn.modules.module, name, {}) or {}) for name in _GLOBAL_HOOKS)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    return {
        "model_hooks": hook_count(model),
        "global_module_hooks": global_hooks,
        "python_threads": threading.active_count(),
        "os_threads": _status("Threads"),
        "open_fds": fds,
        "temp_files": sum(len(files) + len(dirs) for _, dirs, files in os.walk(temp_dir)),
        "rss_mib": None if _status("VmRSS") is None else round(_status("VmRSS") / 1024, 1),
    }


# ----------------------------------------------------------------------------------------- failures
class Failure:
    """A user's forward pre-hook on one module that raises on the k-th and every later forward of an armed call (a
    persistent failure: a retry inside medlens, such as the fast forward's contiguous retry, fails again)."""

    def __init__(self, module: nn.Module) -> None:
        self.armed_at: Optional[int] = None
        self.kind: type[BaseException] = RuntimeError
        self.seen = 0
        self.fired = False
        self.handle = module.register_forward_pre_hook(self)

    def arm(self, k: int, kind: type[BaseException]) -> None:
        self.armed_at, self.kind, self.seen, self.fired = k, kind, 0, False

    def disarm(self) -> None:
        self.armed_at = None

    def __call__(self, module: nn.Module, inputs: Any) -> None:
        if self.armed_at is None:
            return
        self.seen += 1
        if self.seen >= self.armed_at:
            self.fired = True
            raise self.kind(f"injected failure on forward {self.seen}")


# ----------------------------------------------------------------------------------------- the run
def brain_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """Seeded MRI-like phantom slices (one with a lesion) at the model's input size, standardised as it expects."""
    spec = model.input_spec
    images = phantom_2d(batch, size=spec.size[0], seed=0, positive_rate=1.0).images
    return (images - spec.mean[0]) / spec.std[0]


def soak(calls: int, slow_calls: int, fail_every: int, warmup: int, sample_every: int,
         log: Callable[[str], None] = print, model_name: str = "brain-tumor-mri",
         fast_methods: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the soak (module docstring) and return its figures; `problems` lists everything that went wrong.

    `model_name` and `fast_methods` (default: FAST) let the test suite run a small version on a phantom model."""
    before = tempfile.tempdir
    temp_dir = tempfile.mkdtemp(prefix="medlens-soak-")
    tempfile.tempdir = temp_dir  # anything medlens writes through tempfile lands here and is counted
    try:
        fast = {**FAST, "methods": fast_methods or FAST["methods"]}
        return _soak(calls, slow_calls, fail_every, warmup, sample_every, log, temp_dir, model_name, fast)
    finally:
        tempfile.tempdir = before
        shutil.rmtree(temp_dir, ignore_errors=True)


def _soak(calls: int, slow_calls: int, fail_every: int, warmup: int, sample_every: int,
          log: Callable[[str], None], temp_dir: str, model_name: str, fast: dict[str, Any]) -> dict[str, Any]:
    model = medlens.load_model(model_name)
    model.train()  # found in training mode, with its first block frozen: both must come back as they were
    blocks = [m for m in model.children() if list(m.children()) and any(True for _ in m.parameters())]
    for p in blocks[0].parameters():  # brain-tumor-mri: layer1
        p.requires_grad_(False)
    failure = Failure(blocks[min(1, len(blocks) - 1)])  # the user's own hook (layer2): part of the model as found
    x = brain_input(model)
    state = ModelState(model)
    figures: dict[str, Any] = {"model": model_name, "torch_threads": torch.get_num_threads(), "calls": calls, "slow_calls": slow_calls,
                               "fail_every": fail_every, "start": counts(model, temp_dir)}
    failures = {"RuntimeError": 0, "KeyboardInterrupt": 0}
    samples: list[tuple[int, float]] = []
    problems: list[str] = []
    started = time.perf_counter()
    plan = [("fast", i) for i in range(calls)] + [("slow", i) for i in range(slow_calls)]
    for n, (group, i) in enumerate(plan):
        spec = fast if group == "fast" else SLOW
        failing = fail_every > 0 and i % fail_every == fail_every - 1
        if failing:
            kind = KeyboardInterrupt if (i // fail_every) % 2 else RuntimeError
            failure.arm(1 + (i // fail_every) % 4, kind)
        try:
            medlens.explain(model, x, spec["methods"], seed=i, **spec["options"])
            if failing and failure.fired:
                problems.append(f"call {n}: the injected failure was swallowed")
        except (RuntimeError, KeyboardInterrupt, medlens.MedlensError) as error:
            if not (failing and failure.fired):
                problems.append(f"call {n}: unexpected {type(error).__name__}: {error}")
            else:
                failures[failure.kind.__name__] += 1
        finally:
            failure.disarm()
        diff = state.differences()
        if diff:
            problems.append(f"call {n} ({group}{', failed' if failing else ''}): model changed: {', '.join(diff[:5])}")
        if n + 1 == warmup:
            figures["after_warmup"] = counts(model, temp_dir)
            figures["warmup_calls"] = warmup
        if (n + 1) % sample_every == 0 or n + 1 == len(plan):
            rss = counts(model, temp_dir)["rss_mib"]
            samples.append((n + 1, rss))
            log(f"{n + 1}/{len(plan)} calls, {time.perf_counter() - started:.0f} s, RSS {rss} MiB, "
                f"problems {len(problems)}")
        if group == "fast" and i == calls - 1:
            figures["fast_seconds"] = round(time.perf_counter() - started, 1)
    figures["end"] = counts(model, temp_dir)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    figures["failures_injected"] = failures
    figures["rss_samples_mib"] = samples
    after = [rss for n, rss in samples if n >= warmup and rss is not None]
    if len(after) >= 2:
        figures["rss_growth_after_warmup_mib"] = round(after[-1] - after[0], 1)
        figures["rss_range_after_warmup_mib"] = [min(after), max(after)]
    base = figures.get("after_warmup", figures["start"])
    for key in ("model_hooks", "global_module_hooks", "python_threads", "os_threads", "open_fds", "temp_files"):
        if figures["end"][key] is not None and base[key] is not None and figures["end"][key] > base[key]:
            problems.append(f"{key} grew from {base[key]} after warm-up to {figures['end'][key]}")
    if figures["end"]["model_hooks"] != figures["start"]["model_hooks"]:
        problems.append("the model's hook count differs from the start")
    figures["problems"] = problems
    failure.handle.remove()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls with every fast method")
    parser.add_argument("--slow-calls", type=int, default=50, help="calls with the perturbation methods")
    parser.add_argument("--fail-every", type=int, default=10, help="every n-th call fails inside (0: none)")
    parser.add_argument("--warmup", type=int, default=50, help="calls before the after-warm-up counts")
    parser.add_argument("--sample-every", type=int, default=50, help="resident memory sampled every n calls")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    figures = soak(args.calls, args.slow_calls, args.fail_every, args.warmup, args.sample_every,
                   log=lambda line: print(line, flush=True))
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    raise SystemExit(1 if figures["problems"] else 0)


if __name__ == "__main__":
    main()
