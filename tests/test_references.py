"""References that respect the input spec: "zero" is the scan's black in the model's input space ((0 - mean) / std),
for input x gradient, LRP's input layer, integrated gradients and the perturbation baselines; "spec-zero" keeps the
plain 0 of the model's input space. Checked against the definitions computed here, and by completeness."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medlens
from helpers import TinyCNN2d, randomise_bn
from medlens.core.input_spec import InputSpec
from medlens.errors import MethodError

MEAN, STD = 0.4, 0.25
BLACK = (0.0 - MEAN) / STD  # -1.6


@pytest.fixture()
def normalised_model():
    torch.manual_seed(0)
    model = randomise_bn(TinyCNN2d(), 0).eval()
    model.input_spec = InputSpec(size=(24, 24), mean=(MEAN,), std=(STD,), labels=("a", "b", "c"))
    model.labels, model.multi_label = ["a", "b", "c"], False
    return model


def _scan(seed: int = 0) -> torch.Tensor:
    """A prepared scan: black background (the scan's 0, i.e. BLACK after normalising) around a brighter object."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 1, 24, 24)
    img[..., 6:18, 5:19] = 0.3 + 0.7 * torch.rand(1, 1, 12, 14, generator=g)
    return (img - MEAN) / STD


def _grad(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    leaf = x.clone().requires_grad_(True)
    model(leaf)[0, target].backward()
    return leaf.grad.detach()


def test_input_x_gradient_takes_the_input_from_the_scans_black(normalised_model):
    x = _scan()
    result = medlens.explain(normalised_model, x, methods=["inputxgradient"], targets=[1])
    expected = ((x - BLACK) * _grad(normalised_model, x, 1)).sum(dim=1)
    torch.testing.assert_close(result["inputxgradient"][:, 0], expected, rtol=1e-5, atol=1e-6)
    assert float(result["inputxgradient"][0, 0, :5, :].abs().max()) == 0.0  # black background: nothing
    assert "scan's black" in result.provenance["methods"]["inputxgradient"]["reference"]
    old = medlens.explain(normalised_model, x, methods=["inputxgradient"], targets=[1], reference="spec-zero")
    torch.testing.assert_close(old["inputxgradient"][:, 0], (x * _grad(normalised_model, x, 1)).sum(dim=1),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(MethodError, match="reference must be"):
        medlens.explain(normalised_model, x, methods=["inputxgradient"], reference="grey")


def test_lrp_epsilon_input_layer_is_relative_to_black_and_equals_input_x_gradient_from_black(normalised_model):
    """LRP-epsilon (epsilon 1e-6) on a ReLU network is input x gradient; with the reference at the input layer both
    take x minus the scan's black, so they still agree, and the black background gets no relevance."""
    x = _scan(1)
    result = medlens.explain(normalised_model, x, methods=["lrp", "inputxgradient"], targets=[2])
    scale = float(result["inputxgradient"].abs().max())
    assert float((result["lrp"] - result["inputxgradient"]).abs().max()) <= 1e-3 * scale
    assert float(result["lrp"][0, 0, :5, :].abs().max()) == 0.0
    assert "scan's black" in result.provenance["methods"]["lrp"]["input_reference"]
    box = medlens.explain(normalised_model, x, methods=["lrp"], targets=[2], composite="epsilon_gamma_box")
    bounds = box.provenance["methods"]["lrp"]["zbox_bounds"]
    assert (bounds["low"], bounds["high"]) == pytest.approx((BLACK, (1 - MEAN) / STD))  # the spec's black and white


def test_integrated_gradients_start_at_black_and_stay_complete(normalised_model):
    x = _scan(2)
    result = medlens.explain(normalised_model, x, methods=["integratedgradients"], targets=[0], n_steps=64)
    black = torch.full_like(x, BLACK)
    with torch.no_grad():
        gap = float(normalised_model(x)[0, 0] - normalised_model(black)[0, 0])
    assert float(result["integratedgradients"].sum()) == pytest.approx(gap, rel=1e-3, abs=1e-4)
    notes = result.provenance["methods"]["integratedgradients"]
    assert notes["baseline_values"] == [[pytest.approx(BLACK)]]
    old = medlens.explain(normalised_model, x, methods=["integratedgradients"], targets=[0], n_steps=64,
                          baseline="spec-zero")
    with torch.no_grad():
        old_gap = float(normalised_model(x)[0, 0] - normalised_model(torch.zeros_like(x))[0, 0])
    assert float(old["integratedgradients"].sum()) == pytest.approx(old_gap, rel=1e-2, abs=1e-4)  # its quadrature


def test_occlusion_fills_with_black_and_a_model_without_normalisation_keeps_zero(normalised_model):
    x = _scan(3)
    result = medlens.explain(normalised_model, x, methods=["occlusion"], targets=[0], window=6, stride=6)
    assert result.provenance["methods"]["occlusion"]["baseline_values"] == [[pytest.approx(BLACK)]]
    # a window wholly on the black background changes nothing: its occlusion is exactly zero
    assert float(result["occlusion"][0, 0, :6, :6].abs().max()) <= 1e-6  # (float32 rounding of the black)
    plain = randomise_bn(TinyCNN2d(), 0).eval()  # no input spec: "zero" is the plain 0, as before
    a = medlens.explain(plain, x, methods=["integratedgradients"], targets=[0], n_steps=8)
    b = medlens.explain(plain, x, methods=["integratedgradients"], targets=[0], n_steps=8, baseline="spec-zero")
    torch.testing.assert_close(a["integratedgradients"], b["integratedgradients"])


def _scan_with_air(level: float, seed: int = 0) -> torch.Tensor:
    """A prepared scan whose air is not the scale's 0: a noise floor around `level` (in [0, 1]) outside the object."""
    g = torch.Generator().manual_seed(seed)
    img = (level + 0.004 * torch.randn(1, 1, 24, 24, generator=g)).clamp_min(0.0)
    img[..., 6:18, 5:19] = 0.3 + 0.7 * torch.rand(1, 1, 12, 14, generator=g)
    return (img - MEAN) / STD


def test_zero_is_the_air_measured_in_the_frame_when_that_is_dark_and_the_scales_black_otherwise(normalised_model):
    """"zero" is the median of the image's outer frame (its air, with the noise floor of the scan) when that lies in the
    darkest 5% of the image's range, so input x gradient takes x minus that level; a grey frame is not air: the scale's
    black stays. Checked against the definition computed here, and integrated gradients by completeness."""
    x = _scan_with_air(0.012)
    frame = torch.ones(24, 24, dtype=torch.bool)
    frame[1:-1, 1:-1] = False  # 3% of 24 rounds to one pixel a side
    air = float(x[0, 0][frame].median())
    assert BLACK < air < BLACK + 0.05 * (float(x.max()) - BLACK)
    result = medlens.explain(normalised_model, x, methods=["inputxgradient", "integratedgradients"], targets=[1],
                             n_steps=64)
    expected = ((x - air) * _grad(normalised_model, x, 1)).sum(dim=1)
    torch.testing.assert_close(result["inputxgradient"][:, 0], expected, rtol=1e-5, atol=1e-6)
    assert result.provenance["methods"]["integratedgradients"]["baseline_values"] == [[pytest.approx(air)]]
    with torch.no_grad():
        gap = float(normalised_model(x)[0, 1] - normalised_model(torch.full_like(x, air))[0, 1])
    assert float(result["integratedgradients"].sum()) == pytest.approx(gap, rel=5e-3, abs=1e-4)  # quadrature
    from medlens.evaluation.trust import completeness  # evaluate's check takes the same per-image reference
    check = completeness(normalised_model, x, result["integratedgradients"], torch.tensor([[1]]))
    assert bool(check.holds.all()), check
    grey = _scan_with_air(0.5)  # a grey frame: not air, the scale's black is kept
    kept = medlens.explain(normalised_model, grey, methods=["integratedgradients"], targets=[1], n_steps=8)
    assert kept.provenance["methods"]["integratedgradients"]["baseline_values"] == [[pytest.approx(BLACK)]]
