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
    from torch import nn

    from medlens.core.context import ExplainContext

MethodRunner = Callable[["ExplainContext", Mapping[str, Any]], "torch.Tensor"]
#: (model, x (N, C, *s), targets (N, T), options) -> raw attributions (T, N, C, *s)
BatchFunction = Callable[["nn.Module", "torch.Tensor", "torch.Tensor", Mapping[str, Any]], "torch.Tensor"]


@dataclass(frozen=True)
class PerBatch:
    """A method's per-batch form, for wrappers that run it on batches of their own (SmoothGrad's noisy copies).

    `fn(model, x, targets, options)` gets the method's own `options` defaults (plus the wrapper's `batch_size`) and
    returns raw attributions (T, N, C, *s), before the channel sum. `chunks_itself`: `fn` splits its own work into
    `batch_size` pieces (integrated gradients' path points), so a wrapper hands it one batch of N inputs at a time.
    """

    fn: BatchFunction
    chunks_itself: bool = False


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
    #: the method's per-batch form (None: wrappers such as SmoothGrad cannot run it)
    per_batch: PerBatch | None = None
    #: how a picture draws the raw map (maps in the API and .npz stay raw): "positive" (its positive part, where the
    #: method's definition ends in a ReLU: Grad-CAM), "signed" (a diverging scale, where the sign means evidence
    #: for or against) or "magnitude" (|map|, where the definition takes it: Simonyan's saliency)
    display: str = "signed"
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
            "display": self.display,
            "needs_attention": self.needs_attention,
            "options": dict(self.options),
        }


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False
_LOADING = False
_LOAD_LOCK = threading.RLock()  # re-entrant: a family module's import may ask the registry again


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry; names are unique."""
    if spec.display not in ("positive", "signed", "magnitude"):
        raise ValueError(f"method {spec.name!r}: display must be 'positive', 'signed' or 'magnitude', not {spec.display!r}")
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
    _load_families()
    key = name.strip().lower()
    if key not in _REGISTRY:  # looked up directly: all_specs() sorts every method, which each call need not pay for
        known = ", ".join(sorted(all_specs()))
        raise MethodError(f"unknown method {name!r}. Known methods: {known}. See `medlens methods`.")
    return _REGISTRY[key]


def methods() -> list[str]:
    """Every registered method name, grouped by family (the order of `medlens methods`).

    Returns:
        A new list of names such as "gradcam", "lrp", "occlusion"; each is accepted by `explain(methods=...)`.

    Example:
        >>> "gradcam" in medlens.methods()
        True
    """
    return list(all_specs())


def method_info(name: str) -> Mapping[str, Any]:
    """Capability metadata of one method.

    Args:
        name: a method name, case and surrounding spaces ignored.

    Returns:
        A read-only mapping with `name`, `family`, `summary`, `needs_gradients`, `needs_layer`, `supports_3d`,
        `stochastic`, `supports_torchscript`, `cost`, `completeness` (what the map's sum claims to equal, or None)
        and `options` (option name -> default).

    Raises:
        MethodError: an unknown name (the message lists the known ones).

    Example:
        >>> medlens.method_info("integratedgradients")["options"]["n_steps"]
        50
    """
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
             "map's sum equals (for the explained score f, the target logit by default); `medlens evaluate`'s completeness",
             "metric checks that claim.", "",
             *rows, "", "## What each method does", ""]
    lines += [f"- `{s.name}`: {s.summary}" for s in all_specs().values()]
    lines += ["", "## Which output is explained", "",
              '`output=` (`--explain-output`) sets the score f of class k every method explains: `logit` (z_k, the',
              'default), `log-probability` (log softmax(z)_k; multi-label: log sigmoid(z_k)) or `contrast` (z_k minus the',
              'mean of the other logits: linear, so LRP conserves it). Pointing game of the bundled `brain-tumor-mri` (and',
              '`brain-tumor-mri-v4`, the default until 7 Dec 2026) on figshare test slices spread evenly over the split, each',
              'explained for its true class (7 Dec 2026, CPU, 1 thread, load about 2.4 on 2 cores; `python',
              'benchmarks/explain_output_pointing.py --data DATA --n N --model M`):',
              '',
              '| output | gradcam (20 / 100 slices) | inputxgradient (20 / 100) | lrp (20 / 100) |',
              '| --- | --- | --- | --- |',
              '| logit, `brain-tumor-mri` | 0.95 / 0.96 | 0.75 / 0.70 | 0.75 / 0.70 |',
              '| logit, `brain-tumor-mri-v4` | 1.00 / 0.94 | 0.75 / 0.71 | 0.75 / 0.71 |',
              '| log-probability (both) | 0.80 / 0.73 | 0.30 / 0.62 | 0.30 / 0.62 |',
              '| contrast (both) | 0.75 / 0.81 | 0.35 / 0.58 | 0.35 / 0.58 |',
              '',
              'The logit localises best for all three, so it stays the default. The two models differ only in what their three',
              "classes share in the last layer's weights, which moves every logit by the same amount: the log-probability and",
              'the contrast do not see it (their maps are the same for both), the logit does. The default was trained so that',
              "its Grad-CAM is positive in the tumour (docs/pictures.md: v4's picture was blank on a third of the slices).",
              '',
              'On the phantoms (generated test set, seed 3; `python benchmarks/explain_output_pointing.py --model phantom-lesion',
              '--n 200` and `--model phantom-shortcut --n 200`; 6 Dec 2026, 1 thread, load 12-19 on 2 cores), pointing game against',
              'the exact masks:',
              '',
              '| model, cases (mask) | output | gradcam | inputxgradient | lrp |',
              '| --- | --- | --- | --- | --- |',
              '| phantom-lesion, 200 lesion phantoms (lesion) | logit / log-probability / contrast | 0.78 / 0.78 / 0.78 | 0.95 / 0.95 / 0.95 | 0.95 / 0.95 / 0.95 |',
              '| phantom-shortcut, 200 marked phantoms (marker) | logit / log-probability / contrast | 0.06 / 0.06 / 0.06 | 1.00 / 1.00 / 1.00 | 1.00 / 1.00 / 1.00 |',
              '| phantom-shortcut, 200 lesion phantoms (lesion) | logit / log-probability / contrast | 0.00 / 0.00 / 0.00 | 0.00 / 0.00 / 0.00 | 0.00 / 0.00 / 0.00 |',
              '',
              'The phantom models have two classes, so the three outputs explain nearly the same thing: the contrast is z_1 - z_0,',
              "the log-probability's gradient is (1 - p) times the contrast's, and the logit's differs from the contrast's by",
              "z_0's gradient. No output changes a pointing game there (the shortcut model's maps point at its marker, what it",
              'learned, whichever output is explained). The choice matters on the three-class brain model, where the logit is',
              'best: **`logit` stays the default.**',
              ]
    lines += ["", "Why some defaults are what they are (forward-only passes, LRP's default composite), with the",
              "measurements: [research-notes.md](research-notes.md). Every option's default: [api.md](api.md#method-options)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    # Run as a script this file is a second module object; the families register into medlens.core.registry.
    from medlens.core.registry import markdown_table as _table

    print(_table(), end="")
