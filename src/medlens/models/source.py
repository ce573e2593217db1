"""What a model source is: a `ModelSource` entry (can it load this? load it) taking `LoadOptions` and returning a
`LoadedModel`, the module with the part of its description the source knows. The table of sources is in loading.py.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn

from medlens.core.model_description import ModelDescription

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class LoadOptions:
    """How to load, as given to `load_model` (the options that describe the model go to the description instead).

    weights: a local weights file, for architecture names.
    num_classes, in_channels: the architecture's classifier size and input channels (read from the weights if None).
    map_location: where tensors are loaded ("cpu" by default).
    allow_pickle: whether a pickled module may be loaded (loading it runs the code it holds).
    """

    weights: Optional[PathLike] = None
    num_classes: Optional[int] = None
    in_channels: Optional[int] = None
    map_location: Any = "cpu"
    allow_pickle: bool = False


@dataclass
class LoadedModel:
    """A module as a source loaded it, with the part of its description that the source knows.

    partial: source, kind, sha256 and sidecar path; `input_spec` when the source itself says what the model takes
        (TorchXRayVision); labels, multi-label, the checked spec and the notes are filled in by
        `metadata.build_description`.
    sidecar: the fields of the sidecar JSON beside the file, if any (merged below the options and the model's own).
    notes: what the loader did that a user should know (calibration turned off, num_classes read from the weights).
    """

    module: nn.Module
    partial: ModelDescription
    sidecar: Optional[Mapping[str, Any]] = None
    notes: list[str] = field(default_factory=list)

    @property
    def sidecar_path(self) -> Optional[Path]:
        """The sidecar JSON's path, or None."""
        return Path(self.partial.sidecar) if self.partial.sidecar else None


@dataclass(frozen=True)
class ModelSource:
    """One entry of the table of model sources.

    name: what the source is called (for messages and tests).
    can_load: whether this source loads the given `source` (a name, a path, a module); the first that can, loads.
    load: (source, options) -> LoadedModel; raises ModelError with what to do when it cannot.
    takes_weights: whether `weights=` means something to this source (it is refused otherwise).
    """

    name: str
    can_load: Callable[[Any], bool]
    load: Callable[[Any, LoadOptions], LoadedModel]
    takes_weights: bool = False
