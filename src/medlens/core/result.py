"""The frozen result of `explain()`: maps per method, logits, targets and provenance.

It behaves as a read-only mapping from method name to a (B, T, *spatial) float32 tensor.
"""
from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch


class ExplanationResult(Mapping[str, torch.Tensor]):
    """Raw, signed maps at input resolution, with what they explain and how they were made.

    A read-only mapping from method name to a float32 tensor (B, T, *spatial); `explain()` builds it, users read it.

    Args:
        maps: method name -> tensor (B, T, *spatial).
        logits: the model's output (B, K) for the input, whatever `output=` explained (that score is in
            `provenance["output"]`; for region targets, the region scores (B, T)).
        targets: (B, T) long tensor, the class explained in each slot.
        provenance: settings, layer, versions, digests, seed, timings (a JSON-ready dict).
        labels: the model's class names, if it has them.
        multi_label: whether the model's outputs are sigmoid (True) or softmax (False) scores.

    Raises:
        KeyError: `result[name]` for a method that was not computed (the message lists those that were).
        AttributeError: on any attempt to set an attribute.

    Example:
        >>> result = medlens.explain(model, x, methods="gradcam,saliency")
        >>> list(result), result.target_names(), result.probabilities.shape
        (['gradcam', 'saliency'], [['glioma']], torch.Size([1, 3]))
    """

    __slots__ = ("_maps", "_logits", "_targets", "_provenance", "_labels", "_multi_label")

    def __init__(
        self,
        maps: Mapping[str, torch.Tensor],
        logits: torch.Tensor,
        targets: torch.Tensor,
        provenance: Mapping[str, Any],
        labels: Optional[Sequence[str]] = None,
        multi_label: bool = False,
    ) -> None:
        object.__setattr__(self, "_maps", MappingProxyType(dict(maps)))
        object.__setattr__(self, "_logits", logits)
        object.__setattr__(self, "_targets", targets)
        object.__setattr__(self, "_provenance", dict(provenance))
        object.__setattr__(self, "_labels", list(labels) if labels else None)
        object.__setattr__(self, "_multi_label", multi_label)

    def __getitem__(self, method: str) -> torch.Tensor:
        try:
            return self._maps[method]
        except KeyError:
            if isinstance(method, str) and method.strip().lower() in self._maps:  # "GradCAM" as for explain()
                return self._maps[method.strip().lower()]
            raise KeyError(f"{method!r} was not computed in this result; it holds: {', '.join(self._maps)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("an ExplanationResult is read-only")

    @property
    def logits(self) -> torch.Tensor:
        return self._logits

    @property
    def targets(self) -> torch.Tensor:
        return self._targets

    @property
    def provenance(self) -> dict[str, Any]:
        """A copy of the provenance (changing it leaves the result as it was)."""
        return _deep_copy(self._provenance)

    def has_provenance(self, key: str) -> bool:
        """Whether the provenance has `key` at its top level, without copying it (writers ask this per file)."""
        return key in self._provenance

    @property
    def labels(self) -> Optional[list[str]]:
        return list(self._labels) if self._labels else None

    @property
    def multi_label(self) -> bool:
        return self._multi_label

    @property
    def probabilities(self) -> torch.Tensor:
        """Class probabilities: sigmoid for multi-label models, softmax otherwise."""
        return torch.sigmoid(self._logits) if self._multi_label else torch.softmax(self._logits, dim=1)

    def target_names(self) -> list[list[str]]:
        """The class name (or index as text) of every (image, slot)."""
        return [[self._labels[t] if self._labels else str(t) for t in row] for row in self._targets.tolist()]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._maps.items())
        return f"ExplanationResult({shapes}; targets {self._targets.tolist()})"


_ATOMS = (str, int, float, bool, type(None))


def _deep_copy(value: Any) -> Any:
    """`copy.deepcopy` for JSON-like provenance (dicts, lists, tuples, numbers, text), several times faster: the
    batch writer copies each result's provenance a few times per input; anything else goes to `copy.deepcopy`."""
    kind = type(value)
    if kind is dict:
        return {k: _deep_copy(v) for k, v in value.items()}
    if kind is list:
        return [_deep_copy(v) for v in value]
    if kind in _ATOMS:
        return value
    if kind is tuple:
        return tuple(_deep_copy(v) for v in value)
    return copy.deepcopy(value)
