"""Which output of a classifier is explained (`explain(output=...)`, `--explain-output`): the raw logit, the
log-probability or the contrast against the other classes, and `OutputScores`, the wrapper that gives it.

`explain()` wraps the model in `OutputScores` for the call (as it wraps it in `RegionScores` for region targets), so
every method (CAMs, gradients, IG, LRP, perturbations, surrogates) explains the wrapper's columns unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from medlens.errors import MethodError
from medlens.tensor.autograd import call_model, logits_of

OUTPUTS = ("logit", "log-probability", "contrast")

DEFINITIONS = {
    "logit": "the raw logit z_k",
    "log-probability": "log softmax(z)_k (multi-label: log sigmoid(z_k))",
    "contrast": "z_k minus the mean of the other classes' logits",
}


def take_output(options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The explained output named in a call's options, and the options without it.

    `output="probability"` is left in the options: it is the perturbation methods' own option (their score is the
    softmax, or sigmoid, of the logits), which they took before `output` chose the explained output for every method.

    Raises:
        MethodError: a value that is none of "logit", "log-probability", "contrast" (or "probability").
    """
    options = dict(options)
    output = options.get("output", "logit")
    if output == "probability":
        return "logit", options
    options.pop("output", None)
    if not isinstance(output, str) or output not in OUTPUTS:
        raise MethodError(f"output (--explain-output) must be one of {', '.join(OUTPUTS)}, got {output!r} "
                          f"(the perturbation methods also take output='probability').")
    return output, options


def output_scores(logits: torch.Tensor, output: str, multi_label: bool) -> torch.Tensor:
    """The explained score of every class (B, K) from the logits (B, K).

    "contrast" is z_k - mean_{j != k} z_j: like the log-probability it ignores a shift of all logits together, and,
    unlike the log-odds z_k - logsumexp_{j != k} z_j, it is linear in the logits, so LRP conserves it exactly and
    every gradient is a fixed weighted sum of the classes' own.
    """
    if output == "logit":
        return logits
    if output == "log-probability":
        return F.logsigmoid(logits) if multi_label else F.log_softmax(logits, dim=1)
    n = logits.shape[1]
    return logits - (logits.sum(dim=1, keepdim=True) - logits) / (n - 1)


class OutputScores(nn.Module):
    """The model with its logits turned into the chosen scores (B, K). Holds the model as `model`; no parameters of its
    own."""

    def __init__(self, model: nn.Module, output: str, multi_label: bool) -> None:
        super().__init__()
        self.model = model
        self.output = output
        self.multi_label = multi_label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = logits_of(self.model(x))  # (n, K) also when a hook gives n copies of a layer (Ablation-CAM)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            logits = call_model(self.model, x)  # says what the model returned instead
        return output_scores(logits, self.output, self.multi_label)


def wrap_for_output(model: nn.Module, output: str, multi_label: bool, n_classes: int) -> OutputScores:
    """The model wrapped to give `output`'s scores; a MethodError where that score means nothing for the model.

    Raises:
        MethodError: "contrast" with one class (no other class), "log-probability" of a one-output softmax model
            (log softmax of one logit is 0 everywhere).
    """
    if output == "contrast" and n_classes < 2:
        raise MethodError("output='contrast' compares a class with the others, but the model has one output; "
                          "use output='logit' or 'log-probability' (with --multi-label for a sigmoid output).")
    if output == "log-probability" and n_classes < 2 and not multi_label:
        raise MethodError("output='log-probability' of a one-output softmax model is log 1 = 0 for every input; if "
                          "the output is a sigmoid, declare the model multi-label (--multi-label), or use output='logit'.")
    return OutputScores(model, output, multi_label)


def output_record(output: str, multi_label: bool, scores: Any, region_record: Any = None) -> dict[str, Any]:
    """The provenance of the explained output: its name, its definition and its value per image and target slot (for
    region targets the scores are the column scores, per column; `region_targets` has them per slot)."""
    if region_record is not None:
        return {"explained": output, "definition": "the target's region score (region_targets in the provenance)"}
    definition = DEFINITIONS[output]
    if output == "log-probability":
        definition = "log sigmoid(z_k)" if multi_label else "log softmax(z)_k"
    return {"explained": output, "definition": definition, "scores": scores}
