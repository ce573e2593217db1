"""Winograd F(2x2, 3x3) convolutions for the evaluation metrics' forward-only passes on the CPU.

Owns the swap of a folded copy's wide 3x3 convolutions for Winograd ones (2.25x fewer multiplications, done as one
batched matrix product) and its check against the copy; the model and the perturbation methods are not touched.

Why and where (brain-tumor-mri, one AVX2 thread, 16 images; docs/benchmarks.md): a 256 -> 256 convolution on a
10 x 10 map took 17.5 ms against 22.2 ms direct, 128 -> 256 9.7 against 11.8, 128 -> 128 5.9 against 6.4, but
64 -> 64 on 20 x 20 9.0 against 5.8 (the transforms cost more than a narrow product saves), hence `WIDE`. The error
against float64 was 2e-6 against 8e-6 direct: the input and output transforms only add and subtract, the weight
transform halves (exact in binary). On an AVX-512 core (7 Dec 2026), where the direct convolutions run faster, the
same layers still pay, by less: 256 -> 256 13.0 against 15.5 ms, 128 -> 256 7.1 against 8.0, 128 -> 128 3.5 against
3.8, and 64 -> 64 6.6 against 4.0, 32 -> 32 on 40 x 40 10.4 against 4.6.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from medlens.accel.fast_forward import FastForward, relative_gap, replace_submodule, structural_copy

WIDE = 128 * 128  # input times output channels from which a convolution is swapped (see the module docstring)
_BT = torch.tensor([[1.0, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_AT = torch.tensor([[1.0, 1, 1, 0], [0, 1, -1, -1]])
_G = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_BK = torch.kron(_BT, _BT)  # (16, 16): the input transform of a 4 x 4 tile, flattened
_AK = torch.kron(_AT, _AT)  # (4, 16): the output transform to a 2 x 2 tile


def winograd_conv(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, of x (N, C, H, W) with H and W even, given the transformed
    weights u (16, C, Cout) of `transform_weight`; returns (N, Cout, H, W) channels-last."""
    N, C, H, W = x.shape
    th, tw, cout = H // 2, W // 2, u.shape[2]
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (N, H + 2, W + 2, C): a view, whatever the layout
    sn, sh, sw, sc = xp.stride()
    tiles = xp.as_strided((4, 4, N, th, tw, C), (sh, sw, sn, 2 * sh, 2 * sw, sc)).reshape(16, -1)
    v = torch.mm(_BK.to(x), tiles).view(16, N * th * tw, C)
    m = torch.bmm(v, u)  # (16, tiles, Cout): the multiplications
    y = torch.mm(_AK.to(x), m.view(16, -1)).view(2, 2, N, th, tw, cout).permute(2, 3, 0, 4, 1, 5)
    out = x.new_empty(N, th, 2, tw, 2, cout)
    if bias is None:
        out.copy_(y)
    else:
        torch.add(y, bias, out=out)
    return out.view(N, H, W, cout).permute(0, 3, 1, 2)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, C, 3, 3) -> (16, C, Cout): G w G^T of each filter, laid out for `winograd_conv`'s product."""
    g = _G.to(weight)
    return torch.einsum("ik,ockl,jl->ijco", g, weight, g).reshape(16, weight.shape[1], weight.shape[0]).contiguous()


class WinogradConv2d(nn.Module):
    """A 3x3, stride 1, padding 1 convolution run as Winograd F(2x2, 3x3) on even-sized float32 CPU inputs (the
    convolution as given on any other input); the output is channels-last, or contiguous for a contiguous input
    (a model that `.view`s its feature maps gets the layout it expects)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        self.u = transform_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[2] % 2 or x.shape[3] % 2:
            return F.conv2d(x, self.weight, self.bias, padding=1)
        out = winograd_conv(x, self.u, self.bias)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def swappable(module: nn.Module) -> bool:
    """A plain float32 3x3 convolution, stride 1, zero padding 1, no dilation or groups, at least `WIDE` input times
    output channels, without hooks."""
    return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
            and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros" and module.in_channels * module.out_channels >= WIDE
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and not (module._forward_hooks or module._forward_pre_hooks))


def with_winograd(forward: FastForward, x: torch.Tensor, agreement: float) -> FastForward:
    """`forward` with its wide 3x3 convolutions swapped for Winograd ones (in a copy of its module tree), if it
    has any and the result's logits on `x` agree with `forward`'s to `agreement`
    (relative); else `forward` unchanged. Call outside inference mode (the copy's tensors are kept)."""
    names = [n for n, m in forward.module.named_modules() if swappable(m)]
    if not names or x.device.type != "cpu":
        return forward
    tree = structural_copy(forward.module)  # the model's own modules are never replaced
    for name in names:
        replace_submodule(tree, name, WinogradConv2d(tree.get_submodule(name)))
    candidate = FastForward(module=tree, folded=forward.folded, first_convolution=forward.first_convolution,
                            layout=forward.layout, note=dict(forward.note))
    probe = x[:1]  # as fast_forward checks the folded copy: one input, two passes
    try:
        with torch.inference_mode():
            gap = relative_gap(candidate(probe), forward(probe))
    except Exception:  # noqa: BLE001 - model code that cannot take the swapped layers: the folded copy as it was
        return forward
    if not gap <= agreement:
        return forward
    candidate.note["winograd"] = f"{len(names)} 3x3 convolution(s) as Winograd F(2x2, 3x3) (logits agree to {gap:.1e})"
    return candidate
