"""Integrated gradients' own parts: the baseline's logits from their separate pass, and the input layer's transposed
Jacobian by the backward kernel alone, against autograd on the layer (every stock layer form)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import medlens
from medlens.core.baselines import make_baseline
from medlens.families.integrated import _affine_forward64, _transposed_jacobian64

from helpers import make_tiny2d


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv1d(3, 4, 5, stride=2, padding=1), (2, 3, 17)),
    (nn.Conv2d(3, 6, 7, stride=2, padding=3, bias=False), (2, 3, 15, 13)),
    (nn.Conv2d(4, 6, 3, dilation=2, groups=2, padding=2), (1, 4, 9, 11)),
    (nn.Conv3d(2, 3, 3, stride=(1, 2, 2), padding=(1, 0, 1)), (2, 2, 5, 6, 7)),
    (nn.Conv2d(3, 4, 3, padding="same"), (1, 3, 8, 8)),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (1, 3, 8, 8)),
    (nn.Linear(10, 4), (3, 10)),
])
def test_transposed_jacobian_equals_autograd_on_the_layer(layer, shape):
    torch.manual_seed(0)
    probe = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = _affine_forward64(layer, probe)
    grad_output = torch.randn(out.shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(out, probe, grad_outputs=grad_output)
    ours = _transposed_jacobian64(layer, grad_output, tuple(shape))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_completeness_record_uses_the_model_on_the_baseline():
    model = make_tiny2d(0)
    x = torch.randn(2, 1, 16, 16)
    for baseline in ("zero", "blur", 0.25):
        r = medlens.explain(model, x, "integratedgradients", targets=[0, 2], n_steps=8, baseline=baseline)
        gap = torch.tensor(r.provenance["methods"]["integratedgradients"]["completeness"]["output_gap"])
        base = {"zero": torch.zeros_like(x), "blur": make_baseline(x, "blur"), 0.25: torch.full_like(x, 0.25)}[baseline]
        with torch.no_grad():
            expected = (model(x) - model(base))[:, [0, 2]]
        torch.testing.assert_close(gap, expected, rtol=1e-5, atol=1e-6)
