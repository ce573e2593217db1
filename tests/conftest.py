"""Shared fixtures: small seeded models (2-D and 3-D) and inputs; nothing is downloaded."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """The folder of a dataset under ../shared/data, or skip the test with a clear message."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"needs ../shared/data/{name} (not present on this machine); this test runs where the shared data is.")
    return path


class TinyCNN3d(nn.Module):
    """A small 3-D CNN: conv-BN-ReLU twice, global average pool, linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(inplace=True),
            nn.MaxPool3d(2),
            nn.Conv3d(8, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class TinyCNN2d(nn.Module):
    """A small 2-D CNN with a global-average-pool + linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, so canonizers and hygiene are really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture
def tiny2d() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(TinyCNN2d(), 0)


@pytest.fixture
def tiny3d() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(TinyCNN3d(), 0)


def torchvision_model(name: str, num_classes: int = 5, seed: int = 0) -> nn.Module:
    """A torchvision architecture with seeded random weights (never downloaded)."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    return _randomise_bn(model, seed)
