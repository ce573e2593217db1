"""What a model expects as input: size, channels, intensity normalisation, labels, multi-label or not.

A model's `ModelDescription` (core/model_description.py) holds its `InputSpec`; `load_input` prepares scans to it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from medlens.errors import InputError


RESAMPLE_MODES = ("bilinear", "area")


@dataclass(frozen=True)
class InputSpec:
    """How to turn a scan into the tensor a model was trained on.

    size: spatial size (H, W) or (D, H, W) the model takes; None keeps the scan's size.
    channels: 1 or 3 (grayscale is repeated to 3 channels when the model wants 3).
    scale: how raw intensities map to [0, 1] before normalisation: "minmax" (per image), "uint8"
        (divide by 255), or "none".
    mean, std: per-channel normalisation after scaling: (x - mean) / std.
    value_range: the [low, high] of the normalised input (used by LRP's z^B rule and baselines).
    resample: how a scan is resized to `size`: "bilinear" (antialiased bilinear in 2-D; area average when
        shrinking a volume, trilinear when enlarging it) or "area" (Pillow's BOX filter: every output pixel is
        the mean of the input pixels whose centres fall inside it; what the
        bundled brain model was trained with).
        Resizing happens before intensity scaling, so a min-max scale sees the pixels the model sees.
    """

    size: Optional[tuple[int, ...]] = None
    channels: int = 1
    scale: str = "minmax"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    modality: str = ""
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE_MODES:
            raise InputError(
                f"unknown resample mode {self.resample!r} in an input spec; use one of {', '.join(RESAMPLE_MODES)}."
            )

    @property
    def value_range(self) -> tuple[float, float]:
        lows = [(0.0 - m) / s for m, s in zip(self._per_channel(self.mean), self._per_channel(self.std))]
        highs = [(1.0 - m) / s for m, s in zip(self._per_channel(self.mean), self._per_channel(self.std))]
        return (min(lows), max(highs))

    def _per_channel(self, values: Sequence[float]) -> list[float]:
        values = list(values)
        return values * self.channels if len(values) == 1 else values

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["mean"], d["std"], d["labels"] = list(self.mean), list(self.std), list(self.labels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("size", "mean", "std", "labels"):
            if known.get(key) is not None:
                known[key] = tuple(known[key])
        return cls(**known)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
