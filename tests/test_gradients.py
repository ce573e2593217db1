"""Gradient family: captum as an oracle (saliency, input x gradient, guided backprop, guided Grad-CAM,
integrated gradients), completeness, guided backprop with functional ReLU (DenseNet), SmoothGrad, hygiene."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medlens
from medlens.errors import MethodError
from medlens.core.baselines import make_baseline
from medlens.families.integrated import gauss_legendre
from medlens.families.guided import guided_relus
from medlens.core.model_state import hook_count

from helpers import correlation, torchvision_model

torch.set_num_threads(1)
captum_attr = pytest.importorskip("captum.attr")


def _per_target(attr_cls, model, x, targets, **kw):
    """captum attributions for each target column, channel-summed: (B, T, *s)."""
    out = [attr_cls(model).attribute(x.clone(), target=targets[:, t].tolist(), **kw).detach().sum(1)
           for t in range(targets.shape[1])]
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def vgg11():
    return torchvision_model("vgg11", num_classes=4)


def test_saliency_and_inputxgradient_equal_captum(tiny2d):
    x = torch.randn(3, 1, 20, 20)
    r = medlens.explain(tiny2d, x, ["saliency", "inputxgradient"], targets=[0, 2])
    sal = _per_target(captum_attr.Saliency, tiny2d, x, r.targets, abs=False)
    ixg = _per_target(captum_attr.InputXGradient, tiny2d, x, r.targets)
    torch.testing.assert_close(r["saliency"], sal, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r["inputxgradient"], ixg, rtol=1e-5, atol=1e-7)


def test_saliency_3d_and_multichannel_sum(tiny3d):
    x = torch.randn(2, 1, 6, 10, 10)
    r = medlens.explain(tiny3d, x, "saliency", targets=[[1], [2]])
    sal = _per_target(captum_attr.Saliency, tiny3d, x, r.targets, abs=False)
    torch.testing.assert_close(r["saliency"], sal, rtol=1e-5, atol=1e-7)


def test_guided_backprop_equals_captum_on_vgg(vgg11):
    x = torch.randn(2, 3, 32, 32)
    r = medlens.explain(vgg11, x, "guidedbackprop", targets=[1, 3])
    ref = _per_target(captum_attr.GuidedBackprop, vgg11, x, r.targets)
    torch.testing.assert_close(r["guidedbackprop"], ref, rtol=1e-4, atol=1e-6)


class _DenseNetModuleReLU(nn.Module):
    """DenseNet121's forward with its functional final ReLU as a module, so captum's hooks see every ReLU."""

    def __init__(self, net):
        super().__init__()
        self.features, self.relu, self.classifier = net.features, nn.ReLU(), net.classifier

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.relu(self.features(x)), 1), 1))


def test_guided_backprop_covers_functional_relu_on_densenet():
    model = torchvision_model("densenet121")
    x = torch.randn(1, 3, 32, 32)
    r = medlens.explain(model, x, "guidedbackprop", targets=[0, 3])
    ref = _per_target(captum_attr.GuidedBackprop, _DenseNetModuleReLU(model).eval(), x, r.targets)
    torch.testing.assert_close(r["guidedbackprop"], ref, rtol=1e-4, atol=1e-6)
    # and it differs from plain gradients (the guided ReLU really was in place)
    sal = medlens.explain(model, x, "saliency", targets=[0, 3])["saliency"]
    assert correlation(sal, r["guidedbackprop"]) < 0.99


def test_guided_relu_is_restored_even_on_error():
    before = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, "relu" in torch.Tensor.__dict__)

    class Boom(nn.Module):
        def forward(self, x):
            if x.requires_grad:
                raise RuntimeError("boom")
            return x

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), Boom(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="boom"):
        medlens.explain(model.eval(), torch.randn(1, 1, 8, 8), "guidedbackprop")
    after = (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, "relu" in torch.Tensor.__dict__)
    assert before == after and hook_count(model) == 0


def test_guided_relus_change_only_their_own_graph_and_only_inside_the_block():
    a = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    weights = torch.tensor([5.0, -3.0, 2.0])
    guided_out = (weights * F.relu(a)).sum()
    other_out = (weights * torch.relu(a)).sum()  # a second graph over the same input
    with guided_relus(guided_out) as found:
        assert found == 1
        (guided,) = torch.autograd.grad(guided_out, a, retain_graph=True)
        (other,) = torch.autograd.grad(other_out, a)
    assert guided.tolist() == [0.0, 0.0, 2.0]  # the negative gradient at the second ReLU output is stopped
    assert other.tolist() == [0.0, -3.0, 2.0]  # the other graph keeps the plain ReLU gradient
    (after,) = torch.autograd.grad(guided_out, a)
    assert after.tolist() == [0.0, -3.0, 2.0]  # and the guided graph is plain again after the block


def test_guided_gradcam_equals_captum_with_bilinear_upsampling(vgg11):
    x = torch.randn(2, 3, 32, 32)
    # The last conv block's ReLU (a module, so both libraries see the same post-ReLU map; on the conv
    # before an in-place ReLU medlens deliberately uses the ReLU's output, as pytorch-grad-cam does).
    r = medlens.explain(vgg11, x, "guidedgradcam", targets=[0, 2], layer="features.14")
    out = []
    for t in range(2):
        gc = captum_attr.GuidedGradCam(vgg11, vgg11.features[14])
        out.append(gc.attribute(x.clone(), target=r.targets[:, t].tolist(), interpolate_mode="bilinear").detach().sum(1))
    torch.testing.assert_close(r["guidedgradcam"], torch.stack(out, 1), rtol=1e-4, atol=1e-6)


def test_gauss_legendre_integrates_polynomials_exactly():
    nodes, weights = gauss_legendre(5)
    for degree in range(10):  # exact up to degree 2n - 1
        assert float((weights * nodes**degree).sum()) == pytest.approx(1 / (degree + 1), abs=1e-12)


@pytest.mark.parametrize("baseline", ["zero", "blur", 0.3])
def test_integrated_gradients_complete_at_64_steps(tiny2d, tiny3d, baseline):
    for model, x in ((tiny2d, torch.randn(2, 1, 24, 24)), (tiny3d, torch.randn(2, 1, 8, 12, 12))):
        r = medlens.explain(model, x, "integratedgradients", targets=[0, 1, 2], n_steps=64, baseline=baseline)
        notes = r.provenance["methods"]["integratedgradients"]["completeness"]
        gaps = torch.tensor(notes["relative_gap"])
        assert gaps.max() < 0.01, gaps
        sums = r["integratedgradients"].flatten(2).sum(2)
        torch.testing.assert_close(torch.tensor(notes["attribution_sum"]), sums, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sums, torch.tensor(notes["output_gap"]), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("baseline", ["zero", "blur", 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_integrated_gradients_equal_captum(baseline, dtype):
    # In float64 the two libraries agree to rounding. In float32 a path point that lands within rounding of a
    # ReLU or max-pool kink may fall on either side in either library (and medlens computes the stem of a ResNet
    # once, in float64, not per path point), so there a few pixels may differ and the check is correlation.
    model = torchvision_model("resnet18").to(dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    r = medlens.explain(model, x, "integratedgradients", targets=[1, 4], n_steps=64, baseline=baseline, batch_size=64)
    assert r.provenance["methods"]["integratedgradients"]["input_layers_run_once"] == ["conv1"]
    base = {"zero": torch.zeros_like(x), "blur": make_baseline(x, "blur"), 0.3: torch.full_like(x, 0.3)}[baseline]
    ref = _per_target(captum_attr.IntegratedGradients, model, x, r.targets, baselines=base, n_steps=64,
                      internal_batch_size=64).float()
    for b in range(2):
        for t in range(2):
            assert correlation(r["integratedgradients"][b, t], ref[b, t]) >= 0.99
    if dtype == torch.float64:
        torch.testing.assert_close(r["integratedgradients"], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


class _InputUsedThrice(nn.Module):
    """The first conv reads the input twice (shared weights) and the input is also added further on: the
    input-layer shortcut of integrated gradients must intercept both conv calls and keep the direct use."""

    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.stem = conv(1, 4, 3, padding=1)
        self.body = conv(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x)) + 0.5 * torch.tanh(self.stem(x)) + x
        h = torch.relu(self.body(h))
        return self.head(h.flatten(2).mean(2))


@pytest.mark.parametrize("dims", [2, 3])
def test_integrated_gradients_input_layer_shortcut_is_exact(dims):
    torch.manual_seed(0)
    model = _InputUsedThrice(dims).eval()
    x = torch.randn((2, 1) + (10,) * dims)
    base = torch.full_like(x, 0.2)
    r = medlens.explain(model, x, "integratedgradients", targets=[0, 2], n_steps=24, baseline=0.2, batch_size=10)
    assert r.provenance["methods"]["integratedgradients"]["input_layers_run_once"] == ["stem"]
    ref = _per_target(captum_attr.IntegratedGradients, model, x, r.targets, baselines=base, n_steps=24,
                      method="gausslegendre")
    torch.testing.assert_close(r["integratedgradients"], ref, rtol=1e-4, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the interception is undone


def test_integrated_gradients_shortcut_on_resnet_stem_matches_captum():
    model = torchvision_model("resnet18")
    x = torch.randn(1, 3, 40, 40)
    r = medlens.explain(model, x, "integratedgradients", targets=[2], n_steps=16, batch_size=8)
    assert r.provenance["methods"]["integratedgradients"]["input_layers_run_once"] == ["conv1"]
    ref = _per_target(captum_attr.IntegratedGradients, model, x, r.targets, n_steps=16, internal_batch_size=8)
    torch.testing.assert_close(r["integratedgradients"], ref, rtol=1e-3, atol=1e-5)


def test_integrated_gradients_batching_does_not_change_the_result(tiny3d):
    x = torch.randn(2, 1, 6, 8, 8)
    a = medlens.explain(tiny3d, x, "integratedgradients", targets=[0, 1], n_steps=10, batch_size=2)
    b = medlens.explain(tiny3d, x, "integratedgradients", targets=[0, 1], n_steps=10, batch_size=40)
    torch.testing.assert_close(a["integratedgradients"], b["integratedgradients"], rtol=1e-5, atol=1e-7)
    custom = medlens.explain(tiny3d, x, "integratedgradients", n_steps=4, baseline=torch.zeros(1, 6, 8, 8))
    zero = medlens.explain(tiny3d, x, "integratedgradients", n_steps=4, baseline="zero")
    torch.testing.assert_close(custom["integratedgradients"], zero["integratedgradients"])


def test_smoothgrad_is_seeded_noise_scaled_and_wraps_bases(tiny2d):
    x = torch.randn(2, 1, 16, 16)
    a = medlens.explain(tiny2d, x, "smoothgrad", targets=[0, 1], seed=3, n_samples=6)
    b = medlens.explain(tiny2d, x, "smoothgrad", targets=[0, 1], seed=3, n_samples=6)
    c = medlens.explain(tiny2d, x, "smoothgrad", targets=[0, 1], seed=4, n_samples=6)
    torch.testing.assert_close(a["smoothgrad"], b["smoothgrad"], rtol=0, atol=0)
    assert not torch.equal(a["smoothgrad"], c["smoothgrad"])
    sigma = a.provenance["methods"]["smoothgrad"]["noise_sigma"]
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) * 0.15
    assert sigma == pytest.approx(span.tolist())
    # no noise: every sample is the input, so SmoothGrad is its base method
    for base in ("saliency", "inputxgradient", "guidedbackprop", "lrp"):
        s = medlens.explain(tiny2d, x, "smoothgrad", targets=[0, 1], seed=1, n_samples=3, noise=0.0, base=base)
        ref = medlens.explain(tiny2d, x, base, targets=[0, 1])[base]
        torch.testing.assert_close(s["smoothgrad"], ref, rtol=1e-5, atol=1e-7)
    ig = medlens.explain(tiny2d, x, "smoothgrad", seed=1, n_samples=2, noise=0.0, base="integratedgradients")
    ref = medlens.explain(tiny2d, x, "integratedgradients", n_steps=50)["integratedgradients"]
    torch.testing.assert_close(ig["smoothgrad"], ref, rtol=1e-4, atol=1e-6)


def test_smoothgrad_wraps_any_method_that_declares_a_per_batch_form(tiny2d):
    """A new method is wrappable by its registration alone; its per-batch function gets its own option defaults."""
    from medlens.core import registry
    seen = []

    def doubled_input(model, x, targets, options):  # (T, N, C, *s): 2x for every target
        seen.append(dict(options))
        return (2 * x)[None].expand(targets.shape[1], *x.shape)

    spec = registry.MethodSpec(name="twice", family="test", summary="2x the input.", run=lambda ctx, options: None,
                               needs_gradients=False, needs_layer=False, options={"factor": 2},
                               per_batch=registry.PerBatch(doubled_input))
    registry.register(spec)
    try:
        x = torch.randn(3, 1, 16, 16)
        s = medlens.explain(tiny2d, x, "smoothgrad", targets=[0, 1], seed=0, n_samples=4, noise=0.0, base="twice",
                            batch_size=6)
    finally:
        registry._REGISTRY.pop("twice")
    torch.testing.assert_close(s["smoothgrad"], (2 * x).expand(3, 2, 16, 16))
    assert seen and all(o == {"factor": 2, "batch_size": 6} for o in seen)
    assert len(seen) == 2  # 12 noisy rows in chunks of 6 (a multiple of the batch of 3)
    assert "twice" not in registry.all_specs()


def test_smoothgrad_of_a_linear_model_is_its_gradient():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(2, 1, 8, 8)
    s = medlens.explain(model, x, "smoothgrad", targets=[0, 2], seed=0, n_samples=5, noise=0.5)
    ref = medlens.explain(model, x, "saliency", targets=[0, 2])
    torch.testing.assert_close(s["smoothgrad"], ref["saliency"], rtol=1e-5, atol=1e-7)


def test_bad_options_raise_clear_errors(tiny2d):
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(MethodError, match="base"):
        medlens.explain(tiny2d, x, "smoothgrad", base="gradcam")
    with pytest.raises(MethodError, match="baseline"):
        medlens.explain(tiny2d, x, "integratedgradients", baseline="median")
    with pytest.raises(MethodError, match="broadcast"):
        medlens.explain(tiny2d, x, "integratedgradients", baseline=torch.zeros(3, 5))
    with pytest.raises(MethodError, match="n_steps"):
        medlens.explain(tiny2d, x, "integratedgradients", n_steps=0)


def test_hygiene_model_identical_after_all_gradient_methods():
    model = torchvision_model("densenet121")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tree = [(n, type(m).__name__, m.training) for n, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(1, 3, 32, 32)
    medlens.explain(model, x, ["saliency", "inputxgradient", "guidedbackprop", "guidedgradcam", "integratedgradients",
                               "smoothgrad"], seed=0, n_steps=4, n_samples=2)
    assert [(n, type(m).__name__, m.training) for n, m in model.named_modules()] == tree
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()) and hook_count(model) == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_blurred_baseline_keeps_constants_and_removes_detail():
    flat = torch.full((1, 3, 20, 20), 0.7)
    torch.testing.assert_close(make_baseline(flat, "blur"), flat)
    x = torch.randn(2, 2, 6, 20, 20)
    b = make_baseline(x, "blur")
    assert b.shape == x.shape and b.std() < 0.5 * x.std()
    torch.testing.assert_close(b.mean(dim=(2, 3, 4)), x.mean(dim=(2, 3, 4)), rtol=0.2, atol=0.05)
