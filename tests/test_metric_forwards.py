"""The evaluation metrics' forward passes: the folded copy reused across calls only while the model is unchanged,
steps that do not depend on the map scored once per distinct image, values equal to a textbook loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medlens.evaluation import faithfulness as F
from medlens.evaluation import forwards
from medlens.evaluation import trust as TR
from medlens.errors import InputError

from helpers import make_tiny2d

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded, setting restored after


class Counted(nn.Module):
    """Wraps a model and counts the images of the metric's forwards (those run in inference mode; the count is a
    list, shared with the folded copy's shallow copy of this module)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.seen = [0]

    @property
    def images(self) -> int:
        return self.seen[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            self.seen[0] += x.shape[0]
        return self.inner(x)


def _textbook_curves(model, x, maps, targets, steps, fill, output="probability"):
    """Each (image, target, step) built and scored on its own, the model as given."""
    B, T = targets.shape
    P = x[0, 0].numel()
    out = torch.empty(B, T, steps + 1)
    with torch.no_grad():
        for b in range(B):
            for t in range(T):
                order = torch.argsort(maps[b, t].flatten(), descending=True, stable=True)
                for k in range(steps + 1):
                    n = round(k / steps * P)
                    img = x[b].clone().flatten(1)
                    img[:, order[:n]] = fill[b].flatten(1)[:, order[:n]]
                    logits = model(img.view(1, *x.shape[1:]))
                    out[b, t, k] = (logits.softmax(1) if output == "probability" else logits)[0, targets[b, t]]
    return out


def test_deletion_scores_the_ends_once_per_distinct_image_and_matches_a_textbook_loop():
    torch.manual_seed(0)
    model = make_tiny2d(0).eval()
    x, maps = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    targets = torch.tensor([[0, 1], [2, 0], [1, 1]])
    counted = Counted(model)
    F.deletion(counted, x, maps, targets, steps=4, baseline="zero")  # builds the folded copy (2 checking forwards)
    counted.seen[0] = 0
    d = F.deletion(counted, x, maps, targets, steps=4, baseline="zero")
    # 3 images x 2 targets x 3 inner steps, then the 3 untouched images and one all-zero image for every target
    assert counted.images == 3 * 2 * 3 + 3 + 1
    ref = _textbook_curves(model, x, maps, targets, 4, torch.zeros_like(x))
    assert torch.allclose(d.curves, ref, atol=1e-5)
    blur, _ = F.make_baseline(x, "blur")
    i = F.insertion(model, x, maps, targets, steps=4, baseline="blur")  # ends: the blurred and the original images
    assert torch.allclose(i.curves, _textbook_curves(model, blur, maps, targets, 4, x), atol=1e-5)


def test_the_folded_copy_is_reused_until_the_model_changes(monkeypatch):
    model = make_tiny2d(1).eval()
    x, maps, targets = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8), torch.zeros(8, 1, dtype=torch.long)
    built = []
    real = forwards.fast_forward
    monkeypatch.setattr(forwards, "fast_forward", lambda m, xx: built.append(1) or real(m, xx))
    first = F.deletion(model, x, maps, targets, steps=4, output="logit")
    F.deletion(model, x, maps, targets, steps=4, output="logit")
    TR.completeness(model, x, maps, targets)
    assert len(built) == 1 and forwards._FOLDED[model].forward.folded > 0
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_mean.data.add_(0.5)  # through .data: no version counter sees it
    changed = F.deletion(model, x, maps, targets, steps=4, output="logit")
    assert len(built) == 2
    assert not torch.allclose(changed.curves, first.curves)
    assert torch.allclose(changed.curves, _textbook_curves(model, x, maps, targets, 4, torch.zeros_like(x), "logit"),
                          atol=1e-4)
    handle = bn.register_forward_hook(lambda *a: None)  # a hook on a folded module: the copy would skip it
    F.deletion(model, x, maps, targets, steps=4, output="logit")
    handle.remove()
    assert len(built) == 3
    F.deletion(model, torch.randn(8, 1, 12, 12), torch.randn(8, 1, 12, 12), targets, steps=4)  # another shape
    assert len(built) == 4


