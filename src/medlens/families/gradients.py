"""The gradient family: saliency, input x gradient, guided backprop, guided Grad-CAM, SmoothGrad (integrated gradients: `integrated.py`).

All targets of a batch come from one forward and one batched backward (`target_gradients`); the plain
input gradients are cached in `ctx.cache` so several methods of one call share them.

Conventions (documented for users in `medlens methods`):
- every map is the signed attribution summed over input channels, shape (B, T, *spatial): for a one-channel
  image it is the attribution itself; for RGB it is the per-pixel sum of the three channel attributions
  (signed, so completeness still holds: the map sums to what the channels sum to);
- `saliency` is the signed gradient (not its absolute value; take `abs()` when rendering if you want it);
- guided backprop swaps the ReLU backward for the guided one (positive gradient through positive inputs)
  *during the call only*: `nn.ReLU` modules and functional `F.relu` / `torch.relu` / `Tensor.relu` (as in
  torchvision's DenseNet forward) are patched by `guided_relu()`, a context manager that always restores
  the originals, also on error. The swap is process-wide for the length of the call (so threads the model
  starts are guided too; explain() calls run one at a time), and an in-place ReLU whose return value is ignored
  by the model code is not supported.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medlens.core.context import ExplainContext, call_model
from medlens.errors import MethodError
from medlens.core.options import finite_float, positive_int
from medlens.core.registry import MethodSpec, register
from medlens.core.spatial import spatial_dims, upsample_to

# ------------------------------------------------------------------------------------------ shared pass


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


def input_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradients (T, B, C, *s), logits (B, K)) of every target logit with respect to the input x."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = call_model(model, leaf)
        picked = logits.gather(1, targets)
        (grads,) = target_gradients(picked, [leaf])
    return grads.detach(), logits.detach()


def slots_first_to_maps(values: torch.Tensor) -> torch.Tensor:
    """(T, B, C, *s) attributions -> (B, T, *s) channel-summed maps."""
    return values.sum(dim=2).transpose(0, 1).contiguous()


# ---------------------------------------------------------------------------------------- guided ReLU
class _GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward passes only positive gradients through positive inputs (Springenberg et al.)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


def _guided(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    # `inplace` is ignored on purpose: the guided ReLU returns a new tensor, and model code uses the return value.
    return _GuidedReLU.apply(x)


_RELU_ENTRY_POINTS = [(F, "relu"), (F, "relu_"), (torch, "relu"), (torch, "relu_"), (torch.Tensor, "relu"),
                      (torch.Tensor, "relu_")]
_patch_lock = threading.Lock()
_patch_users = 0
_patch_saved: list[tuple[Any, str, Any]] = []


@contextlib.contextmanager
def guided_relu() -> Iterator[None]:
    """Swap every ReLU entry point (nn.ReLU via F.relu, F.relu_, torch.relu(_), Tensor.relu(_)) for the guided one.

    Process-wide, so that a model running parts of its forward in other threads (nn.DataParallel, checkpointing
    on a GPU) is guided too. The swap is installed by the first block to enter and undone by the last to leave,
    under a lock, so concurrent blocks never save each other's swap as "the original". Everything is put back in
    `finally`, so an error inside the block leaves torch exactly as it was.
    """
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            # (owner, name, own attribute or None when inherited): inherited ones are deleted again, not copied in.
            _patch_saved[:] = [(owner, name, owner.__dict__.get(name)) for owner, name in _RELU_ENTRY_POINTS]
            for owner, name, _ in _patch_saved:
                setattr(owner, name, _guided)
        _patch_users += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for owner, name, original in _patch_saved:
                    if original is None:
                        delattr(owner, name)
                    else:
                        setattr(owner, name, original)
                _patch_saved.clear()


# ------------------------------------------------------------------------------------ per-batch methods
# Each takes (model, x (N, C, *s), targets (N, T), options) and returns raw attributions (T, N, C, *s).
def _saliency(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return input_gradients(model, x, targets)[0]


def _inputxgradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    return input_gradients(model, x, targets)[0] * x.detach()[None]


def _guidedbackprop(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    if isinstance(model, torch.jit.ScriptModule):  # its ReLUs run inside TorchScript: patching would not reach them
        raise MethodError("guided backpropagation cannot run on a TorchScript model: its ReLUs run inside TorchScript, "
                          "where medlens cannot swap their backward (the result would silently be the plain gradient). "
                          "Load the model as a Python module, or use saliency / integratedgradients.")
    with guided_relu():
        return input_gradients(model, x, targets)[0]


# ---------------------------------------------------------------------------------------------- runners
def _cached_plain_gradients(ctx: ExplainContext) -> torch.Tensor:
    key = ("gradients", "input")
    if key not in ctx.cache:
        ctx.cache[key] = input_gradients(ctx.model, ctx.x, ctx.targets)[0]
    return ctx.cache[key]


def _run_saliency(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return slots_first_to_maps(_cached_plain_gradients(ctx))


def _run_inputxgradient(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    return slots_first_to_maps(_cached_plain_gradients(ctx) * ctx.x.detach()[None])


def _cached_guided(ctx: ExplainContext) -> torch.Tensor:
    key = ("gradients", "guided")
    if key not in ctx.cache:
        ctx.cache[key] = _guidedbackprop(ctx.model, ctx.x, ctx.targets, {})
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


def _lrp(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    from medlens.families.lrp import lrp_relevance  # imported here: the LRP package builds on this module

    return lrp_relevance(model, x, targets, "epsilon_plus_flat").relevance


# The methods SmoothGrad can wrap: name -> per-batch function returning (T, N, C, *s); a family of its own adds
# its entry (and defaults) here, as `integrated.py` does.
SMOOTHABLE: dict[str, Callable[..., torch.Tensor]] = {
    "saliency": _saliency,
    "inputxgradient": _inputxgradient,
    "guidedbackprop": _guidedbackprop,
    "lrp": _lrp,  # with its default composite, epsilon_plus_flat
}
BASE_DEFAULTS: dict[str, dict[str, Any]] = {}


def _run_smoothgrad(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    base = str(options["base"]).strip().lower()
    if base not in SMOOTHABLE:
        raise MethodError(f"smoothgrad cannot wrap {options['base']!r}; base must be one of {', '.join(SMOOTHABLE)}.")
    n_samples = positive_int(options, "n_samples")
    batch_size = positive_int(options, "batch_size")
    noise = finite_float(options, "noise", minimum=0.0)  # a fraction of the input's range
    x = ctx.x.detach()
    b = x.shape[0]
    flat = x.reshape(b, -1)
    sigma = noise * (flat.amax(dim=1) - flat.amin(dim=1))  # per image
    # Each image's noise comes from its own generator, seeded alike: an image's map does not depend on the others
    # in the batch, nor on its place there.
    eps = torch.stack([torch.randn((n_samples,) + tuple(x.shape[1:]), generator=ctx.generator("smoothgrad"),
                                   device=x.device, dtype=x.dtype) for _ in range(b)], dim=1)
    noisy = (x[None] + eps * sigma.view(1, b, *([1] * (x.dim() - 1)))).reshape(n_samples * b, *x.shape[1:])
    targets = ctx.targets.repeat(n_samples, 1)
    base_options = {**BASE_DEFAULTS.get(base, {}), "batch_size": batch_size}
    fn = SMOOTHABLE[base]
    chunk = max(b, (batch_size // b) * b) if base != "integratedgradients" else b
    total = None
    for start in range(0, noisy.shape[0], chunk):
        part = fn(ctx.model, noisy[start:start + chunk], targets[start:start + chunk], base_options)
        part = part.reshape(part.shape[0], -1, b, *x.shape[1:]).sum(dim=1)  # (T, B, C, *s)
        total = part if total is None else total + part
    ctx.method_notes["noise_sigma"] = sigma.tolist()
    ctx.method_notes["base"] = base
    return slots_first_to_maps(total / n_samples)


# --------------------------------------------------------------------------------------------- registry
_CHANNELS = " Multi-channel inputs: signed sum over channels."
register(MethodSpec(
    name="saliency", family="gradient",
    summary="Saliency: the signed gradient of the target logit with respect to the input (Simonyan et al. 2014)." + _CHANNELS,
    run=_run_saliency, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
))
register(MethodSpec(
    name="inputxgradient", family="gradient",
    summary="Input x gradient (Shrikumar et al. 2016); equals LRP-0 on ReLU networks." + _CHANNELS,
    run=_run_inputxgradient, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
))
register(MethodSpec(
    name="guidedbackprop", family="gradient",
    summary="Guided backpropagation: only positive gradients pass through positive ReLUs, module or functional "
            "(Springenberg et al. 2015)." + _CHANNELS,
    run=_run_guidedbackprop, needs_gradients=True, needs_layer=False, cost="one forward + one backward",
    torchscript=False,
))
register(MethodSpec(
    name="guidedgradcam", family="gradient",
    summary="Guided Grad-CAM: guided backprop times the upsampled Grad-CAM of the target layer (Selvaraju et al. 2017).",
    run=_run_guidedgradcam, needs_gradients=True, needs_layer=True, cost="two forwards + two backwards",
))
register(MethodSpec(
    name="smoothgrad", family="gradient",
    summary="SmoothGrad: a gradient method averaged over noisy copies of the input; noise is a fraction of the "
            "input's range (Smilkov et al. 2017)." + _CHANNELS,
    run=_run_smoothgrad, needs_gradients=True, needs_layer=False, stochastic=True,
    cost="n_samples forwards + backwards, batched",
    options={"n_samples": 25, "noise": 0.15, "base": "saliency", "batch_size": 16},
))
