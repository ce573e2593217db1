"""The shared layer pass: the layers below the target layer run unrecorded (inference mode), and that changes
nothing: the logits, the captured activation and the target gradients equal those of the pass recorded
throughout, bit for bit, on 2-D and 3-D models, with the layer inside a residual block, used twice, followed by
an in-place ReLU, and where the model refuses inference tensors above the layer (it runs again, recorded)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medlens
from medlens.core import context
from medlens.core.model_state import borrowed_model

from helpers import make_tiny2d, make_tiny3d


class ResidualNet(nn.Module):
    """The target layer `a` sits inside a residual block; `twice` is called twice; `gate` multiplies a tensor
    made below it with its own output (autograd must save the lower tensor)."""

    def __init__(self, dims: int = 2, gated: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.stem = conv(1, 8, 3, padding=1)
        self.a = conv(8, 8, 3, padding=1)
        self.b = conv(8, 8, 3, padding=1)
        self.twice = conv(8, 8, 1)
        self.gate = conv(8, 8, 1)
        self.gated = gated
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        r = self.b(torch.relu(self.a(h)))
        h = torch.relu(h + r)
        h = torch.relu(self.twice(h))
        h = self.twice(h) * h
        if self.gated:
            h = torch.sigmoid(self.gate(h)) * h  # h was made below `gate`: saved for the backward of the product
        return self.fc(h.flatten(2).mean(2))


class OwnGradBlock(nn.Module):
    """A model whose own enable_grad block spans the target layer (`inner`): its exit restores the mode it found."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            h = torch.relu(self.inner(x))
        return self.fc(h.mean(dim=(2, 3)))


def _pass(model: nn.Module, x: torch.Tensor, layer: nn.Module, targets: torch.Tensor, unrecorded: bool):
    with torch.enable_grad(), borrowed_model(model):
        if unrecorded:  # as explain() runs it: unrecorded below the layer when the model allows it
            lp = context.run_layer_pass(model, x, layer, None, True)
        else:
            lp = context._layer_pass(model, x, layer, True, unrecorded_below=False)
        grads = lp.gradients(targets)
    return lp, grads


def _cases():
    yield "tiny2d", make_tiny2d(0), torch.randn(2, 1, 20, 20), "features"
    yield "tiny3d", make_tiny3d(0), torch.randn(2, 1, 8, 8, 8), "features"
    for dims in (2, 3):
        torch.manual_seed(1)
        model = ResidualNet(dims).eval()
        x = torch.randn((2, 1) + (10,) * dims)
        yield f"residual{dims}d-inner", model, x, "a"
        yield f"residual{dims}d-twice", model, x, "twice"


@pytest.mark.parametrize("name", [c[0] for c in _cases()])
def test_unrecorded_below_equals_the_recorded_pass_exactly(name):
    _, model, x, layer_name = next(c for c in _cases() if c[0] == name)
    layer = dict(model.named_modules())[layer_name]
    targets = torch.tensor([[0, 2], [1, 0]])
    seen = []
    below = model.stem if hasattr(model, "stem") else model.features[0]
    handle = below.register_forward_hook(lambda m, i, o: seen.append(o.is_inference()))
    try:
        fast, fast_grads = _pass(model, x, layer, targets, True)
        slow, slow_grads = _pass(model, x, layer, targets, False)
    finally:
        handle.remove()
    assert seen == [True, False]  # the fast pass really ran the layers below unrecorded
    assert not fast.logits.is_inference() and fast.logits.requires_grad
    assert torch.equal(fast.logits, slow.logits)
    assert torch.equal(fast.activation, slow.activation)
    assert fast.inplace_relu == slow.inplace_relu
    assert torch.equal(fast_grads, slow_grads)
    assert fast_grads.abs().sum() > 0


def test_gradient_of_the_layer_inside_a_residual_block_is_the_textbook_one():
    """d logit / d a(h), by autograd on the model with a(h) made a leaf by hand (a slow independent route)."""
    torch.manual_seed(1)
    model = ResidualNet(2).eval()
    x = torch.randn(1, 1, 10, 10)
    _, grads = _pass(model, x, model.a, torch.tensor([[2]]), True)
    leaf = {}

    def make_leaf(_m, _i, out):
        leaf["a"] = out.detach().requires_grad_(True)
        return leaf["a"]

    handle = model.a.register_forward_hook(make_leaf)
    try:
        logit = model(x)[0, 2]
        (expected,) = torch.autograd.grad(logit, leaf["a"])
    finally:
        handle.remove()
    torch.testing.assert_close(grads[0], expected, rtol=1e-6, atol=1e-7)


def test_a_model_that_saves_a_lower_tensor_above_the_layer_runs_recorded_and_gives_the_same_pass():
    torch.manual_seed(2)
    model = ResidualNet(2, gated=True).eval()
    x = torch.randn(2, 1, 10, 10)
    targets = torch.tensor([[0], [1]])
    calls = []
    handle = model.stem.register_forward_hook(lambda m, i, o: calls.append(o.is_inference()))
    try:
        fast, fast_grads = _pass(model, x, model.gate, targets, True)
    finally:
        handle.remove()
    assert calls == [True, False]  # tried unrecorded, refused by autograd, run again recorded
    slow, slow_grads = _pass(model, x, model.gate, targets, False)
    assert torch.equal(fast.logits, slow.logits) and torch.equal(fast_grads, slow_grads)


def test_a_grad_mode_block_spanning_the_layer_runs_recorded():
    torch.manual_seed(3)
    model = OwnGradBlock().eval()
    x = torch.randn(1, 1, 6, 6)
    fast, fast_grads = _pass(model, x, model.inner, torch.tensor([[1]]), True)
    slow, slow_grads = _pass(model, x, model.inner, torch.tensor([[1]]), False)
    assert fast.logits.requires_grad and not fast.logits.is_inference()
    assert torch.equal(fast_grads, slow_grads)


def test_explain_maps_do_not_depend_on_the_unrecorded_region(monkeypatch):
    """Every layer-based method, through explain(), equals itself with the layer pass recorded throughout."""
    torch.manual_seed(1)
    model = ResidualNet(2).eval()
    x = torch.randn(2, 1, 12, 12)
    methods = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam", "eigencam",
               "scorecam", "ablationcam", "guidedgradcam"]
    for layer in ("a", "twice"):
        fast = medlens.explain(model, x, methods, targets=[0, 2], layer=layer)
        recorded = context._layer_pass
        monkeypatch.setattr(context, "_layer_pass", lambda m, x_, l, g, unrecorded_below, **kw: recorded(m, x_, l, g, False, **kw))
        slow = medlens.explain(model, x, methods, targets=[0, 2], layer=layer)
        monkeypatch.undo()
        for method in methods:
            assert torch.equal(fast[method], slow[method]), (layer, method)
