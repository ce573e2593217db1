"""Canonizers: what LRP needs to know about a model's structure, and the equivalent LRP-friendly model.

`plan_model()` traces one small inference pass (cached per model and input shape) and finds, by tensor
identity, which BatchNorm reads the output of which linear layer, which layers read the model input, the
call order of the linear layers, and any layer no rule covers (a `MethodError` names it).

How each structure is made LRP-friendly (inside one call, undone on exit, also on error):

- conv/linear -> BatchNorm (VGG-BN, ResNet, DenseNet's conv -> norm): the BN is merged into the layer before
  it: W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps). Valid for any sign of s,
  provided the layer's output feeds only that BN (checked). During the call the layer computes with (W', b')
  and the BN's forward is the identity; no parameter, buffer or submodule is touched.
- BatchNorm -> ReLU -> conv (DenseNet's norm1/relu1/conv1, the transitions, norm5 -> relu -> pool -> classifier):
  there is no layer before the BN to merge into. For s > 0, relu(s x + t) = s relu(x + t / s), so the BN is
  the same as a bias t / s before the ReLU and the scale s merged into the FOLLOWING layer's input weights;
  for s < 0, relu(s x + t) = |s| relu(-x + t / |s|): a sign flip, a bias, and |s| merged forward. Every rule
  here depends on the input only through the products a_j w_jk (LRP-0, epsilon, gamma, alpha-beta, z+), and
  those products are the same with the scale on either side, while the ×input convention of the engine
  passes relevance through an elementwise scale (or sign flip) unchanged. So leaving such a BN in place as
  an elementwise affine map is *exactly* that merge into the following layer: its scale conserves relevance
  and its shift t acts as a bias (absorbing relevance as every bias does under LRP-0/epsilon). A pooling
  between BN and classifier (norm5) is linear and changes nothing. The non-product rules (flat, w-square,
  z^B) apply only to the input layer, never behind a BN.
- residual additions (ResNet), concatenation (DenseNet), average and adaptive average pooling (LRP-0, exact)
  and max pooling (winner takes all) need no rewrite: under the ×input convention the plain gradient is the
  conservative LRP step for them (an addition splits relevance by each branch's contribution).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from medlens.errors import MethodError
from medlens.core.layers import is_batchnorm, is_conv, is_linear

# Layers with a data-dependent, non-elementwise computation that no LRP rule here covers.
_UNCOVERED = (
    nn.modules.instancenorm._InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Softmax,
    nn.LogSoftmax, nn.Softmin, nn.MultiheadAttention, nn.modules.conv._ConvTransposeNd, nn.Embedding,
    nn.modules.pooling._LPPoolNd, nn.modules.pooling._MaxUnpoolNd, nn.modules.rnn.RNNBase,
)
# Parameterised leaves that are still elementwise and positively homogeneous: the gradient is their LRP step.
_HOMOGENEOUS = (nn.PReLU,)


def is_rule_layer(m: nn.Module) -> bool:
    """A layer LRP rules apply to: a (non-transposed) convolution of any dimension, or a dense layer."""
    return (is_conv(m) and not isinstance(m, nn.modules.conv._ConvTransposeNd)) or is_linear(m)


@dataclass
class ModelPlan:
    """What one trace found; modules are referenced by object, names are for users and composites."""

    names: dict[nn.Module, str]
    order: list[nn.Module]  # rule layers in the order of their first call
    input_layers: set[nn.Module]  # rule layers whose input is the model input itself
    merges: dict[nn.Module, nn.Module]  # rule layer -> the BatchNorm merged into it
    elementwise_bn: list[nn.Module] = field(default_factory=list)  # BNs left as elementwise affine maps
    notes: list[str] = field(default_factory=list)


_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def plan_model(model: nn.Module, x: torch.Tensor) -> ModelPlan:
    """The model's LRP plan for inputs shaped like x (traced on x[:1], cached while the module tree is unchanged)."""
    signature = (tuple(id(m) for m in model.modules()), x.dim(), tuple(x.shape[1:]), str(x.device))
    cached = _PLANS.get(model)
    if cached is not None and cached["signature"] == signature:
        return cached["plan"]
    plan = _trace(model, x[:1])
    _PLANS[model] = {"signature": signature, "plan": plan}
    return plan


