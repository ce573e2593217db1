"""Forward-only versions of a model for the hundreds of no-grad passes of the perturbation methods.

`fast_forward()` traces the model for one call and folds each BatchNorm into the convolution before it (new
modules on the trace's own root, channels-last), checked against the model; the caller's model is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .spatial import channels_last

# The fast version is used only when its logits on the call's input agree with the model's to this (relative)
# bound: folding changes float rounding only, about 1e-6 of the logits' scale on torchvision ResNets.
AGREEMENT = 1e-4

# A trace replays the tensor operations of one forward call; Python-side state in a forward (a counter, a flag,
# Python's random) is frozen at its value during tracing. Only forwards written in these packages are traced.
LIBRARY_PACKAGES = ("torch", "torchvision", "timm", "monai", "medlens")

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}


@dataclass
class FastForward:
    """The module the forward-only passes run, and what was done to get it (for provenance)."""

    module: nn.Module
    graph_module: Optional[fx.GraphModule] = None  # the rewritten trace, when one is used
    layout: bool = True  # feed channels-last inputs
    note: dict[str, Any] = field(default_factory=dict)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a batch (inference mode is the caller's): channels-last unless the model rejects it."""
        from .context import call_model

        if self.layout and batch.dim() in (4, 5):
            try:
                return call_model(self.module, channels_last(batch))
            except RuntimeError:  # e.g. a .view() on a non-contiguous tensor inside the model
                self.layout = False
                self.note["channels_last"] = False
        return call_model(self.module, batch.contiguous())


def untraceable_reason(model: nn.Module) -> str:
    """Why the model's forward is not traced ("" when it may be): TorchScript, or a module class from outside
    `LIBRARY_PACKAGES` (user code, whose forward may keep Python-side state)."""
    if isinstance(model, torch.jit.ScriptModule):
        return "TorchScript model"
    for module in model.modules():
        package = type(module).__module__.split(".")[0]
        if package not in LIBRARY_PACKAGES:
            return (f"its module class {type(module).__name__} is not from {', '.join(LIBRARY_PACKAGES)}; "
                    f"a trace would freeze any Python-side state in its forward")
    return ""


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max(|b|, 1): how far two sets of logits are apart, on the scale of the reference b."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def _add_module(gm: fx.GraphModule, module: nn.Module) -> str:
    """Register a new module on the trace's own root (never inside the caller's model) and return its name."""
    name = f"medlens_fast_{sum(1 for _ in gm.children())}"
    while hasattr(gm, name):
        name += "_"
    gm.add_module(name, module)
    return name


def _fold_batchnorms(gm: fx.GraphModule, layout: bool) -> int:
    """Fold every eval-mode BatchNorm whose input is a convolution (or linear layer) used by nothing else."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = gm.get_submodule(node.target)
        src = node.args[0]
        if not isinstance(bn, _BATCHNORMS) or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        layer = gm.get_submodule(src.target)
        if _FOLDABLE.get(type(layer)) is not type(bn) or len(src.users) != 1 or src.kwargs or len(src.args) != 1:
            continue
        if bn.training or layer.training or not bn.track_running_stats or bn.running_mean is None:
            continue
        fused = fuse_conv_bn_eval(layer, bn) if isinstance(layer, nn.modules.conv._ConvNd) else fuse_linear_bn_eval(layer, bn)
        if layout and isinstance(fused, nn.Conv2d):
            fused = fused.to(memory_format=torch.channels_last)
        src.target = _add_module(gm, fused)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def fast_forward(model: nn.Module, x: torch.Tensor, logits: Optional[torch.Tensor] = None) -> FastForward:
    """The model, or a rewritten trace of it, for forward-only passes on inputs like `x`.

    The trace shares every module it does not replace with the model and changes none of them: each folded
    convolution is a new module on the trace's own root. It is used only when it agrees with the model on
    `x` (relative gap at most `AGREEMENT`); otherwise, or when the model may not or cannot be traced
    (`untraceable_reason`, data-dependent control flow), the model itself runs and the note says why.
    `logits`, the model's output on `x` when the caller has it, saves a forward pass.
    """
    plain = FastForward(module=model)
    key = "forward_passes"
    why = untraceable_reason(model)
    if why:
        plain.note[key] = f"the model as given (not rewritten: {why})"
        return plain
    if model.training:
        plain.note[key] = "the model as given (in training mode: not rewritten)"
        return plain
    if x.device.type != "cpu":
        # Measured on an H200 (30 Nov 2026): Score-CAM took 190 ms with the rewrite against 119 ms without, and
        # TF32 convolutions (cuDNN's default) differ from the folded ones by about 3e-4 anyway.
        plain.note[key] = f"the model as given (on {x.device.type}, where the rewrite does not pay)"
        return plain
    probe = x[:1]
    try:
        gm = fx.symbolic_trace(model)
        folded = _fold_batchnorms(gm, layout=x.dim() == 4)
        if not folded:
            plain.note[key] = "the model as given (no BatchNorm after a convolution or linear layer to fold)"
            return plain
        gm.graph.lint()
        gm.delete_all_unused_submodules()  # the folded BatchNorms (from the trace's own tree, not the model's)
        gm.recompile()
        with torch.inference_mode():
            reference = model(probe) if logits is None else logits[:1]
            candidate = FastForward(module=gm, graph_module=gm)(probe)
    except Exception as error:  # noqa: BLE001 - any failure to trace or rewrite means "run the model as it is"
        plain.note[key] = f"the model as given (it could not be traced: {type(error).__name__})"
        return plain
    if not isinstance(reference, torch.Tensor) or reference.shape != candidate.shape:
        plain.note[key] = "the model as given (the trace's output differs in kind from the model's)"
        return plain
    gap = relative_gap(candidate, reference)
    if not gap <= AGREEMENT:
        plain.note[key] = f"the model as given (the rewritten trace's logits differed by {gap:.1e} relative)"
        return plain
    return FastForward(
        module=gm, graph_module=gm,
        note={key: f"a trace of the model with {folded} BatchNorm layer(s) folded into the layer before them "
              f"(logits on the input agree to {gap:.1e} relative)"},
    )
