"""Running the model and taking gradients of its target logits: the ground floor every gradient method stands on.

Owns `call_model` (the logits of a model's output as it comes, insisting on (B, K)), `target_gradients` (every target of a batch from one batched
backward), `input_gradients` and the (T, B, C, *s) -> (B, T, *s) map layout the gradient methods share.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence

import torch
from torch import nn

from medlens.errors import ModelError


def logits_of(out: Any) -> Any:
    """The logits in a model's output as it comes: a tensor; an object with `.logits` (HuggingFace); a mapping with
    "logits" (or "out", torchvision's segmentation models); a tuple or list whose first element is the logits.
    Anything else is returned as it is, for `call_model` to refuse with a message."""
    if isinstance(out, torch.Tensor):
        return out
    found = getattr(out, "logits", None)  # HuggingFace ModelOutput (also a mapping, but .logits says it)
    if isinstance(found, torch.Tensor):
        return found
    if isinstance(out, Mapping):
        for key in ("logits", "out"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


def call_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the model and insist on (B, K) logits, with a message people can act on.

    Args:
        model: any module whose forward takes the input batch; its output may be a tensor, an object with
            `.logits`, a mapping with "logits" or "out", or a tuple/list with the logits first (`logits_of`).
        x: the input batch (B, C, *spatial).

    Returns:
        The logits (B, K), still attached to the model's graph.

    Raises:
        ModelError: the output holds no logits tensor, or not one of shape (batch, classes).
    """
    out = logits_of(model(x))
    if not isinstance(out, torch.Tensor):
        raise ModelError(
            f"the model returned {type(out).__name__}, with no tensor of logits (batch, classes) in it: medlens takes a "
            f"tensor, an object with .logits, a dict with 'logits' or 'out', or a tuple with the logits first. Wrap it "
            f"so that forward() returns the class scores."
        )
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        hint = (" It looks like per-pixel logits of a segmentation model: give targets=[medlens.SegmentationTarget(class, "
                "region=...)]." if out.dim() == x.dim() and out.shape[0] == x.shape[0] else "")
        raise ModelError(f"the model must return logits of shape (batch, classes); for input {tuple(x.shape)} it returned {tuple(out.shape)}.{hint}")
    return out


def target_gradients(picked: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d picked[:, t] / d input for every slot t of picked (B, T): one (T, *input.shape) per input.

    Inputs the outputs do not depend on get zeros. One batched backward when the graph supports it (vmap over the grad outputs), else one backward
    per slot with the graph retained. Images of the batch are independent (eval mode), so the gradient of
    the batch sum of slot t gives each image's own gradient.
    """
    n_slots = picked.shape[1]
    if n_slots == 1:
        grads = torch.autograd.grad(picked[:, 0].sum(), list(inputs), allow_unused=True, materialize_grads=True)
        return [g.unsqueeze(0) for g in grads]
    eye = torch.eye(n_slots, dtype=picked.dtype, device=picked.device)
    grad_outputs = eye[:, None, :].expand(n_slots, picked.shape[0], n_slots)
    try:
        grads = torch.autograd.grad(picked, list(inputs), grad_outputs=grad_outputs, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
        # an input the outputs do not depend on gets None: zeros with the slot axis
        return [g if g is not None else inp.new_zeros((n_slots,) + tuple(inp.shape)) for g, inp in zip(grads, inputs)]
    except (RuntimeError, NotImplementedError):
        per_slot = [torch.autograd.grad(picked[:, t].sum(), list(inputs), retain_graph=t < n_slots - 1,
                                        allow_unused=True, materialize_grads=True)
                    for t in range(n_slots)]
        return [torch.stack([g[i] for g in per_slot]) for i in range(len(inputs))]


def input_gradients(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, *,
    around_backward: Optional[Callable[[torch.Tensor], ContextManager]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradients (T, B, C, *s), logits (B, K)) of every target logit with respect to the input x.

    `around_backward(picked)`: a context manager the backward runs in, given the picked logits (B, T) whose graph
    it may change for this backward only (guided backprop's `guided_relus`)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = call_model(model, leaf)
        picked = logits.gather(1, targets)
        with around_backward(picked) if around_backward is not None else contextlib.nullcontext():
            (grads,) = target_gradients(picked, [leaf])
    return grads.detach(), logits.detach()


def slots_first_to_maps(values: torch.Tensor) -> torch.Tensor:
    """(T, B, C, *s) attributions -> (B, T, *s) maps, summed over input channels (signed)."""
    return values.sum(dim=2).transpose(0, 1).contiguous()


#: how every gradient method's summary states the channel convention
CHANNELS_NOTE = " Multi-channel inputs: signed sum over channels."
