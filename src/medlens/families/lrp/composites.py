"""Composites: which LRP rule goes on which layer, by role (convolution, dense, input layer) and position.

Named presets follow the literature (Kohlbrenner et al. 2020, Montavon et al. 2019); `"depth"` is the seed
notebook's scheme (gamma on the lower third of the rule layers, epsilon in the middle, LRP-0 on top); a
mapping {layer name: rule} sets rules by name and leaves every other layer on epsilon.
"""
from __future__ import annotations

from typing import Any, Mapping, Union

from torch import nn

from medlens.errors import MethodError
from medlens.core.layers import is_linear
from medlens.families.lrp.canonizers import ModelPlan
from medlens.families.lrp.rules import AlphaBeta, Epsilon, Flat, Gamma, Pass, Rule, WSquare, ZBox, Zero, ZPlus

PRESETS = ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1", "depth")
RULE_NAMES = ("zero", "epsilon", "gamma", "zplus", "alpha<a>_beta<b>", "zbox", "flat", "wsquare", "pass")


def make_rule(spec: Union[str, Rule], epsilon: float, gamma: float, bounds: tuple[float, float]) -> Rule:
    """A rule from its name ("epsilon", "gamma", "zplus", "alpha2_beta1", "zbox", "flat", ...) or a Rule."""
    if isinstance(spec, Rule):
        return spec
    key = str(spec).strip().lower().replace("-", "_")
    simple = {
        "zero": Zero, "lrp0": Zero, "lrp_0": Zero, "z": Zero,
        "epsilon": lambda: Epsilon(epsilon), "gamma": lambda: Gamma(gamma), "zplus": ZPlus, "z_plus": ZPlus,
        "zbox": lambda: ZBox(*bounds), "zb": lambda: ZBox(*bounds), "flat": Flat, "wsquare": WSquare,
        "w_square": WSquare, "pass": Pass,
    }
    if key in simple:
        return simple[key]()
    if key.startswith("alpha") and "_beta" in key:
        try:
            alpha, beta = (float(v) for v in key[len("alpha"):].split("_beta"))
            return AlphaBeta(alpha, beta)
        except ValueError as exc:
            raise MethodError(f"bad alpha-beta rule {spec!r}: {exc}. Write it as e.g. 'alpha2_beta1' (alpha - beta = 1).") from None
    raise MethodError(f"unknown LRP rule {spec!r}; known rules: {', '.join(RULE_NAMES)}.")


def assign_rules(
    plan: ModelPlan, composite: Any, epsilon: float, gamma: float, bounds: tuple[float, float],
) -> tuple[dict[nn.Module, Rule], list[str]]:
    """{rule layer: rule} for the whole model, and notes for provenance."""
    notes: list[str] = []
    order = plan.order
    if not order:
        raise MethodError("the model has no convolution or dense layer, so LRP has nothing to propagate through.")
    first = order[0]

    def first_layer_rule(rule: Rule, fallback: Rule) -> Rule:
        if first in plan.input_layers:
            return rule
        notes.append(f"first layer {plan.names[first]!r} does not read the model input directly; "
                     f"it uses {fallback.describe()} instead of {rule.describe()}")
        return fallback

    if isinstance(composite, Mapping):
        by_name = {plan.names[m]: m for m in order}
        unknown = [k for k in composite if k not in by_name]
        if unknown:
            raise MethodError(
                f"composite mapping names layer(s) {', '.join(map(repr, unknown))} that are not convolution or dense "
                f"layers of this model; known: {', '.join(list(by_name)[:12])}{' ...' if len(by_name) > 12 else ''}."
            )
        rules = {m: Epsilon(epsilon) for m in order}
        for name, spec in composite.items():
            rules[by_name[name]] = make_rule(spec, epsilon, gamma, bounds)
        notes.append("layers not named in the mapping use the epsilon rule")
    else:
        key = str(composite).strip().lower().replace("-", "_")
        if key not in PRESETS:
            raise MethodError(f"unknown LRP composite {composite!r}; use one of {', '.join(PRESETS)}, or a mapping "
                              f"{{layer name: rule}} with rules from {', '.join(RULE_NAMES)}.")
        dense = Epsilon(epsilon)
        if key == "epsilon":
            rules = {m: Epsilon(epsilon) for m in order}
        elif key == "depth":
            n = len(order)
            rules = {m: (Gamma(gamma) if i < n / 3 else Epsilon(epsilon) if i < 2 * n / 3 else Zero())
                     for i, m in enumerate(order)}
        else:
            conv_rule = {"epsilon_plus_flat": ZPlus(), "epsilon_gamma_box": Gamma(gamma),
                         "epsilon_alpha2_beta1": AlphaBeta(2.0, 1.0)}[key]
            rules = {m: (dense if is_linear(m) else conv_rule) for m in order}
            if key == "epsilon_plus_flat":
                rules[first] = first_layer_rule(Flat(), rules[first])
            elif key == "epsilon_gamma_box":
                rules[first] = first_layer_rule(ZBox(*bounds), rules[first])
    for m, rule in rules.items():
        if rule.input_layer_only and m not in plan.input_layers:
            raise MethodError(
                f"the {rule.name} rule spreads relevance without regard to the layer's input and is meant for the layer "
                f"that reads the image; layer {plan.names[m]!r} does not. Put it on the first layer only."
            )
    return rules, notes
