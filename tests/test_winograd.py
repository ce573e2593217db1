"""Winograd F(2x2, 3x3) convolutions of the evaluation's forward passes: equal to the direct convolution to float
rounding, used only where they apply, and the metrics' values unchanged with them."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from medlens.core.model_state import borrowed_model
from medlens.evaluation import faithfulness as FA
from medlens.evaluation import forwards
from medlens.evaluation import winograd as W

from helpers import make_tiny2d

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: single-threaded, setting restored after


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_winograd_convolution_equals_the_direct_one_in_float64(layout):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 10, dtype=torch.float64).contiguous(memory_format=layout)
    w, b = torch.randn(7, 5, 3, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    for bias in (b, None):
        got = W.winograd_conv(x, W.transform_weight(w), bias)
        assert got.shape == (3, 7, 6, 10)
        assert torch.allclose(got, F.conv2d(x, w, bias, padding=1), atol=1e-12)


def test_the_module_falls_back_to_the_direct_convolution_where_winograd_does_not_apply():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    swapped = W.WinogradConv2d(conv)
    with torch.no_grad():
        for shape in ((2, 4, 8, 8), (2, 4, 7, 8), (1, 4, 5, 5)):  # even: Winograd; odd: direct
            x = torch.randn(shape)
            assert torch.allclose(swapped(x), conv(x), atol=1e-5)
    assert not W.swappable(nn.Conv2d(256, 256, 3, padding=1, stride=2))
    assert not W.swappable(nn.Conv2d(256, 256, 3, padding=2, dilation=2))
    assert not W.swappable(nn.Conv2d(8, 8, 3, padding=1))  # narrow: the transforms cost more than they save
    assert W.swappable(nn.Conv2d(128, 128, 3, padding=1))


def test_the_metrics_swap_wide_convolutions_and_keep_their_values(monkeypatch):
    model = make_tiny2d(6).eval()
    x, maps, targets = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8), torch.tensor([[i % 3] for i in range(8)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = FA.deletion(model, x, maps, targets, steps=4)
    forwards._FOLDED.pop(model)
    monkeypatch.setattr(W, "WIDE", 1)  # the tiny model's convolutions count as wide
    swapped = FA.deletion(model, x, maps, targets, steps=4)
    held = forwards._FOLDED[model].forward
    assert sum(isinstance(m, W.WinogradConv2d) for m in held.module.modules()) == 2 and "winograd" in held.note
    assert not any(isinstance(m, W.WinogradConv2d) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.allclose(swapped.curves, plain.curves, atol=1e-6)
    conv = model.features[4]
    conv.weight.data.mul_(2)  # the swapped convolution's weights changed behind its back: rebuilt
    with borrowed_model(model):
        assert forwards.folded_forward(model, x) is not held



def test_the_output_keeps_the_input_layout():
    """A model whose code `.view`s a feature map needs a contiguous one when it is fed contiguous inputs."""
    swapped = W.WinogradConv2d(nn.Conv2d(3, 5, 3, padding=1))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert swapped(x).is_contiguous()
        assert swapped(x.contiguous(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
