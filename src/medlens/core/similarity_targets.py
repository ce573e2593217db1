"""Similarity targets (`SimilarityTarget`): the explained score is the cosine similarity of an encoder's embedding to
a reference embedding, so a foundation encoder with no classifier head can be explained.

Built on the region targets' mechanism (`region_targets.wrap_for_targets` hands SimilarityTargets here): the model is
wrapped for the call so that its output is one similarity per (target, reference), and every method runs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from medlens.errors import ModelError, TargetError

LRP_NOTE = ("lrp does not conserve a similarity: a cosine does not change when the embedding is scaled, so the "
            "relevance entering the encoder (embedding x gradient of the cosine) sums to 0, and its conservation "
            "record shows the gap; integrated gradients complete against sim(x) - sim(baseline)")
EMBEDDING_RULE = ("the model's output (batch, width) as it is; for a HuggingFace encoder output, its `.pooler_output` "
                  "when it has one, else the class token `.last_hidden_state[:, 0]`")


@dataclass(frozen=True, eq=False)
class SimilarityTarget:
    """Explain an encoder's embedding by its cosine similarity to a reference embedding.

    The embedding is the model's output when that is a tensor (batch, width); for a HuggingFace encoder's output
    (`ViTModel`, `Dinov2Model`, ...; an object or dict) its `.pooler_output` when present, else the class token
    `.last_hidden_state[:, 0]`.

    Args:
        reference: the embedding to compare with, a tensor (or array, or list of numbers) of shape (width,) or
            (1, width); or (batch, width), one per image of the batch. Another image's embedding, a text
            embedding, a class prototype.
        name: the target's name in results (default "similarity"; "similarity<i>" when several are given).
    """

    reference: Any
    name: Optional[str] = None

    def describe(self) -> str:
        """A short text for names and provenance."""
        return self.name or "similarity"


def embedding_of(out: Any, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The embedding (B, D) in an encoder's output and which rule found it; a ModelError otherwise."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 2 and out.shape[0] == x.shape[0]:
            return out, "output"
        raise ModelError(f"a SimilarityTarget needs an embedding (batch, width) from the model; for input "
                         f"{tuple(x.shape)} it returned a tensor of shape {tuple(out.shape)}. Wrap the model so its "
                         f"forward returns one vector per image (e.g. the class token or the pooled features).")
    for key, rule in (("pooler_output", "pooler_output"), ("last_hidden_state", "last_hidden_state[:, 0]")):
        found = getattr(out, key, None)
        if found is None and isinstance(out, Mapping):
            found = out.get(key)
        if isinstance(found, torch.Tensor):
            return (found if key == "pooler_output" else found[:, 0]), rule
    raise ModelError(f"a SimilarityTarget needs an embedding from the model: a tensor (batch, width), or an output with "
                     f"`.pooler_output` or `.last_hidden_state` (HuggingFace encoders); this model returned "
                     f"{type(out).__name__}.")


class SimilarityScores(nn.Module):
    """The model with its output turned into cosine similarities (B, columns), one column per reference row. Holds the
    model as `model`; the references (columns, D) are a buffer-less attribute, so the wrapper has no state of its own."""

    def __init__(self, model: nn.Module, references: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.references = references

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        embedding, _ = embedding_of(self.model(x), x)
        refs = self.references.to(embedding.device, embedding.dtype)
        return torch.nn.functional.cosine_similarity(embedding[:, None, :], refs[None, :, :], dim=-1)


def _reference_rows(target: SimilarityTarget, width: int, batch: int, name: str) -> torch.Tensor:
    """The reference as (1, D) or (B, D) float32 rows; a TargetError for any other shape or width."""
    try:
        ref = torch.as_tensor(target.reference.detach().cpu() if isinstance(target.reference, torch.Tensor)
                              else target.reference, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise TargetError(f"target {name}: the reference must be a tensor, array or list of numbers, not "
                          f"{type(target.reference).__name__}.") from None
    if ref.dim() == 1:
        ref = ref[None]
    if ref.dim() != 2 or ref.shape[0] not in (1, batch):
        raise TargetError(f"target {name}: the reference has shape {tuple(ref.shape)}; give one embedding (width,) or "
                          f"(1, width), or one per image ({batch}, width).")
    if ref.shape[1] != width:
        raise TargetError(f"target {name}: the reference embedding has width {ref.shape[1]}, but the model's "
                          f"embedding has width {width}; give a reference of width {width} (an embedding from the "
                          f"same encoder, or a text embedding projected into its space).")
    if not bool(torch.isfinite(ref).all()) or bool((ref.norm(dim=1) == 0).any()):
        raise TargetError(f"target {name}: the reference is zero or not finite; its cosine similarity means nothing.")
    return ref


def wrap_for_similarity(model: nn.Module, x: torch.Tensor, items: list) -> tuple[SimilarityScores, torch.Tensor,
                                                                                   list[str], dict[str, Any]]:
    """The model wrapped so that its output is the similarity targets' scores (as `region_targets.wrap_for_targets`).

    Args:
        model: the model as given (in eval mode, inside the call's borrowed state).
        x: the input batch (B, C, *spatial).
        items: the targets, every one a SimilarityTarget.

    Returns:
        (wrapped model, grid (B, T) long, names (T,), provenance dict with kind "similarity").

    Raises:
        TargetError: a target that is not a SimilarityTarget, a reference of the wrong width or shape.
        ModelError: the model's output holds no embedding.
    """
    if not items or not all(isinstance(t, SimilarityTarget) for t in items):
        raise TargetError("similarity targets cannot be mixed with classes or region targets in one call; give only "
                          "medlens.SimilarityTarget(reference) targets.")
    with torch.no_grad():
        embedding, rule = embedding_of(model(x), x)
    batch, width = x.shape[0], embedding.shape[1]
    rows, grid_columns, names, records = [], [], [], []
    for i, target in enumerate(items):
        name = target.name or ("similarity" if len(items) == 1 else f"similarity{i}")
        ref = _reference_rows(target, width, batch, name)
        start = sum(r.shape[0] for r in rows)
        grid_columns.append([start + (b if ref.shape[0] > 1 else 0) for b in range(batch)])
        rows.append(ref)
        names.append(name)
    if len(set(names)) != len(names):
        raise TargetError(f"similarity targets need distinct names; got {names}.")
    references = torch.cat(rows).to(x.device)
    wrapped = SimilarityScores(model, references)
    grid = torch.tensor(grid_columns, dtype=torch.long, device=x.device).T.contiguous()
    with torch.no_grad():
        scores = wrapped(x).gather(1, grid).T.cpu()
    for name, ref, score in zip(names, rows, scores):
        records.append({"name": name, "width": width, "references": ref.shape[0], "embedding": rule,
                        "score": [round(float(s), 6) for s in score]})
    return wrapped, grid, names, {"kind": "similarity", "rule": EMBEDDING_RULE, "note": LRP_NOTE,
                                  "targets": records}
