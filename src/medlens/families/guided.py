"""Guided backpropagation and guided Grad-CAM: gradients through ReLUs that pass only positive gradients.

`guided_relus()` clamps the gradient arriving at every ReLU node of one call's own graph (module, `F.relu`,
`torch.relu`, `Tensor.relu`, in place or not, in any thread the model runs it), so nothing process-wide changes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medlens.tensor.autograd import CHANNELS_NOTE, input_gradients, slots_first_to_maps
from medlens.core.context import ExplainContext
from medlens.core.registry import MethodSpec, PerBatch, register
from medlens.tensor.spatial import spatial_dims, upsample_to
from medlens.errors import MethodError


def _guided_grad_outputs(grad_outputs: tuple[Optional[torch.Tensor], ...]) -> tuple[Optional[torch.Tensor], ...]:
    # Only positive gradients enter a ReLU's backward, which then passes them where its output is positive.
    return tuple(None if g is None else g.clamp(min=0) for g in grad_outputs)


@contextlib.contextmanager
def guided_relus(output: torch.Tensor) -> Iterator[int]:
    """Backward passes from `output` inside the block go through every ReLU of its graph the guided way.

    Guided backprop (Springenberg et al.): a ReLU passes back only positive gradients, where its output is
    positive. Each ReLU of the graph that produced `output` (module, `F.relu`, `torch.relu`, `Tensor.relu`,
    in place or not, in any thread the model ran it) is one `ReluBackward0` node; a pre-hook on that node clamps
    the gradient arriving at it. Nothing outside this one graph changes, so other calls, other threads and
    other models are untouched. Yields how many ReLU nodes were found; the hooks are removed on exit.
    """
    handles = []
    seen: set[Any] = set()
    stack = [output.grad_fn]
    try:
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node.name() == "ReluBackward0":
                handles.append(node.register_prehook(_guided_grad_outputs))
            stack.extend(next_node for next_node, _ in node.next_functions)
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def guided_backprop(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any],
                    relus_found: Optional[list] = None) -> torch.Tensor:
    if isinstance(model, torch.jit.ScriptModule):  # its ReLUs run inside TorchScript's own graph: no ReLU node to hook
        raise MethodError("guided backpropagation cannot run on a TorchScript model: its ReLUs run inside TorchScript, "
                          "where medlens cannot swap their backward (the result would silently be the plain gradient). "
                          "Load the model as a Python module, or use saliency / integratedgradients.")
    around = guided_relus
    if relus_found is not None:
        @contextlib.contextmanager
        def around(output: torch.Tensor) -> Iterator[int]:
            with guided_relus(output) as count:
                relus_found.append(count)
                yield count
    return input_gradients(model, x, targets, around_backward=around)[0]


def _cached_guided(ctx: ExplainContext) -> torch.Tensor:
    key = ("gradients", "guided")
    if key not in ctx.cache:
        found: list[int] = []
        ctx.cache[key] = guided_backprop(ctx.model, ctx.x, ctx.targets, {}, relus_found=found)
        ctx.cache[("guided", "relus")] = sum(found)
    if ctx.cache[("guided", "relus")] == 0:
        ctx.method_notes["relus"] = ("no ReLU in the model's graph (a GELU transformer?): guided backpropagation is the "
                                     "plain gradient here")
    return ctx.cache[key]


def _run_guidedbackprop(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return slots_first_to_maps(_cached_guided(ctx))


def gradcam_maps(ctx: ExplainContext) -> torch.Tensor:
    """Grad-CAM at ctx.layer from the shared layer pass, ReLU'd and upsampled: (B, T, *input spatial)."""
    lp = ctx.layer_pass()
    grads = lp.gradients(ctx.targets)  # (T, B, C, *s)
    activation = lp.activation.detach()[None]
    weights = grads.mean(dim=spatial_dims(grads, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=2)).transpose(0, 1)  # (B, T, *s)
    return upsample_to(cam, ctx.spatial_shape)


def _run_guidedgradcam(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    ctx.method_notes["layer"] = ctx.layer.name
    ctx.method_notes["upsampling"] = "bilinear/trilinear Grad-CAM (ReLU'd) times the channel-summed guided backprop"
    return slots_first_to_maps(_cached_guided(ctx)) * gradcam_maps(ctx)


register(MethodSpec(
    name="guidedbackprop", family="gradient",
    summary="Guided backpropagation: only positive gradients pass through positive ReLUs, module or functional "
            "(Springenberg et al. 2015)." + CHANNELS_NOTE,
    run=_run_guidedbackprop, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
    torchscript=False, per_batch=PerBatch(guided_backprop),
))
register(MethodSpec(
    name="guidedgradcam", family="gradient",
    summary="Guided Grad-CAM: guided backprop times the upsampled Grad-CAM of the target layer (Selvaraju et al. 2017).",
    run=_run_guidedgradcam, needs_gradients=True, needs_layer=True, cost="two forwards + two backwards",
))
