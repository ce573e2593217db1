"""The hybrid vision transformer behind `brain-tumor-mri-vit`: a convolutional stem (SmallResNet's first stages), then
torchvision's ViT encoder. In a module of its own so that loading the CNNs never imports torchvision's ViT.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from medlens.errors import ModelError
from medlens.models.networks import SmallResNet


class HybridViT(VisionTransformer):
    """A small vision transformer whose patch embedding is a convolutional stem (the hybrid of Dosovitskiy et al.
    2021; Xiao et al. 2021, "Early convolutions help transformers see better"): SmallResNet's first stages (conv1,
    bn1, maxpool, then layer1 .. layerK, one per stem width) and a projection to `hidden_dim` that brings the grid to
    1/16 of the input, so one token per 16 x 16 pixels; then torchvision's ViT encoder with a class token
    (`encoder.layers`, `ln`, `heads`).

    It is a `torchvision.models.VisionTransformer` with `conv_proj` replaced (grayscale in, patch size 16), so the
    stem's names are SmallResNet's under `conv_proj.` and a SmallResNet's weights can start it (`load_cnn_stem`).
    """

    def __init__(self, num_classes: int = 3, in_channels: int = 1, image_size: int = 128,
                 stem_widths: Sequence[int] = (32, 64, 128), hidden_dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_dim: int = 192, dropout: float = 0.0) -> None:
        super().__init__(image_size=image_size, patch_size=16, num_layers=depth, num_heads=heads, hidden_dim=hidden_dim,
                         mlp_dim=mlp_dim, dropout=dropout, num_classes=num_classes)
        widths = [int(w) for w in stem_widths]
        if not 1 <= len(widths) <= 3:
            raise ModelError(f"HybridViT takes one to three stem widths (SmallResNet's layer1 to layer3), not {widths}.")
        stem = SmallResNet(in_channels=in_channels, widths=(*widths, *[1] * (4 - len(widths))))
        layers: OrderedDict[str, nn.Module] = OrderedDict(conv1=stem.conv1, bn1=stem.bn1, relu=stem.relu,
                                                          maxpool=stem.maxpool)
        for i in range(len(widths)):
            layers[f"layer{i + 1}"] = getattr(stem, f"layer{i + 1}")
        patch = 16 // (4 * 2 ** (len(widths) - 1))  # the stem's grid is 1/4, 1/8 or 1/16 of the input
        layers["proj"] = nn.Conv2d(widths[-1], hidden_dim, kernel_size=patch, stride=patch)
        self.conv_proj = nn.Sequential(layers)
        nn.init.trunc_normal_(self.class_token, std=0.02)

    def load_cnn_stem(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Copy a SmallResNet state dict's conv1, bn1 and stem stages into the stem (the rest starts fresh).

        Returns:
            The stem keys copied.

        Raises:
            ModelError: the state dict lacks a stem key or its shape differs.
        """
        own = self.conv_proj.state_dict()
        wanted = [k for k in own if not k.startswith("proj.")]
        bad = [k for k in wanted if k not in state or state[k].shape != own[k].shape]
        if bad:
            raise ModelError(f"the starting weights do not fit this network's convolutional stem ({bad[:3]} missing or "
                             f"of another shape); give a SmallResNet state dict with the same first widths.")
        self.conv_proj.load_state_dict({**own, **{k: state[k] for k in wanted}})
        return wanted
