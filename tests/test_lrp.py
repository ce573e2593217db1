"""LRP: every rule against its textbook formula, axioms (LRP-0 = input x gradient, conservation after
canonization on DenseNet121 / ResNet50 / VGG16-BN), zennit as an oracle, and hygiene."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.errors import MethodError
from medlens.core.input_spec import InputSpec
from medlens.families.lrp import (AlphaBeta, Epsilon, Flat, Gamma, Pass, WSquare, ZBox, ZPlus, Zero, lrp_model,
                                  lrp_relevance, plan_model, assign_rules)
from medlens.families.lrp.engine import _CallState
from medlens.core.model_state import hook_count

from helpers import correlation, torchvision_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vgg16():
    return torchvision_model("vgg16")  # built once: its 120M-parameter head is slow to initialise


# ------------------------------------------------------------------------------- textbook LRP (dense)
def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).double()


def textbook(rule: str, a: torch.Tensor, w: torch.Tensor, b: torch.Tensor, r: torch.Tensor, *, eps=1e-6, gamma=0.25,
             alpha=2.0, beta=1.0, low=0.0, high=1.0, ones_mask=None) -> torch.Tensor:
    """R_j = sum_k q_jk / (sum_j q_jk + bias term) R_k, written out per rule; a (J,), w (J, K), b (K,), r (K,)."""
    a, w, b, r = a.double(), w.double(), b.double(), r.double()
    y = a @ w + b
    contrib = a[:, None] * w  # (J, K)
    if rule in ("epsilon", "zero"):
        return (contrib / _stab(y, eps)[None] * r[None]).sum(1)
    if rule == "gamma":
        ap, an = a.clamp(min=0)[:, None], a.clamp(max=0)[:, None]
        q_pos = ap * (w + gamma * w.clamp(min=0)) + an * (w + gamma * w.clamp(max=0))
        q_neg = ap * (w + gamma * w.clamp(max=0)) + an * (w + gamma * w.clamp(min=0))
        z_pos = q_pos.sum(0) + b + gamma * b.clamp(min=0)
        z_neg = q_neg.sum(0) + b + gamma * b.clamp(max=0)
        rp, rn = r * (y > 0), r * (y < 0)
        return (q_pos / _stab(z_pos, eps) * rp).sum(1) + (q_neg / _stab(z_neg, eps) * rn).sum(1)
    if rule == "alphabeta":
        pos, neg = contrib.clamp(min=0), contrib.clamp(max=0)
        z_pos, z_neg = pos.sum(0) + b.clamp(min=0), neg.sum(0) + b.clamp(max=0)
        return (alpha * pos / _stab(z_pos, eps) * r - beta * neg / _stab(z_neg, eps) * r).sum(1)
    if rule == "zbox":
        q = contrib - low * w.clamp(min=0) - high * w.clamp(max=0)
        return (q / _stab(q.sum(0), eps) * r).sum(1)
    if rule in ("flat", "wsquare"):
        q = ones_mask.double() if rule == "flat" else w * w
        return (q / _stab(q.sum(0), eps) * r).sum(1)
    raise ValueError(rule)


def _dense_of_conv(conv: nn.Conv2d, shape) -> torch.Tensor:
    """The (J, K) matrix of a bias-free convolution, J = input entries, K = output entries."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    out = F.conv2d(basis, conv.weight.double(), None, conv.stride, conv.padding)
    return out.reshape(n, -1)


def _engine(model, x, rule, targets, bounds=(0.0, 1.0)):
    res = lrp_relevance(model, x, targets, composite={"0": rule}, bounds=bounds)
    return res.relevance  # (T, B, *x.shape[1:])


