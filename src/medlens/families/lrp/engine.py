"""The LRP engine: one forward with every linear layer computing its rule's surrogate, one batched backward.

The quantity propagated backward is g = R / a, so the input relevance is x * grad(x) plus, for input-layer
rules (flat, w-square, z^B), leaf * grad(leaf) of their surrogate inputs. See `rules.py` for why the plain
gradient is then the right LRP step for activations, pooling, additions and concatenation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medlens.tensor.autograd import call_model, target_gradients
from medlens.errors import MethodError
from medlens.core.layers import is_activation, is_linear
from medlens.core.model_description import describe
from medlens.core.model_state import override_forward
from medlens.families.lrp.canonizers import ModelPlan, bn_bypass, merged_parameters, plan_model
from medlens.families.lrp.composites import DEFAULT_COMPOSITE, assign_rules
from medlens.families.lrp.rules import Epsilon, LayerCall, Rule, stabilize

# Elementwise activations whose plain gradient already passes relevance unchanged (f(a) = f'(a) a).
_HOMOGENEOUS_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


@dataclass
class _CallState:
    """Per-call state the overridden forwards share: the model input leaf and the surrogate-input leaves."""

    input: Optional[torch.Tensor] = None
    leaves: list[torch.Tensor] = field(default_factory=list)


@dataclass
class LRPResult:
    relevance: torch.Tensor  # (T, B, C, *s)
    logits: torch.Tensor  # (B, K)
    plan: ModelPlan
    rules: dict[nn.Module, Rule]
    notes: list[str]
    reference_note: str = ""  # how the input layer's reference point was taken (empty: the plain input)


def _linear_fn(module: nn.Module) -> Callable[..., torch.Tensor]:
    if is_linear(module):
        return F.linear
    return module._conv_forward  # Conv1d/2d/3d: honours padding_mode, stride, dilation, groups


def _rule_forward(module: nn.Module, rule: Rule, bn: Optional[nn.Module], state: _CallState, name: str) -> Callable[..., torch.Tensor]:
    fn = _linear_fn(module)
    weight, bias = merged_parameters(module, bn)

    def leaf(value: torch.Tensor) -> torch.Tensor:
        made = value.detach().requires_grad_(True)
        state.leaves.append(made)
        return made

    def forward(a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = fn(a, weight, bias)
        if not a.requires_grad:
            return y
        if rule.input_layer_only and a is not state.input:
            raise MethodError(f"the {rule.name} rule is for the layer that reads the image; layer {name!r} does not.")
        call = LayerCall(fn=fn, weight=weight, bias=bias, a=a, y=y, leaf=leaf, nonnegative=bool((a >= 0).all()))
        try:
            surrogate = rule.surrogate(call)
        except ValueError as exc:
            raise MethodError(f"rule {rule.describe()} cannot run on layer {name!r}: {exc}") from None
        return surrogate + (y - surrogate).detach()

    return forward


def _pass_forward(module: nn.Module) -> Callable[..., torch.Tensor]:
    """Relevance passes unchanged through a non-homogeneous elementwise activation (GELU, SiLU, sigmoid, ...)."""
    original = type(module).forward

    def forward(a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = original(module, a.clone() if getattr(module, "inplace", False) else a, *args, **kwargs)
        if not a.requires_grad:
            return y
        surrogate = a * (y.detach() / stabilize(a.detach(), 1e-9))
        return surrogate + (y - surrogate).detach()

    return forward


@contextlib.contextmanager
def lrp_model(model: nn.Module, plan: ModelPlan, rules: dict[nn.Module, Rule], state: _CallState) -> Iterator[None]:
    """The canonised model with rules installed (instance-level forwards), restored on exit, also on error."""
    overrides: dict[nn.Module, Any] = dict(bn_bypass(plan))
    for module, rule in rules.items():
        overrides[module] = _rule_forward(module, rule, plan.merges.get(module), state, plan.names.get(module, "?"))
    for module in model.modules():
        if is_activation(module) and not isinstance(module, _HOMOGENEOUS_ACTIVATIONS):
            overrides[module] = _pass_forward(module)
    with override_forward(overrides):
        yield


def input_bounds(model: nn.Module, x: torch.Tensor) -> tuple[tuple[float, float], str]:
    """(low, high) for z^B: the model's input spec when it has one, else the input's own min and max."""
    spec = describe(model).input_spec
    if spec is not None:
        low, high = spec.value_range
        return (float(low), float(high)), "from model.input_spec.value_range"
    return (float(x.min()), float(x.max())), "from the input's min and max (the model has no input_spec)"


def lrp_relevance(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor, composite: Any = DEFAULT_COMPOSITE,
    epsilon: float = 1e-6, gamma: float = 0.25, bounds: Optional[tuple[float, float]] = None,
    reference: Optional[torch.Tensor] = None,
) -> LRPResult:
    """Input relevance (T, B, C, *s) of every target logit; relevance at the output is the logit itself.

    `reference` (broadcastable to x, e.g. the scan's black in the model's input space): the layers that read the
    input with the epsilon (or zero) rule give relevance to x - reference instead of x, i.e. R_i = sum_k
    (x_i - r_i) w_ik / z_k R_k; the share the reference accounts for stays with the layer's bias. Ignored (with a
    note) when an input layer has another rule: z^B has its own bounds, and gamma and alpha-beta split by sign."""
    plan = plan_model(model, x)
    if bounds is None:
        bounds, _ = input_bounds(model, x)
    rules, notes = assign_rules(plan, composite, float(epsilon), float(gamma), bounds)
    state = _CallState()
    with lrp_model(model, plan, rules, state), torch.enable_grad():
        state.input = x.detach().requires_grad_(True)
        logits = call_model(model, state.input)
        picked = logits.gather(1, targets)
        grads = target_gradients(picked, [state.input, *state.leaves])
    start, reference_note = state.input.detach(), ""
    if reference is not None and bool((reference != 0).any()):
        input_rules = [rules[m] for m in plan.order if m in plan.input_layers]
        if input_rules and all(isinstance(r, Epsilon) for r in input_rules):
            start = start - reference.to(start)
            reference_note = ("the input layer's relevance is of x minus the scan's black in the model's input space "
                              "(what black accounts for stays with the layer's bias)")
        else:
            reference_note = ("the input layer's rule takes its own reference (z^B: the spec's bounds; gamma and "
                              "alpha-beta: 0), so relevance is of x itself")
    relevance = grads[0] * start[None]
    for leaf, grad in zip(state.leaves, grads[1:]):
        relevance = relevance + grad * leaf.detach()[None]
    return LRPResult(relevance.detach(), logits.detach(), plan, rules, notes + list(plan.notes), reference_note)
