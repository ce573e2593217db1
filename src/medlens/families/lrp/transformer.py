"""LRP for vision transformers (AttnLRP's rules, Achtibat et al. 2024): LayerNorm, attention and GELU made linear.

For one pass: LayerNorm's standard deviation is held constant, each attention module is recomputed with its softmax
weights held constant (so the value product is linear; `softmax="constant"`) or with AttnLRP's own softmax and uniform
product rules (`softmax="attnlrp"`), GELU passes relevance on unchanged (identity rule), and the linear layers use
LRP-0; relevance is then input x gradient of that pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from medlens.core.model_state import HookSet
from medlens.errors import MethodError
from medlens.families.attention import attention_modules, check_agreement, install_recomputation
from medlens.families.lrp.rules import stabilize
from medlens.tensor.autograd import call_model, target_gradients

#: what `lrp` on a transformer applies to each kind of layer (into the provenance)
RULES = {
    "LayerNorm": "standard deviation held constant (AttnLRP's identity rule on the normalisation); the centring is linear",
    "attention": "softmax weights held constant for the pass (CP-LRP; AttnLRP's rule on the value product), "
                 "recomputed from the module's own weights",
    "GELU and other non-homogeneous activations": "identity rule: relevance passes on unchanged",
    "linear layers and the patch embedding": "LRP-0 (the epsilon rule's limit; the value of `epsilon` is not used)",
    "additions (residuals)": "split by each branch's contribution",
}
#: the attention rule with `softmax="attnlrp"` (replaces RULES["attention"])
SOFTMAX_RULE = ("AttnLRP's softmax rule R_s = s (R_p - p sum R_p) on the attention scores (not conservative: the "
                "softmax's linearisation bias absorbs the rest), the uniform rule (half to each factor) on the query-key "
                "and the value products; recomputed from the module's own weights")
SOFTMAX_CHOICES = ("constant", "attnlrp")
#: the relevance that reaches the input is the logit minus what biases, LayerNorm shifts, the class token and the
#: position embeddings absorb; with none of those the sum equals the logit to float rounding (tested to 1e-4)
CONSERVATION_TOLERANCE = 1e-4


def is_transformer(model: nn.Module) -> bool:
    """Whether `lrp` should use the transformer rules: the model has a LayerNorm and an attention module."""
    return any(isinstance(m, nn.LayerNorm) for m in model.modules()) and any(
        isinstance(m, nn.MultiheadAttention) or type(m).__name__.lower().endswith("attention") for m in model.modules())


def _layernorm_hook(module: nn.LayerNorm, args: Any, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    dims = tuple(range(-len(module.normalized_shape), 0))
    mean = x.mean(dim=dims, keepdim=True)
    std = (x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).sqrt()
    y = (x - mean) / std.detach()
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y + (output - y).detach()


def _identity_hook(_module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    x = args[0]
    surrogate = x * (output.detach() / stabilize(x.detach(), 1e-9))
    return surrogate + (output - surrogate).detach()


def _is_smooth_activation(m: nn.Module) -> bool:
    name = type(m).__name__.lower()
    return not list(m.children()) and isinstance(m, (nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)) or (
        "gelu" in name and not list(m.children()))


@dataclass
class TransformerRelevance:
    relevance: torch.Tensor  # (T, B, C, *s)
    logits: torch.Tensor
    notes: dict[str, Any]


def transformer_relevance(model: nn.Module, x: torch.Tensor, targets: torch.Tensor,
                          reference_logits: torch.Tensor, softmax: str = "constant") -> TransformerRelevance:
    """Input relevance (T, B, C, *s) of every target logit under the transformer rules, from one pass and one
    batched backward; the pass's logits are checked against the model's own (`reference_logits`).

    Args:
        model: the vision transformer.
        x: the input batch.
        targets: (B, T) class indices.
        reference_logits: the model's own logits for x.
        softmax: "constant" (attention weights held constant) or "attnlrp" (AttnLRP's softmax and uniform rules).

    Returns:
        The relevance, the pass's logits and the notes for the provenance.

    Raises:
        MethodError: an unknown `softmax`, attention that cannot be recomputed (Swin's windows, masks), or changed
            logits.
    """
    if softmax not in SOFTMAX_CHOICES:
        raise MethodError(f"option softmax of lrp must be one of {', '.join(SOFTMAX_CHOICES)}, got {softmax!r}.")
    modules = attention_modules(model)
    local = HookSet()
    probabilities: list[torch.Tensor] = []
    counts = {"LayerNorm": 0, "identity": 0}
    try:
        install_recomputation(modules, local, probabilities, constant=True, softmax_rule=softmax == "attnlrp")
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                local.forward(m, _layernorm_hook)
                counts["LayerNorm"] += 1
            elif _is_smooth_activation(m):
                local.forward(m, _identity_hook)
                counts["identity"] += 1
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            logits = call_model(model, leaf)
            (grads,) = target_gradients(logits.gather(1, targets), [leaf])
    finally:
        local.remove()
    gap = check_agreement(logits, reference_logits, modules, "lrp")
    rules = dict(RULES, attention=SOFTMAX_RULE) if softmax == "attnlrp" else dict(RULES)
    notes = {"rules": rules, "softmax": softmax, "layers": {"attention": len(probabilities), "LayerNorm": counts["LayerNorm"],
                                               "identity_rule": counts["identity"]},
             "attention_recomputed": f"logits agree with the model's to {gap:.1e} relative"}
    return TransformerRelevance((grads * leaf.detach()[None]).detach(), logits.detach(), notes)