RULES = {
    "zero": (Zero(), {"eps": 1e-9}),
    "epsilon": (Epsilon(0.3), {"eps": 0.3}),
    "gamma": (Gamma(0.5), {"gamma": 0.5}),
    "alpha2_beta1": (AlphaBeta(2, 1), {}),
    "alpha3_beta2": (AlphaBeta(3, 2), {"alpha": 3.0, "beta": 2.0}),
    "zplus": (ZPlus(), {"alpha": 1.0, "beta": 0.0}),
    "zbox": (ZBox(-2.0, 3.0), {"low": -2.0, "high": 3.0}),
    "flat": (Flat(), {}),
    "wsquare": (WSquare(), {}),
}


def _textbook_name(name):
    return {"alpha2_beta1": "alphabeta", "alpha3_beta2": "alphabeta", "zplus": "alphabeta"}.get(name, name)


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize("name", list(RULES))
def test_rule_on_linear_layer_matches_textbook(name, nonnegative):
    torch.manual_seed(1)
    layer = nn.Linear(7, 5)
    model = nn.Sequential(layer).eval()
    x = torch.rand(3, 7) * 5 - 2 if not nonnegative else torch.rand(3, 7) * 3
    targets = torch.tensor([[0, 3], [1, 4], [2, 2]])
    rule, kw = RULES[name]
    got = _engine(model, x, rule, targets, bounds=(-2.0, 3.0))
    for b in range(3):
        y = layer(x[b])
        for t in range(2):
            r = torch.zeros(5, dtype=torch.float64)
            r[targets[b, t]] = y[targets[b, t]].double()
            want = textbook(_textbook_name(name), x[b], layer.weight.detach().T, layer.bias.detach(), r,
                            ones_mask=torch.ones(7, 5), **kw)
            torch.testing.assert_close(got[t, b].double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(RULES))
def test_rule_on_conv_layer_matches_textbook(name):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Flatten()).eval()
    shape = (2, 5, 5)
    x = torch.rand(2, *shape) * 5 - 2
    targets = torch.tensor([[7, 40], [30, 74]])
    rule, kw = RULES[name]
    got = _engine(model, x, rule, targets, bounds=(-2.0, 3.0))
    dense = _dense_of_conv(conv, shape)
    ones = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    ones.weight.data.fill_(1.0)
    mask = _dense_of_conv(ones, shape)
    bias = conv.bias.detach().double().repeat_interleave(25)
    for b in range(2):
        y = x[b].double().flatten() @ dense + bias
        for t in range(2):
            r = torch.zeros_like(y)
            r[targets[b, t]] = y[targets[b, t]]
            # (for w-square, the square of the dense matrix is the dense matrix of the squared kernel)
            want = textbook(_textbook_name(name), x[b].flatten(), dense, bias, r, ones_mask=mask, **kw)
            torch.testing.assert_close(got[t, b].double().flatten(), want, rtol=1e-4, atol=1e-5)


