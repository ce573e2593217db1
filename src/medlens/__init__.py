"""medlens: explain medical image classifiers with CAM, gradient, LRP and perturbation methods.

The public surface (see API.md): `load_model`, `load_input`, `methods`, `method_info`, `explain`.
"""
from __future__ import annotations

from typing import Any

from medlens.version import __version__  # noqa: E402

from medlens.errors import MedlensError  # noqa: E402
from medlens.core.explain import explain  # noqa: E402
from medlens.core.registry import method_info, methods  # noqa: E402
from medlens.core.result import ExplanationResult  # noqa: E402


def load_model(source: Any, **options: Any):
    """A bundled model name, a file path, or "xrv:<weights name>" -> nn.Module with .labels and .multi_label."""
    # imported on first use: the bundled zoo builds on torchvision, whose import takes about a second
    from medlens.models.loading import load_model as _load_model

    return _load_model(source, **options)


def load_input(path: Any, model: Any = None, **options: Any):
    """Read an image or volume file and prepare it for `model`: a (1, C, *spatial) float tensor."""
    from medlens.io.preparation import load_input as _load_input

    return _load_input(path, model, **options)


__all__ = [
    "ExplanationResult",
    "MedlensError",
    "__version__",
    "explain",
    "load_input",
    "load_model",
    "method_info",
    "methods",
]
