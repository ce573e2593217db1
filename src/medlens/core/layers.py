"""Layers matched by role (convolution, linear, batch-norm, activation, pooling), and target-layer choice.

Roles use `isinstance` on torch's base classes, so subclasses from torchvision, timm or MONAI count;
the automatic target layer is the last module whose output is a spatial map before global pooling.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from medlens.errors import ModelError

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.PReLU,
)


def is_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd)


def first_convolution(model: nn.Module) -> Optional[nn.Module]:
    """The model's first convolution in module order (TorchScript ones by their original class name), or None."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) or getattr(module, "original_name", "") in (
            "Conv1d", "Conv2d", "Conv3d"
        ):
            return module
    return None


def is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear)


def is_batchnorm(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def is_activation(m: nn.Module) -> bool:
    return isinstance(m, _ACTIVATIONS)


def is_pooling(m: nn.Module) -> bool:
    return isinstance(
        m,
        (
            nn.modules.pooling._AdaptiveAvgPoolNd,
            nn.modules.pooling._AdaptiveMaxPoolNd,
            nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._MaxPoolNd,
        ),
    )


def is_global_pooling(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd))


LayerSpec = Union[None, str, nn.Module]


@dataclass(frozen=True)
class TargetLayer:
    module: nn.Module
    name: str
    chosen_automatically: bool
    reason: str = "given by the caller"


def module_name(model: nn.Module, module: nn.Module) -> Optional[str]:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


# model -> {(input ndim, spatial shape): (dotted name, reason)}; weak so a dropped model frees its entry
_AUTO_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

LAST_SPATIAL = "the last layer with a spatial output before the global pooling"
LAST_BLOCK_NORM = ("the last transformer block's first norm (pytorch-grad-cam's choice for vision transformers): its "
                   "patch tokens still reach the class token through that block's attention, whereas the patch "
                   "embedding before the blocks maps the input, not the decision")


def resolve_target_layer(model: nn.Module, x: torch.Tensor, layer: LayerSpec = None) -> TargetLayer:
    """The layer whose activations CAM methods use: given by module or dotted name, or found automatically.

    Args:
        model: the model explained.
        x: its input (B, C, *spatial); the automatic choice runs one inference pass on its first image.
        layer: None (automatic: the last spatial layer before the pooling, or a vision transformer's last block's
            first norm), a module of the model, or its dotted name.

    Returns:
        The layer, its dotted name, whether it was chosen automatically and why.

    Raises:
        ModelError: the layer is not part of the model, or no layer fits.
    """
    if isinstance(layer, nn.Module):
        name = module_name(model, layer)
        if name is None:
            raise ModelError("the layer given is not a submodule of this model; pass one of model.named_modules()")
        return TargetLayer(layer, name or "<model>", False)
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            spatial = [n for n, m in modules.items() if n and (is_conv(m) or is_batchnorm(m))][-5:]
            raise ModelError(
                f"the model has no layer named {layer!r}. Give a dotted name from model.named_modules(), "
                f"for example one of: {', '.join(spatial) or '(none)'}; or leave the layer out to choose it automatically."
            )
        return TargetLayer(modules[layer], layer, False)
    if layer is not None:
        raise ModelError(f"layer must be None, a dotted module name or a module, not {type(layer).__name__}")

    key = (x.dim(), tuple(x.shape[2:]))
    cached = _AUTO_CACHE.get(model, {}).get(key)
    if cached is not None:
        found = _submodule(model, cached[0])  # the dotted path walked, not every module named
        if found is not None:
            return TargetLayer(found, cached[0], True, cached[1])
    name, reason = _find_auto_layer(model, x)
    _AUTO_CACHE.setdefault(model, {})[key] = (name, reason)
    return TargetLayer(model.get_submodule(name), name, True, reason)


def _submodule(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The module at a dotted name, or None when the model no longer has one there."""
    try:
        found = model.get_submodule(name)
    except AttributeError:
        return None
    return found if isinstance(found, nn.Module) else None


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()


def _is_norm(m: nn.Module) -> bool:
    """A token norm (LayerNorm, RMSNorm, ...), not a CNN's BatchNorm."""
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or (
        "norm" in type(m).__name__.lower() and not is_batchnorm(m) and not list(m.children()))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The innermost modules holding a norm as a direct child and an attention module below them (encoder blocks:
    torchvision's EncoderBlock, timm's Block, HuggingFace's ViTLayer, Swin blocks), in module order."""
    candidates = [m for m in model.modules()
                  if any(_is_norm(c) for c in m.children()) and any(_is_attention(d) for d in m.modules() if d is not m)]
    inner = set(map(id, candidates))
    return [m for m in candidates if not any(id(d) in inner for d in m.modules() if d is not m)]


def _find_auto_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, str]:
    """Run one inference pass: a vision transformer's last block's first norm when the blocks run after every
    spatial (B, C, *s) layer, else the last module (outermost on ties) with a spatial output; with the reason."""
    names = {m: n for n, m in model.named_modules()}
    order: list[tuple[str, torch.Tensor, int]] = []  # (name, output, when); outputs kept alive so identity is exact
    finished: dict[nn.Module, int] = {}  # module -> when its (last) forward ended
    tick = [0]
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_m, _inp, out):
            tick[0] += 1
            finished[module] = tick[0]
            if (
                name
                and isinstance(out, torch.Tensor)
                and out.dim() == x.dim()
                and not is_global_pooling(module)
                and int(torch.tensor(out.shape[2:]).prod()) > 1
            ):
                order.append((name, out, tick[0]))
        return hook

    for m, n in names.items():
        handles.append(m.register_forward_hook(make_hook(n, m)))
    was_training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.inference_mode():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
        for m, mode in was_training:
            m.training = mode
    blocks = [b for b in transformer_blocks(model) if b in finished]
    last_spatial = max((when for _, _, when in order), default=-1)
    if blocks:
        last = max(blocks, key=lambda b: finished[b])
        norms = [c for c in last.children() if _is_norm(c) and c in finished]
        if norms and finished[last] > last_spatial:
            return names[min(norms, key=lambda c: finished[c])], LAST_BLOCK_NORM
    if not order:
        raise ModelError(
            f"the model has no layer with a spatial output (B, C, *spatial) before its global pooling on an input of "
            f"size {' x '.join(map(str, x.shape[2:]))}, so CAM methods cannot run on it. If the model downsamples a "
            f"small input to a single position, give a larger input (--input-size); otherwise use a gradient or "
            f"perturbation method (e.g. saliency, occlusion), or pass layer= with a convolutional layer."
        )
    last_out = order[-1][1]
    # Several modules may return the same tensor (a container and its last child): take the outermost.
    same = [n for n, out, _ in order if out is last_out]
    return min(same, key=lambda n: n.count(".")), LAST_SPATIAL
