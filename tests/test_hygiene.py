"""Model hygiene around `explain()`: hooks, train/eval flags, requires_grad, .grad and buffers as found.

Checked after successful calls and after calls that raise part-way, for every CAM method.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import medlens
from medlens.errors import MedlensError, MethodError
from medlens.core.model_state import hook_count

from helpers import make_tiny2d, run_in_threads

CAMS = [n for n in medlens.methods() if medlens.method_info(n)["family"] == "cam"]


def _model(seed: int = 0) -> nn.Module:
    return make_tiny2d(seed, num_classes=3)


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, 24, 24, generator=torch.Generator().manual_seed(1))


def _snapshot(model: nn.Module) -> dict:
    return {
        "hooks": hook_count(model),
        "training": [(n, m.training) for n, m in model.named_modules()],
        "requires_grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
        "grad_ids": [(n, None if p.grad is None else id(p.grad)) for n, p in model.named_parameters()],
        "grad_values": [(n, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["hooks"] == before["hooks"], "hooks left on the model"
    assert after["training"] == before["training"], "train/eval flags changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["grad_ids"] == before["grad_ids"], ".grad tensors replaced"
    for (name, g0), (_, g1) in zip(before["grad_values"], after["grad_values"]):
        if g0 is None:
            assert g1 is None, f"{name}.grad appeared"
        else:
            assert torch.equal(g0, g1), f"{name}.grad changed"
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{k} changed (parameters or batch-norm statistics)"


def _dirty(model: nn.Module) -> None:
    """Mixed modes, frozen parameters and existing .grad tensors, as a training loop leaves them."""
    model.train()
    model.features[1].eval()  # one BN in eval mode, the rest training
    model.features[0].weight.requires_grad_(False)  # frozen
    model.features[0].bias.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.25)
    model.features[4].weight.grad = torch.randn_like(model.features[4].weight)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_every_cam_leaves_the_model_as_found(mode):
    model = _model()
    if mode == "train":
        _dirty(model)
    else:
        model.fc.bias.grad = torch.ones_like(model.fc.bias)
    before = _snapshot(model)
    x = _x()
    result = medlens.explain(model, x, CAMS, targets=[0, 2])
    _assert_same(model, before)
    assert x.grad is None and not x.requires_grad
    # The call ran in eval mode: the same maps as on an eval-mode copy (batch-norm statistics used, not
    # the batch's), so train mode did not leak into the explanation.
    reference = _model()
    reference.eval()
    again = medlens.explain(reference, x, CAMS, targets=[0, 2])
    for name in CAMS:
        torch.testing.assert_close(result[name], again[name], msg=name)


class _FailsAfter(nn.Module):
    """Wraps a model and raises on its n-th forward call (a method failing part-way)."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        self.inner = inner
        self.n = n
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise RuntimeError("boom in forward")
        return self.inner(x)


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_model_restored_when_a_method_raises_midway(method):
    wrapped = _FailsAfter(_model(), n=3)  # 1: automatic layer, 2: shared pass, 3: first perturbation/aug pass
    _dirty(wrapped.inner)
    before = _snapshot(wrapped)
    with pytest.raises(RuntimeError, match="boom"):
        medlens.explain(wrapped, _x(), method, targets=1, **({"aug_smooth": True} if method == "gradcam" else {}))
    assert wrapped.calls >= 3
    _assert_same(wrapped, before)


def test_model_restored_when_a_user_error_is_raised_inside_the_call():
    # gradcam runs (hooks, a graph), then cam fails on VGG-like heads: model restored, clear error.
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    model[3].weight.grad = torch.zeros_like(model[3].weight)
    before = _snapshot(model)
    with pytest.raises(MethodError, match="cam needs"):
        medlens.explain(model, torch.randn(1, 1, 8, 8), ["gradcam", "cam"], targets=0)
    _assert_same(model, before)
    # Bad options and bad targets also leave no trace.
    for kwargs in ({"batch_size": 0, "methods": "scorecam"}, {"targets": [7], "methods": "gradcam"},
                   {"targets": [[0], [1]], "methods": "gradcam"}, {"methods": "gradcam", "bogus": 1}):
        with pytest.raises(MedlensError):
            medlens.explain(model, torch.randn(1, 1, 8, 8), **kwargs)
        _assert_same(model, before)


def test_in_place_relus_give_the_same_maps_as_out_of_place():
    inplace = _model()
    outplace = _model()
    for m in outplace.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = _x()
    a = medlens.explain(inplace, x, CAMS, targets=[0, 1])
    b = medlens.explain(outplace, x, CAMS, targets=[0, 1])
    for name in CAMS:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_repeated_calls_leave_no_hooks_and_are_deterministic():
    model = _model()
    x = _x()
    first = medlens.explain(model, x, CAMS, targets=1)
    for _ in range(3):
        again = medlens.explain(model, x, CAMS, targets=1)
    assert hook_count(model) == 0
    for name in CAMS:
        assert torch.equal(first[name], again[name]), name


