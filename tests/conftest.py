"""Shared fixtures: small seeded models (2-D and 3-D) and one-thread torch; nothing is downloaded. The builders
behind them live in tests/helpers.py, which test modules import (`from helpers import ...`) instead of conftest."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# TinyCNN2d, TinyCNN3d, shared_dataset, torchvision_model are re-exported for scripts that still import them from
# conftest (benchmarks/fuzz_readers.py); tests import them from helpers.
from helpers import TinyCNN2d, TinyCNN3d, make_tiny2d, make_tiny3d, shared_dataset, torchvision_model  # noqa: F401

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny2d() -> nn.Module:
    return make_tiny2d(0)


@pytest.fixture
def tiny3d() -> nn.Module:
    return make_tiny3d(0)


@pytest.fixture
def one_thread():
    """The CI machine is shared: a test using this runs single-threaded and restores the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