def test_pass_rule_and_nonhomogeneous_activation_pass_relevance_unchanged():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6, bias=False), nn.SiLU(), nn.Linear(6, 4, bias=False)).eval()
    x = torch.randn(4, 6)
    targets = torch.tensor([[0], [1], [2], [3]])
    res = lrp_relevance(model, x, targets, composite="epsilon", epsilon=1e-9)
    # LRP-0 without biases through a pass-through SiLU conserves the logit exactly.
    torch.testing.assert_close(res.relevance.sum(dim=2)[0], res.logits.gather(1, targets)[:, 0], rtol=1e-4, atol=1e-5)
    # The pass rule on a square layer hands each output's relevance to the input of the same index.
    sq = nn.Sequential(nn.Linear(5, 5)).eval()
    x2 = torch.randn(2, 5)
    t2 = torch.tensor([[1], [3]])
    rel = lrp_relevance(sq, x2, t2, composite={"0": Pass()}).relevance[0]
    y = sq(x2)
    want = torch.zeros_like(rel)
    want[0, 1], want[1, 3] = y[0, 1], y[1, 3]
    torch.testing.assert_close(rel, want.detach(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- axioms
def _inputxgradient(model, x, targets):
    out = []
    for t in range(targets.shape[1]):
        leaf = x.clone().requires_grad_(True)
        y = model(leaf).gather(1, targets[:, t:t + 1]).sum()
        (g,) = torch.autograd.grad(y, leaf)
        out.append((g * x).sum(1))
    return torch.stack(out, 1)


@pytest.mark.parametrize("which", ["tiny2d", "tiny3d", "resnet18"])
def test_lrp0_equals_input_x_gradient_on_relu_networks(which, request):
    if which == "resnet18":
        model, x = torchvision_model("resnet18"), torch.randn(2, 3, 32, 32)
    else:
        model = request.getfixturevalue(which)
        x = torch.randn(2, 1, 8, 16, 16) if which == "tiny3d" else torch.randn(2, 1, 24, 24)
    r = medlens.explain(model, x, "lrp", targets=[0, 2], composite="epsilon", epsilon=1e-12)
    want = _inputxgradient(model, x, r.targets)
    scale = want.abs().max()
    torch.testing.assert_close(r["lrp"] / scale, want / scale, rtol=0, atol=2e-4)


def _bias_free(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and isinstance(m.bias, torch.Tensor):
                m.bias.zero_()
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.zero_()
    return model


@pytest.mark.parametrize("name", ["densenet121", "resnet50", "vgg16_bn"])
def test_conservation_and_canonized_output_on_bn_architectures(name):
    model = _bias_free(torchvision_model(name))
    x = torch.randn(2, 3, 64 if name != "vgg16_bn" else 32, 64 if name != "vgg16_bn" else 32)
    # the canonized model (BN merged, rules installed) computes the same function
    plan = plan_model(model, x)
    assert plan.merges, "some BatchNorm must be merged into the layer before it"
    rules, _ = assign_rules(plan, "epsilon", 1e-9, 0.25, (0.0, 1.0))
    with torch.no_grad():
        reference = model(x)
        with lrp_model(model, plan, rules, _CallState()):
            canonized = model(x)
    torch.testing.assert_close(canonized, reference, rtol=1e-4, atol=1e-4)
    r = medlens.explain(model, x, "lrp", targets=[0, 4], composite="epsilon", epsilon=1e-9)
    fraction = torch.tensor(r.provenance["methods"]["lrp"]["conservation"]["fraction_reaching_input"])
    assert (fraction - 1).abs().max() < 1e-3, fraction
    torch.testing.assert_close(r["lrp"].flatten(2).sum(2), r.logits.gather(1, r.targets), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(r.logits, reference, rtol=1e-4, atol=1e-4)


def _xrv_style_densenet() -> nn.Module:
    """TorchXRayVision's DenseNet layout: torchvision's DenseNet121 with a 1-channel stem and 18 outputs."""
    model = torchvision_model("densenet121", num_classes=18)
    torch.manual_seed(1)
    model.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


@pytest.mark.parametrize("name", ["brain-tumor-mri", "phantom-lesion", "xrv-densenet"])
def test_conservation_on_the_bundled_models_and_the_xrv_densenet_layout(name):
    if name == "xrv-densenet":
        model, x = _xrv_style_densenet().eval(), torch.randn(2, 1, 64, 64)
    else:
        model = copy.deepcopy(medlens.load_model(name))
        x = torch.randn(2, 1, *model.input_spec.size)
    # with its real biases: the canonized model (BN merged, epsilon-plus-flat rules installed) computes the same logits
    plan = plan_model(model, x)
    rules, _ = assign_rules(plan, "epsilon_plus_flat", 1e-6, 0.25, (float(x.min()), float(x.max())))
    with torch.no_grad():
        reference = model(x)
        with lrp_model(model, plan, rules, _CallState()):
            canonized = model(x)
    torch.testing.assert_close(canonized, reference, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(medlens.explain(model, x, "lrp", targets=[0, 1], composite="epsilon_plus_flat")["lrp"]).all()
    model = _bias_free(model)
    # conservation is of x itself: reference="spec-zero" (by default the input layer takes x minus the scan's black,
    # and the share that black accounts for is not the input's)
    r = medlens.explain(model, x, "lrp", targets=[0, 1], composite="epsilon", epsilon=1e-9, reference="spec-zero")
    torch.testing.assert_close(r["lrp"].flatten(2).sum(2), r.logits.gather(1, r.targets), rtol=1e-3, atol=1e-5)


def test_epsilon_alpha2_beta1_composite_assigns_alpha_beta_to_convolutions_and_epsilon_to_dense(vgg16):
    plan = plan_model(vgg16, torch.randn(1, 3, 32, 32))
    rules, _ = assign_rules(plan, "epsilon_alpha2_beta1", 0.25, 0.25, (0.0, 1.0))
    for module in plan.order:
        rule = rules[module]
        if isinstance(module, nn.Conv2d):
            assert isinstance(rule, AlphaBeta) and (rule.alpha, rule.beta) == (2.0, 1.0), module
        else:
            assert isinstance(module, nn.Linear) and type(rule) is Epsilon, module
    # end to end on conv -> ReLU -> dense: epsilon on the dense layer, then alpha2-beta1 on the convolution
    torch.manual_seed(0)
    conv, dense = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 5 * 5, 4)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), dense).eval()
    x = torch.rand(1, 2, 5, 5) * 4 - 2
    r = medlens.explain(model, x, "lrp", targets=[2], composite="epsilon_alpha2_beta1", epsilon=0.1)
    matrix = _dense_of_conv(conv, (2, 5, 5))
    bias = conv.bias.detach().double().repeat_interleave(25)
    hidden = (x[0].double().flatten() @ matrix + bias).clamp(min=0)
    y = hidden @ dense.weight.detach().double().T + dense.bias.detach().double()
    top = torch.zeros(4, dtype=torch.float64)
    top[2] = y[2]
    r_hidden = textbook("epsilon", hidden, dense.weight.detach().T, dense.bias.detach(), top, eps=0.1)
    want = textbook("alphabeta", x[0].flatten(), matrix, bias, r_hidden, alpha=2.0, beta=1.0)
    torch.testing.assert_close(r["lrp"][0, 0].double().flatten(), want.view(2, 25).sum(0), rtol=1e-4, atol=1e-6)


def test_densenet_bn_relu_conv_counts_as_merge_into_following_conv():
    """BN -> ReLU -> conv with positive and negative BN scales: relevance equals that of the explicitly rewritten
    net (scale moved into the conv, sign flip and shift before the ReLU), checked on one dense block."""
    torch.manual_seed(4)
    bn, conv, head = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.Linear(3, 2, bias=False)
    bn.eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0]))
        bn.bias.copy_(torch.tensor([0.2, -0.1, 0.05, 0.3]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
        bn.running_var.copy_(torch.tensor([0.5, 1.5, 1.0, 2.0]))

    class Net(nn.Module):
        def __init__(self, first):
            super().__init__()
            self.first, self.conv, self.head = first, conv, head

        def forward(self, x):
            return self.head(F.adaptive_avg_pool2d(self.conv(F.relu(self.first(x))), 1).flatten(1))

    s = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
    t = bn.bias.detach() - bn.running_mean * s

    class Rewritten(nn.Module):  # sign(s) x + t/|s|, then ReLU, then the conv with |s| folded into its weights
        def __init__(self):
            super().__init__()
            self.first = nn.Identity()
            self.conv = nn.Conv2d(4, 3, 3, padding=1, bias=False)
            self.conv.weight.data = conv.weight.detach() * s.abs().view(1, -1, 1, 1)
            self.head = head

        def forward(self, x):
            u = torch.sign(s).view(1, -1, 1, 1) * x + (t / s.abs()).view(1, -1, 1, 1)
            return self.head(F.adaptive_avg_pool2d(self.conv(F.relu(u)), 1).flatten(1))

    x = torch.randn(2, 4, 6, 6)
    original, rewritten = Net(bn).eval(), Rewritten().eval()
    torch.testing.assert_close(original(x), rewritten(x), rtol=1e-5, atol=1e-5)
    targets = torch.tensor([[0, 1], [1, 0]])
    for comp in ("epsilon", {"conv": "gamma", "head": "epsilon"}, {"conv": "alpha2_beta1", "head": "epsilon"}):
        a = lrp_relevance(original, x, targets, composite=comp).relevance
        b = lrp_relevance(rewritten, x, targets, composite=comp).relevance
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_residual_addition_does_not_double_relevance():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)
            self.head = nn.Linear(2, 2, bias=False)

        def forward(self, x):
            out = F.relu(x)
            out = out + F.relu(self.conv(out))  # identity + branch
            return self.head(out.mean(dim=(2, 3)))

    torch.manual_seed(5)
    model = Block().eval()
    x = torch.randn(3, 2, 5, 5)
    r = medlens.explain(model, x, "lrp", targets=[0, 1], composite="epsilon", epsilon=1e-9)
    torch.testing.assert_close(r["lrp"].flatten(2).sum(2), r.logits.gather(1, r.targets), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- zennit oracle
@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_epsilon_plus_flat_agrees_with_zennit(name, request):
    zennit = pytest.importorskip("zennit")
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    model = request.getfixturevalue("vgg16") if name == "vgg16" else torchvision_model(name)
    x = torch.randn(2, 3, 64, 64)
    r = medlens.explain(model, x, "lrp", targets=[1], composite="epsilon_plus_flat")
    zmodel = copy.deepcopy(model)
    canon = ResNetCanonizer() if name == "resnet50" else VGGCanonizer()
    with Gradient(model=zmodel, composite=EpsilonPlusFlat(canonizers=[canon])) as attributor:
        out, relevance = attributor(x.clone(), torch.eye(5)[[1, 1]] * model(x).detach())
    theirs = relevance.sum(1)
    for b in range(2):
        assert correlation(r["lrp"][b, 0], theirs[b]) >= 0.99
    # zennit's input relevance sums to the same share of the logit
    torch.testing.assert_close(r["lrp"][:, 0].flatten(1).sum(1), theirs.flatten(1).sum(1), rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------- errors, hygiene
def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "tree": [(n, type(m).__name__, m.training, sorted(m.__dict__.get("_forward_hooks", {}))) for n, m in model.named_modules()],
        "own_forward": [n for n, m in model.named_modules() if "forward" in m.__dict__],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": hook_count(model),
    }


def _assert_same(model, snap):
    now = _snapshot(model)
    assert now["tree"] == snap["tree"] and now["own_forward"] == [] and now["hooks"] == snap["hooks"]
    assert now["flags"] == snap["flags"] and all(g is None for g in now["grads"])
    assert snap["state"].keys() == now["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(v, now["state"][k]), k


def test_hygiene_after_success_and_error():
    model = torchvision_model("densenet121")
    model.train()
    model.classifier.weight.requires_grad_(False)
    snap = _snapshot(model)
    x = torch.randn(1, 3, 32, 32)
    medlens.explain(model, x, "lrp", composite="epsilon_gamma_box")
    _assert_same(model, snap)
    with pytest.raises(MethodError):  # raises inside the forward, after every override is installed
        medlens.explain(model, x, "lrp", composite={"features.denseblock1.denselayer1.conv1": "pass"})
    _assert_same(model, snap)
    with pytest.raises(MethodError, match="first layer"):
        medlens.explain(model, x, "lrp", composite={"features.denseblock1.denselayer1.conv1": "flat"})
    _assert_same(model, snap)


def test_uncovered_layer_and_bad_options_raise_clear_errors(tiny2d):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    with pytest.raises(MethodError, match="GroupNorm"):
        medlens.explain(model, torch.randn(1, 1, 8, 8), "lrp")
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(MethodError, match="composite"):
        medlens.explain(tiny2d, x, "lrp", composite="nonsense")
    with pytest.raises(MethodError, match="alpha"):
        medlens.explain(tiny2d, x, "lrp", composite={"fc": "alpha2_beta2"})
    with pytest.raises(MethodError, match="no layer|not convolution"):
        medlens.explain(tiny2d, x, "lrp", composite={"nope": "epsilon"})


def test_provenance_records_conservation_rules_and_zbox_bounds(tiny3d):
    x = torch.randn(2, 1, 8, 12, 12)
    r = medlens.explain(tiny3d, x, "lrp", targets=[0, 1], composite="epsilon_gamma_box")
    notes = r.provenance["methods"]["lrp"]
    assert r["lrp"].shape == (2, 2, 8, 12, 12)
    assert notes["first_layer"].startswith("features.0: zbox")
    assert notes["zbox_bounds"]["low"] == pytest.approx(float(x.min()))
    assert "input's min and max" in notes["zbox_bounds"]["source"]
    sums = r["lrp"].flatten(2).sum(2)
    torch.testing.assert_close(torch.tensor(notes["conservation"]["relevance_sum"]), sums, rtol=1e-5, atol=1e-6)
    tiny3d.input_spec = InputSpec(channels=1, mean=(0.5,), std=(0.25,))
    try:
        r2 = medlens.explain(tiny3d, x, "lrp", composite="epsilon_gamma_box")
        assert r2.provenance["methods"]["lrp"]["zbox_bounds"]["low"] == pytest.approx(-2.0)
        assert r2.provenance["methods"]["lrp"]["zbox_bounds"]["high"] == pytest.approx(2.0)
    finally:
        del tiny3d.input_spec


def test_depth_composite_assigns_gamma_epsilon_zero_by_position(vgg16):
    model = vgg16
    plan = plan_model(model, torch.randn(1, 3, 32, 32))
    rules, _ = assign_rules(plan, "depth", 0.25, 0.25, (0.0, 1.0))
    names = [type(rules[m]).__name__ + ("0" if rules[m].name == "zero" else "") for m in plan.order]
    n = len(names)  # 13 convs + 3 dense
    assert names[: (n + 2) // 3] == ["Gamma"] * ((n + 2) // 3)
    assert names[-1] == "Epsilon0" and "Epsilon" in names


def test_a_new_composite_and_a_new_rule_are_one_table_entry_each(monkeypatch):
    from medlens.families.lrp import composites, rules as rules_module

    class Half(rules_module.Rule):
        """A test rule: half of LRP-0's relevance (the gradient of y / 2 with y's value)."""

        name = "half"

        def surrogate(self, call):
            return call.y * 0.5 + (call.y * 0.5).detach()

    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 2)).eval()
    torch.manual_seed(0)
    x = torch.rand(1, 1, 8, 8)
    monkeypatch.setattr(composites, "RULES", composites.RULES + (rules_module.RuleEntry("half", lambda s, p: Half()),))
    monkeypatch.setitem(composites.COMPOSITES, "all_gamma", composites.ByRole(conv="gamma", dense="gamma"))
    by_table = medlens.explain(model, x, "lrp", targets=[1], composite="all_gamma", gamma=0.5)["lrp"]
    by_mapping = medlens.explain(model, x, "lrp", targets=[1], composite={"0": "gamma", "3": "gamma"}, gamma=0.5)["lrp"]
    torch.testing.assert_close(by_table, by_mapping, rtol=0, atol=0)
    half = medlens.explain(model, x, "lrp", targets=[1], composite={"0": "half", "3": "half"})["lrp"]
    zero = medlens.explain(model, x, "lrp", targets=[1], composite={"0": "zero", "3": "zero"})["lrp"]
    torch.testing.assert_close(half, zero * 0.25)  # two layers, each passing back half of its relevance
    with pytest.raises(MethodError, match="known rules: .*half"):
        medlens.explain(model, x, "lrp", targets=[1], composite={"0": "nope"})
