"""Score-CAM's masked inputs through the model's first convolution without running it on each of them.

Every mask is a (bi/tri)linear upsampling of a map on the target layer's grid, so conv(x * mask) is a sum over
grid points g of map[g] * conv(x * basis_g); near any output only 2-3 grid points per axis reach the receptive
field, so the output splits into tiles, each a small matrix product over precomputed values. The model runs
with that convolution swapped, in a structural copy, for a module that hands back the precomputed output.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medlens.accel.fast_forward import AGREEMENT, FastForward, relative_gap, replace_submodule, structural_copy
from medlens.tensor.autograd import call_model
from medlens.tensor.spatial import channels_last
from medlens.tensor.spatial import upsample_to

MAX_TERMS_PER_AXIS = 3  # grid points a tile may combine along one axis (bands are merged up to this)
MAX_TILE_MEMORY = 256 * 2**20  # bytes of precomputed values per image; above it the convolution simply runs


@dataclass
class _Tile:
    region: tuple[slice, ...]  # output positions, one slice per spatial axis
    grid_index: torch.Tensor  # (K + 1,) flat indices of the grid points that reach them, then the bias slot
    # (K + 1, *region sizes, C_out): conv(x * basis_g) there, channels last, then the bias; while building only
    values: Optional[torch.Tensor]
    rows: Optional[torch.Tensor] = None  # the same as (*leading sizes, H size, K + 1, W size * C_out), for bmm


class _Precomputed(nn.Module):
    """Stands in for the first convolution: returns the precomputed output when it receives the very input it
    was prepared for, and otherwise runs the convolution (so a model that changes its input first stays exact)."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.expected: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None
        self.hits = 0

    def __getattr__(self, name: str):
        # What the model reads off its convolution (HuggingFace's patch embedding asks for .weight.dtype) is the
        # convolution's own.
        try:
            return super().__getattr__(name)
        except AttributeError:
            conv = self.__dict__.get("_modules", {}).get("conv")
            if conv is None:
                raise
            return getattr(conv, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.value is not None and x is self.expected:
            value, self.value, self.expected = self.value, None, None
            self.hits += 1
            return value
        return self.conv(x)


class MaskedStem:
    """The first convolution's output on x * U(w) for any maps w on the grid, and the model run around it."""

    def __init__(self, model: nn.Module, swap: _Precomputed, tiles: list[_Tile], out_shape: Sequence[int]) -> None:
        self.model = model  # a structural copy whose first convolution is `swap`
        self.swap = swap
        self.tiles = tiles
        self.out_shape = tuple(out_shape)  # (C_out, *O)
        self._buffer: Optional[torch.Tensor] = None

    def outputs(self, weights: torch.Tensor) -> torch.Tensor:
        """conv(x * U(w)) for w of shape (n, G): (n, C_out, *O), channels-last strides.

        The result lives in a buffer that the next call overwrites (the model may apply an in-place ReLU to it).
        """
        n = weights.shape[0]
        c, spatial = self.out_shape[0], self.out_shape[1:]
        if self._buffer is None or self._buffer.shape[0] < n:
            self._buffer = weights.new_empty(n, *spatial, c)
        out = self._buffer[:n]
        with_bias = torch.cat([weights, weights.new_ones(n, 1)], dim=1)  # the last slot weighs the bias row
        for tile in self.tiles:
            coefficients = with_bias[:, tile.grid_index]  # (n, K + 1)
            # The products go straight into the buffer: per position along the leading axes, a batch over the
            # H axis of (n, K + 1) @ (K + 1, W * C), whose output rows are strided views of the buffer.
            block = out[(slice(None), *tile.region)].movedim(0, -3)  # (*leading, H size, n, W size, C)
            rows = tile.rows
            assert rows is not None
            for lead in itertools.product(*(range(r) for r in rows.shape[:-3])):
                target = block[lead].flatten(-2)
                torch.bmm(coefficients.expand(target.shape[0], -1, -1), rows[lead], out=target)
        return out.movedim(-1, 1)

    def logits(self, weights: torch.Tensor, masked: torch.Tensor,
               check: bool = False) -> tuple[Optional[torch.Tensor], bool, Optional[float]]:
        """The model's logits on `masked` (= x * U(weights)) with the first convolution precomputed; the flag says
        whether the precomputed output was used (False: the model changed its input first, the convolution ran).

        With `check`, the precomputed output for the first masked input is first compared with the convolution run
        on it; the gap (relative) comes back third, and above `AGREEMENT` the model is not run (logits None). With the
        flag, that covers the whole pass: the convolution got exactly that input, the rest of the model is its own.
        """
        masked = channels_last(masked)
        value = self.outputs(weights)
        gap = None
        if check:
            gap = relative_gap(value[:1], self.swap.conv(masked[:1]))
            if not gap <= AGREEMENT:
                return None, False, gap
        self.swap.expected, self.swap.value = masked, value
        hits = self.swap.hits
        try:
            out = call_model(self.model, masked)
        finally:
            self.swap.expected = self.swap.value = None
        return out, self.swap.hits > hits, gap


def _bands(support: list[range], size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int):
    """Runs of output positions along one axis, each with the grid points whose basis reaches their receptive fields."""
    def reaching(o: int) -> set[int]:
        lo = max(o * stride - padding, 0)
        hi = min(o * stride - padding + dilation * (kernel - 1), size - 1)
        return {g for g, r in enumerate(support) if r.start <= hi and lo < r.stop}

    bands: list[tuple[int, int, list[int]]] = []
    start, current = 0, reaching(0)
    for o in range(1, out_size):
        merged = current | reaching(o)
        if len(merged) <= MAX_TERMS_PER_AXIS:
            current = merged
        else:
            bands.append((start, o, sorted(current)))
            start, current = o, reaching(o)
    bands.append((start, out_size, sorted(current)))
    return bands


def build_masked_stem(fast: FastForward, x: torch.Tensor, grid: Sequence[int]) -> tuple[Optional[MaskedStem], str]:
    """For one image x (1, C, *S) and masks upsampled from `grid`: the shortcut, or None and the reason it does not apply."""
    if x.device.type != "cpu":
        return None, f"on {x.device.type} the convolution is cheaper than the combination's many small products"
    spatial = tuple(x.shape[2:])
    grid = tuple(int(g) for g in grid)
    if grid == spatial:
        return None, "the masks are not upsampled"
    if fast.first_convolution is None:
        return None, "no convolution (called once, without hooks) receives the model's input unchanged"
    conv = fast.module.get_submodule(fast.first_convolution)
    swap = conv if isinstance(conv, _Precomputed) else None  # left in place by an earlier image of the call
    conv = swap.conv if swap is not None else conv
    conv_type = {2: nn.Conv2d, 3: nn.Conv3d}.get(len(spatial))
    if type(conv) is not conv_type or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None, "the first convolution is not a zero-padded convolution of the input's dimension"
    k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    out = [(spatial[a] + 2 * p[a] - d[a] * (k[a] - 1) - 1) // s[a] + 1 for a in range(len(spatial))]
    bands_per_axis = _bands_per_axis(grid, spatial, out, k, s, p, d)
    terms = 1
    for bands in bands_per_axis:
        terms *= max(len(b[2]) for b in bands)
    conv_cost = conv.in_channels // conv.groups * int(torch.tensor(k).prod())
    if conv_cost < 4 * terms:
        return None, f"the first convolution is cheap ({conv_cost} multiply-adds per output against {terms} terms)"
    c_out = conv.out_channels
    strides = [int(torch.tensor(grid[a + 1:]).prod()) for a in range(len(grid))]
    n_grid = int(torch.tensor(grid).prod())
    tiles: list[_Tile] = []
    memory = 0
    for combo in itertools.product(*bands_per_axis):
        region = tuple(slice(lo, hi) for lo, hi, _ in combo)
        flat = [sum(i * st for i, st in zip(point, strides)) for point in itertools.product(*(b[2] for b in combo))]
        sizes = [hi - lo for lo, hi, _ in combo]
        memory += len(flat) * int(torch.tensor(sizes).prod()) * c_out * x.element_size()
        if memory > MAX_TILE_MEMORY:
            return None, f"the precomputed values would exceed {MAX_TILE_MEMORY // 2**20} MiB"
        values = x.new_empty(len(flat) + 1, *sizes, c_out)
        values[-1] = 0 if conv.bias is None else conv.bias.detach()
        tiles.append(_Tile(region, torch.tensor(flat + [n_grid], device=x.device), values))
    uses: dict[int, list[tuple[_Tile, int]]] = {}
    for tile in tiles:
        for j, g in enumerate(tile.grid_index.tolist()[:-1]):
            uses.setdefault(g, []).append((tile, j))
    conv_fn = F.conv2d if len(spatial) == 2 else F.conv3d
    with torch.inference_mode():
        for g, used in uses.items():
            one_hot = torch.zeros(n_grid, dtype=x.dtype, device=x.device)
            one_hot[g] = 1
            basis = upsample_to(one_hot.view(1, 1, *grid), spatial)  # (1, 1, *S)
            # Only the outputs of the tiles that use g are needed: convolve just the input window they see.
            first = [min(t.region[a].start for t, _ in used) for a in range(len(spatial))]
            last = [max(t.region[a].stop for t, _ in used) for a in range(len(spatial))]
            window, pads = [], []
            for a in range(len(spatial)):
                lo = first[a] * s[a] - p[a]
                hi = (last[a] - 1) * s[a] - p[a] + d[a] * (k[a] - 1) + 1
                window.append(slice(max(lo, 0), min(hi, spatial[a])))
                pads.append((max(0, -lo), max(0, hi - spatial[a])))
            part = (x * basis)[(slice(None), slice(None), *window)]
            part = F.pad(part, [v for pair in reversed(pads) for v in pair])
            z = conv_fn(part, conv.weight, None, conv.stride, 0, conv.dilation, conv.groups)[0].movedim(0, -1)
            for tile, j in used:
                tile.values[j] = z[tuple(slice(r.start - f, r.stop - f) for r, f in zip(tile.region, first))]
    for tile in tiles:
        moved = tile.values.movedim(0, -3)  # (*leading, H size, K + 1, W size, C)
        tile.rows = moved.reshape(*moved.shape[:-2], -1).contiguous()
        tile.values = None
    if swap is None:
        swap = _swap_in(fast, conv)
    return MaskedStem(fast.module, swap, tiles, (c_out, *out)), ""


def _bands_per_axis(grid: Sequence[int], spatial: Sequence[int], out: Sequence[int], k: Sequence[int],
                    s: Sequence[int], p: Sequence[int], d: Sequence[int]) -> list:
    """Per spatial axis, the bands of outputs of the first convolution that each grid cell's upsampled mask reaches."""
    bands_per_axis = []
    for a, (g, size) in enumerate(zip(grid, spatial)):
        one_d = F.interpolate(torch.eye(g, dtype=torch.float64)[:, None, :], size=size, mode="linear", align_corners=False)[:, 0]
        support = []
        for row in one_d:
            nz = torch.nonzero(row).flatten()
            support.append(range(int(nz[0]), int(nz[-1]) + 1) if nz.numel() else range(0))
        bands_per_axis.append(_bands(support, size, out[a], k[a], s[a], p[a], d[a]))
    return bands_per_axis


def _swap_in(fast: FastForward, conv: nn.Module) -> "_Precomputed":
    """The first convolution replaced by its precomputed stand-in, in the fast module (a copy, never the caller's)."""
    if not fast.folded:  # never swap inside the caller's model: make the fast module a copy first
        fast.module = structural_copy(fast.module)
    swap = _Precomputed(conv)
    replace_submodule(fast.module, fast.first_convolution, swap)
    return swap
