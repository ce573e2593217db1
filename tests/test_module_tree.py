"""`module_tree` (the one walk the borrow and the model digest use) lists exactly `modules()` and `parameters()`, in
their order, shared submodules and parameters once; the digest's cache still sees a parameter changed in place or
replaced."""
from __future__ import annotations

import torch
from torch import nn

from medlens.core.digests import model_digest
from medlens.core.model_state import module_tree

from helpers import make_tiny2d


def test_module_tree_equals_modules_and_parameters_with_shared_ones_once():
    shared = nn.Linear(3, 3)
    models = [make_tiny2d(0), nn.Sequential(shared, nn.ReLU(), nn.Sequential(shared, nn.Identity()), shared)]
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight  # one parameter in two modules
    for model in [*models, tied]:
        modules, params = module_tree(model)
        assert [id(m) for m in modules] == [id(m) for m in model.modules()]
        assert [id(p) for p in params] == [id(p) for p in model.parameters()]


def test_the_digest_changes_when_a_parameter_changes_in_place_or_is_replaced():
    model = make_tiny2d(0)
    first = model_digest(model)
    assert model_digest(model) == first
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    original = linear.bias.detach().clone()
    with torch.no_grad():
        linear.bias.add_(1.0)
    second = model_digest(model)
    assert second != first
    linear.bias = nn.Parameter(original)
    assert model_digest(model) == first  # the same values again: the same digest, recomputed
    model.register_buffer("extra", torch.zeros(2))
    assert model_digest(model) != first


def test_an_explanation_call_walks_the_model_once_and_its_digest_equals_a_fresh_one(monkeypatch):
    """The borrow's walk serves the layer pass and the digest's cache key: one walk per call, the same results."""
    import medlens
    from medlens.core import context, digests, model_state

    model = make_tiny2d(0)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = medlens.explain(model, x, ["gradcam", "eigengradcam"], targets=[0, 1])
    walks = []
    real = model_state.module_tree

    def counted(m):
        walks.append(m)
        return real(m)

    monkeypatch.setattr(model_state, "module_tree", counted)
    monkeypatch.setattr(digests, "module_tree", counted)
    monkeypatch.setattr(context, "module_tree", counted)
    again = medlens.explain(model, x, ["gradcam", "eigengradcam"], targets=[0, 1])
    assert [m for m in walks if m is model] == [model]
    for method in ("gradcam", "eigengradcam"):
        assert torch.equal(again[method], expected[method])
    digests._DIGESTS.clear()
    assert again.provenance["model"]["sha256"] == model_digest(model)


def test_the_hooks_of_a_borrow_walk_any_other_model_afresh():
    from medlens.core.model_state import borrowed_model

    model, other = make_tiny2d(0), make_tiny2d(1)
    with borrowed_model(model) as hooks:
        assert hooks.modules_of(model) == list(model.modules())
        assert [id(m) for m in hooks.modules_of(other)] == [id(m) for m in other.modules()]


def test_the_digest_sees_an_optimizer_step_a_loaded_state_and_an_init():
    """What changes weights through torch bumps their version counters, so the cached digest is computed again and
    equals a fresh one (writes through `.data` are not seen: docs/api.md says so)."""
    from medlens.core import digests

    def fresh(m):
        digests._DIGESTS.pop(m, None)
        return model_digest(m)

    model = make_tiny2d(0)
    before = model_digest(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    optimizer.step()
    stepped = model_digest(model)
    assert stepped != before and stepped == fresh(model)
    model.load_state_dict(saved)
    assert model_digest(model) == before
    nn.init.zeros_(next(m for m in model.modules() if isinstance(m, nn.Linear)).weight)
    initialised = model_digest(model)
    assert initialised not in (before, stepped) and initialised == fresh(model)
