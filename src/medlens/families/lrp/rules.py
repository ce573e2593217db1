"""LRP rules for linear layers (convolutions of any dimension, dense layers), each a short "surrogate" function.

The engine propagates the quantity g = R / a (relevance over activation) as the gradient, so relevance is
always a * grad: the plain gradient is then already the right LRP step for ReLU (and other positively
homogeneous activations), max pooling (winner takes all), average pooling (LRP-0, exact), additions (each
branch gets relevance in proportion to its contribution: never doubled) and concatenation. Only linear
layers need a rule. A rule returns a *surrogate* for the layer output y: a tensor equal to y in value whose
gradient with respect to the layer input is the rule's. With s = y / z' detached, the surrogate z'(a) * s
sends back W'^T (g * y / z'), hence R_j = a_j sum_k w'_jk R_k / z'_k: the textbook LRP step.

Rules that do not scale with the input (flat, w-square, z^B) also take "surrogate inputs" (leaves filled
with ones or the bounds); their relevance is leaf * grad and only exists on the layer that reads the model
input. Stabilisers add eps * sign(z) (sign(0) = +1) to denominators.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

# A layer's linear map with given weight and bias: (input, weight, bias or None) -> output.
LinearFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
# Make a leaf tensor whose relevance (leaf * grad) counts as input relevance.
LeafFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerCall:
    """One call of a linear layer as a rule sees it (weight and bias already canonised, e.g. BN-merged)."""

    fn: LinearFn
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    a: torch.Tensor  # the layer input (part of the graph)
    y: torch.Tensor  # the layer output with unmodified parameters (part of the graph)
    leaf: LeafFn
    nonnegative: bool  # every entry of a is >= 0 (after a ReLU): negative-input terms are skipped


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _part(b: Optional[torch.Tensor], positive: bool, scale: float = 1.0) -> Optional[torch.Tensor]:
    if b is None:
        return None
    return (b.clamp(min=0) if positive else b.clamp(max=0)) * scale


class Rule:
    """A named LRP rule; `surrogate(call)` returns a tensor equal to call.y whose gradient is the rule's."""

    name = "rule"
    input_layer_only = False  # flat, w-square, z^B: only on the layer that reads the model input
    stabilizer = 1e-6

    def surrogate(self, call: LayerCall) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def _ratio(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (y.detach() / stabilize(z.detach(), self.stabilizer)).detach()


class Epsilon(Rule):
    """LRP-epsilon: R_j = sum_k a_j w_jk / (z_k + eps sign z_k) R_k, z_k = sum_j a_j w_jk + b_k. eps -> 0: LRP-0."""

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.stabilizer = float(epsilon)
        self.name = "epsilon" if epsilon > 1e-9 else "zero"

    def surrogate(self, call: LayerCall) -> torch.Tensor:
        return call.y * self._ratio(call.y, call.y)

    def describe(self) -> str:
        return f"epsilon(epsilon={self.stabilizer:g})" if self.name == "epsilon" else "zero (LRP-0)"


def Zero() -> Epsilon:
    """LRP-0 (with a 1e-9 stabiliser only)."""
    return Epsilon(1e-9)


class Gamma(Rule):
    """LRP-gamma, generalised to signed inputs: positive outputs use w + gamma w+ on a+ (w + gamma w- on a-),
    negative outputs the mirror; bias b + gamma b+ (resp. b-). For a >= 0 and z > 0 it is Montavon et al.'s rule."""

    name = "gamma"

    def __init__(self, gamma: float = 0.25) -> None:
        self.gamma = float(gamma)

    def surrogate(self, c: LayerCall) -> torch.Tensor:
        g, w, b = self.gamma, c.weight, c.bias
        wp, wn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        bp = None if b is None else b + g * b.clamp(min=0)
        bn = None if b is None else b + g * b.clamp(max=0)
        ap, an = c.a.clamp(min=0), c.a.clamp(max=0)
        z_pos, z_neg = c.fn(ap, wp, bp), c.fn(ap, wn, bn)
        if not c.nonnegative:
            z_pos, z_neg = z_pos + c.fn(an, wn, None), z_neg + c.fn(an, wp, None)
        y = c.y.detach()
        return z_pos * self._ratio(y * (y > 0), z_pos) + z_neg * self._ratio(y * (y < 0), z_neg)

    def describe(self) -> str:
        return f"gamma(gamma={self.gamma:g})"


class AlphaBeta(Rule):
    """LRP-alpha-beta: alpha times the positive contributions' share minus beta times the negative ones' (alpha - beta = 1)."""

    def __init__(self, alpha: float = 2.0, beta: float = 1.0) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-9:
            raise ValueError(f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1; got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.name = "zplus" if self.beta == 0 else f"alpha{alpha:g}_beta{beta:g}"

    def surrogate(self, c: LayerCall) -> torch.Tensor:
        w, b = c.weight, c.bias
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        ap, an = c.a.clamp(min=0), c.a.clamp(max=0)
        z_pos = c.fn(ap, wp, _part(b, True)) + (0 if c.nonnegative else c.fn(an, wn, None))
        out = self.alpha * z_pos * self._ratio(c.y, z_pos)
        if self.beta:
            z_neg = c.fn(ap, wn, _part(b, False)) + (0 if c.nonnegative else c.fn(an, wp, None))
            out = out - self.beta * z_neg * self._ratio(c.y, z_neg)
        return out

    def describe(self) -> str:
        return self.name if self.beta == 0 else f"alpha_beta(alpha={self.alpha:g}, beta={self.beta:g})"


def ZPlus() -> AlphaBeta:
    """LRP-z+ (alpha = 1, beta = 0): only positive contributions carry relevance."""
    return AlphaBeta(1.0, 0.0)


class ZBox(Rule):
    """LRP-z^B for the input layer: R_j = sum_k (x_j w_jk - l_j w+_jk - h_j w-_jk) / z_k R_k, x in [l, h]."""

    name = "zbox"
    input_layer_only = True

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = float(low), float(high)

    def surrogate(self, c: LayerCall) -> torch.Tensor:
        low = c.leaf(torch.full_like(c.a, self.low))
        high = c.leaf(torch.full_like(c.a, self.high))
        z = c.fn(c.a, c.weight, None) - c.fn(low, c.weight.clamp(min=0), None) - c.fn(high, c.weight.clamp(max=0), None)
        return z * self._ratio(c.y, z)

    def describe(self) -> str:
        return f"zbox(low={self.low:g}, high={self.high:g})"


class WSquare(Rule):
    """LRP-w^2 for the input layer: R_j = sum_k w_jk^2 / sum_j w_jk^2 R_k (independent of the input values)."""

    name = "wsquare"
    input_layer_only = True

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * w

    def surrogate(self, c: LayerCall) -> torch.Tensor:
        ones = c.leaf(torch.ones_like(c.a))
        z = c.fn(ones, self._weight(c.weight), None)
        return z * self._ratio(c.y, z)


class Flat(WSquare):
    """LRP-flat for the input layer: relevance spread evenly over each output's receptive field."""

    name = "flat"

    def _weight(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(w)


class Pass(Rule):
    """Pass: the output relevance goes unchanged to the input (elementwise layers whose shapes agree)."""

    name = "pass"

    def surrogate(self, c: LayerCall) -> torch.Tensor:
        if c.a.shape != c.y.shape:
            raise ValueError(f"the pass rule needs input and output of the same shape, got {tuple(c.a.shape)} -> {tuple(c.y.shape)}")
        return c.a * self._ratio(c.y, c.a)


@dataclass(frozen=True)
class RuleSettings:
    """The numbers a rule may take from the call's options: epsilon, gamma, and the input bounds (for z^B)."""

    epsilon: float
    gamma: float
    bounds: tuple[float, float]


@dataclass(frozen=True)
class RuleEntry:
    """A rule name as written in composites and options: `make(settings, parameters)` builds the rule.

    `pattern` (a regular expression with named groups) makes a parametrised name such as alpha2_beta1; its
    groups are the `parameters`; `label` and `hint` go into the message when a parametrised name is malformed.
    """

    name: str
    make: Callable[[RuleSettings, Mapping[str, str]], Rule]
    aliases: tuple[str, ...] = ()
    pattern: Optional[str] = None
    label: str = ""
    hint: str = ""

    def matches(self, key: str) -> Optional[Mapping[str, str]]:
        """The parameters when `key` (lower case, '_' for '-') names this rule, else None."""
        if self.pattern is not None:
            match = re.fullmatch(self.pattern, key)
            return match.groupdict() if match else None
        return {} if key == self.name or key in self.aliases else None


def _alpha_beta(_: RuleSettings, parameters: Mapping[str, str]) -> Rule:
    return AlphaBeta(float(parameters["alpha"]), float(parameters["beta"]))


#: every rule by name, in the order messages list them
RULES: tuple[RuleEntry, ...] = (
    RuleEntry("zero", lambda s, p: Zero(), aliases=("lrp0", "lrp_0", "z")),
    RuleEntry("epsilon", lambda s, p: Epsilon(s.epsilon)),
    RuleEntry("gamma", lambda s, p: Gamma(s.gamma)),
    RuleEntry("zplus", lambda s, p: ZPlus(), aliases=("z_plus",)),
    RuleEntry("alpha<a>_beta<b>", _alpha_beta, pattern=r"alpha(?P<alpha>.*)_beta(?P<beta>.*)",
              label="alpha-beta", hint=" Write it as e.g. 'alpha2_beta1' (alpha - beta = 1)."),
    RuleEntry("zbox", lambda s, p: ZBox(*s.bounds), aliases=("zb",)),
    RuleEntry("flat", lambda s, p: Flat()),
    RuleEntry("wsquare", lambda s, p: WSquare(), aliases=("w_square",)),
    RuleEntry("pass", lambda s, p: Pass()),
)
