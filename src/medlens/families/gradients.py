"""The gradient family's plain gradients: saliency and input x gradient.

Guided backprop and guided Grad-CAM live in `guided.py`, integrated gradients in `integrated.py`, SmoothGrad in
`smoothgrad.py`, the shared autograd helpers in `medlens.tensor.autograd`. All targets of a batch come from one
forward and one batched backward (`target_gradients`); the plain input gradients are cached in `ctx.cache` so several
methods of one call share them.

Conventions (documented for users in `medlens methods`):
- every map is the signed attribution summed over input channels, shape (B, T, *spatial): for a one-channel
  image it is the attribution itself; for RGB it is the per-pixel sum of the three channel attributions
  (signed, so completeness still holds: the map sums to what the channels sum to);
- `saliency` is the signed gradient (not its absolute value; take `abs()` when rendering if you want it);
- `inputxgradient` is (x - reference) x gradient, the reference being the scan's black in the model's input space
  (its air, measured in the image's frame when that is dark: `core.baselines.air_level`; option `reference="zero"`,
  the default; the plain x x gradient when the model does not normalise, or with
  `reference="spec-zero"`): black background then carries no attribution, whatever the normalisation's mean.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from medlens.tensor.autograd import CHANNELS_NOTE, input_gradients, slots_first_to_maps
from medlens.core.baselines import reference_of, scan_black
from medlens.core.context import ExplainContext
from medlens.core.registry import MethodSpec, PerBatch, register


# ------------------------------------------------------------------------------------ per-batch methods
# Each takes (model, x (N, C, *s), targets (N, T), options) and returns raw attributions (T, N, C, *s).
def saliency(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return input_gradients(model, x, targets)[0]


def input_x_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    reference = reference_of(x.detach(), options.get("reference", "zero"), scan_black(model), {})
    return input_gradients(model, x, targets)[0] * (x.detach() - reference)[None]


# ---------------------------------------------------------------------------------------------- runners
def _cached_plain_gradients(ctx: ExplainContext) -> torch.Tensor:
    key = ("gradients", "input")
    if key not in ctx.cache:
        ctx.cache[key] = input_gradients(ctx.model, ctx.x, ctx.targets)[0]
    return ctx.cache[key]


def _run_saliency(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return slots_first_to_maps(_cached_plain_gradients(ctx))


def _run_inputxgradient(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    x = ctx.x.detach()
    reference = reference_of(x, options.get("reference", "zero"), scan_black(ctx.model), ctx.method_notes)
    return slots_first_to_maps(_cached_plain_gradients(ctx) * (x - reference)[None])


# --------------------------------------------------------------------------------------------- registry
register(MethodSpec(
    name="saliency", family="gradient",
    summary="Saliency: the signed gradient of the target logit with respect to the input (Simonyan et al. 2014)." + CHANNELS_NOTE,
    run=_run_saliency, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
    per_batch=PerBatch(saliency),
    display="magnitude",  # Simonyan et al. draw |gradient| (the largest over channels); the signed map stays in the API
))
register(MethodSpec(
    name="inputxgradient", family="gradient",
    summary="Input x gradient (Shrikumar et al. 2016), the input taken from the scan's black (reference=); equals "
            "LRP-0 on ReLU networks." + CHANNELS_NOTE,
    run=_run_inputxgradient, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
    per_batch=PerBatch(input_x_gradient),
    options={"reference": "zero"},
))
