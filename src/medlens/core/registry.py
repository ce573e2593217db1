"""The one registry of explanation methods and their capability metadata.

The CLI choices, the docs table, `medlens.methods()` and the parametrised tests all read it; a method
family registers its entries with `register()` when its module under `medlens.families` is imported.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping

from medlens.errors import MethodError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medlens.core.context import ExplainContext

MethodRunner = Callable[["ExplainContext", Mapping[str, Any]], "torch.Tensor"]


@dataclass(frozen=True)
class MethodSpec:
    """What a method is and what it needs; `run(ctx, options)` returns (B, T, *spatial) raw maps."""

    name: str
    family: str
    summary: str
    run: MethodRunner
    needs_gradients: bool
    needs_layer: bool
    supports_3d: bool = True
    stochastic: bool = False
    cost: str = "one pass"
    options: Mapping[str, Any] = field(default_factory=dict)  # option name -> default
    #: whether the method runs on a TorchScript model: it may only call the model, never hook a layer or
    #: patch its functions (None: every method that needs no target layer, unless it says otherwise)
    torchscript: bool | None = None
    #: what the map's sum claims to equal, for the completeness metric: "conservation" (the target logit f(x), as
    #: LRP), "baseline" (f(x) - f(baseline) with the method's own `baseline` option), or None (no such claim)
    completeness: str | None = None
    #: whether the method needs global self-attention blocks (a ViT or DeiT): it refuses other models
    needs_attention: bool = False

    @property
    def supports_torchscript(self) -> bool:
        return (not self.needs_layer) if self.torchscript is None else self.torchscript

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "summary": self.summary,
            "needs_gradients": self.needs_gradients,
            "needs_layer": self.needs_layer,
            "supports_3d": self.supports_3d,
            "stochastic": self.stochastic,
            "supports_torchscript": self.supports_torchscript,
            "cost": self.cost,
            "completeness": self.completeness,
            "needs_attention": self.needs_attention,
            "options": dict(self.options),
        }


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False
_LOADING = False
_LOAD_LOCK = threading.RLock()  # re-entrant: a family module's import may ask the registry again


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; names are unique."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


_FAMILY_MODULES: list[str] = []


def _load_families() -> None:
    """Import every module of `medlens.families` so each family registers its methods."""
    global _LOADED, _LOADING
    if _LOADED:
        return
    with _LOAD_LOCK:  # two threads' first calls: the second waits until every family is registered
        if _LOADED or _LOADING:  # _LOADING: this thread is importing the families (a family asked the registry)
            return
        _LOADING = True
        package = importlib.import_module("medlens.families")
        names = [module.name for module in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        _FAMILY_MODULES[:] = names
        try:
            for name in names:
                importlib.import_module(name)
            _LOADED = True
        finally:
            _LOADING = False


def _module_position(spec: MethodSpec) -> int:
    # The module that defines the method's runner, in the families package's walk order.
    module = getattr(spec.run, "__module__", "") or ""
    return _FAMILY_MODULES.index(module) if module in _FAMILY_MODULES else len(_FAMILY_MODULES)


def all_specs() -> Mapping[str, MethodSpec]:
    """Every method, grouped by family (families in the order their first module comes in the families package's
    walk), within a family by module in walk order, then by registration: the same order whichever family module a
    program happens to import first, and a family split over several modules stays together."""
    _load_families()
    names = list(_REGISTRY)
    family_rank: dict[str, int] = {}
    for n in names:
        spec = _REGISTRY[n]
        family_rank[spec.family] = min(family_rank.get(spec.family, len(_FAMILY_MODULES)), _module_position(spec))
    ordered = sorted(names, key=lambda n: (family_rank[_REGISTRY[n].family], _module_position(_REGISTRY[n]),
                                           names.index(n)))
    return MappingProxyType({n: _REGISTRY[n] for n in ordered})


def get_spec(name: str) -> MethodSpec:
    specs = all_specs()
    key = name.strip().lower()
    if key not in specs:
        known = ", ".join(sorted(specs))
        raise MethodError(f"unknown method {name!r}. Known methods: {known}. See `medlens methods`.")
    return specs[key]


def methods() -> list[str]:
    """Every registered method name, in registration order."""
    return list(all_specs())


def method_info(name: str) -> Mapping[str, Any]:
    """Capability metadata of one method: family, needs_gradients, needs_layer, supports_3d, stochastic, ..."""
    return MappingProxyType(get_spec(name).info())


def markdown_table() -> str:
    """The methods table of docs/methods.md, generated from the registry (a test keeps the file current)."""
    rows = ["| method | family | gradients | target layer | 3-D | stochastic | TorchScript | map sums to | cost | options |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    sums = {"conservation": "f(x)", "baseline": "f(x) - f(baseline)", None: "-"}
    yes = {True: "yes", False: "-"}
    for spec in all_specs().values():
        options = ", ".join(f"`{k}`" for k in spec.options) or "-"
        rows.append(
            f"| `{spec.name}` | {spec.family} | {yes[spec.needs_gradients]} | {yes[spec.needs_layer]} | "
            f"{yes[spec.supports_3d]} | {yes[spec.stochastic]} | {yes[spec.supports_torchscript]} | "
            f"{sums[spec.completeness]} | {spec.cost} | {options} |"
        )
    lines = ["# Methods", "", "Generated from the registry (`python -m medlens.core.registry > docs/methods.md`);",
             "`tests/test_registry.py` fails when this file falls behind. \"map sums to\" is what the method claims its",
             "map's sum equals (for the target logit f); `medlens evaluate`'s completeness metric checks that claim.", "",
             *rows, "", "## What each method does", ""]
    lines += [f"- `{s.name}`: {s.summary}" for s in all_specs().values()]
    lines += ["", "## Forward-only passes", "",
              "Score-CAM, occlusion, RISE, LIME and KernelSHAP run hundreds of forward passes without gradients. On the CPU",
              "they run them through a copy of the model's module tree (the same parameters, forward code and hooks) in which",
              "each BatchNorm that reads a convolution's or linear layer's output unchanged, where nothing else uses that",
              "output, is folded into that layer (one observed forward pass finds them), on channels-last inputs; the copy is used only when its logits on the input",
              "agree with the model's to 1e-4 (relative). Score-CAM also hands the model's first convolution a precomputed",
              "output when that convolution receives the masked input itself (the masks are linear upsamplings of the layer's",
              "grid), checked on the first mask. The model is never changed, but Python-side state that a forward changes (a",
              "counter) changes on the copy. Provenance (`forward_passes`, `first_convolution_precomputed`) says what ran;",
              "`medlens.accel.fast_forward.ENABLED = False` turns both off. On a GPU the model runs as given: there the rewrite was",
              "slower (and TF32 convolutions differ from folded ones by ~3e-4)."]
    lines += LRP_DEFAULT_NOTE
    return "\n".join(lines) + "\n"


#: hand-written: why `lrp`'s default composite is what it is (issue 16), with the measurements behind it
LRP_DEFAULT_NOTE = [
    "", "## LRP's default composite", "",
    "`lrp` uses `composite=\"epsilon\"` (the epsilon rule, epsilon 1e-6, on every layer) unless told otherwise; until",
    "Dec 2026 the default was `epsilon_plus_flat`. The five presets were measured on the bundled models against",
    "regions known in advance: the brain models on a seeded 100-slice subset of the figshare test split (tumour box;",
    "deletion and the randomisation check on 24 of them), `phantom-lesion` on the 200 lesion cases among 600 test",
    "phantoms (exact lesion mask; deletion and randomisation on 48). Pointing game and energy in the region (higher",
    "is better), deletion AUC (lower is better), Spearman similarity to the original map after the whole network is",
    "re-drawn (below 0.5 passes):", "",
    "| composite | pointing brain v1 / new / phantom | energy brain v1 / new / phantom "
    "| deletion brain v1 / new / phantom | randomisation brain v1 / new / phantom |",
    "| --- | --- | --- | --- | --- |",
    "| `epsilon` (default) | **0.29** / **0.43** / 0.955 | 0.078 / **0.094** / 0.327 | 0.044 / **0.033** / **0.271** "
    "| **0.40** / **0.44** / 0.90 |",
    "| `epsilon_plus_flat` | 0.10 / 0.00 / 1.000 | 0.070 / 0.000 / 0.313 | 0.089 / 0.475 / 0.361 | 0.61 / 0.52 / 0.78 |",
    "| `epsilon_gamma_box` | 0.09 / 0.19 / 1.000 | 0.076 / 0.037 / 0.492 | 0.075 / 0.169 / 0.386 | 0.49 / 0.54 / 0.76 |",
    "| `epsilon_alpha2_beta1` | 0.14 / 0.15 / 1.000 | **0.090** / 0.041 / **0.664** | **0.043** / 0.160 / 0.310 "
    "| 0.52 / 0.54 / 0.87 |",
    "| `depth` | 0.27 / 0.38 / 0.995 | 0.068 / 0.079 / 0.479 | 0.049 / 0.037 / 0.302 | 0.43 / 0.48 / 0.91 |",
    "| centre / prior baseline | 0.62 / 0.41 (brain), 0.29 / 0.16 (phantom) | 0.057 / 0.122 (brain), 0.027 / 0.058 "
    "(phantom) | | |", "",
    "Why `epsilon`:", "",
    "- On the real models, where the presets differ most, it wins every column on the new (bundled) brain model",
    "  and, on v1, has the best pointing game and randomisation score with energy and deletion close behind",
    "  `epsilon_alpha2_beta1` (0.078 vs 0.090, 0.044 vs 0.043); it passes the randomisation check on both.",
    "  `epsilon_plus_flat` fails it on both and, on the new brain model, puts its peak outside the tumour box on",
    "  every slice: its flat first layer spreads each first-layer unit's relevance evenly over the",
    "  unit's receptive field, which draws the grid of isolated squares (inside and outside the head) seen below.",
    "- On the phantoms every preset finds the lesion (pointing 0.955-1.0 against 0.29 for the centre guess);",
    "  `epsilon` has the best deletion (it is the most faithful to what the model needs) but the least tidy map",
    "  (AUPRC 0.40 against 0.75 for `epsilon_plus_flat`; speckle around the lesion). No preset passes",
    "  randomisation on the phantoms (0.76-0.91): the lesion is the brightest structure in the input and every",
    "  composite multiplies by the input somewhere, the behaviour `docs/evaluation.md` reports for input x",
    "  gradient and integrated gradients on the same model. So the phantom check cannot separate them, and the",
    "  choice rests on the brain models, where it can.",
    "- No preset reaches the centre baseline's pointing game on the brain test slices (see",
    "  [the case study](case-study-brain.md#4-lrp-composites)); the default is the least bad there, not good.",
    "- What it is: with epsilon 1e-6 on a ReLU network, LRP-epsilon is numerically close to input x gradient",
    "  (LRP-0 equals it exactly; tested in `tests/test_lrp.py`), so the default adds conservation bookkeeping and",
    "  the option to switch rules, not a different picture. For a smoother, more \"readable\" map ask for",
    "  `composite=\"epsilon_plus_flat\"` or `\"epsilon_gamma_box\"`, and run `medlens evaluate`'s randomisation",
    "  check on your model before trusting it.", "",
    "![LRP composites on phantoms](lrp-composites/phantom-lesion.png)", "",
    "*`phantom-lesion`, three lesion cases (rows in pairs): the image, then each preset; the first row of a pair as",
    "`medlens explain` overlays it (colour scale at the largest magnitude), the second the map alone, red positive,",
    "blue negative, scale at the 99th percentile of |map|; the lesion outlined in green.*", "",
    "![LRP composites on the brain model](lrp-composites/brain-tumor-mri-v2.png)", "",
    "*`brain-tumor-mri-v2` (the bundled `brain-tumor-mri` when measured), test slices 0, 7 and 14 of the same subset, drawn the same way; the tumour box in",
    "green. `epsilon_plus_flat` shows the regular grid of squares, also outside the head.*", "",
    "Reproduce (one thread; figures as shown; JSON beside the figures in `docs/lrp-composites/`):", "",
    "```",
    "python benchmarks/lrp_composites_phantom.py --model phantom-lesion --limit 200 --limit-slow 48 \\",
    "    --figure docs/lrp-composites/phantom-lesion.png",
    "python benchmarks/lrp_composites_brain.py --data ../shared/data/brain-tumor-figshare --model brain-tumor-mri-v2 \\",
    "    --limit 100 --figure docs/lrp-composites/brain-tumor-mri-v2.png   # and --model brain-tumor-mri-v1",
    "```",
]


if __name__ == "__main__":  # pragma: no cover
    # Run as a script this file is a second module object; the families register into medlens.core.registry.
    from medlens.core.registry import markdown_table as _table

    print(_table(), end="")
