"""Layer-wise relevance propagation: rules, composites, canonizers and the engine, registered as `lrp`.

`lrp` returns the input relevance summed over channels (signed), (B, T, *spatial); its provenance records
the rules used, the canonisation and how much of each explained logit reached the input.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import torch
from torch import nn

from medlens.core.baselines import reference_of, scan_black
from medlens.core.context import ExplainContext
from medlens.errors import MethodError
from medlens.core.registry import MethodSpec, PerBatch, register
from medlens.families.lrp.canonizers import ModelPlan, plan_model
from medlens.families.lrp.composites import DEFAULT_COMPOSITE, PRESETS, assign_rules, make_rule
from medlens.families.lrp.engine import LRPResult, input_bounds, lrp_model, lrp_relevance
from medlens.families.lrp.transformer import CONSERVATION_TOLERANCE, is_transformer, transformer_relevance
from medlens.families.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, Zero, ZPlus

__all__ = [
    "lrp_relevance", "LRPResult", "plan_model", "ModelPlan", "assign_rules", "make_rule", "lrp_model", "PRESETS",
    "DEFAULT_COMPOSITE",
    "Rule", "Epsilon", "Zero", "Gamma", "AlphaBeta", "ZPlus", "ZBox", "Flat", "WSquare", "Pass",
]


def _number(options: Mapping[str, Any], name: str) -> float:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise MethodError(f"option {name} of lrp must be a non-negative number, got {value!r}.")
    return float(value)


def _lrp_per_batch(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, options: Mapping[str, Any]) -> torch.Tensor:
    """Input relevance (T, N, C, *s) for a wrapper's batch (SmoothGrad's noisy copies), with the given composite."""
    reference = reference_of(x.detach(), options.get("reference", "zero"), scan_black(model), {})
    return lrp_relevance(model, x, targets, options["composite"], _number(options, "epsilon"),
                         _number(options, "gamma"), reference=reference).relevance


def _conservation(ctx: ExplainContext, relevance: torch.Tensor) -> dict[str, Any]:
    relevance_sum = relevance.flatten(2).sum(dim=2).transpose(0, 1)  # (B, T)
    logit = ctx.logits.gather(1, ctx.targets)
    return {
        "relevance_sum": relevance_sum.tolist(),
        "logit": logit.tolist(),
        "fraction_reaching_input": (relevance_sum / logit.where(logit != 0, torch.ones_like(logit))).tolist(),
    }


def _run_transformer_lrp(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    """`lrp` on a vision transformer: AttnLRP's rules (`transformer.py`); the CNN composites do not apply."""
    if options["composite"] != DEFAULT_COMPOSITE:
        raise MethodError(
            f"lrp on a vision transformer uses AttnLRP's rules (LayerNorm, attention, GELU; LRP-0 on linear layers); "
            f"composite={options['composite']!r} is a preset for CNNs. Leave composite at its default.")
    result = transformer_relevance(ctx.model, ctx.x, ctx.targets, ctx.logits, options["softmax"])
    ctx.method_notes.update(result.notes)
    ctx.method_notes["conservation"] = _conservation(ctx, result.relevance)
    ctx.method_notes["conservation"]["tolerance"] = (
        f"the sum equals the logit to {CONSERVATION_TOLERANCE:g} (relative) in a network without biases, LayerNorm "
        f"shifts, class token or position embeddings; those absorb the rest" + (
            "; with softmax='attnlrp' the softmax's linearisation absorbs a share too" if options["softmax"] ==
            "attnlrp" else ""))
    return result.relevance.sum(dim=2).transpose(0, 1).contiguous()


def _run_lrp(ctx: ExplainContext, options: Mapping[str, Any]) -> torch.Tensor:
    epsilon, gamma = _number(options, "epsilon"), _number(options, "gamma")
    if is_transformer(ctx.model):
        return _run_transformer_lrp(ctx, options)
    if options["softmax"] != "constant":
        raise MethodError(f"option softmax={options['softmax']!r} of lrp is a rule for the attention of vision "
                          f"transformers; this model has none. Leave softmax at its default.")
    bounds, bounds_note = input_bounds(ctx.model, ctx.x)
    reference = reference_of(ctx.x.detach(), options.get("reference", "zero"), scan_black(ctx.model), {})
    result = lrp_relevance(ctx.model, ctx.x, ctx.targets, options["composite"], epsilon, gamma, bounds,
                           reference=reference)
    names = result.plan.names
    first = result.plan.order[0]
    notes = ctx.method_notes
    notes["rules"] = dict(Counter(rule.describe() for rule in result.rules.values()))
    notes["first_layer"] = f"{names.get(first, '?')}: {result.rules[first].describe()}"
    if any(isinstance(r, ZBox) for r in result.rules.values()):
        notes["zbox_bounds"] = {"low": bounds[0], "high": bounds[1], "source": bounds_note,
                                "meaning": "the scan's black and white in the model's input space" if "input_spec" in
                                bounds_note else "the input's own darkest and brightest values"}
    if result.reference_note:
        notes["input_reference"] = result.reference_note
    notes["canonization"] = {
        "batchnorm_merged": len(result.plan.merges),
        "batchnorm_elementwise": len(result.plan.elementwise_bn),
        "max_pooling": "winner takes all", "average_pooling": "LRP-0 (exact)",
        "additions_and_concatenation": "split by each branch's contribution",
    }
    notes["conservation"] = _conservation(ctx, result.relevance)
    if result.notes:
        notes["notes"] = result.notes
    return result.relevance.sum(dim=2).transpose(0, 1).contiguous()


register(MethodSpec(
    name="lrp", family="lrp",
    summary="Layer-wise relevance propagation with canonizers (BatchNorm merging; conservative at additions and "
            "concatenations) for VGG, ResNet, DenseNet and 3-D CNNs; composite= picks the rules (Bach et al. 2015). "
            "On vision transformers AttnLRP's rules for LayerNorm, attention and GELU (Achtibat et al. 2024).",
    run=_run_lrp, needs_gradients=True, needs_layer=False, cost="one forward + one backward", torchscript=False,
    options={"composite": DEFAULT_COMPOSITE, "epsilon": 1e-6, "gamma": 0.25, "reference": "zero", "softmax": "constant"},
    completeness="conservation", per_batch=PerBatch(_lrp_per_batch),
))
