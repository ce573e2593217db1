"""Forward-only versions of a model for the hundreds of no-grad passes of the perturbation methods.

`fast_forward()` watches one forward pass, then builds a copy of the module tree (sharing every tensor) in which
each BatchNorm that reads a convolution's output is folded into it; checked against the model, CPU only.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from medlens.tensor.autograd import call_model
from medlens.tensor.spatial import channels_last

# The copy is used only when its logits on the call's input agree with the model's to this (relative) bound:
# folding changes float rounding only, about 1e-6 of the logits' scale on torchvision ResNets.
AGREEMENT = 1e-4
ENABLED = True  # False: every forward-only pass runs the model as given (for comparisons and debugging)

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}
_CONVS = (nn.Conv2d, nn.Conv3d)


@dataclass
class FastForward:
    """The module the forward-only passes run, and what was learnt about the model while building it."""

    module: nn.Module
    folded: int = 0
    first_convolution: Optional[str] = None  # the convolution that receives the model's input unchanged, if one does
    layout: bool = True  # feed channels-last inputs
    note: dict[str, Any] = field(default_factory=dict)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """Logits of a batch (inference mode is the caller's): channels-last unless the model rejects it."""
        if self.layout and batch.dim() in (4, 5):
            try:
                return call_model(self.module, channels_last(batch))
            except Exception:  # noqa: BLE001 - e.g. a .view() or an assert on contiguous tensors inside the model
                self.layout = False
                self.note["channels_last"] = False
        return call_model(self.module, batch.contiguous())


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max(|b|, 1): how far two sets of logits are apart, on the scale of the reference b."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1.0))


def structural_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree whose children can be replaced without touching the original.

    Every module object is copied shallowly (its forward code, hooks, parameters and buffers are the same
    objects); only the dictionaries of children are new.
    """
    return _structural_copy(module, {})


def _structural_copy(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a module registered at several paths stays one object in the copy
        return memo[id(module)]
    new = module.__class__.__new__(module.__class__)  # not copy.copy: parametrized modules refuse to be pickled
    new.__dict__ = dict(module.__dict__)
    memo[id(module)] = new
    new._modules = OrderedDict(
        (name, None if child is None else _structural_copy(child, memo)) for name, child in module._modules.items()
    )
    return new


def replace_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


@dataclass
class _Observation:
    pairs: list[tuple[str, str]]  # (convolution or linear layer, the BatchNorm that reads its output)
    first_convolution: Optional[str]


def observe(model: nn.Module, probe: torch.Tensor) -> _Observation:
    """One forward pass with hooks that see which BatchNorm reads which layer's untouched output, and which
    convolution receives the input itself. Modules called more than once, or with hooks of their own, are left out."""
    if torch.is_inference(probe):
        probe = probe.clone()
    paths: dict[nn.Module, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(m, []).append(n)
    names = {m: p[0] for m, p in paths.items() if len(p) == 1}  # modules at several paths are left alone
    calls: Counter = Counter()
    produced: dict[int, tuple[str, torch.Tensor, int]] = {}
    other_uses: Counter = Counter()  # uses of a layer's output by anything but the BatchNorm that reads it
    reads: list[tuple[str, str, tuple]] = []
    takes_input: list[str] = []
    handles = []
    inside: list[int] = []  # ids of the tensors whose BatchNorm is running now
    paused = [False]  # our own hooks' looks at a tensor are not uses
    probe_version = probe._version

    class CountUses(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for t in () if paused[0] else torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor) and id(t) in produced and produced[id(t)][1] is t and id(t) not in inside:
                    other_uses[id(t)] += 1
            return func(*args, **(kwargs or {}))

    def not_a_use(hook):
        def run(*a):
            paused[0] = True
            try:
                hook(*a)
            finally:
                paused[0] = False
        return run

    @not_a_use
    def after_layer(module: nn.Module, _args: Any, out: Any) -> None:
        calls[names[module]] += 1
        if isinstance(out, torch.Tensor):
            produced[id(out)] = (names[module], out, out._version)

    @not_a_use
    def before_batchnorm(module: nn.Module, args: Any) -> None:
        calls[names[module]] += 1
        t = args[0] if args else None
        entry = produced.get(id(t)) if isinstance(t, torch.Tensor) else None
        if entry is not None and entry[1] is t and t._version == entry[2]:  # the same tensor, not changed in place
            reads.append((entry[0], names[module], (id(t), tuple(t.shape))))
            inside.append(id(t))

    @not_a_use
    def after_batchnorm(module: nn.Module, args: Any, _out: Any) -> None:
        if inside and args and isinstance(args[0], torch.Tensor) and inside[-1] == id(args[0]):
            inside.pop()

    @not_a_use
    def before_layer(module: nn.Module, args: Any) -> None:
        if args and args[0] is probe and probe._version == probe_version:  # the input itself, unchanged
            takes_input.append(names[module])

    try:
        for module in names:
            if _has_hooks(module):
                continue
            if type(module) in _FOLDABLE:
                handles.append(module.register_forward_pre_hook(before_layer))
                handles.append(module.register_forward_hook(after_layer))
            elif isinstance(module, _BATCHNORMS):
                handles.append(module.register_forward_pre_hook(before_batchnorm))
                handles.append(module.register_forward_hook(after_batchnorm))
        # not inference mode: version counters show in-place changes between layer and BatchNorm
        with torch.no_grad(), CountUses():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return _observation(dict(model.named_modules(remove_duplicate=False)), calls, other_uses, reads, takes_input)


def _observation(modules: dict[str, nn.Module], calls: Counter, other_uses: Counter,
                 reads: list[tuple[str, str, tuple]], takes_input: list[str]) -> _Observation:
    """What the observed pass allows: the (layer, BatchNorm) pairs that fold (each called once, the BatchNorm the
    only reader of the layer's untouched output, in eval mode with running statistics), and the first convolution."""

    def foldable(layer: str, bn: str, tensor: tuple) -> bool:
        lay, norm = modules[layer], modules[bn]
        shape = tensor[1]
        return (
            calls[layer] == 1 and calls[bn] == 1 and other_uses[tensor[0]] == 0
            and _FOLDABLE[type(lay)] is type(norm) and len(shape) >= 2 and shape[1] == norm.num_features
            and (not isinstance(lay, nn.Linear) or len(shape) == 2)
            and not norm.training and norm.track_running_stats and norm.running_mean is not None
            and sum(1 for _, b, _ in reads if b == bn) == 1 and sum(1 for l, _, _ in reads if l == layer) == 1
        )

    pairs = [(layer, bn) for layer, bn, tensor in reads if foldable(layer, bn, tensor)]
    first = takes_input[0] if len(takes_input) == 1 and isinstance(modules[takes_input[0]], _CONVS) else None
    return _Observation(pairs, first if first is not None and calls[first] == 1 else None)


def fast_forward(model: nn.Module, x: torch.Tensor, logits: Optional[torch.Tensor] = None) -> FastForward:
    """The model, or a structural copy with BatchNorms folded, for forward-only passes on inputs like `x`.

    The copy runs the model's own forward code (hooks and Python-side state included); it is used only when
    it agrees with the model on `x` (relative gap at most `AGREEMENT`). `logits`, the model's output on `x`
    when the caller has it, saves a forward pass. On a GPU the model runs as given (see docs/benchmarks.md).
    """
    plain = FastForward(module=model)
    key = "forward_passes"
    if not ENABLED:
        plain.note[key] = "the model as given (medlens.accel.fast_forward.ENABLED is False)"
        return plain
    if isinstance(model, torch.jit.ScriptModule):
        plain.note[key] = "the model as given (TorchScript)"
        return plain
    if model.training:
        plain.note[key] = "the model as given (in training mode)"
        return plain
    if x.device.type != "cpu":
        # Measured on an H200 (30 Nov 2026): Score-CAM took 190 ms with the rewrite against 119 ms without, and
        # TF32 convolutions (cuDNN's default) differ from the folded ones by about 3e-4 anyway.
        plain.note[key] = f"the model as given (on {x.device.type}, where the rewrite does not pay)"
        return plain
    probe = channels_last(x[:1]) if x.dim() in (4, 5) else x[:1]
    try:
        seen = observe(model, probe)
    except Exception:  # noqa: BLE001 - e.g. a .view() or an assert that needs contiguous tensors
        probe = x[:1].contiguous()
        seen = observe(model, probe)
        plain.layout = False
    plain.first_convolution = seen.first_convolution
    if not seen.pairs:
        plain.note[key] = "the model as given (no BatchNorm reads a convolution's or linear layer's output)"
        return plain
    modules = dict(model.named_modules(remove_duplicate=False))
    try:
        fast = structural_copy(model)
        for layer_name, bn_name in seen.pairs:
            layer, bn = modules[layer_name], modules[bn_name]
            fused = fuse_conv_bn_eval(layer, bn) if isinstance(layer, nn.modules.conv._ConvNd) else fuse_linear_bn_eval(layer, bn)
            if isinstance(fused, nn.Conv2d):
                fused = fused.to(memory_format=torch.channels_last)
            replace_submodule(fast, layer_name, fused)
            replace_submodule(fast, bn_name, nn.Identity())
        candidate = FastForward(module=fast, folded=len(seen.pairs), first_convolution=seen.first_convolution, layout=plain.layout)
        with torch.inference_mode():
            reference = call_model(model, probe) if logits is None else logits[:1]
            got = candidate(probe)
    except Exception as error:  # noqa: BLE001 - a copy that cannot be built or run: the model runs as given
        plain.note[key] = f"the model as given (the folded copy failed: {type(error).__name__})"
        return plain
    gap = relative_gap(got, reference)
    if not gap <= AGREEMENT:
        plain.note[key] = f"the model as given (the folded copy's logits differed by {gap:.1e} relative)"
        return plain
    candidate.note[key] = (f"a copy of the model with {len(seen.pairs)} BatchNorm layer(s) folded into the layer "
                           f"before them (logits on the input agree to {gap:.1e} relative)")
    return candidate