# ------------------------------------------------------------------------------------------ threads
def _in_threads(fn, n: int) -> list:
    """fn(0) ... fn(n - 1), each in its own thread, started together: the exceptions they raised."""
    return run_in_threads([functools.partial(fn, i) for i in range(n)])


def test_threads_explaining_one_model_leave_it_as_found_and_get_the_same_maps():
    model = _model().train()
    model.features[0].weight.requires_grad_(False)
    before = _snapshot(model)
    x = _x()
    model.eval()
    reference = medlens.explain(model, x, ["gradcam", "scorecam"], targets=[1])
    model.train()
    results: dict = {}

    def work(i):
        for _ in range(5):
            results[i] = medlens.explain(model, x, ["gradcam", "scorecam"], targets=[1])

    assert _in_threads(work, 3) == []
    _assert_same(model, before)
    assert model.training
    for r in results.values():
        for name in ("gradcam", "scorecam"):
            torch.testing.assert_close(r[name], reference[name])


class _BranchesInThreads(nn.Module):
    """Runs its two branches in a thread pool, as nn.DataParallel's parallel_apply does."""

    def __init__(self, threaded: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(1, 4, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.threaded = threaded

    def forward(self, x):
        if self.threaded:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(2) as pool:
                fa, fb = pool.submit(self.a, x), pool.submit(self.b, x)
                a, b = fa.result(), fb.result()
        else:
            a, b = self.a(x), self.b(x)
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


def test_guided_relu_reaches_threads_the_model_starts_and_is_undone_after_concurrent_calls():
    import torch.nn.functional as F

    originals = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, "relu" in torch.Tensor.__dict__)
    x = _x()
    one_thread = medlens.explain(_BranchesInThreads(False).eval(), x, "guidedbackprop", targets=[1])["guidedbackprop"]
    threaded_model = _BranchesInThreads(True).eval()
    threaded = medlens.explain(threaded_model, x, "guidedbackprop", targets=[1])["guidedbackprop"]
    torch.testing.assert_close(threaded, one_thread)  # the branches' ReLUs were guided in the pool's threads too
    saliency = medlens.explain(threaded_model, x, "saliency", targets=[1])["saliency"]
    assert not torch.allclose(threaded, saliency)

    def work(i):
        for _ in range(5):
            got = medlens.explain(threaded_model, x, "guidedbackprop", targets=[1])["guidedbackprop"]
            torch.testing.assert_close(got, one_thread)

    assert _in_threads(work, 3) == []
    assert (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, "relu" in torch.Tensor.__dict__) == originals
    a = torch.tensor([-1.0, 2.0], requires_grad=True)
    (-3 * F.relu(a)).sum().backward()
    assert a.grad.tolist() == [0.0, -3.0]  # plain ReLU gradients again


def test_first_calls_from_two_threads_see_every_method():
    import subprocess
    import sys

    code = (
        "import threading, medlens\n"
        "errors = []\n"
        "def run():\n"
        "    try:\n"
        "        medlens.method_info('saliency'); medlens.method_info('lrp')\n"
        "    except Exception as e:\n"
        "        errors.append(repr(e))\n"
        "ts = [threading.Thread(target=run) for _ in range(4)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print(len(medlens.methods()), errors)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == f"{len(medlens.methods())} []"


# ------------------------------------------------------------------------------------------ soak
def _soak_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("medlens_soak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_short_soak_no_growth_and_model_as_found_after_failed_calls():
    """benchmarks/soak.py in small: 15 calls with every fast method on a bundled phantom model, every third failing
    inside the call (RuntimeError or KeyboardInterrupt, at the 1st to 4th forward); after each call the model's
    tensors are bit for bit, its modes, flags, .grad, hooks and attributes as found; no hooks, threads, open
    files or temporary files more at the end than after warm-up."""
    soak = _soak_module()
    fast = [m for m in soak.FAST["methods"] if m != "cam"]  # CAM needs a pooling + linear head right after the layer
    figures = soak.soak(calls=15, slow_calls=0, fail_every=3, warmup=5, sample_every=5, log=lambda line: None,
                        model_name="phantom-lesion", fast_methods=fast)
    assert figures["problems"] == []
    assert sum(figures["failures_injected"].values()) == 5  # the failures did fire (and were checked after)
    assert figures["failures_injected"]["KeyboardInterrupt"] >= 2
    for key in ("model_hooks", "global_module_hooks", "python_threads", "os_threads", "open_fds", "temp_files"):
        assert figures["end"][key] == figures["after_warmup"][key], key


def test_soak_state_check_sees_a_changed_model():
    """The soak's model check can fail: a changed weight, mode, flag or leftover hook is reported."""
    soak = _soak_module()
    model = _model().eval()
    state = soak.ModelState(model)
    assert state.differences() == []
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] += 1e-7
    model.features[1].train()
    model.fc.weight.requires_grad_(False)
    handle = model.fc.register_forward_hook(lambda *a: None)
    found = " ".join(state.differences())
    handle.remove()
    assert "tensor features.0.weight" in found and "mode of features.1" in found
    assert "requires_grad of fc.weight" in found and "hooks of fc" in found