def _trace(model: nn.Module, x: torch.Tensor) -> ModelPlan:
    names = {m: n for n, m in model.named_modules()}
    calls: list[tuple[nn.Module, list[int], Any]] = []  # (module, ids of tensor inputs, output)
    keep: list[Any] = []  # keeps traced tensors alive so ids stay unique

    def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
        keep.extend(tensors)
        keep.append(output)
        calls.append((module, [id(t) for t in tensors], output))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            x_traced = x.detach().clone()
            keep.append(x_traced)
            model(x_traced)
    finally:
        for h in handles:
            h.remove()

    called = []
    for module, _, _ in calls:
        if module not in called:
            called.append(module)
    for module in called:
        own_params = list(module.parameters(recurse=False))
        covered = is_rule_layer(module) or is_batchnorm(module) or isinstance(module, _HOMOGENEOUS)
        if isinstance(module, _UNCOVERED) or (own_params and not covered):
            raise MethodError(
                f"LRP has no rule for layer {names.get(module, '?')!r} of type {type(module).__name__}: medlens's LRP "
                f"covers convolutions, dense layers, BatchNorm, pooling, elementwise activations, additions and "
                f"concatenation. Use a gradient method (e.g. inputxgradient, integratedgradients) for this model."
            )
        if is_batchnorm(module) and (module.running_mean is None or module.running_var is None):
            raise MethodError(
                f"BatchNorm layer {names.get(module, '?')!r} has no running statistics (track_running_stats=False), "
                f"so it is not a fixed linear map and LRP cannot merge it; use a gradient method for this model."
            )

    produced_by = {id(out): module for module, _, out in calls if isinstance(out, torch.Tensor)}
    consumers: dict[int, int] = {}
    for _, ids, _ in calls:
        for i in ids:
            consumers[i] = consumers.get(i, 0) + 1
    n_calls: dict[nn.Module, int] = {}
    for module, _, _ in calls:
        n_calls[module] = n_calls.get(module, 0) + 1

    order = [m for m in called if is_rule_layer(m)]
    input_layers = {m for m, ids, _ in calls if is_rule_layer(m) and id(x_traced) in ids}
    merges: dict[nn.Module, nn.Module] = {}
    elementwise: list[nn.Module] = []
    notes: list[str] = []
    for module, ids, _ in calls:
        if not is_batchnorm(module) or module in merges.values() or module in elementwise:
            continue
        source = produced_by.get(ids[0]) if ids else None
        if (
            source is not None and is_rule_layer(source) and n_calls[source] == 1 and n_calls[module] == 1
            and consumers.get(ids[0], 0) == 1 and source not in merges
        ):
            merges[source] = module
        else:
            elementwise.append(module)
    if elementwise:
        notes.append(
            f"{len(elementwise)} BatchNorm layer(s) not preceded by a conv/linear layer (e.g. "
            f"{names.get(elementwise[0], '?')}) kept as elementwise affine maps: equivalent to merging their scale "
            f"into the following layer; their shift acts as a bias."
        )
    return ModelPlan(names=names, order=order, input_layers=input_layers, merges=merges,
                     elementwise_bn=elementwise, notes=notes)


def merged_parameters(layer: nn.Module, bn: Optional[nn.Module]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of `layer` followed by the eval-mode BatchNorm `bn` (or the layer's own when bn is None)."""
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    if bn is None:
        return weight, bias
    scale = (bn.running_var + bn.eps).rsqrt()
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale, shift = scale * bn.weight.detach(), shift * bn.weight.detach()
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    bias = shift if bias is None else bias * scale + shift
    return weight, bias


def _identity(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return x


def bn_bypass(plan: ModelPlan) -> dict[nn.Module, Any]:
    """The forward overrides that make merged BatchNorms the identity."""
    return {bn: _identity for bn in plan.merges.values()}
