"""explain() from several threads: two models run at the same time, one model's calls wait for each other, and
every map equals the map of the same call made alone (issue 13 item 6, issue 17 item 6)."""
from __future__ import annotations

import threading
import time

import torch
from torch import nn

import medlens
from helpers import run_in_threads
from medlens.core.model_state import hook_count


class _Tiny(nn.Module):
    """A small conv net (conv-BN-ReLU twice, functional ReLU in forward, GAP, linear) on 1-channel images."""

    def __init__(self, seed: int, features: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = features if features is not None else nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8),
        )
        self.head = nn.Linear(8, 3)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean((2, 3)))


class _Meeting(nn.Module):
    """Wraps a model; its first forward records when it started and waits (up to 30 s) until the other
    `_Meeting` sharing the barrier is inside its forward too: both are only released if the calls overlap."""

    def __init__(self, inner: nn.Module, barrier: threading.Barrier) -> None:
        super().__init__()
        self.inner = inner
        self.barrier = barrier
        self.armed = False
        self.times: list[tuple[float, float]] = []
        self.met: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.monotonic()
        if self.armed:
            self.armed = False
            try:
                self.barrier.wait()
                self.met = True
            except threading.BrokenBarrierError:
                self.met = False
        out = self.inner(x)
        self.times.append((start, time.monotonic()))
        return out


def _x(seed: int, side: int = 12, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, side, side, generator=torch.Generator().manual_seed(seed))


METHODS_TWO = ["gradcam", "saliency", "guidedbackprop", "lrp"]


def test_two_threads_explain_two_models_at_the_same_time_and_get_the_sequential_maps():
    barrier = threading.Barrier(2, timeout=30)
    a, b = _Meeting(_Tiny(1), barrier).eval(), _Meeting(_Tiny(2), barrier).eval()
    xa, xb = _x(10), _x(11)
    alone_a = medlens.explain(a, xa, METHODS_TWO, targets=[0, 2], layer="inner.features.3")
    alone_b = medlens.explain(b, xb, METHODS_TWO, targets=[1], layer="inner.features.3")
    a.times.clear()
    b.times.clear()
    a.armed = b.armed = True
    results: dict = {}

    def job(name, model, x, targets):
        return lambda: results.__setitem__(name, medlens.explain(model, x, METHODS_TWO, targets=targets,
                                                                 layer="inner.features.3"))

    assert run_in_threads([job("a", a, xa, [0, 2]), job("b", b, xb, [1])]) == []
    # Each first forward waited at the barrier for the other: both calls were inside their models at once.
    assert a.met is True and b.met is True
    (a_start, _), (b_start, _) = a.times[0], b.times[0]
    a_end, b_end = a.times[-1][1], b.times[-1][1]
    assert a_start < b_end and b_start < a_end  # the two calls' model runs overlap in time
    for name in METHODS_TWO:
        assert torch.equal(results["a"][name], alone_a[name]), name
        assert torch.equal(results["b"][name], alone_b[name]), name


def test_calls_on_one_model_wait_for_each_other():
    barrier = threading.Barrier(2, timeout=3)
    model = _Meeting(_Tiny(3), barrier).eval()
    x = _x(12)
    alone = medlens.explain(model, x, ["gradcam", "guidedbackprop"], layer="inner.features.3")
    model.times.clear()
    model.armed = True  # the first call's forward waits for a second forward inside this model: it never comes
    results: list = []
    errors = run_in_threads([lambda: results.append(medlens.explain(model, x, ["gradcam", "guidedbackprop"],
                                                                   layer="inner.features.3"))] * 2)
    assert errors == [] and model.met is False  # the other call waited outside the model (the barrier timed out)
    intervals = sorted(model.times)
    # No forward of one call ran while the other call was inside the model: the calls ran one after the other.
    first_call, second_call = intervals[: len(intervals) // 2], intervals[len(intervals) // 2:]
    assert first_call[-1][1] <= second_call[0][0]
    for r in results:
        for name in ("gradcam", "guidedbackprop"):
            assert torch.equal(r[name], alone[name]), name


# (methods, options) mixed over families: gradient CAMs, forward-only CAMs, gradients, guided, LRP, perturbation
_MIXES = [
    (["gradcam", "layercam", "saliency"], {}),
    (["guidedbackprop", "guidedgradcam"], {}),
    (["lrp"], {"composite": "epsilon_gamma_box"}),
    (["integratedgradients", "inputxgradient"], {"n_steps": 4}),
    (["smoothgrad"], {"n_samples": 2, "base": "guidedbackprop"}),
    (["scorecam", "eigencam"], {}),
    (["occlusion"], {"window": 4, "stride": 4}),
    (["rise"], {"n_masks": 8}),
]


def test_four_threads_fifty_calls_each_give_exactly_the_sequential_maps():
    shared = _Tiny(4)
    models = [_Tiny(5), _Tiny(6), _Tiny(7, features=shared.features)]  # the third shares its features with `shared`
    models.append(shared)
    for m in models:
        m.eval()
    models[0].train()  # a model in training mode must come back in training mode
    inputs = [_x(20 + i, side=10) for i in range(3)]
    calls = [(i % len(models), i % len(_MIXES), i % len(inputs)) for i in range(4 * 50)]

    def call(model_i, mix_i, input_i):
        methods, options = _MIXES[mix_i]
        return medlens.explain(models[model_i], inputs[input_i], methods, targets=[mix_i % 3], seed=mix_i,
                               layer="features.4", **options)

    expected = {key: call(*key) for key in set(calls)}  # the same calls, one after another
    got: list[list] = [[] for _ in range(4)]
    errors = run_in_threads([
        (lambda t=t: got[t].extend((key, call(*key)) for key in calls[t::4])) for t in range(4)
    ])
    assert errors == []
    assert sum(len(g) for g in got) == 200
    for key, result in (item for g in got for item in g):
        for name in _MIXES[key[1]][0]:
            assert torch.equal(result[name], expected[key][name]), (key, name)
    assert models[0].training and not models[1].training
    assert all(hook_count(m) == 0 for m in models)
    assert all(p.requires_grad and p.grad is None for m in models for p in m.parameters())
