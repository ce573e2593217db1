"""Composites: which LRP rule goes on which layer, by role (convolution, dense, input layer) and position.

`COMPOSITES` is the table of named presets (a new composite is one entry); they follow the literature
(Kohlbrenner et al. 2020, Montavon et al. 2019); `"depth"` is the seed notebook's scheme (gamma on the lower
third of the rule layers, epsilon in the middle, LRP-0 on top); a mapping {layer name: rule} sets rules by
name and leaves every other layer on epsilon. Rule names come from `rules.RULES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from torch import nn

from medlens.core.layers import is_linear
from medlens.errors import MethodError
from medlens.families.lrp.canonizers import ModelPlan
from medlens.families.lrp.rules import RULES, Rule, RuleSettings

RuleMaker = Callable[[Union[str, Rule]], Rule]


@dataclass(frozen=True)
class ByRole:
    """Convolutions get `conv`, dense layers `dense`; the first rule layer gets `first` when it reads the image
    (otherwise it keeps its role's rule, and a note says so)."""

    conv: str
    dense: str
    first: Optional[str] = None

    def assign(self, plan: ModelPlan, make: RuleMaker, notes: list[str]) -> dict[nn.Module, Rule]:
        conv, dense = make(self.conv), make(self.dense)
        rules = {m: (dense if is_linear(m) else conv) for m in plan.order}
        if self.first is not None:
            first, wanted = plan.order[0], make(self.first)
            if first in plan.input_layers:
                rules[first] = wanted
            else:
                notes.append(f"first layer {plan.names[first]!r} does not read the model input directly; "
                             f"it uses {rules[first].describe()} instead of {wanted.describe()}")
        return rules


@dataclass(frozen=True)
class ByDepth:
    """The rule layers in forward order: the lower third gets `lower`, the middle third `middle`, the rest `upper`."""

    lower: str
    middle: str
    upper: str

    def assign(self, plan: ModelPlan, make: RuleMaker, notes: list[str]) -> dict[nn.Module, Rule]:
        n = len(plan.order)
        lower, middle, upper = make(self.lower), make(self.middle), make(self.upper)
        return {m: (lower if i < n / 3 else middle if i < 2 * n / 3 else upper) for i, m in enumerate(plan.order)}


@dataclass(frozen=True)
class ByName:
    """Rules named per layer ({layer name: rule}); every other rule layer gets `default`."""

    rules: Mapping[str, Union[str, Rule]]
    default: str = "epsilon"

    def assign(self, plan: ModelPlan, make: RuleMaker, notes: list[str]) -> dict[nn.Module, Rule]:
        by_name = {plan.names[m]: m for m in plan.order}
        unknown = [k for k in self.rules if k not in by_name]
        if unknown:
            raise MethodError(
                f"composite mapping names layer(s) {', '.join(map(repr, unknown))} that are not convolution or dense "
                f"layers of this model; known: {', '.join(list(by_name)[:12])}{' ...' if len(by_name) > 12 else ''}."
            )
        default = make(self.default)
        rules = {m: default for m in plan.order}
        for name, spec in self.rules.items():
            rules[by_name[name]] = make(spec)
        notes.append(f"layers not named in the mapping use the {self.default} rule")
        return rules


#: every named composite: a new one is one entry
COMPOSITES: dict[str, Union[ByRole, ByDepth]] = {
    "epsilon": ByRole(conv="epsilon", dense="epsilon"),
    "epsilon_plus_flat": ByRole(conv="zplus", dense="epsilon", first="flat"),
    "epsilon_gamma_box": ByRole(conv="gamma", dense="epsilon", first="zbox"),
    "epsilon_alpha2_beta1": ByRole(conv="alpha2_beta1", dense="epsilon"),
    "depth": ByDepth(lower="gamma", middle="epsilon", upper="zero"),
}
PRESETS = tuple(COMPOSITES)
#: the `lrp` method's default composite, chosen by measurement (docs/research-notes.md, "LRP's default composite")
DEFAULT_COMPOSITE = "epsilon"
RULE_NAMES = tuple(entry.name for entry in RULES)  # as shipped; messages list the table as it is at the time


def make_rule(spec: Union[str, Rule], epsilon: float, gamma: float, bounds: tuple[float, float]) -> Rule:
    """A rule from its name ("epsilon", "gamma", "zplus", "alpha2_beta1", "zbox", "flat", ...) or a Rule."""
    if isinstance(spec, Rule):
        return spec
    key = str(spec).strip().lower().replace("-", "_")
    settings = RuleSettings(epsilon, gamma, bounds)
    for entry in RULES:
        parameters = entry.matches(key)
        if parameters is None:
            continue
        try:
            return entry.make(settings, parameters)
        except ValueError as exc:
            raise MethodError(f"bad {entry.label or entry.name} rule {spec!r}: {exc}.{entry.hint}") from None
    raise MethodError(f"unknown LRP rule {spec!r}; known rules: {', '.join(e.name for e in RULES)}.")


def assign_rules(
    plan: ModelPlan, composite: Any, epsilon: float, gamma: float, bounds: tuple[float, float],
) -> tuple[dict[nn.Module, Rule], list[str]]:
    """{rule layer: rule} for the whole model, and notes for provenance."""
    notes: list[str] = []
    if not plan.order:
        raise MethodError("the model has no convolution or dense layer, so LRP has nothing to propagate through.")
    if isinstance(composite, Mapping):
        chosen: Union[ByRole, ByDepth, ByName] = ByName(composite)
    else:
        key = str(composite).strip().lower().replace("-", "_")
        if key not in COMPOSITES:
            raise MethodError(f"unknown LRP composite {composite!r}; use one of {', '.join(COMPOSITES)}, or a mapping "
                              f"{{layer name: rule}} with rules from {', '.join(e.name for e in RULES)}.")
        chosen = COMPOSITES[key]
    rules = chosen.assign(plan, lambda spec: make_rule(spec, epsilon, gamma, bounds), notes)
    for m, rule in rules.items():
        if rule.input_layer_only and m not in plan.input_layers:
            raise MethodError(
                f"the {rule.name} rule spreads relevance without regard to the layer's input and is meant for the layer "
                f"that reads the image; layer {plan.names[m]!r} does not. Put it on the first layer only."
            )
    return rules, notes
