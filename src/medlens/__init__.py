"""medlens: explain medical image classifiers with CAM, gradient, LRP and perturbation methods.

The public surface, every name with its arguments, defaults, errors and an example in docs/api.md:
`load_model`, `load_input`, `methods`, `method_info`, `explain`, `ExplanationResult`, `MedlensError`,
`SegmentationTarget`, `BoxTarget` and `SimilarityTarget` (explaining segmentation and detection models and
encoders).

Importing the package does not import torch: the names that need it are imported on first use (PEP 562
`__getattr__`), so that `medlens batch --executor processes` can start its workers' forkserver, which imports torch
in a process of its own, before the command imports torch itself (docs/batch.md, "Start-up").
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that wait for work sleep instead of spinning (unless the user chose): a spinning thread on a machine
# with other busy processes takes the core the thread it waits for needs (docs/batch.md, "Threads"). Only effective
# when medlens is imported before torch, which `medlens` commands and worker processes always do.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from medlens.version import __version__  # noqa: E402

from medlens.errors import MedlensError  # noqa: E402

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from medlens.core.explain import explain
    from medlens.core.registry import method_info, methods
    from medlens.core.region_targets import BoxTarget, SegmentationTarget
    from medlens.core.result import ExplanationResult
    from medlens.core.similarity_targets import SimilarityTarget

_LAZY = ("explain", "method_info", "methods", "ExplanationResult", "BoxTarget", "SegmentationTarget",
         "SimilarityTarget")  # the public names that need torch, imported on first use


def __getattr__(name: str) -> Any:
    """A public name that needs torch, imported on first use and then kept as a plain attribute of the package.

    Raises:
        AttributeError: `name` is not a name of the package.
    """
    if name == "explain":
        from medlens.core.explain import explain as value
    elif name == "method_info":
        from medlens.core.registry import method_info as value
    elif name == "methods":
        from medlens.core.registry import methods as value
    elif name == "ExplanationResult":
        from medlens.core.result import ExplanationResult as value
    elif name == "BoxTarget":
        from medlens.core.region_targets import BoxTarget as value
    elif name == "SegmentationTarget":
        from medlens.core.region_targets import SegmentationTarget as value
    elif name == "SimilarityTarget":
        from medlens.core.similarity_targets import SimilarityTarget as value
    else:
        raise AttributeError(f"module 'medlens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def load_model(source: Any, **options: Any):
    """Load a model to explain: a bundled name, a model file, an architecture with weights, or a TorchXRayVision model.

    Args:
        source: a bundled name (`medlens models` lists them, e.g. "brain-tumor-mri"); a model file (TorchScript,
            a torch.export program `.pt2`, weights whose sidecar JSON names an "architecture", or a pickled module);
            "torchvision:<arch>", "timm:<arch>" or "monai:<Name>" with `weights=`; "xrv:<weights name>"; or an `nn.Module`,
            which gets its labels and input spec attached.
        **options: `weights` (a local state dict or .safetensors file for an architecture name), `num_classes`,
            `in_channels` (override what the weights say), `map_location` (default "cpu"), `allow_pickle` (default
            False: a pickled module runs code when loaded, so only for files you trust); and what the model takes,
            overriding its sidecar JSON: `labels` (list or comma-separated), `input_size` (int, (H, W) or
            (D, H, W)), `multi_label`, `channels`, `scale`, `mean`, `std`, `modality`.

    Returns:
        The `torch.nn.Module` in eval mode, with `.labels` (list[str]), `.multi_label` (bool) and `.input_spec`.

    Raises:
        ModelError: an unknown name or missing file, a pickled file without `allow_pickle=True`, weights that do
            not fit the architecture, an unknown option, a missing optional package (timm, torchxrayvision).

    Example:
        >>> model = medlens.load_model("brain-tumor-mri")
        >>> model.labels
        ['pituitary', 'meningioma', 'glioma']
    """
    # imported on first use: the bundled zoo builds on torchvision, whose import takes about a second
    from medlens.models.loading import load_model as _load_model

    return _load_model(source, **options)


def load_input(path: Any, model: Any = None, **options: Any):
    """Read an image or volume file and prepare it for `model` as the model's input spec says.

    Args:
        path: a PNG, JPEG, TIFF, DICOM or NIfTI file, or a folder holding one DICOM series.
        model: the model the tensor is for (its `.input_spec`: size, channels, scaling, normalisation); None keeps
            the scan's size with 1 channel and min-max scaling.
        **options: `slice_index` (a 2-D model and a volume: the axial slice, default the middle one), `frame`
            (a multi-frame file: the frame to read), `window` (DICOM: True applies the file's VOI LUT or window,
            False keeps modality values, (center, width) applies that window; default True), `spec` (an
            `InputSpec` that replaces the model's), `return_notes` (default False; True returns
            `(tensor, notes)`, the notes saying what loading did).

    Returns:
        A float32 tensor of shape (1, C, H, W) or (1, C, D, H, W), ready for `explain(model, x)`.

    Raises:
        InputError: a missing, unreadable, corrupt or oversized file, or one that does not fit the model (a
            volume for a 2-D model is sliced, never refused; a 2-D image for a 3-D model is refused).

    Example:
        >>> x = medlens.load_input("slice.png", model)
        >>> x.shape
        torch.Size([1, 1, 160, 160])
    """
    from medlens.io.preparation import load_input as _load_input

    return _load_input(path, model, **options)


__all__ = [
    "BoxTarget",
    "ExplanationResult",
    "MedlensError",
    "__version__",
    "explain",
    "load_input",
    "load_model",
    "method_info",
    "methods",
    "SegmentationTarget",
    "SimilarityTarget",
]
