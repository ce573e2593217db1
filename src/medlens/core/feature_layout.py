"""How a layer's output lies over the input's grid: channels first (CNNs), channels last (Swin) or a token sequence.

`layout_of()` reads a layer's output (a tensor, or a tuple/list with it first) as a (B, C, *grid) feature map: a
(B, tokens, C) sequence has its class, distillation and register tokens set aside and the rest laid on the patch grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from medlens.errors import MethodError

MAX_PREFIX_TOKENS = 8  # class + distillation + register tokens tried before a sequence is said to fit no grid
PATCH_MERGES = 6  # a model with a patch embedding of stride p has token grids at strides p, 2p, ... 2^5 p (Swin)


def first_tensor(output: Any) -> Optional[torch.Tensor]:
    """The tensor a layer hands on: the output itself, or the first element of a tuple/list (HuggingFace layers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def with_first(output: Any, tensor: torch.Tensor) -> Any:
    """`output` with its tensor (the output itself, or a tuple's/list's first element) replaced by `tensor`."""
    if isinstance(output, torch.Tensor):
        return tensor
    rest = list(output[1:])
    return (tensor, *rest) if isinstance(output, tuple) else [tensor, *rest]


@dataclass(frozen=True)
class FeatureLayout:
    """Where the feature map sits in a layer's output: `kind` is "channels_first" (B, C, *grid), "channels_last"
    (B, *grid, C) or "tokens" (B, prefix + prod(grid), C) with `prefix` leading tokens that are not patches."""

    kind: str
    grid: tuple[int, ...]
    prefix: int = 0

    def to_map(self, out: torch.Tensor) -> torch.Tensor:
        """The (B, C, *grid) feature map in a layer's output tensor (a view where it can be)."""
        if self.kind == "channels_first":
            return out
        if self.kind == "tokens":
            out = out[:, self.prefix:].reshape(out.shape[0], *self.grid, out.shape[-1])
        return out.movedim(-1, 1)

    def rebuild(self, output: Any, feature_map: torch.Tensor) -> Any:
        """The layer's output (same structure as `output`) with its feature map replaced by `feature_map` (n, C, *grid);
        prefix tokens come from `output`, repeated when it holds one image and `feature_map` several."""
        first = first_tensor(output)
        if self.kind == "channels_first":
            new = feature_map
        else:
            new = feature_map.movedim(1, -1)
            if self.kind == "tokens":
                prefix = first[:, : self.prefix]
                if prefix.shape[0] != new.shape[0]:
                    prefix = prefix.expand(new.shape[0], *prefix.shape[1:])
                new = torch.cat([prefix.to(new.dtype), new.reshape(new.shape[0], -1, new.shape[-1])], dim=1)
            else:
                new = new.contiguous()
        return with_first(output, new)

    def describe(self, shape: Sequence[int]) -> str:
        grid = " x ".join(map(str, self.grid))
        if self.kind == "channels_first":
            return f"feature map {tuple(shape)} (batch, channels, {grid} grid)"
        if self.kind == "channels_last":
            return f"channels-last feature map {tuple(shape)} (batch, {grid} grid, channels), read as channels first"
        return (f"token sequence {tuple(shape)}: {self.prefix} leading (class/distillation/register) token(s) set "
                f"aside, {prod(self.grid)} patch tokens on a {grid} grid")


def prod(values: Sequence[int]) -> int:
    total = 1
    for v in values:
        total *= int(v)
    return total


def patch_stride(model: nn.Module) -> Optional[int]:
    """The model's patch size: the stride of its first convolution whose kernel equals its stride (a patch
    embedding), or None."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            if tuple(m.kernel_size) == tuple(m.stride) and len(set(m.stride)) == 1 and m.stride[0] > 1:
                return int(m.stride[0])
            return None
    return None


def _grids_for(spatial: Sequence[int], stride: int) -> list[tuple[int, ...]]:
    """Grids an input of size `spatial` gives at one stride (each axis rounded down or up)."""
    grids = [()]
    for s in spatial:
        options = sorted({max(1, s // stride), max(1, -(-s // stride))})
        grids = [g + (o,) for g in grids for o in options]
    return grids


def _strides(spatial: Sequence[int], patch: Optional[int]) -> list[int]:
    """The strides a feature grid may have: the patch size times powers of two when the model has a patch
    embedding, else any."""
    if patch:
        return [patch * 2**j for j in range(PATCH_MERGES)]
    return list(range(1, max(spatial) + 1))


def _fits(grid: Sequence[int], spatial: Sequence[int], patch: Optional[int]) -> bool:
    """Whether `grid` is the input's grid at one common stride."""
    return any(tuple(grid) in _grids_for(spatial, s) for s in _strides(spatial, patch))


def _token_grid(n_tokens: int, spatial: Sequence[int], patch: Optional[int], known_prefix: Optional[int]):
    """(prefix, grid) of a sequence of n tokens over an input of size `spatial`: the fewest leading tokens (the
    model's own count first) such that the rest is the input's grid at one stride (from the patch size)."""
    prefixes = ([known_prefix] if known_prefix is not None else []) + list(range(0, MAX_PREFIX_TOKENS + 1))
    for k in prefixes:
        n = n_tokens - k
        if n <= k:
            break
        for s in _strides(spatial, patch):
            for grid in _grids_for(spatial, s):
                if prod(grid) == n:
                    return k, grid
    return None


def layout_of(model: nn.Module, x: torch.Tensor, output: Any, layer_name: str, module: nn.Module) -> FeatureLayout:
    """How the feature map lies in `module`'s output for input x (B, C, *spatial).

    Raises:
        MethodError: the output is not a tensor, has another batch size, is neither a spatial map nor a token
            sequence, or is a token sequence that fits no patch grid of the input.
    """
    out = first_tensor(output)
    spatial = tuple(x.shape[2:])
    what = "depth, height, width" if x.dim() == 5 else "height, width"
    if out is None:
        raise MethodError(
            f"the target layer {layer_name} returns {type(output).__name__}, not a tensor; choose a layer that outputs "
            f"a feature map (batch, channels, {what}) or a token sequence (batch, tokens, channels) (layer=...).")
    shape = tuple(out.shape)
    if out.shape[0] != x.shape[0]:
        raise MethodError(
            f"the target layer {layer_name}'s output {shape} does not have the input's batch size {x.shape[0]} first "
            f"(attention windows or heads?); choose the block or norm around it, e.g. a block's first norm (layer=...).")
    stride = patch_stride(model)
    if out.dim() == x.dim():
        first, last = shape[2:], shape[1:-1]
        first_fits, last_fits = _fits(first, spatial, stride), _fits(last, spatial, stride)
        norm_last = isinstance(module, nn.LayerNorm) and not type(module).__name__.endswith("2d") and (
            tuple(module.normalized_shape) == (shape[-1],))
        if last_fits and (not first_fits or norm_last):
            return FeatureLayout("channels_last", last)
        return FeatureLayout("channels_first", first)
    if out.dim() == 3 and x.dim() in (4, 5):
        known = getattr(model, "num_prefix_tokens", None)
        found = _token_grid(shape[1], spatial, stride, known if isinstance(known, int) and known >= 0 else None)
        if found is None:
            raise MethodError(
                f"the target layer {layer_name}'s output {shape} looks like a token sequence (batch, tokens, channels), "
                f"but {shape[1]} tokens fit no patch grid of the input {' x '.join(map(str, spatial))} (patch size "
                f"{stride or 'unknown'}) after setting aside up to {MAX_PREFIX_TOKENS} class/register tokens. Choose a layer whose tokens are the patches "
                f"(a block's first norm), or give an input of the size the model was built for.")
        return FeatureLayout("tokens", found[1], found[0])
    raise MethodError(
        f"the target layer {layer_name}'s output has shape {shape}: it is not a spatial feature map (batch, channels, "
        f"{what}) like the input {tuple(x.shape)}, nor a token sequence (batch, tokens, channels). Choose a "
        f"convolutional layer, or a transformer block's norm (layer=...).")