def test_completeness_scores_a_constant_baseline_once():
    model = make_tiny2d(2).eval()
    x, targets = torch.randn(4, 1, 8, 8), torch.tensor([[0], [1], [2], [0]])
    counted = Counted(model)
    maps = torch.randn(4, 1, 8, 8)
    r = TR.completeness(counted, x, maps, targets, baseline=0.25)  # 5 inputs: the model as given, nothing built
    assert counted.images == 4 + 1
    with torch.no_grad():
        delta = model(x).gather(1, targets) - model(torch.full_like(x, 0.25)).gather(1, targets)
    assert torch.allclose(r.delta, delta, atol=1e-5)
    assert torch.allclose(r.attribution_sum, maps.flatten(1).sum(1, keepdim=True), atol=1e-5)


def test_given_logits_save_the_unperturbed_passes_and_leave_the_values_equal():
    model = make_tiny2d(3).eval()
    x, maps = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    targets = torch.tensor([[0, 1], [2, 0], [1, 1]])
    with torch.no_grad():
        logits = model(x)
    counted = Counted(model)
    for name, baseline in (("deletion", "zero"), ("insertion", "blur")):
        for output in ("probability", "logit"):
            plain = getattr(F, name)(counted, x, maps, targets, steps=4, baseline=baseline, output=output)
            counted.seen[0] = 0
            given = getattr(F, name)(counted, x, maps, targets, steps=4, baseline=baseline, output=output,
                                     logits=logits)
            # insertion: its last point (everything put back) is x; deletion: its first point
            assert counted.images == 3 * 2 * 3 + (1 if name == "deletion" else 3)
            assert torch.allclose(given.curves, plain.curves, atol=1e-6) and torch.allclose(given.values, plain.values,
                                                                                             atol=1e-6)
    for baseline, passes in ((0.25, 1), ("zero", 1), (None, 0)):
        plain = TR.completeness(counted, x, maps, targets, baseline=baseline)
        counted.seen[0] = 0
        given = TR.completeness(counted, x, maps, targets, baseline=baseline, logits=logits)
        assert counted.images == passes
        assert torch.allclose(given.delta, plain.delta, atol=1e-6) and torch.equal(given.holds, plain.holds)
        assert given.reference == plain.reference
    with pytest.raises(InputError, match="logits"):
        F.deletion(model, x, maps, targets, steps=4, logits=logits[:2])
    with pytest.raises(InputError, match="classes"):
        TR.completeness(model, x, maps, targets, logits=logits[:, :2])


def test_a_metric_call_with_logits_scores_as_one_without():
    from medlens.evaluation.metrics import MetricCall, get_metric

    model = make_tiny2d(4).eval()
    x, maps, targets = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([[1], [2]])
    with torch.no_grad():
        logits = model(x)
    for metric in ("deletion", "insertion", "completeness"):
        plain = get_metric(metric).score(MetricCall(model, x, maps, targets, None, "integratedgradients"))
        call = MetricCall(model, x, maps, targets, None, "integratedgradients", logits=logits)
        given = get_metric(metric).score(call)
        assert torch.allclose(given.values, plain.values, rtol=1e-5, atol=1e-6), metric


def test_a_baseline_constant_per_image_is_scored_once_per_distinct_value():
    model = make_tiny2d(5).eval()
    x, maps, targets = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8), torch.tensor([[0], [1], [2], [0], [1]])
    black = torch.tensor([-0.5, 0.25, -0.5, 0.25, 0.0]).view(5, 1, 1, 1)  # e.g. the scan's black, measured per image
    rows, index = forwards.distinct_rows(black.expand_as(x).clone())
    assert rows[:, 0, 0, 0].tolist() == [-0.5, 0.25, 0.0] and index.tolist() == [0, 1, 0, 1, 2]
    counted = Counted(model)
    TR.completeness(counted, x, maps, targets, baseline=black)  # 8 inputs: builds the folded copy
    counted.seen[0] = 0
    r = TR.completeness(counted, x, maps, targets, baseline=black)
    assert counted.images == 5 + 3
    with torch.no_grad():
        delta = model(x).gather(1, targets) - model(black.expand_as(x)).gather(1, targets)
    assert torch.allclose(r.delta, delta, atol=1e-5)
